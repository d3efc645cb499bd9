"""Training-step cost on the embedded tiny model: LoCon (network_dim 8 / conv_dim 8) at batch 4, 64x64 images.

    .venv/bin/python benchmarks/tiny_step.py [--reps 20] [--threads 2]

Prints the median s/step of the LoCon step (U-Net forward + backward with adapters, AdamW step; latents and
text embeddings precomputed as a trainer caches them) next to the frozen U-Net's own forward + backward.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.modules.setdefault("torchvision", None)
import torch  # noqa: E402

from lorakit.models.tiny import load_pipeline  # noqa: E402
from lorakit.surgery.config import NetworkConfig  # noqa: E402
from lorakit.surgery.network import create_network  # noqa: E402


def timed(step, reps: int) -> float:
    for _ in range(3):
        step()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    unet = pipe.unet.requires_grad_(False)
    b = args.batch
    latents = torch.randn(b, 4, 8, 8, requires_grad=True)
    context = torch.randn(b, 77, unet.config.cross_attention_dim)
    t = torch.randint(0, 1000, (b,))

    def frozen_step():
        latents.grad = None
        unet(latents, t, context).sample.square().mean().backward()

    frozen = timed(frozen_step, args.reps)
    net = create_network(unet, [], NetworkConfig(network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4,
                                                 train_text_encoder=False))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = latents.detach()

    def locon_step():
        loss = unet(x, t, context).sample.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    locon = timed(locon_step, args.reps)
    print(f"# embedded tiny model, batch {b}, CPU {args.threads} threads, torch {torch.__version__}, median of {args.reps}\n")
    print("| step | s/step |\n|---|---|")
    print(f"| frozen U-Net forward+backward (input grad) | {frozen:.3f} |")
    print(f"| LoCon training step ({net.counts()['unet']} modules, {net.trainable_parameters():,} params) | {locon:.3f} |")


if __name__ == "__main__":
    main()
