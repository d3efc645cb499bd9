"""Rank-r products over many positions, split so that every CPU thread takes a share.

A LoRA factor's products pair a rank-r side (r ~ 8) with an activation over thousands of positions:
D x (r, C) @ (C, L), and the factor gradients, which contract over the positions. As one torch.mm such a
product ran far slower than the same arithmetic cut along the positions into one block per thread and run
as one torch.bmm over the blocks (a contraction then adds the blocks' partial products). Measured on a 2-core
AMD EPYC, 2 threads, fp32, each product just after its operand was written, µs plain -> split in two:

    (r, C) @ (C, L)       640 x 4096: 853 -> 538 (D x),   320 x 4096 (Uᵀ g): 448 -> 264,   320 x 1024: 130 -> 76
    (r, L) @ (L, C)       a xᵀ 640 x 4096: 771 -> 513,    320 x 1024: 104 -> 74
    g hᵀ (out, L) @ (L, r) lost (336 -> 432 at 320 x 4096) and stays one GEMM.
Used by the 1x1 conv nodes at batch 1 (channel-major maps). In SD1.5's 1x1 convs at 512 px (43 layers, forward
+ backward) the adapters' extra fell from 82-92 to 70-75 ms; at 256 px it did not move beyond the noise. The
Linear nodes' token-major contractions (hᵀ g over 4096 tokens: 489 -> 346 µs alone) ran slower split inside
the node (LoRA 11.5 -> 11.8 ms), so they stay plain. Below MIN_BLOCK positions per thread nothing is split: at 64
positions it lost.
"""
from __future__ import annotations

import torch

MIN_BLOCK = 128


def blocks(length: int, *tensors: torch.Tensor) -> int:
    """How many blocks a product over `length` positions splits into: one per thread, for contiguous CPU
    tensors (the blocks are views), where each block gets at least MIN_BLOCK positions and they divide evenly;
    otherwise 1 (no split). Under torch.compile also 1: the compiler schedules the product itself, and reading
    the thread count would break its graph."""
    if torch.compiler.is_compiling():
        return 1
    threads = torch.get_num_threads()
    if (threads < 2 or length < threads * MIN_BLOCK or length % threads
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors)):
        return 1
    return threads


def rank_times(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w (r, C) @ t (C, L): (r, L), contiguous."""
    channels, length = t.shape
    n = blocks(length, t)
    if n == 1:
        return w @ t
    parts = torch.bmm(w.expand(n, -1, -1), t.view(channels, n, length // n).transpose(0, 1))  # (n, r, L/n)
    return parts.transpose(0, 1).reshape(w.shape[0], length)


def times_positions(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a (r, L) @ t (C, L)ᵀ: (r, C), the contraction over the positions of two channel-major maps."""
    channels, length = t.shape
    n = blocks(length, a, t)
    if n == 1:
        return a @ t.T
    part = length // n
    return torch.bmm(a.view(a.shape[0], n, part).transpose(0, 1), t.view(channels, n, part).permute(1, 2, 0)).sum(0)
