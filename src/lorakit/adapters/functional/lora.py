"""LoRA / LoCon math.

Layouts (kohya and LyCORIS files use exactly these):
    Linear      down [r, in]           up [out, r]
    Conv kxk    down [r, in, kh, kw]   up [out, r, 1, 1]        (down carries stride/padding/dilation)
    Tucker      down [r, in, 1, 1]     mid [r, r, kh, kw]        up [out, r, 1, 1]

ΔW = scale · up @ down (im2col view for convs); Tucker: ΔW[o,i,h,w] = scale · Σ_ab up[o,a] mid[a,b,h,w] down[b,i].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.adapters.functional import split
from lorakit.adapters.functional.layer import LayerSpec, draw_device


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float, mid: torch.Tensor | None = None) -> torch.Tensor:
    out_ch, rank = up.shape[0], down.shape[0]
    up2 = up.reshape(out_ch, rank) * scale  # scale the small factor, not the full ΔW
    if mid is None:
        return (up2 @ down.reshape(rank, -1)).reshape(out_ch, *down.shape[1:])
    return torch.einsum("oa,abhw,bi->oihw", up2, mid, down.reshape(rank, -1))


def product_sq_norm(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """‖scale · up @ down‖²_F as a float64 scalar, without the (out, n) product: ‖UD‖² = tr(Dᵀ UᵀU D) =
    tr(UᵀU · DDᵀ) = Σ (UᵀU ⊙ DDᵀ), two (r, r) Grams (both symmetric). up (out, r[, 1, 1]), down (r, n...)."""
    u = up.reshape(up.shape[0], -1).double()
    d = down.reshape(down.shape[0], -1).double()
    return (u.T @ u).mul_(d @ d.T).sum() * scale ** 2


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of up (out, r) @ down (r, n) without forming the (out, n) product: QR of both factors, then
    the SVD of the r x r core. Exact, and O((out + n) r²) instead of O(out n min(out, n))."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def bypass_delta(x: torch.Tensor, spec: LayerSpec, down: torch.Tensor, up: torch.Tensor, scale: float,
                 mid: torch.Tensor | None = None, rank_mask: torch.Tensor | None = None,
                 dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """ΔW·x without building ΔW: up(down(x)) · scale, with optional dropouts on the rank activations.

    rank_mask: (batch, r) keep-mask already rescaled by 1/(1-p) (rank_dropout).
    """
    if not spec.is_conv:
        h = F.linear(x, down)  # (..., r)
    elif mid is None:
        h = F.conv2d(x, down, None, spec.stride, spec.padding, spec.dilation)  # (B, r, H', W')
    else:
        h = F.conv2d(x, down)
        h = F.conv2d(h, mid, None, spec.stride, spec.padding, spec.dilation)
    if dropout > 0.0 and training:
        h = F.dropout(h, dropout, training=True)
    if rank_mask is not None:
        h = h * (rank_mask.view(rank_mask.shape[0], *([1] * (h.dim() - 2)), -1) if not spec.is_conv
                 else rank_mask.view(*rank_mask.shape, 1, 1))
    up_scaled = up * scale  # (out, r[,1,1]): scaling the small weight saves a pass over the output
    return F.linear(h, up_scaled) if not spec.is_conv else F.conv2d(h, up_scaled)


def init_weights(spec: LayerSpec, rank: int, use_tucker: bool = False, dtype=None, device=None,
                 generator: torch.Generator | None = None, use_scalar: bool = False) -> dict[str, torch.Tensor]:
    """microsoft/LoRA init: down (and mid) kaiming-uniform with a = sqrt(5), up zeros, so ΔW = 0 at step 0.

    use_scalar (LyCORIS): up is kaiming-uniform too; the module's scalar, starting at 0, keeps ΔW = 0."""
    out_ch, in_ch, kernel = spec.out_features, spec.in_features, spec.kernel
    tucker = use_tucker and spec.is_conv and kernel != (1, 1)
    if not spec.is_conv:
        shapes = {"down": (rank, in_ch), "up": (out_ch, rank)}
    elif tucker:
        shapes = {"down": (rank, in_ch, 1, 1), "mid": (rank, rank, *kernel), "up": (out_ch, rank, 1, 1)}
    else:
        shapes = {"down": (rank, in_ch, *kernel), "up": (out_ch, rank, 1, 1)}
    weights = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name == "up" and not use_scalar:
            t.zero_()
        else:
            kaiming_uniform_(t, generator)
        weights[name] = t
    return weights


def kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with an optional generator."""
    fan_in = t[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        at = draw_device(t.device, generator)
        if at == t.device:
            return t.uniform_(-bound, bound, generator=generator)
        return t.copy_(torch.empty(t.shape, dtype=t.dtype, device=at).uniform_(-bound, bound, generator=generator))


def flops(spec: LayerSpec, rank: int, positions: int, tucker: bool = False) -> int:
    """Multiply-adds of the bypass path for `positions` output positions (batch x H' x W' or tokens)."""
    k = math.prod(spec.kernel) if spec.is_conv else 1
    down = rank * spec.in_features * (1 if tucker else k)
    mid = rank * rank * k if tucker else 0
    return positions * (down + mid + rank * spec.out_features)


class FusedLinearLoRA(torch.autograd.Function):
    """y = x W^T + b + scale · (x D^T) U^T for a frozen Linear, in one autograd node.

    The skinny rank-r GEMMs are memory-bound, so this avoids full-size passes: the adapter is accumulated
    into the base GEMM's output in place (no separate scale and add), and likewise into grad_x in backward.
    Measured in the SD1.5 U-Net at 256 px fp32 (2-core Xeon, forward + backward, side by side): the Linear
    adapters add 106 ms this way, 172 ms with the earlier backward (over many tokens grad went once through
    a copied [W | s·U], whose slice addmm then copied again; over few, addmm copied a fresh (T, in) bias).
    The base part is computed exactly as F.linear does (addmm with the bias), so a zero adapter gives
    bit-identical outputs and input gradients.
    x [..., in] (flattened to [T, in] inside, so no view nodes are recorded around it), W [out, in] (frozen),
    b [out] | None (frozen), D [r, in], U [out, r].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        h = x2 @ down.T  # (T, r)
        y = x.new_empty(*x.shape[:-1], weight.shape[0])  # the output is no view: callers may modify it in place
        y2 = y.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.T, out=y2)
        else:
            torch.mm(x2, weight.T, out=y2)
        y2.addmm_(h, up.T, alpha=scale)  # (T, out), accumulated in place
        ctx.save_for_backward(x2, weight, down, up, h)
        ctx.scale, ctx.lead = scale, x.shape[:-1]
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, up, h = ctx.saved_tensors
        scale = ctx.scale
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_h = grad @ transposed_times(up, scale).T  # (T, r); see transposed_times
            if ctx.needs_input_grad[0]:  # the base GEMM, then the rank-r product added in place (no copy)
                grad_x = (grad @ weight).addmm_(grad_h, down).view(*ctx.lead, x.shape[-1])
            if ctx.needs_input_grad[3]:
                grad_down = grad_h.T @ x
        if ctx.needs_input_grad[4]:
            grad_up = transposed_times(h.T @ grad, scale)  # the skinny (r, T) side first: 2-3x faster than grad.T @ h
        return grad_x, None, None, grad_down, grad_up, None


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                 up: torch.Tensor, scale: float) -> torch.Tensor:
    """Frozen Linear + LoRA bypass in one autograd node; any leading dims."""
    return FusedLinearLoRA.apply(x, weight, bias, down, up, scale)


