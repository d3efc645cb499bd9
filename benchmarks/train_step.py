"""Training-step speed and memory at SD1.5 / SDXL size (random weights), through the trainer's own step.

    .venv/bin/python benchmarks/train_step.py [--tiny] [--steps 3] [--warmup 2] [--threads 2] [--only NAME,...]

Every configuration runs in its own subprocess, so its peak RSS (VmHWM) is its own. Each builds a U-Net of
the stock architecture (lorakit.models.configs), its VAE and text encoders with random weights straight in
the run's dtypes, writes a one-image dataset, and runs `lorakit.training.trainer.Trainer` on it: latent and
caption caching, the release of the VAE and text encoders, autocast, the loss, AdamW and a LoCon network
(network_dim 8 / alpha 4, conv_dim 8 / alpha 4, U-Net only) are exactly a user's run. s/step is the median
of the steps after the warm-up (micro-batch start to optimizer step end).

Beside each run: the floor (the same frozen U-Net without adapters, forward + backward to its input, same
dtype, autocast and checkpointing; timed after each training step, alternating with them), the
adapters' FLOP share (torch.utils.flop_counter over forward + backward on a meta-device copy: adapted
minus bare, over bare), step / (floor x (1 + share)) with, in brackets, the lowest and highest of the same
ratio taken per step (each step over the floor timed right after it: the run's own noise), trainable
versus total U-Net parameters, and a full fine-tune's memory: measured for SD1.5 256 px fp32 (AdamW over the
whole U-Net, the trainer's loss) when the machine has the memory, else estimated as this run's peak plus
(16 - w) bytes per U-Net parameter (fp32 weight, gradient and two AdamW moments against the w-byte frozen
weight). SDXL: 512 px bf16 and the peak RSS of an fp32 build of the same model.
--tiny runs the same code on tiny models (64/128 px) in seconds. Progress on stderr, the table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.modules.setdefault("torchvision", None)  # PyPI's torchvision breaks beside CPU torch
import torch  # noqa: E402

GIB = 2 ** 30


@dataclass(frozen=True)
class Run:
    name: str
    family: str  # sd1 / sdxl
    res: int  # pixels, full size (--tiny divides by 4)
    precision: str  # "no" (fp32) / "bf16"
    checkpointing: bool = False
    kind: str = "locon"  # locon / full (full fine-tune) / load (fp32 build only)


RUNS = [Run(f"sd1-{r}-{p}{'-gc' if gc else ''}", "sd1", r, {"fp32": "no"}.get(p, p), gc)
        for r in (256, 512) for p, gc in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))]
RUNS += [Run("sd1-256-full", "sd1", 256, "no", kind="full"), Run("sdxl-512-bf16", "sdxl", 512, "bf16"),
         Run("sdxl-512-bf16-gc", "sdxl", 512, "bf16", True),
         Run("sdxl-load-fp32", "sdxl", 512, "no", kind="load")]
TARGETS = {"sd1-256-bf16": "<= 2.2 s/step, <= 4.0 GiB", "sd1-512-fp32": "<= 6.3 GiB",
           "sdxl-512-bf16": "<= 0.6 x fp32 load", "sdxl-512-bf16-gc": "<= 0.6 x fp32 load"}


def log(msg: str) -> None:
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss() -> int:
    """VmHWM: this process's peak resident set, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux: /proc/self/clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- the model, built in-process in the run's dtypes ------------------------------------------------
