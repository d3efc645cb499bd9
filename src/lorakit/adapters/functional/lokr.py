"""LoKr math: ΔW = scale · kron(W1, W2).

With (a, b) = factorization(out) and (c, d) = factorization(in):
    W1 [a, c]               full `w1`, or `w1a [a, r] @ w1b [r, c]`
    W2 [b, d(, kh, kw)]     full `w2`, or `w2a [b, r] @ w2b [r, d·kh·kw]` (w2b may be 4-D [r, d, kh, kw]),
                            or Tucker `t2 [r, r, kh, kw]`, `w2a [r, b]`, `w2b [r, d]`
ΔW[i·b+p, j·d+q, ...] = W1[i, j] · W2[p, q, ...].
Scale is alpha / r when a side is factorised, and 1 when both sides are full matrices (the rule A1111,
ComfyUI and LyCORIS apply, whatever alpha the file holds).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.adapters.functional.layer import LayerSpec, scale_of
from lorakit.adapters.functional.loha import rebuild_tucker
from lorakit.adapters.functional.lora import kaiming_uniform_


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m <= n and m·n = dim.

    factor > 0 dividing dim gives (factor, dim/factor) sorted; otherwise the most balanced split whose
    smaller side is at most `factor` (no cap for factor <= 0). Same results as LyCORIS.
    """
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    cap = dim if factor <= 0 else factor
    best = 1
    for m in range(1, math.isqrt(dim) + 1):
        if dim % m == 0 and m <= cap:
            best = m
    return best, dim // best


def full_w1(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return weights["w1"] if "w1" in weights else weights["w1a"] @ weights["w1b"]


def full_w2(weights: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """W2 with shape (b, d, *kernel)."""
    if "w2" in weights:
        return weights["w2"]
    if "t2" in weights:
        # einsum output can be non-contiguous and torch.kron rejects that (the bug ComfyUI hits on lokr_t2)
        return rebuild_tucker(weights["t2"], weights["w2a"], weights["w2b"]).contiguous()
    w2a, w2b = weights["w2a"], weights["w2b"]
    b = w2a.shape[0]
    w1_shape = weights["w1"].shape if "w1" in weights else (weights["w1a"].shape[0], weights["w1b"].shape[1])
    d = weight_shape[1] // w1_shape[1]
    return (w2a @ w2b.reshape(w2b.shape[0], -1)).reshape(b, d, *weight_shape[2:])


def is_factorised(weights: dict[str, torch.Tensor]) -> bool:
    return "w1b" in weights or "w2b" in weights


def rank_of(weights: dict[str, torch.Tensor]) -> int | None:
    """Rank used for alpha/r: from w1b or w2b (as ComfyUI reads it, correct for Tucker files too)."""
    if "w1b" in weights:
        return weights["w1b"].shape[0]
    if "w2b" in weights:
        return weights["w2b"].shape[0]
    return None


def scale_for(weights: dict[str, torch.Tensor], alpha: float | None) -> float:
    rank = rank_of(weights)
    return 1.0 if rank is None else scale_of(alpha, rank)  # both sides full: no rank, scale 1


def delta_weight(weights: dict[str, torch.Tensor], scale: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    w1 = full_w1(weights) * scale  # scale the small factor
    w2 = full_w2(weights, weight_shape)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(weight_shape)


def bypass_delta(x: torch.Tensor, spec: LayerSpec, weights: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """kron(W1, W2)·x without building the Kronecker product.

    Input channels are c groups of d: y[i·b+p] = Σ_j W1[i, j] · (W2 · x_j)[p]. So W2 runs once per group
    (as a conv with the layer's geometry, or a matmul) and W1 mixes the groups: about 1/a of the dense cost.
    """
    w1 = full_w1(weights) * scale  # (a, c)
    w2 = full_w2(weights, spec.weight_shape)  # (b, d[, kh, kw])
    a, c = w1.shape
    b, d = w2.shape[:2]
    if not spec.is_conv:
        lead = x.shape[:-1]
        tokens = x.numel() // x.shape[-1]
        h = x.reshape(tokens, c, d).transpose(0, 1) @ w2.T  # (c, T, b): c GEMMs instead of T tiny ones
        y = (w1 @ h.reshape(c, tokens * b)).reshape(a, tokens, b)  # one GEMM mixes the groups
        return y.transpose(0, 1).reshape(*lead, a * b)
    n = x.shape[0]
    h = F.conv2d(x.reshape(n * c, d, *x.shape[2:]), w2, None, spec.stride, spec.padding, spec.dilation)
    out_hw = h.shape[2:]
    y = w1 @ h.reshape(n, c, -1)  # (n, a, b·H'·W')
    return y.reshape(n, a * b, *out_hw)


def bypass_flops(weights: dict[str, torch.Tensor], spec: LayerSpec, positions: int) -> int:
    """Multiply-adds of bypass_delta: W2 on each of the c input groups, then W1 across groups."""
    a, c = weights["w1"].shape if "w1" in weights else (weights["w1a"].shape[0], weights["w1b"].shape[1])
    b, d = spec.out_features // a, spec.in_features // c
    k = math.prod(spec.kernel) if spec.is_conv else 1
    return positions * (c * b * d * k + a * c * b)


def plan_shapes(spec: LayerSpec, rank: int, factor: int = -1, decompose_both: bool = False,
                use_tucker: bool = False, full_matrix: bool = False,
                unbalanced: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter shapes, with LyCORIS's rules for which side is factorised.

    unbalanced (LyCORIS unbalanced_factorization): the output split (a, b) is swapped to (b, a), so W1 takes
    the larger output factor; the input split is unchanged."""
    a, b = factorization(spec.out_features, factor)
    if unbalanced:
        a, b = b, a
    c, d = factorization(spec.in_features, factor)
    kernel = spec.kernel
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(a, c) / 2 and not full_matrix:
        shapes.update(w1a=(a, rank), w1b=(rank, c))
    else:
        shapes["w1"] = (a, c)
    if full_matrix or rank >= max(b, d) / 2:
        shapes["w2"] = (b, d, *kernel)
    elif use_tucker and spec.is_conv and kernel != (1, 1):
        shapes.update(t2=(rank, rank, *kernel), w2a=(rank, b), w2b=(rank, d))
    else:
        shapes.update(w2a=(b, rank), w2b=(rank, d * math.prod(kernel)))
    return shapes


def init_weights(spec: LayerSpec, rank: int, factor: int = -1, decompose_both: bool = False,
                 use_tucker: bool = False, full_matrix: bool = False, dtype=None, device=None,
                 generator: torch.Generator | None = None, use_scalar: bool = False,
                 unbalanced: bool = False) -> dict[str, torch.Tensor]:
    """LyCORIS init: W1 side kaiming; full w2 zeros; w2a kaiming, w2b zeros; t2 kaiming. ΔW = 0 at step 0.

    use_scalar (LyCORIS): w2 / w2b kaiming too; the module's scalar, starting at 0, keeps ΔW = 0."""
    shapes = plan_shapes(spec, rank, factor, decompose_both, use_tucker, full_matrix, unbalanced)
    weights = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name in ("w2", "w2b") and not use_scalar:
            t.zero_()
        else:
            kaiming_uniform_(t, generator)
        weights[name] = t
    return weights
