"""Where a GPU training step goes: the adapted U-Net against the bare one, and torch.profiler's top ops.

    bash benchmarks/gpu.sh --profile [--tiny]     (sets up the dependencies, then runs this)

For SD1.5 at 512 px and SDXL at 1024 px, bf16, LoCon 8/4 conv 8/4 (benchmarks/train_step.py's builder and
config): the trainer's step (median after the warm-up), the adapted U-Net's forward + backward, the bare
U-Net's (adapters detached), the GPU's busy time per pass, kernel launches and host-device copies per pass,
then the ops with the most host time. A step far above its GPU time is launch-bound (the host, not the GPU,
sets the pace); copies to the host that wait for the queue show as cudaMemcpyAsync.
--tiny runs the same on the CPU with tiny models (64 px).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.modules.setdefault("torchvision", None)  # PyPI's torchvision breaks beside CPU torch
import torch  # noqa: E402

from train_step import Run, bench_config, build_base, fwd_bwd, median_time, timed_steps, unet_inputs  # noqa: E402

PASSES = 3  # forward + backward passes under the profiler; its counts are divided by this


def timed(fn, sync) -> float:
    """Median seconds of fn() to the GPU's end (3 warm-up calls, 10 timed)."""
    return median_time(lambda: (fn(), sync()), warmup=3, steps=10)


def profile(fn, sync, cuda: bool):
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PASSES):
            fn()
        sync()
    return prof.key_averages()


def per_pass(averages, name: str) -> float:
    return sum(e.count for e in averages if e.key == name) / PASSES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models, seconds")
    parser.add_argument("--rows", type=int, default=15, help="ops listed per model")
    parser.add_argument("--models", default="sd1,sdxl", help="comma-separated: sd1 (512 px), sdxl (1024 px)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from lorakit.training.precision import choose
    from lorakit.training.trainer import Trainer

    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# lorakit GPU step profile: {name}, torch {torch.__version__}, bf16, batch 1, LoCon 8/4 conv 8/4\n")
    for family in args.models.split(","):
        res = {"sd1": 512, "sdxl": 1024}[family]
        res = 64 if args.tiny else res
        with tempfile.TemporaryDirectory(prefix="lorakit-prof-") as tmp:
            cfg = bench_config(Run(f"{family}-{res}", family, res, "bf16", False), res, Path(tmp), 13)
            trainer = Trainer(cfg, device, base=build_base(family, choose(cfg).load_dtypes(), args.tiny, device))
            times, _, _ = timed_steps(trainer)
            trainer.run()
            inputs = unet_inputs(trainer.unet, res, device=device)

            def adapted():
                fwd_bwd(trainer.unet, inputs, torch.bfloat16)

            with_adapters = timed(adapted, sync)
            trainer.network.restore()
            bare = timed(adapted, sync)
            trainer.network.apply_to()
            averages = profile(adapted, sync, cuda)
        busy = sum(e.self_device_time_total for e in averages) / PASSES / 1e3 if cuda else float("nan")
        print(f"## {family} {res} px: {len(trainer.network.adapters)} adapters\n\n"
              "| trainer step ms | adapted fwd+bwd ms | bare fwd+bwd ms | GPU busy ms/pass | kernel launches/pass "
              "| cudaMemcpyAsync/pass |\n|---|---|---|---|---|---|\n"
              f"| {statistics.median(times[3:]) * 1e3:.1f} | {with_adapters * 1e3:.1f} | {bare * 1e3:.1f} | {busy:.1f} "
              f"| {per_pass(averages, 'cudaLaunchKernel') + per_pass(averages, 'cuLaunchKernelEx'):.0f} "
              f"| {per_pass(averages, 'cudaMemcpyAsync'):.0f} |\n")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
