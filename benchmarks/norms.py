"""Cost of the adapters' ‖ΔW‖ on a full-size U-Net: kohya's max-norm (`scale_weight_norms`, run after every
optimizer step) and the per-block norm log (every epoch's end), LoCon 8/4 conv 8/4 as in train_step.py.

    .venv/bin/python benchmarks/norms.py [--only sd1,sdxl] [--reps 5] [--threads 2] [--tiny]

The U-Net is built with random weights (SD1.5 in fp32, SDXL in bf16, as the train-step rows) and the adapters'
factors are drawn at random, so every ΔW is non-zero. Since the norms come from the factors
(AdapterModule.delta_sq_norm), no ΔW is built; "largest ΔW" is what building them one at a time would have
allocated at once, in fp32. To time the earlier code, put a checkout of it first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.modules.setdefault("torchvision", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import train_step  # noqa: E402

from lorakit.models.configs import build_unet  # noqa: E402
from lorakit.surgery.config import NetworkConfig  # noqa: E402
from lorakit.surgery.network import create_network  # noqa: E402
from lorakit.training.optim import apply_max_norm  # noqa: E402

WEIGHT_DTYPES = {"sd1": torch.float32, "sdxl": torch.bfloat16}


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def measure(family: str, reps: int, tiny: bool) -> dict:
    unet = train_step.materialize(build_unet(train_step.arch(family, tiny), "meta"), WEIGHT_DTYPES[family], "cpu")
    network = create_network(unet, (), NetworkConfig(network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4),
                             seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for p in adapter.parameters():
                p.normal_(0, 0.02, generator=generator)
    adapters = list(network.adapters.values())
    # a cap no ΔW reaches: the norms are computed and nothing is rescaled, so every rep does the same work
    max_norm = median_ms(lambda: apply_max_norm(adapters, 1e9), reps)
    norm_log = median_ms(network.delta_norms, reps)
    largest = max(math.prod(a.spec.weight_shape) for a in adapters) * 4 / 2 ** 20
    return dict(adapters=len(adapters), max_norm=max_norm, norm_log=norm_log, largest=largest)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="sd1,sdxl", help="comma-separated: sd1, sdxl")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny U-Nets of the same layouts: seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# ‖ΔW‖ of every adapter: CPU, {args.threads} threads, torch {torch.__version__}, LoCon 8/4 conv 8/4, "
          f"median of {args.reps}{', tiny models' if args.tiny else ''}\n")
    print("| U-Net | adapters | max-norm, ms per step | norm log, ms per epoch | largest ΔW (fp32 MiB) |")
    print("|---|---|---|---|---|")
    for family in args.only.split(","):
        r = measure(family, args.reps, args.tiny)
        print(f"| {family} | {r['adapters']} | {r['max_norm']:.1f} | {r['norm_log']:.1f} | {r['largest']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
