"""Output-axis LoRA-DoRA over a frozen conv with few output positions, as GEMMs that read W once per pass.

Where a conv's weight is large against its activations (SD1.5's 1280-channel 3x3 convs at 8x8 latents: a
59 MB weight, 64 positions), the DoRA norm's two rank-r products with W cost more than the conv itself
would suggest: W Dᵀ in forward and (c ⊙ U)ᵀ W in backward are skinny GEMMs that run far below the speed of
the conv's own (MKL on a 2-core CPU: ~5 ms each for what the conv's GEMM does in ~2 ms as 8 extra
columns). So the conv runs as an im2col GEMM here, with those products as extra columns of it:

    forward   [Z₀ | W Dᵀ] = W [X | Dᵀ]                 X = unfold(x) (n, P), n = in·kh·kw, P = N·Hₒ·Wₒ
              Z = Z₀ + s U (D X),  r = m / ‖W + s U D‖ per row (output_axis_sq from W Dᵀ and D Dᵀ)
              y = r ⊙ Z + b
    backward  ∂Z = r ⊙ g,  ∂r = Σ_P g ⊙ Z,  c = ∂‖W + s U D‖²  (per row, through m / sqrt)
              [∂X₀ | ∂(W Dᵀ)ᵀ W] = Wᵀ [∂Z | 2s c ⊙ U]     ∂x = fold(∂X₀ + s Dᵀ Uᵀ ∂Z)

The two products with W run as MKL GEMMs, or, in float32 with at least ONEDNN_MIN_COLUMNS columns, as oneDNN 1x1
convs (measured faster: see that constant). Either way the frozen conv's result is not the conv kernel's own, so on this
path the output equals the frozen layer's to float rounding, not bit for bit (the adapter's share at step
0, U = 0 and r = 1, is still exactly zero). x [N, in, H, W], W [out, in, kh, kw] frozen, b [out] | None
frozen, D [r, in, kh, kw], U [out, r, 1, 1], m [out, 1, 1, 1], w_sq = ‖W‖² per row [out, 1, 1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional.folded import Geometry


# Columns from which W's products run in oneDNN (a 1x1 conv over the columns as an (n, P, 1) image) rather
# than MKL's GEMM, float32 on the CPU. Measured on a 2-core AMD EPYC with AVX-512, where MKL's GEMM ran as fast
# with AVX2 only (it leaves AVX-512 unused there; oneDNN does not). Forward / backward at 1280 x 11520 (ms, MKL
# against oneDNN): 24 columns 7.2 / 6.4 and 7.7 / 10.6, 40 columns 9.1 / 6.7 and 9.8 / 8.7, 72 columns
# 13.9 / 8.9 and 14.4 / 11.3, 136 columns 23.6 / 13.8 and 24.2 / 17.6; the same from 40 columns at 640 x 5760
# and 1280 x 23040 (docs/benchmarks.md, "DoRA's one-GEMM path in oneDNN").
ONEDNN_MIN_COLUMNS = 32


def _in_onednn(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.shape[1] >= ONEDNN_MIN_COLUMNS


def frozen_product(w: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """w (out, n) @ rhs (n, P) -> (out, P), contiguous; w and rhs must be contiguous."""
    if not _in_onednn(rhs):
        return w @ rhs
    out, n = w.shape
    return F.conv2d(rhs.view(1, n, -1, 1), w.view(out, n, 1, 1)).view(out, -1)


def frozen_t_product(w: torch.Tensor, lhs: torch.Tensor) -> torch.Tensor:
    """wᵀ (n, out) @ lhs (out, P) -> (n, P), contiguous; w and lhs must be contiguous. In oneDNN: the transposed
    1x1 conv."""
    if not _in_onednn(lhs):
        return w.T @ lhs
    out, n = w.shape
    return F.conv_transpose2d(lhs.view(1, out, -1, 1), w.view(out, n, 1, 1)).view(n, -1)


def _cols(x: torch.Tensor, kernel: tuple[int, int], geometry: Geometry, extra: int) -> torch.Tensor:
    """unfold(x) laid out as one (n, N·L + extra) matrix, the last `extra` columns left for the caller."""
    cols = F.unfold(x, kernel, geometry.dilation, geometry.padding, geometry.stride)  # (N, n, L)
    batch, n, length = cols.shape
    out = x.new_empty(n, batch * length + extra)
    out[:, :batch * length].view(n, batch, length).copy_(cols.transpose(0, 1))
    return out


class ConvDoRAGemm(torch.autograd.Function):
    """The node of the module docstring; the frozen W and b get no gradient, w_sq and the geometry none."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, magnitude, w_sq, scale: float, geometry: Geometry,
                detach_norm: bool):
        out, rank = weight.shape[0], down.shape[0]
        w, u, d = weight.reshape(out, -1), up.reshape(out, rank), down.reshape(rank, -1)
        rhs = _cols(x, weight.shape[2:], geometry, rank)  # [X | Dᵀ]
        positions = rhs.shape[1] - rank
        rhs[:, positions:].copy_(d.T)
        prod = frozen_product(w, rhs)  # (out, P + r): the only read of W in forward
        z, wd = prod[:, :positions], prod[:, positions:]
        h = d @ rhs[:, :positions]  # (r, P)
        z.addmm_(u, h, alpha=scale)
        gram = d @ d.T
        sq = F_dora.output_axis_sq(w_sq.reshape(-1), u, wd, gram, scale)
        ratio, norm = F_dora.ratio_from_sq(sq, magnitude.reshape(-1).to(sq.dtype))
        batch = x.shape[0]
        y = x.new_empty(batch, out, positions // batch)
        torch.mul(z.view(out, batch, -1).transpose(0, 1), ratio.view(1, out, 1), out=y)
        if bias is not None:
            y += bias.view(1, out, 1)
        # x, not its 9x larger unfold: rebuilding that in backward is cheap at these sizes
        ctx.save_for_backward(x, weight, down, up, prod, h, gram, sq, norm, ratio)
        ctx.scale, ctx.geometry, ctx.input_size, ctx.magnitude_shape = scale, geometry, x.shape[2:], magnitude.shape
        ctx.detach_norm = detach_norm
        return y.view(batch, out, *output_size(x.shape[2:], weight.shape[2:], geometry))

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, up, prod, h, gram, sq, norm, ratio = ctx.saved_tensors
        scale, needs = ctx.scale, ctx.needs_input_grad
        out, rank, batch = weight.shape[0], down.shape[0], grad.shape[0]
        w, u, d = weight.reshape(out, -1), up.reshape(out, rank), down.reshape(rank, -1)
        positions = h.shape[1]
        z, wd = prod[:, :positions], prod[:, positions:]
        norm_grad = not ctx.detach_norm  # a detached norm is a constant: only m learns from the ratio
        lhs = grad.new_empty(out, positions + rank * norm_grad)  # [∂Z | ∂(W Dᵀ)], the one read of W in backward
        grad_z = lhs[:, :positions]
        grad_z.view(out, batch, -1).copy_(grad.reshape(batch, out, -1).transpose(0, 1))
        grad_ratio = (grad_z * z).sum(1)  # (out,)
        grad_z *= ratio[:, None]
        if norm_grad:
            c = F_dora.sq_grad(grad_ratio, ratio, norm, sq)  # ∂L/∂‖W_o + s(UD)_o‖², (out,)
            grad_up_norm, grad_wd, grad_down_gram = F_dora.output_axis_sq_grads(c, u, wd, gram, d, scale)
            lhs[:, positions:] = grad_wd
        grad_h = (u.T * scale) @ grad_z  # (r, P)
        back = frozen_t_product(w, lhs)  # (n, P + r)
        grad_x = grad_down = grad_up = grad_magnitude = None
        if needs[0]:
            cols = back[:, :positions].addmm_(d.T, grad_h)  # (n, P)
            grad_x = F.fold(cols.view(cols.shape[0], batch, -1).transpose(0, 1), tuple(ctx.input_size),
                            weight.shape[2:], ctx.geometry.dilation, ctx.geometry.padding, ctx.geometry.stride)
        if needs[3]:
            cols = _cols(x, weight.shape[2:], ctx.geometry, 0)  # X (n, P)
            grad_down = grad_h @ cols.T
            if norm_grad:
                grad_down += back[:, positions:].T + grad_down_gram
            grad_down = grad_down.view(down.shape)
        if needs[4]:
            grad_up = (grad_up_norm.addmm_(grad_z, h.T, alpha=scale) if norm_grad
                       else torch.mm(grad_z, h.T).mul_(scale)).view(up.shape)
        if needs[5]:
            grad_magnitude = (grad_ratio / norm).view(ctx.magnitude_shape)
        return grad_x, None, None, grad_down, grad_up, grad_magnitude, None, None, None, None


def output_size(size: torch.Size, kernel: tuple[int, int], geometry: Geometry) -> tuple[int, int]:
    """(Hₒ, Wₒ) of a conv over an (H, W) input."""
    return tuple((size[i] + 2 * geometry.padding[i] - geometry.dilation[i] * (kernel[i] - 1) - 1)
                 // geometry.stride[i] + 1 for i in range(2))


def conv_dora_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                   up: torch.Tensor, magnitude: torch.Tensor, w_sq: torch.Tensor, scale: float,
                   geometry: Geometry, detach_norm: bool = False) -> torch.Tensor:
    """m ⊙ (W + s·U D) x / ‖W + s·U D‖ + b (norm per output row) for a frozen conv: see the module docstring.
    detach_norm: the norm a constant in backward (no ∂(W Dᵀ) columns, no c)."""
    return ConvDoRAGemm.apply(x, weight, bias, down, up, magnitude, w_sq, scale, geometry, detach_norm)
