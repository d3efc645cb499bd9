"""Where the adapters' time goes in a full-size U-Net: each adapted layer shape, frozen against adapted.

    .venv/bin/python benchmarks/unet_layers.py [--family sd1|sdxl] [--res 256] [--dora [--detach-norm]] [--top 20]
        [--tiny]

Builds the U-Net of the stock architecture with random fp32 weights, attaches the trainer's LoCon network
(network_dim 8 / alpha 4, conv_dim 8 / alpha 4; --dora adds dora_wd, --detach-norm dora_detach_norm), records
the input every adapted layer sees in one forward, and then, per distinct (layer, input shape), times forward
+ backward to the input of the frozen layer alone and of the adapted layer (adapter weights random, so no path
is skipped), alternating the two in rounds. The table lists shapes by their total extra (extra per call x
calls per pass), beside the adapter's multiply-add share for that layer and the path it took. Isolated layers,
not the network: the sums are a map of the extra, not the step's own figure (benchmarks/train_step.py is).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import arch, materialize, unet_inputs  # noqa: E402  (sets torchvision aside first)

import torch  # noqa: E402


def adapted_unet(family: str, tiny: bool, dora: bool, detach_norm: bool = False):
    from lorakit.models.configs import build_unet
    from lorakit.surgery.config import NetworkConfig
    from lorakit.surgery.network import create_network

    unet = materialize(build_unet(arch(family, tiny), "meta"), torch.float32, "cpu").requires_grad_(False)
    config = NetworkConfig(network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4, dora_wd=dora,
                           dora_detach_norm=dora and detach_norm)
    network = create_network(unet, config=config, seed=0)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if not name.endswith("magnitude"):  # a DoRA magnitude stays ‖W‖: random factors are enough
                p.normal_(0, 0.02)
    return unet, network


def layer_inputs(unet, network, res: int) -> dict[tuple, list[str]]:
    """Adapter names grouped by (kind, weight shape, stride, input shape) as one forward sees them."""
    seen = {}

    def hook(name):
        return lambda _module, args: seen.setdefault(name, tuple(args[0].shape)) and None

    handles = [a.layer.register_forward_pre_hook(hook(n)) for n, a in network.adapters.items()]
    x, t, ctx, extra = unet_inputs(unet, res)
    with torch.no_grad():
        unet(x, t, ctx, added_cond_kwargs=extra)
    for h in handles:
        h.remove()
    groups = defaultdict(list)
    for name, shape in seen.items():
        spec = network.adapters[name].spec
        groups[(spec.kind, tuple(spec.weight_shape), tuple(spec.stride), shape)].append(name)
    return groups


def time_layer(adapter, shape: tuple, rounds: int, reps: int) -> tuple[float, float]:
    """Median ms of forward + backward to the input: (frozen alone, adapted)."""
    layer = adapter.layer
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn_like(layer(x))
    params = list(adapter.parameters())

    def adapted():
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(grad)

    def frozen():
        x.grad = None
        adapter._base(x).backward(grad)  # the frozen layer's own op, as its unpatched forward runs it

    samples = {frozen: [], adapted: []}
    for f in samples:
        f()
    for _ in range(rounds):
        for f, out in samples.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                f()
                out.append(time.perf_counter() - t0)
    return statistics.median(samples[frozen]) * 1e3, statistics.median(samples[adapted]) * 1e3


def path_of(adapter, x: torch.Tensor) -> str:
    path = adapter._choose_mode(x)
    if path != "bypass":
        return path
    if adapter.runs_dora_gemm(x):
        return "gemm"
    return "folded" if adapter.folds(x) else "fused" if adapter._fused_node(x) is not None else "bypass"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    parser.add_argument("--res", type=int, default=256, help="pixels (--tiny divides by 4)")
    parser.add_argument("--dora", action="store_true", help="dora_wd (input axis, the default layout)")
    parser.add_argument("--detach-norm", action="store_true", help="with --dora: dora_detach_norm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5, help="calls per round and layer")
    parser.add_argument("--top", type=int, default=20, help="rows shown (the sums count every shape)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny U-Net: seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorakit.training.precision import keep_large_buffers

    keep_large_buffers(torch.device("cpu"))  # the trainer's allocator setting
    res = args.res // 4 if args.tiny else args.res
    unet, network = adapted_unet(args.family, args.tiny, args.dora, args.detach_norm)
    rows = []
    for (kind, weight, stride, shape), names in layer_inputs(unet, network, res).items():
        adapter = network.adapters[names[0]]
        frozen_ms, adapted_ms = time_layer(adapter, shape, args.rounds, args.reps)
        x = torch.empty(shape)
        share = adapter.training_flops(x) / (2 * adapter._output_positions(x) * adapter.layer.weight.numel()) - 1
        rows.append((kind, weight, stride, shape, len(names), frozen_ms, adapted_ms, share, path_of(adapter, x)))
    frozen_sum = sum(r[5] * r[4] for r in rows)
    adapted_sum = sum(r[6] * r[4] for r in rows)
    dora = (" + DoRA, norm detached" if args.detach_norm else " + DoRA") if args.dora else ""
    print(f"# {arch(args.family, args.tiny)} at {res} px, fp32, LoCon 8/4 conv 8/4{dora}, "
          f"{len(network.adapters)} adapters in {len(rows)} shapes, {args.threads} threads, torch {torch.__version__}")
    print(f"# every shape x its calls: frozen {frozen_sum:.0f} ms, adapted {adapted_sum:.0f} ms, extra "
          f"{adapted_sum - frozen_sum:.0f} ms ({(adapted_sum - frozen_sum) / frozen_sum:.1%})\n")
    print("| layer | weight | stride | input | calls | frozen ms | adapted ms | extra x calls ms | extra / frozen "
          "| FLOP share | path |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows.sort(key=lambda r: (r[5] - r[6]) * r[4])  # largest extra first
    for kind, weight, stride, shape, n, f, a, share, path in rows[:args.top]:
        print(f"| {kind} | {weight} | {stride} | {shape} | {n} | {f:.2f} | {a:.2f} | {(a - f) * n:.1f} | "
              f"{(a - f) / f:.3f} | {share:.3f} | {path} |")


if __name__ == "__main__":
    main()