def materialize(module: torch.nn.Module, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A meta-device model made real in `dtype` (never an fp32 copy of a half model), with random weights of
    the usual scale: uniform in +-1/sqrt(fan_in) (PyTorch's default init), norms at 1, biases small. The
    values are tiles of one random block (seconds instead of minutes of RNG for 2.6B weights): the speed and
    memory measured do not depend on them. CLIP's position_ids buffer is rebuilt."""
    module = module.to(dtype).to_empty(device=device)
    block = torch.rand(1 << 22, device=device, generator=torch.Generator(device).manual_seed(0)) * 2 - 1
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.view(-1)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                flat.fill_(1.0)
                continue
            scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.01
            for start in range(0, flat.numel(), block.numel()):
                chunk = flat[start:start + block.numel()]
                chunk.copy_(block[:chunk.numel()] * scale)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
    return module.eval()


def arch(family: str, tiny: bool) -> str:
    return f"tiny-{family}" if tiny else family


def build_base(family: str, dtypes: dict, tiny: bool, device: str = "cpu"):
    """A BaseModel (pipeline with U-Net, VAE, text encoders, tokenizers, scheduler) with random weights,
    initialised on `device` (a GPU builds SDXL in a second)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorakit.models.checkpoint import BaseModel
    from lorakit.models.configs import SCHEDULERS, SD_VAE, SDXL_VAE, build_text_encoders, build_unet
    from lorakit.models.tiny import TINY_VAE
    from lorakit.models.tokenizer import clip_tokenizer

    name, weights = arch(family, tiny), dtypes["default"]
    unet = materialize(build_unet(name, "meta"), weights, device)
    encoders = [materialize(te, weights, device) for te in build_text_encoders(name, "meta")]
    with torch.device("meta"):
        vae = AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE if family == "sdxl" else SD_VAE))
    vae = materialize(vae, dtypes["vae"], device)
    scheduler = DDIMScheduler(**SCHEDULERS[family])
    tok = clip_tokenizer()
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae, encoders[0], encoders[1], tok, tok, unet, scheduler)
    else:
        pipe = StableDiffusionPipeline(vae, encoders[0], tok, unet, scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return BaseModel(pipe, family, "epsilon", f"random-weight {name}", [])


def bench_config(run: Run, res: int, folder: Path, steps: int, **overrides):
    """A one-image dataset at `res` and the training config a user would write for this run."""
    import numpy as np
    from PIL import Image

    from lorakit.training.config import build_config

    data = folder / "data" / "1_bench"
    data.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (res, res, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "0.png")
    (data / "0.txt").write_text("a photo of a bench")
    return build_config(dict(dict(
        train_data_dir=str(folder / "data"), resolution=res, train_batch_size=1, max_train_steps=steps,
        network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4, network_train_unet_only=True,
        mixed_precision=run.precision, learning_rate=1e-4, gradient_checkpointing=run.checkpointing,
        output_dir=str(folder / "out"), output_name="bench", seed=0), **overrides))


# ---- measurements ---------------------------------------------------------------------------------
def unet_inputs(unet, res: int, batch: int = 1, device: str = "cpu"):
    """Random latents (needing a gradient: the floor's backward goes to them), timesteps, text embeddings."""
    cfg = unet.config
    x = torch.randn(batch, 4, res // 8, res // 8, device=device, requires_grad=True)
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, device=device)
    extra = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(batch, pooled, device=device),
                 "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device, dtype=torch.float32)}
    return x, t, ctx, extra


def fwd_bwd(unet, inputs, dtype: torch.dtype | None) -> None:
    x, t, ctx, extra = inputs
    amp = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with amp:
        out = unet(x, t, ctx, added_cond_kwargs=extra).sample
    out.float().square().mean().backward()
    x.grad = None


def flop_share(unet, network, inputs) -> float:
    """The adapters' extra FLOPs over the bare U-Net's, both for forward + backward: the bare U-Net counted
    by torch.utils.flop_counter on one real step (adapters detached), each adapter by its own multiply-add
    model (AdapterModule.training_flops, on the input its layer saw in that step, in the path it picks),
    less the 2F its frozen layer alone costs. A layer whose forward ran more than once in the step (gradient
    checkpointing recomputes it; the counter counts the bare U-Net's recomputation too) adds the adapter's
    forward again each time (AdapterModule.recompute_flops)."""
    from torch.utils.flop_counter import FlopCounterMode

    seen, calls = {}, dict.fromkeys(network.adapters, 0)

    def record(name, _, args):  # returns None: the layer's input is left as it is
        seen.setdefault(name, torch.empty(args[0].shape, dtype=args[0].dtype, device="meta"))
        calls[name] += 1

    hooks = [network.layer(name).register_forward_pre_hook(partial(record, name)) for name in network.adapters]
    x, t, ctx, extra = inputs  # in the weights' dtype, without autocast (which the counter trips): same FLOPs
    weights = next(unet.parameters()).dtype
    cast = (x.detach().to(weights).requires_grad_(), t, ctx.to(weights),
            extra and {k: v.to(weights) for k, v in extra.items()})
    with FlopCounterMode(display=False) as counter:
        fwd_bwd(unet, cast, None)
    for hook in hooks:
        hook.remove()
    extra = 0
    with torch.enable_grad():  # the path an adapter picks depends on whether a gradient is wanted
        for name, adapter in network.adapters.items():
            x = seen[name]
            frozen = adapter._output_positions(x) * math.prod(adapter.spec.weight_shape)
            extra += adapter.training_flops(x) - 2 * frozen + (calls[name] - 1) * adapter.recompute_flops(x)
    return 2 * extra / counter.get_total_flops()  # multiply-adds are 2 FLOPs each


def median_time(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def timed_steps(trainer, floor_step=None) -> tuple[list[float], list[float], list[int]]:
    """Seconds of each optimizer step of trainer.run() (from its micro-batch's start to the optimizer step's
    end) and, with floor_step, the floor timed right after each step with the adapters detached: step and
    floor alternate in one process, so a shared machine's drift hits both alike (measured: a floor timed
    only after training read 2.3-5.4 s beside 2.8 s before it, on the same quiet machine).
    The third list: the peak RSS before each floor. Each floor's own peak is then reset (where Linux allows),
    so the run's peak is the training's, not the instrument's (SDXL: the floor's allocations had set it)."""
    times, floors, started, peaks = [], [], [], []
    micro_batch, optimizer_step = trainer.micro_batch, trainer._optimizer_step

    def timed_micro_batch(*args):
        started.append(time.perf_counter())
        return micro_batch(*args)

    def timed_optimizer_step(*args):
        optimizer_step(*args)
        times.append(time.perf_counter() - started[0])
        started.clear()
        if floor_step is not None:
            peaks.append(peak_rss())
            trainer.network.restore()
            t0 = time.perf_counter()
            floor_step()
            floors.append(time.perf_counter() - t0)
            trainer.network.apply_to()
            if not reset_peak_rss():
                peaks.append(peak_rss())  # cannot separate them: the floor's peak counts

    trainer.micro_batch, trainer._optimizer_step = timed_micro_batch, timed_optimizer_step
    return times, floors, peaks


def unet_params(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def run_locon(run: Run, res: int, args, folder: Path) -> dict:
    from lorakit.training.precision import choose
    from lorakit.training.trainer import Trainer

    cfg = bench_config(run, res, folder, args.warmup + args.steps)
    trainer = Trainer(cfg, "cpu", base=build_base(run.family, choose(cfg).load_dtypes(), args.tiny))
    inputs, dtype = unet_inputs(trainer.unet, res), choose(cfg).autocast
    times, floors, peaks = timed_steps(trainer, lambda: fwd_bwd(trainer.unet, inputs, dtype))
    log(f"{run.name}: built, {peak_rss() / GIB:.2f} GiB; training {cfg.max_train_steps} steps")
    result = trainer.run()
    peak = max([peak_rss(), *peaks])  # building, caching and training; not the floors run between steps
    log(f"{run.name}: steps {', '.join(f'{s:.2f}' for s in times)} s; floors "
        f"{', '.join(f'{s:.2f}' for s in floors)} s; losses {', '.join(f'{v:.4f}' for v in result.losses)}")
    trainer.network.restore()  # the same U-Net, mode and checkpointing, without adapters
    share = flop_share(trainer.unet, trainer.network, inputs)
    floor = statistics.median(floors[args.warmup:])
    unet = trainer.unet
    pairs = [t / f for t, f in zip(times[args.warmup:], floors[args.warmup:])]  # each step over its own floor
    return dict(step=statistics.median(times[args.warmup:]), first=times[0], peak=peak, floor=floor, share=share,
                pairs=pairs,
                trainable=trainer.network.trainable_parameters(), total=unet_params(unet),
                weight_bytes=next(unet.parameters()).element_size(), losses=result.losses)


def run_full(run: Run, res: int, args, folder: Path) -> dict:
    """A full fine-tune step: every U-Net weight trained by AdamW (16 B/param in fp32), the trainer's loss."""
    from lorakit.training.data import LatentCache
    from lorakit.training.optim import make_optimizer
    from lorakit.training.precision import choose
    from lorakit.training.trainer import Trainer

    cfg = bench_config(run, res, folder, 1)
    trainer = Trainer(cfg, "cpu", base=build_base(run.family, choose(cfg).load_dtypes(), args.tiny))
    need = 12 * unet_params(trainer.unet) + 2 * GIB  # gradients, two moments, activations; weights are in
    if mem_available() < need:
        return dict(skipped=f"needs ~{need / GIB:.1f} GiB more, {mem_available() / GIB:.1f} GiB available")
    trainer.network.restore()
    cache = LatentCache.build(trainer.report.items, trainer.vae)
    trainer.release_frozen(cache)
    unet = trainer.unet.train().requires_grad_(True)
    optimizer = make_optimizer("AdamW", [{"params": list(unet.parameters())}], cfg.learning_rate, trainer.device)
    latents, caption = torch.stack(cache.latents), [trainer.report.items[0].caption]

    def step():
        loss = trainer.loss(latents, caption, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, 1, max(1, args.steps // 2))
    return dict(step=seconds, peak=peak_rss(), total=unet_params(unet))


def run_load(run: Run, res: int, args, folder: Path) -> dict:
    base = build_base(run.family, {"default": torch.float32, "vae": torch.float32}, args.tiny)
    return dict(peak=peak_rss(), total=unet_params(base.pipeline.unet))


def child(run: Run, args) -> None:
    torch.set_num_threads(args.threads)
    res = run.res // 4 if args.tiny else run.res
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        runner = {"locon": run_locon, "full": run_full, "load": run_load}[run.kind]
        out = runner(run, res, args, Path(tmp))
    print(json.dumps(out))


# ---- the parent: one subprocess per run, one table ----------------------------------------------
def half_skip(run: Run, args) -> str | None:
    """Full-size bf16 on a CPU without native bf16 takes hours a step (the trainer says so too): not run."""
    from types import SimpleNamespace

    from lorakit.training.precision import cpu_half_note

    if run.precision == "no" or args.tiny or args.force_half:
        return None
    note = cpu_half_note(SimpleNamespace(mixed_precision=run.precision), torch.device("cpu"))
    return note and (f"not run: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}, no "
                     "AVX512_BF16/AMX); a bf16 3x3 conv runs ~70x slower than fp32 here (--force-half runs it)")


def measure(run: Run, args) -> dict:
    skip = half_skip(run, args)
    if skip:
        log(f"{run.name}: {skip}")
        return dict(skipped=skip)
    log(f"{run.name}: starting")
    cmd = [sys.executable, __file__, "--child", run.name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        log(f"{run.name}: failed (exit {proc.returncode})")
        return dict(failed=f"exit {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"{run.name}: done in {time.perf_counter() - t0:.0f} s: {out}")
    return out


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def full_ft_peak(run: Run, r: dict, results: dict) -> tuple[float, str]:
    """(bytes, how): the full fine-tune's peak, measured where it ran (SD1.5 256 px fp32), else estimated from
    this run's peak plus what full training adds per U-Net parameter: (16 - w) bytes for fp32 weight, gradient
    and two AdamW moments against the frozen w-byte weight."""
    full = results.get("sd1-256-full") or {}
    if run.name == "sd1-256-fp32" and "peak" in full:
        return full["peak"], "measured"
    return r["peak"] + (16 - r["weight_bytes"]) * r["total"], "est."


def target(run: Run, r: dict, results: dict, tiny: bool) -> str:
    if tiny:
        return "- (tiny)"
    if run.precision == "no":
        bound = r["floor"] * (1 + r["share"]) * 1.10
        verdicts = [f"step <= (floor + share) x 1.1 = {bound:.2f} s: {'met' if r['step'] <= bound else 'MISSED'}"]
    else:
        verdicts = []
    if run.name == "sd1-256-bf16":
        ok = r["step"] <= 2.2 and r["peak"] <= 4.0 * GIB
        verdicts.append(f"<= 2.2 s and <= 4.0 GiB: {'met' if ok else 'MISSED'}")
    if run.name == "sd1-512-fp32":
        verdicts.append(f"<= 6.3 GiB: {'met' if r['peak'] <= 6.3 * GIB else 'MISSED'}")
    load = results.get("sdxl-load-fp32", {})
    if run.name.startswith("sdxl-512-bf16") and "peak" in load:
        ratio = r["peak"] / load["peak"]
        verdicts.append(f"{ratio:.2f} x fp32 load (<= 0.6): {'met' if ratio <= 0.6 else 'MISSED'}")
    return "; ".join(verdicts) or "-"


HEADER = ("| run | s/step | first step s | floor s | FLOP share | step / (floor x (1+share)) [per step] | "
          "peak RSS GiB | full FT peak GiB | peak / full FT | trainable / total params | target (full size) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def ratio_cell(r: dict) -> str:
    """step / (floor x (1 + share)) from the medians, then [lowest-highest] of the per-step ratios when there
    are two or more: how far this run's noise moves the verdict."""
    bound = 1 + r["share"]
    cell = f"{r['step'] / (r['floor'] * bound):.2f}"
    pairs = r.get("pairs") or []
    return cell + (f" [{min(pairs) / bound:.2f}-{max(pairs) / bound:.2f}]" if len(pairs) > 1 else "")


def row(run: Run, r: dict, results: dict, tiny: bool) -> str:
    if "step" not in r or "floor" not in r:
        return f"| {run.name} | {r.get('failed', r.get('skipped', '-'))} |" + " |" * 10
    ft, how = full_ft_peak(run, r, results)
    return (f"| {run.name} | {r['step']:.2f} | {r['first']:.2f} | {r['floor']:.2f} | {r['share']:.1%} | "
            f"{ratio_cell(r)} | {gib(r['peak'])} | {gib(ft)} ({how}) | "
            f"{r['peak'] / ft:.2f} | {r['trainable']:,} / {r['total']:,} ({r['total'] / r['trainable']:,.0f}x) | "
            f"{target(run, r, results, tiny)} |")


def print_tables(runs: list[Run], results: dict, args) -> None:
    size = "tiny (64/128 px, not the targets' size)" if args.tiny else "full size"
    print(f"# lorakit train step, {size}: CPU, {args.threads} threads, torch {torch.__version__}, batch 1, "
          f"LoCon 8/4 conv 8/4 U-Net only, median of {args.steps} steps after {args.warmup} warm-up\n")
    for family, title in (("sd1", "SD1.5-architecture U-Net"), ("sdxl", "SDXL-architecture U-Net")):
        mine = [run for run in runs if run.family == family and run.kind == "locon"]
        if mine:
            print(f"## {title}\n\n{HEADER}")
            for run in mine:
                print(row(run, results[run.name], results, args.tiny))
            print()
    full, load = results.get("sd1-256-full"), results.get("sdxl-load-fp32")
    if full:
        text = (f"peak RSS {gib(full['peak'])} GiB, {full['step']:.2f} s/step" if "peak" in full
                else f"not measured: {full.get('skipped') or full.get('failed')}; the estimate is used")
        print(f"Full fine-tune (SD1.5 256 px fp32, AdamW over all {full.get('total', 0):,} U-Net params): {text}.")
    if load:
        print(f"SDXL fp32 build (U-Net, VAE, text encoders): peak RSS {gib(load.get('peak'))} GiB.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 1/4 the resolution: seconds")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps left out of the medians: the first two still grow the heap (SD1.5 256 px fp32: "
                             "162k and 35k minor page faults, then under 200 a step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help=f"comma-separated runs out of {', '.join(r.name for r in RUNS)}")
    parser.add_argument("--force-half", action="store_true", help="run bf16 rows on CPUs without native bf16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_name = {r.name: r for r in RUNS}
    if args.child:
        return child(by_name[args.child], args)
    names = args.only.split(",") if args.only else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(by_name)}")
    runs = [by_name[n] for n in names]
    results = {run.name: measure(run, args) for run in runs}
    print_tables(runs, results, args)


if __name__ == "__main__":
    main()