def transposed_times(t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · tᵀ written contiguous. Two uses:
    - A rank-r factor's gradient comes out of the fast product transposed ((r, out) -> (out, r));
      AccumulateGrad would copy such a tensor into the parameter's layout once more.
    - grad (T, out) @ U (out, r): MKL runs it 2-2.5x faster with U given as the transpose of a contiguous
      (r, out), grad @ transposed_times(U, s).T, on every SD1.5 shape (2-core AMD EPYC, fp32: 4096 x 320
      743 -> 314 µs, 1024 x 2560 1531 -> 894, 64 x 10240 380 -> 151, 16384 x 320 2984 -> 1240)."""
    return torch.mul(t.T, scale, out=t.new_empty(t.shape[1], t.shape[0]))


def per_sample(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """weight (r, C) @ t[n] (C, L) for every sample n of t (N, C, L), as one bmm with the weight expanded.
    torch.matmul folds a 2-D @ 3-D product into one GEMM over a transposed copy of t when N > 1: for a 4x640
    channels x 64x64 map that copy took 29 ms of a 100 ms forward + backward, three times the GEMMs. One sample
    is split along its positions instead (split.rank_times)."""
    if t.shape[0] == 1:
        return split.rank_times(weight, t[0]).unsqueeze(0)
    return torch.bmm(weight.expand(t.shape[0], -1, -1), t)


def down_grad(grad_h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_n grad_h[n] @ x[n]ᵀ, (r, C), for grad_h (N, r, L) and x (N, C, L): a 1x1 `down`'s gradient.
    One sample skips the batched form (its transposed operand and sum over N ran 10-60% slower at every SD1.5
    1x1 shape at batch 1, 2-core AMD EPYC, fp32: 1280 ch at 8x8 37 -> 23 µs, 640 -> 320 at 64x64 787 -> 738 µs)
    and is split along its positions where they are many (split.times_positions); at N > 1 the batched product
    stays (one GEMM per sample, no copy of x)."""
    if x.shape[0] == 1:
        return split.times_positions(grad_h[0], x[0])
    return torch.matmul(grad_h, x.transpose(1, 2)).sum(0)


def up_grad(h: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · Σ_n grad[n] @ h[n]ᵀ, (out, r) contiguous, for h (N, r, L) and grad (N, out, L): a 1x1 `up`'s
    gradient. One sample: grad @ hᵀ comes out in the parameter's layout, 25-50% faster than the skinny-first
    product and its transposed copy (1280 ch at 8x8 57 -> 30 µs, 320 at 64x64 421 -> 297 µs); at N > 1 the
    skinny (r, L) side goes first (2-3x faster there), then one transposed copy of the small result."""
    if h.shape[0] == 1:
        return torch.mm(grad[0], h[0].T).mul_(scale)
    return transposed_times(torch.matmul(h, grad.transpose(1, 2)).sum(0), scale)


class FusedConv1x1LoRA(torch.autograd.Function):
    """y = conv1x1(x, W, b) + scale · U (D x) at every pixel, for a frozen 1x1 conv over NCHW, in one node.

    oneDNN runs the rank-r 1x1 convs (C -> r -> out) far below its GEMM speed: in the SD1.5 U-Net at 256 px
    (2-core Xeon, forward + backward of one layer) the adapter added 5.4 ms to a 960 -> 320 conv at 32x32 as
    two convs and an add, 1.0 ms as GEMMs. So the adapter runs as batched GEMMs over the (N, C, H·W) view,
    accumulated in place into the frozen conv's output and into its input gradient. The frozen part is the
    layer's own conv and convolution_backward, so a zero adapter gives bit-identical outputs and input grads.
    x [N, C, H, W] contiguous, W [out, C, 1, 1] (frozen), b [out] | None (frozen), D [r, C], U [out, r].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):
        n, c, height, width = x.shape
        h = per_sample(down, x.view(n, c, height * width))  # (N, r, HW)
        y = F.conv2d(x, weight, bias).contiguous()
        y.view(n, -1, height * width).baddbmm_(up.expand(n, -1, -1), h, alpha=scale)
        ctx.save_for_backward(x, weight, down, up, h)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, up, h = ctx.saved_tensors
        n, c, height, width = x.shape
        grad = grad.contiguous()
        grad3 = grad.view(n, -1, height * width)  # (N, out, HW)
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_h = per_sample((up * ctx.scale).T, grad3)  # (N, r, HW)
            if ctx.needs_input_grad[0]:  # the call autograd makes for the frozen conv alone
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1],
                    False, [0, 0], 1, [True, False, False])[0].contiguous()
                grad_x.view(n, c, -1).baddbmm_(down.T.expand(n, -1, -1), grad_h)
            if ctx.needs_input_grad[3]:
                grad_down = down_grad(grad_h, x.view(n, c, -1))  # (r, C)
        if ctx.needs_input_grad[4]:
            grad_up = up_grad(h, grad3, ctx.scale)  # (out, r)
        return grad_x, None, None, grad_down, grad_up, None


def fused_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                  up: torch.Tensor, scale: float) -> torch.Tensor:
    """Frozen 1x1 conv (stride 1, no padding) + LoRA bypass in one autograd node; x NCHW contiguous."""
    return FusedConv1x1LoRA.apply(x, weight, bias, down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1),
                                  scale)
