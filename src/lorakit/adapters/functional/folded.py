"""LoRA (and LoRA-DoRA) over a frozen layer with the rank-r product folded into the weight.

The bypass path runs the frozen op and then the rank-r ops beside it: in forward, down(x) and an up
projection accumulated into the output; in backward, one more rank-r op accumulated into grad_x. Those are
passes over full-size activations, memory-bound on a CPU. Where the activations are much larger than the
weight (SD1.5's 320-channel layers at 512 px: 4096 positions x 640 channels against a 320x320 weight), it
is cheaper to build W' = W + s·U D (two (out, in·k²) passes) and run the frozen op once with it:

    forward     y = op(x, W') + b                        (the frozen layer's own kernel, with W')
    backward    grad_x = op_input_grad(g, W')            (W' rebuilt, not saved: one weight per layer)
                a = Uᵀ g,  h = down(x)                   (rank-r, read g and x once each)
                grad_U = s · Σ g ⊗ h,  grad_D = s · down_weight_grad(x, a)

The weight gradients are the bypass path's, so no (out, in) weight gradient is ever formed. Only in float32
or float64 without autocast: a bf16 W' would round s·U D (~1e-3 of W) away. DoRA folds its ratio r = m/‖W'‖
into W' as well (rows: output axis; input columns: input axis), as FusedLinearDoRA does, and r's gradient is
one reduction over (g, y) or (x, grad_x).

U = 0 gives W' = W bit for bit, so step 0 is the frozen layer's own output and input gradient.
x: Linear [T, in]; conv [N, in, H, W]. W [out, in(, kh, kw)] frozen, b [out] | None frozen,
D [r, in(, kh, kw)], U [out, r(, 1, 1)], r [out] or [in] or None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional import lora as F_lora


@dataclass(frozen=True)
class Geometry:
    """A conv's stride/padding/dilation (explicit ints); a Linear layer passes None instead."""
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def pointwise(self) -> bool:
        return self.stride == (1, 1) and self.padding == (0, 0)


def folded_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float,
                  ratio: torch.Tensor | None = None, axis: str | None = None) -> torch.Tensor:
    """(W + s·U D), its rows (output axis) or input columns (input axis) scaled by ratio, shaped like W: as
    r ⊙ W + s·(r ⊙ U) D (or W ⊙ r + s·U (D ⊙ r)), two passes over the weight fewer than scaling W + s·U D."""
    out, rank = up.shape[0], down.shape[0]
    w, up, down = weight.reshape(out, -1), up.reshape(out, rank), down.reshape(rank, -1)
    if ratio is None:
        return torch.addmm(w, up, down, alpha=scale).view(weight.shape)
    if axis == "output":
        w, up = w * ratio.view(-1, 1), up * ratio.view(-1, 1)
    else:
        per_input = ratio.view(1, -1, 1)
        w = (w.view(out, ratio.shape[0], -1) * per_input).view(out, -1)
        down = (down.view(rank, ratio.shape[0], -1) * per_input).view(rank, -1)
    return w.addmm_(up, down, alpha=scale).view(weight.shape)


def _conv_grads(grad, x, weight, geometry: Geometry, input_grad: bool, weight_grad: bool):
    stride, padding, dilation = list(geometry.stride), list(geometry.padding), list(geometry.dilation)
    return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1,
                                               [input_grad, weight_grad, False])


