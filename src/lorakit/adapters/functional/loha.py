"""LoHa math (FedPara): ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b).

Layouts (as LyCORIS writes them):
    plain   w1a, w2a [out, r]   w1b, w2b [r, in·kh·kw]  (2-D even for convs; reshaped to the weight shape)
    Tucker  t1, t2 [r, r, kh, kw]   w1a, w2a [r, out]   w1b, w2b [r, in]
            Wj[o,i,h,w] = Σ_ab tj[a,b,h,w] · wja[a,o] · wjb[b,i];  ΔW = scale · W1 ⊙ W2
A rank-r LoHa reaches rank r² (elementwise product of two rank-r matrices).
"""
from __future__ import annotations

import torch

from lorakit.adapters.functional.layer import LayerSpec, draw_device


class _HadamardProduct(torch.autograd.Function):
    """scale · (w1a@w1b) ⊙ (w2a@w2b) that saves only the factors.

    Autograd would keep both full-size products (2 x out·in·k² floats) alive until backward; this
    recomputes them in backward instead, one at a time.
    """

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # ∂/∂(w1a@w1b)
        grad_w1a, grad_w1b = g1 @ w1b.T, w1a.T @ g1
        del g1
        g2 = grad * (w1a @ w1b)  # ∂/∂(w2a@w2b)
        grad_w2a, grad_w2b = g2 @ w2b.T, w2a.T @ g2
        return grad_w1a, grad_w1b, grad_w2a, grad_w2b, None


def rebuild_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[o,i,h,w] = Σ_ab t[a,b,h,w] · wa[a,o] · wb[b,i]  (t [r,r,kh,kw], wa [r,out], wb [r,in])."""
    return torch.einsum("abhw,ao,bi->oihw", t, wa, wb)


def delta_weight(weights: dict[str, torch.Tensor], scale: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    if "t1" in weights:
        w1 = rebuild_tucker(weights["t1"], weights["w1a"], weights["w1b"])
        w2 = rebuild_tucker(weights["t2"], weights["w2a"], weights["w2b"])
        return (w1 * w2 * scale).reshape(weight_shape)
    dw = _HadamardProduct.apply(weights["w1a"], weights["w1b"], weights["w2a"], weights["w2b"], scale)
    return dw.reshape(weight_shape)


def khatri_rao_factors(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1a@w1b) ⊙ (w2a@w2b) = U @ V with U[:, i·r+j] = w1a[:, i]·w2a[:, j] and V[i·r+j] = w1b[i]·w2b[j].

    So a rank-r LoHa is an exact rank-r² LoRA: U [out, r²], V [r², in·k]. At small spatial sizes the
    bypass through U, V costs far less than building the dense ΔW.
    """
    w1a, w1b, w2a, w2b = weights["w1a"], weights["w1b"], weights["w2a"], weights["w2b"]
    r1, r2 = w1a.shape[1], w2a.shape[1]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, w1b.shape[1])
    return up, down


def rank_of(weights: dict[str, torch.Tensor]) -> int:
    return weights["w1b"].shape[0]


def init_weights(spec: LayerSpec, rank: int, use_tucker: bool = False, dtype=None, device=None,
                 generator: torch.Generator | None = None, use_scalar: bool = False) -> dict[str, torch.Tensor]:
    """LyCORIS init: w1b, w2b ~ N(0,1); w1a ~ N(0, 0.1); w2a = 0 so ΔW = 0 at step 0; t1, t2 ~ N(0, 0.1).

    use_scalar (LyCORIS): w2a ~ N(0, 0.1) too; the module's scalar, starting at 0, keeps ΔW = 0."""
    out_ch, in_ch, kernel = spec.out_features, spec.in_features, spec.kernel
    tucker = use_tucker and spec.is_conv and kernel != (1, 1)
    k = 1
    for s in kernel:
        k *= s

    def normal(shape, std):
        at = draw_device(device, generator)
        return (torch.randn(shape, dtype=dtype, device=at, generator=generator) * std).to(device)

    def second_up(shape):
        return normal(shape, 0.1) if use_scalar else torch.zeros(shape, dtype=dtype, device=device)

    if tucker:
        w = {"t1": normal((rank, rank, *kernel), 0.1), "w1a": normal((rank, out_ch), 0.1),
             "w1b": normal((rank, in_ch), 1.0), "t2": normal((rank, rank, *kernel), 0.1),
             "w2a": second_up((rank, out_ch)), "w2b": normal((rank, in_ch), 1.0)}
    else:
        w = {"w1a": normal((out_ch, rank), 0.1), "w1b": normal((rank, in_ch * k), 1.0),
             "w2a": second_up((out_ch, rank)), "w2b": normal((rank, in_ch * k), 1.0)}
    return w
