"""GPU training-step speed and VRAM through the trainer's own step: SD1.5 at 512 px and SDXL at 1024 px.

    bash benchmarks/gpu.sh [--tiny] [--steps 10] [--budget 420] [--only torch_compile] [--models sd1,sdxl]
    (sets up the dependencies, then runs this)

Random-weight models built on the GPU (benchmarks/train_step.py's builder), a one-image dataset, batch 1,
LoCon 8/4 conv 8/4, U-Net only, `lorakit.training.trainer.Trainer`: it/s (1 / median step after the warm-up)
and peak VRAM (torch.cuda.max_memory_allocated) for bf16, fp16 (GradScaler), 8-bit AdamW (bitsandbytes),
gradient checkpointing and torch_compile. The CUDA-only paths (AdamW8bit, fp16 GradScaler, fp8_base) also
train 30 steps at a higher learning rate and report the loss on fixed noise draws before and after: it must fall.
--tiny runs the same code on the CPU with tiny models (64 px), skipping CUDA-only rows with the reason.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.modules.setdefault("torchvision", None)  # PyPI's torchvision breaks beside CPU torch
import torch  # noqa: E402

from train_step import GIB, Run, bench_config, build_base, log, peak_rss, timed_steps  # noqa: E402


@dataclass(frozen=True)
class Row:
    precision: str = "bf16"
    optimizer: str = "AdamW"
    checkpointing: bool = False
    compile: bool = False
    fp8: bool = False
    check_loss: bool = False  # a CUDA-only path: train longer and show the loss falls
    mode: str = "default"  # dynamo_mode; reduce-overhead: CUDA graphs (the H200's step was launch-bound)

    @property
    def label(self) -> str:
        parts = [self.precision, self.optimizer] + ["grad ckpt"] * self.checkpointing + \
            ["torch_compile" + ("" if self.mode == "default" else f" {self.mode}")] * self.compile + \
            ["fp8_base"] * self.fp8
        return ", ".join(parts)


ROWS = [Row(), Row("fp16", check_loss=True), Row(optimizer="AdamW8bit", check_loss=True), Row(checkpointing=True),
        Row(compile=True), Row(compile=True, mode="reduce-overhead"), Row(checkpointing=True, compile=True),
        Row(fp8=True, check_loss=True)]
MODELS = [("sd1", 512), ("sdxl", 1024)]


def skip_reason(row: Row, cuda: bool) -> str | None:
    if row.optimizer == "AdamW8bit":
        if not cuda:
            return "CUDA only (bitsandbytes)"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            return f"bitsandbytes not installable here ({e.__class__.__name__}: {e})"
    if row.fp8 and not cuda:
        return "CUDA only (float8 weights)"
    if row.mode == "reduce-overhead" and not cuda:
        return "CUDA only (CUDA graphs)"
    if row.check_loss and row.precision == "fp16" and not cuda:
        return "fp16 GradScaler path: CUDA only in this benchmark"
    return None


def fixed_loss(trainer, cache) -> float:
    """The loss on the cached image over 4 fixed noise draws: the same question before and after training."""
    latents = torch.stack(cache.latents).to(trainer.device)
    captions = [item.caption for item in trainer.report.items]
    with torch.no_grad():
        return sum(float(trainer.loss(latents, captions, torch.Generator().manual_seed(s))) for s in range(4)) / 4


def measure(family: str, res: int, row: Row, args, device: str) -> dict:
    from lorakit.training.data import LatentCache
    from lorakit.training.precision import choose
    from lorakit.training.trainer import Trainer

    steps = 30 if row.check_loss else args.warmup + args.steps
    run = Run(f"{family}-{res}", family, res, row.precision, row.checkpointing)
    with tempfile.TemporaryDirectory(prefix="lorakit-gpu-") as tmp:
        cfg = bench_config(run, res, Path(tmp), steps, optimizer_type=row.optimizer, fp8_base=row.fp8,
                           torch_compile=row.compile, dynamo_backend="inductor" if device == "cuda" else "eager",
                           dynamo_mode=row.mode,
                           learning_rate=1e-3 if row.check_loss else 1e-4)
        trainer = Trainer(cfg, device, base=build_base(family, choose(cfg).load_dtypes(), args.tiny, device))
        before = None
        if row.check_loss:
            cache = LatentCache.build(trainer.report.items, trainer.vae)
            before = fixed_loss(trainer, cache)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, _, _ = timed_steps(trainer)
        trainer.run()
        out = dict(step=statistics.median(times[args.warmup:]), first=times[0],
                   vram=torch.cuda.max_memory_allocated() if device == "cuda" else None)
        if row.check_loss:
            out.update(before=before, after=fixed_loss(trainer, cache))
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def cell(row: Row, r: dict) -> str:
    if "skipped" in r:
        return f"| {row.label} | - | - | - | skipped: {r['skipped']} |"
    vram = "-" if r["vram"] is None else f"{r['vram'] / GIB:.2f}"
    loss = ""
    if "before" in r:
        loss = f"loss {r['before']:.4f} -> {r['after']:.4f} ({'falls' if r['after'] < r['before'] else 'DOES NOT FALL'})"
    return f"| {row.label} | {1 / r['step']:.2f} | {r['first']:.2f} | {vram} | {loss} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models, seconds")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420, help="seconds; later rows are skipped past it")
    parser.add_argument("--only", default="", help="comma-separated; only the settings whose label contains one, "
                        "e.g. torch_compile (a second call for rows the first one's budget cut)")
    parser.add_argument("--models", default=",".join(f for f, _ in MODELS), help="comma-separated: sd1, sdxl")
    args = parser.parse_args(argv)
    models = [(f, res) for f, res in MODELS if f in args.models.split(",")]
    rows = [row for row in ROWS if not args.only or any(k.strip() in row.label for k in args.only.split(","))]
    if not models or not rows:
        print(f"nothing selected: --models from {[f for f, _ in MODELS]}, --only from {[r.label for r in ROWS]}",
              file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.tiny:
        print("no CUDA GPU: run with --tiny for the CPU check", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# lorakit GPU train step: {name}, torch {torch.__version__}, batch 1, LoCon 8/4 conv 8/4, U-Net only, "
          f"{args.steps} steps after {args.warmup} warm-up{' (tiny models)' if args.tiny else ''}\n")
    start, failures, results = time.perf_counter(), 0, {}
    # torch_compile rows last, after both models' other rows: compiling a U-Net takes minutes, and past
    # --budget the rows left are skipped, so the budget cuts compile rows rather than SDXL's plain ones; among
    # them, those with gradient checkpointing last
    plan = sorted(((family, row) for family, _ in models for row in rows),
                  key=lambda p: (p[1].compile, p[1].compile and p[1].checkpointing))
    for family, row in plan:
        res = 64 if args.tiny else dict(MODELS)[family]
        reason = skip_reason(row, cuda)
        if reason is None and time.perf_counter() - start > args.budget:
            reason = f"over the {args.budget:.0f} s budget"
        log(f"{family} {res}: {row.label}: {reason or 'running'}")
        try:
            r = dict(skipped=reason) if reason else measure(family, res, row, args, device)
        except Exception as e:  # one failing setting must not hide the others' figures
            failures += 1
            r = dict(skipped=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        results[family, row] = cell(row, r)
        failures += "DOES NOT FALL" in results[family, row]
        log(f"{family} {res}: {results[family, row]}")  # kept even if the run is cut before the tables
    for family, res in models:
        res = 64 if args.tiny else res
        print(f"## {family} {res} px\n\n| setting | it/s | first step s | peak VRAM GiB | CUDA-only path check |\n"
              "|---|---|---|---|---|")
        print("\n".join(results[family, row] for row in rows) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s; peak RSS {peak_rss() / GIB:.2f} GiB")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