class FoldedLoRA(torch.autograd.Function):
    """op(x, fold(W, U, D, s, r)) + b in one node; see the module docstring. geometry None = Linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float, ratio, axis, geometry):
        w = folded_weight(weight, up, down, scale, ratio, axis)
        y = (torch.addmm(bias, x, w.T) if bias is not None else x @ w.T) if geometry is None else \
            F.conv2d(x, w, bias, geometry.stride, geometry.padding, geometry.dilation)
        keep_y = ratio is not None and axis == "output"
        ctx.save_for_backward(x, weight, bias, down, up, ratio, y if keep_y else None)
        ctx.scale, ctx.axis, ctx.geometry = scale, axis, geometry
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, down, up, ratio, y = ctx.saved_tensors
        scale, axis, geometry, needs = ctx.scale, ctx.axis, ctx.geometry, ctx.needs_input_grad
        dora_input = ratio is not None and axis == "input"
        need_x = needs[0] or (needs[6] and dora_input)
        grad_x = grad_ratio = None
        # the output axis's r gradient reduces over grad and y: taken first, while grad is still in cache from
        # the op that just produced it, not after the passes below (Linear 320x320 at 4096 tokens: 14.2 ->
        # 13.4 ms). The input axis's needs grad_x: taking it right after grad_x measured no faster.
        if needs[6] and not dora_input:
            grad_ratio = F_dora.ratio_grad(grad, x, None, y, bias, ratio, axis)
        if need_x:
            w = folded_weight(weight, up, down, scale, ratio, axis)
            grad_x = grad @ w if geometry is None else _conv_grads(grad.contiguous(), x, w, geometry, True, False)[0]
        up_r = up * ratio.view(-1, *[1] * (up.dim() - 1)) if ratio is not None and axis == "output" else up
        down_r = down * _input_view(ratio, down) if dora_input else down
        grad_down, grad_up = _rank_grads(grad, x, down_r, up_r, scale, geometry, needs[3], needs[4])
        if grad_down is not None and dora_input:
            grad_down = grad_down * _input_view(ratio, down)
        if grad_up is not None and ratio is not None and axis == "output":
            grad_up = grad_up * ratio.view(-1, *[1] * (up.dim() - 1))
        if needs[6] and dora_input:
            grad_ratio = F_dora.ratio_grad(grad, x, grad_x, y, bias, ratio, axis)
        return (grad_x if needs[0] else None), None, None, grad_down, grad_up, None, grad_ratio, None, None


def _input_view(ratio: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The input-axis ratio shaped to scale down's input channels (r, in(, kh, kw))."""
    return ratio.view(1, -1, *[1] * (down.dim() - 2))


def _rank_grads(grad, x, down, up, scale, geometry, need_down: bool, need_up: bool):
    """The bypass path's weight gradients: grad_D = s·down_weight_grad(x, Uᵀg), grad_U = s·Σ g ⊗ down(x)."""
    out, rank = up.shape[0], down.shape[0]
    grad_down = grad_up = None
    if geometry is None:  # x [T, in], grad [T, out]
        if need_down:
            grad_down = (grad @ F_lora.transposed_times(up, scale).T).T @ x
        if need_up:
            grad_up = F_lora.transposed_times((x @ down.T).T @ grad, scale)  # the skinny (r, T) side first
        return grad_down, grad_up
    n = x.shape[0]
    grad = grad.contiguous()
    grad3 = grad.view(n, out, -1)  # (N, out, H'W')
    pointwise = geometry.pointwise and down.shape[2:] == (1, 1)
    if need_down:
        a = F_lora.per_sample(up.reshape(out, rank).T * scale, grad3)  # (N, r, H'W')
        if pointwise:  # oneDNN's rank-r 1x1 convs run far below GEMM speed: batched GEMMs instead
            grad_down = F_lora.down_grad(a, x.reshape(n, x.shape[1], -1)).view_as(down)
        else:
            grad_down = _conv_grads(a.view(n, rank, *grad.shape[2:]), x, down, geometry, False, True)[1]
    if need_up:
        if pointwise:
            h = F_lora.per_sample(down.reshape(rank, -1), x.reshape(n, x.shape[1], -1))  # (N, r, HW)
        else:
            h = F.conv2d(x, down, None, geometry.stride, geometry.padding, geometry.dilation).view(n, rank, -1)
        grad_up = F_lora.up_grad(h, grad3, scale).view_as(up)
    return grad_down, grad_up


def folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor,
           scale: float, geometry: Geometry | None, ratio: torch.Tensor | None = None,
           axis: str | None = None) -> torch.Tensor:
    """The folded node for a Linear (geometry None; any leading dims) or a conv (NCHW). A ratio must have no
    exact zero (its gradient divides by it): callers take the bypass path then."""
    if geometry is not None:
        return FoldedLoRA.apply(x, weight, bias, down, up, scale, ratio, axis, geometry)
    lead = x.shape[:-1]
    y = FoldedLoRA.apply(x.reshape(-1, x.shape[-1]), weight, bias, down, up, scale, ratio, axis, None)
    return y.reshape(*lead, y.shape[-1])
