"""Forward+backward time of one adapted layer: lorakit vs lycoris-lora and peft, on SD1.5 layer shapes.

    .venv/bin/python benchmarks/adapters.py [--reps 7] [--quick] [--threads 2] [--device cpu|cuda] [--algos dora]
        [--shapes conv1x1]

For every (layer shape, batch) it times the frozen layer alone (forward + grad of the input: the cost a
frozen U-Net layer has in LoRA training) and, per algorithm, each implementation's adapted layer. All
implementations of a row run round-robin, so machine noise hits them alike; the table shows medians. On a
glibc CPU the process takes the allocator setting the trainer uses there (precision.keep_large_buffers: large
blocks from the heap, not a fresh mmap that faults in page by page on every call), for every column alike.

Columns: ours/best = our time over the faster reference (target <= 0.8); overhead = our time over the
frozen layer; FLOP ratio = multiply-adds of our path over the frozen layer's; overhead/FLOPs = how far the
time overhead exceeds the arithmetic (target <= 1.3); frozen/best = the frozen layer's own time over the faster
reference: the lowest ours/best any adapter over this frozen op could reach (where it is above 0.8, that
target is out of reach of any implementation that runs PyTorch's op for the frozen layer).

dora = LoRA with DoRA on the output axis (LyCORIS dora_wd with its default wd_on_output, peft use_dora: the
axis all three share). A reference whose output does not change when its DoRA magnitude does is not computing
DoRA (lycoris-lora 4.1.3's bypass mode drops weight_decompose): its cell reads "not DoRA" and it is left out
of "best". lorakit's dora (like LyCORIS's) back-propagates through the norm ‖W + ΔW‖; peft treats it as a
constant, less work. dora_detached is lorakit with dora_detach_norm, the gradient peft computes: its only
reference is peft (LyCORIS has no such mode: n/a).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

sys.modules.setdefault("torchvision", None)  # PyPI's torchvision breaks beside CPU torch; peft must not import it
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lorakit.adapters.functional.layer import LayerSpec  # noqa: E402
from lorakit.adapters.modules.lora import LoRAOptions  # noqa: E402
from lorakit.adapters.registry import get_algorithm  # noqa: E402
from lorakit.training.precision import keep_large_buffers  # noqa: E402

RANK, ALPHA = 8, 4.0
SHAPES = [  # label, layer factory, input shape without batch
    ("conv3x3 320->320 @64x64", lambda: nn.Conv2d(320, 320, 3, padding=1), (320, 64, 64)),
    ("conv3x3 1280->1280 @8x8", lambda: nn.Conv2d(1280, 1280, 3, padding=1), (1280, 8, 8)),
    ("conv1x1 640->320 @64x64", lambda: nn.Conv2d(640, 320, 1), (640, 64, 64)),  # a 512 px up-block shortcut
    ("linear 320->320 x4096 tok", lambda: nn.Linear(320, 320), (4096, 320)),
]
ALGOS = ["lora", "loha", "lokr", "dora", "dora_detached"]
DORA = ("dora", "dora_detached")


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def ours(layer, algo):
    spec, device = LayerSpec.of(layer), layer.weight.device
    if algo in DORA:
        options = LoRAOptions(dora_wd=True, wd_on_output=True, dora_detach_norm=algo == "dora_detached")
        adapter = get_algorithm("lora").module.create(spec, RANK, ALPHA, options, device=device)
    else:
        adapter = get_algorithm(algo).module.create(spec, RANK, ALPHA, device=device)
    adapter.attach(layer)
    return layer, list(adapter.parameters()), adapter, getattr(adapter, "magnitude", None)


def lycoris(layer, algo, bypass):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule, "dora": LoConModule}[algo]
    dora = {"weight_decompose": True, "wd_on_out": True} if algo == "dora" else {}
    module = cls("bench", layer, 1.0, RANK, ALPHA, bypass_mode=bypass, **dora).to(layer.weight.device)
    module.apply_to()
    return layer, list(module.parameters()), None, getattr(module, "dora_scale", None)


def peft(layer, algo):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    configs = {"lora": LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["layer"]),
               "loha": LoHaConfig(r=RANK, alpha=ALPHA, target_modules=["layer"]),
               "lokr": LoKrConfig(r=RANK, alpha=ALPHA, target_modules=["layer"]),
               "dora": LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["layer"], use_dora=True)}
    config = configs["dora" if algo in DORA else algo]  # peft's DoRA always detaches its norm
    model = inject_adapter_in_model(config, Holder(layer))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    magnitude = next((p for n, p in model.named_parameters() if "lora_magnitude_vector" in n), None)
    return model, params, None, magnitude


def randomize(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)


@torch.no_grad()
def ignores_magnitude(model, magnitude, x) -> bool:
    """True when doubling the DoRA magnitude leaves the output as it was: that path is not DoRA."""
    before = model(x)
    magnitude.mul_(2)
    after = model(x)
    magnitude.div_(2)
    return torch.allclose(before, after)


def step_fn(model, params, x, grad_out):
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        model(x).backward(grad_out)
    return step


def time_round_robin(steps: dict, reps: int, sync) -> dict[str, float]:
    for step in steps.values():  # warm-up: allocator, oneDNN primitive caches
        step(); step()
    samples = {k: [] for k in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1000 for k, v in samples.items()}


def bench_row(label, factory, shape, batch, reps, device, sync, algos=ALGOS):
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device, requires_grad=True)
    frozen = factory().to(device).requires_grad_(False)
    grad_out = torch.randn_like(frozen(x))
    rows = []
    for algo in algos:
        not_dora = set()
        impls = {"lorakit": lambda layer: ours(layer, algo),
                 "lycoris bypass": lambda layer: lycoris(layer, algo, True),
                 "lycoris rebuild": lambda layer: lycoris(layer, algo, False),
                 "peft": lambda layer: peft(layer, algo)}
        if algo == "dora_detached":  # only peft computes this gradient
            impls = {k: v for k, v in impls.items() if k in ("lorakit", "peft")}
        steps, adapter = {"frozen": step_fn(frozen, [], x, grad_out)}, None  # timed in the same rounds
        for name, build in impls.items():
            layer = factory().to(device).requires_grad_(False)
            layer.load_state_dict(frozen.state_dict())
            try:
                model, params, maybe_adapter, magnitude = build(layer)
            except Exception as e:  # a reference that cannot wrap this layer is reported, not fatal
                print(f"  {name} {algo} {label}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            adapter = maybe_adapter or adapter
            randomize(params)
            if algo in DORA and (magnitude is None or ignores_magnitude(model, magnitude, x)):
                not_dora.add(name)
                continue
            steps[name] = step_fn(model, params, x, grad_out)
        times = time_round_robin(steps, reps, sync)
        base_ms = times.pop("frozen")
        refs = [v for k, v in times.items() if k != "lorakit"]
        flop_ratio = adapter.training_flops(x.detach()) / (2 * adapter._output_positions(x) *
                                                          frozen.weight.numel())
        path = adapter._choose_mode(x)
        if path == "bypass":
            path = "gemm" if adapter.runs_dora_gemm(x) else "folded" if adapter.folds(x) else path
        rows.append((label, batch, algo, base_ms, times, min(refs), flop_ratio, path, not_dora))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 reps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset, e.g. dora")
    parser.add_argument("--shapes", default="", help="only the layers whose label contains this, e.g. conv1x1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    klb = keep_large_buffers(torch.device(args.device))  # the trainer's CPU allocator setting, for every column
    logging.disable(logging.WARNING)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps = 3 if args.quick else args.reps
    batches = (1,) if args.quick else (1, 4)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# adapter forward+backward, rank {RANK}, alpha {ALPHA}, fp32, {name}, torch {torch.__version__}, "
          f"median of {reps}, allocator: {'keep_large_buffers' if klb else 'as found'}\n")
    print("| layer | batch | algo | frozen ms | lorakit ms (path) | lycoris bypass ms | lycoris rebuild ms | "
          "peft ms | ours/best | overhead | FLOP ratio | overhead/FLOPs | frozen/best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, factory, shape in [s for s in SHAPES if args.shapes in s[0]]:
        for batch in batches:
            for row in bench_row(label, factory, shape, batch, reps, device, sync, args.algos.split(",")):
                label_, b, algo, base_ms, t, best, flop_ratio, mode, not_dora = row
                ms = t["lorakit"]
                cells = [f"{t[k]:.1f}" if k in t else "not DoRA" if k in not_dora else "n/a"
                         for k in ("lycoris bypass", "lycoris rebuild", "peft")]
                print(f"| {label_} | {b} | {algo} | {base_ms:.1f} | {ms:.1f} ({mode}) | {' | '.join(cells)} | "
                      f"{ms / best:.2f} | {ms / base_ms:.2f} | {flop_ratio:.2f} | {ms / base_ms / flop_ratio:.2f} | "
                      f"{base_ms / best:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
