"""DoRA (weight-decomposed low-rank adaptation): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖.

The norm is taken per output row (`axis="output"`: over every dim but 0) or per input column
(`axis="input"`: over every dim but 1; for a conv that is over (out, kh, kw)). The magnitude m is stored in
the layout LyCORIS files use, which also tells the axis apart by shape:

    output axis   Linear (out, 1)   conv (out, 1, 1, 1)     LyCORIS >= 3.2 (wd_on_output=True)
    input axis    Linear (1, in)    conv (1, in, 1, 1)      LyCORIS legacy, OneTrainer; A1111/ComfyUI/Forge

m starts at ‖W‖ on the same axis, so step 0 is the base weight exactly (ratio m / ‖W‖ is exactly 1.0).
A strength μ blends as A1111 and ComfyUI do: W + μ·(W' − W). ΔW may be any algorithm's (LoRA, LoHa, LoKr).
The norm's gradient flows by default, as in LyCORIS (the DoRA paper and PEFT detach it).
"""
from __future__ import annotations

import torch

from lorakit.adapters.functional import lora as F_lora

AXES = ("output", "input")


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"DoRA axis must be one of {AXES}, got {axis!r}")


def magnitude_shape(weight_shape: tuple[int, ...], axis: str) -> tuple[int, ...]:
    """(out, 1[, 1, 1]) for the output axis, (1, in[, 1, 1]) for the input axis."""
    _check_axis(axis)
    ones = [1] * (len(weight_shape) - 2)
    if axis == "output":
        return (weight_shape[0], 1, *ones)
    return (1, weight_shape[1], *ones)


def axis_of(magnitude_shape_: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    """The axis a stored magnitude (in the layout above) normalises, or None if it fits neither."""
    shape = tuple(magnitude_shape_)
    for axis in AXES:
        if shape == magnitude_shape(weight_shape, axis):
            return axis
    return None


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: a bf16 norm over thousands of elements loses the ratio's last digits. float8 weights
    (fp8_base) are storage only: they compute in float32 too (promote_types refuses float8)."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype.itemsize > 1:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _reduced_dims(weight: torch.Tensor, axis: str) -> tuple[int, ...]:
    _check_axis(axis)
    return tuple(d for d in range(weight.dim()) if d != (0 if axis == "output" else 1))


def weight_sq(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖² per output row or input column, kept in the magnitude's layout. Every DoRA norm goes through
    this one reduction, so m = ‖W‖ and the step-0 norm ‖W + 0‖ are the same float bit for bit."""
    return weight.square().sum(_reduced_dims(weight, axis), keepdim=True)


def norm_from_sq(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (as vector_norm has), not 0/0 = NaN, where a row or column is exactly zero; values
    are sqrt's own, bit for bit. Negative inputs (rounding below an exact zero) count as zero."""
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def weight_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖ per output row or input column, kept in the magnitude's layout."""
    return norm_from_sq(weight_sq(weight, axis))


def init_magnitude(weight: torch.Tensor, axis: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """m = ‖W‖ on `axis` (computed in at least float32), the value that makes step 0 the base model."""
    w = weight.detach().to(compute_dtype(weight))
    return weight_norm(w, axis).to(dtype or w.dtype)


def ratio(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str,
          detach_norm: bool = False) -> torch.Tensor:
    """m / ‖W + ΔW‖ in the magnitude's layout (compute dtype). A zero column gets ratio m / tiny, not inf."""
    dtype = compute_dtype(weight, delta, magnitude)
    merged = weight.to(dtype) + delta.to(dtype)
    norm = weight_norm(merged, axis)
    if detach_norm:
        norm = norm.detach()
    return magnitude.to(dtype) / norm.clamp_min(torch.finfo(dtype).tiny)


def lowrank_norm_sq(w_sq: torch.Tensor, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    scale: float, axis: str) -> torch.Tensor:
    """‖W + s·U D‖² per row/column without forming U D: ‖W‖² + 2s⟨W, U D⟩ + s²‖U D‖², exactly.

    W (out, in[, kh, kw]) with w_sq = weight_sq(W, axis); up U (out, r[, 1, 1]); down D (r, in[, kh, kw]).
    Output row o:  ⟨W_o, (UD)_o⟩ = U_o · (W D^T)_o   and ‖(UD)_o‖² = U_o (D D^T) U_o^T.
    Input column i (over out, kh, kw): ⟨W_:i, (UD)_:i⟩ = Σ (U^T W)_:i ⊙ D_:i
                                         and ‖(UD)_:i‖² = Σ (U^T U D)_:i ⊙ D_:i.
    One GEMM with W (out·in·k·r multiply-adds) and r-sized ones; no weight-sized temporaries, so DoRA's
    norm and its gradient cost about what the rank-r path itself costs. ΔW = 0 gives w_sq exactly.
    """
    out, r = up.shape[0], down.shape[0]
    u, w, d = up.reshape(out, r), weight.reshape(out, -1), down.reshape(r, -1)  # (out, r) (out, n) (r, n)
    return _norm_sq_and_products(w_sq, u, w, d, scale, axis)[0]


def _norm_sq_and_products(w_sq, u, w, d, scale: float, axis: str):
    """(sq, its two r-sized products) for u (out, r), w (out, n), d (r, n): output axis (W Dᵀ, D Dᵀ), input
    axis (Uᵀ W, Uᵀ U D). The products are what _LowRankRatio's backward needs again."""
    if axis == "output":
        products = (weight_times(w, d), d @ d.T)
        return output_axis_sq(w_sq, u, *products, scale), products
    products = (times_weight(u.T, w), (u.T @ u) @ d)
    return input_axis_sq(w_sq, *products, d, scale), products


def output_axis_sq(w_sq: torch.Tensor, up: torch.Tensor, wd: torch.Tensor, gram: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """‖W_o + s·(U D)_o‖² per output row from r-sized products, in w_sq's shape (out elements, ‖W_o‖² each).

    up U (out, r), wd = W Dᵀ (out, r), gram = D Dᵀ (r, r):
    row o is ‖W_o‖² + 2s U_o·(W Dᵀ)_o + s² U_o D Dᵀ U_oᵀ."""
    cross = (up * wd).sum(1)  # (out,)
    quad = ((up @ gram) * up).sum(1)
    return w_sq + (2 * scale * cross + scale * scale * quad).reshape(w_sq.shape)


def input_axis_sq(w_sq: torch.Tensor, uw: torch.Tensor, gd: torch.Tensor, down: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """‖W_:i + s·(U D)_:i‖² per input channel i (over out, kh, kw), in w_sq's shape (in elements).

    uw = Uᵀ W (r, n), gd = Uᵀ U D (r, n), down D (r, n), n = in·kh·kw: Σ over r and i's kernel positions of
    ‖W_:i‖² + 2s (Uᵀ W) ⊙ D + s² (Uᵀ U D) ⊙ D."""
    r, k = down.shape[0], down.shape[1] // w_sq.numel()  # kernel positions per input channel
    cross = (uw * down).reshape(r, -1, k).sum((0, 2))  # (in,)
    quad = (gd * down).reshape(r, -1, k).sum((0, 2))
    return w_sq + (2 * scale * cross + scale * scale * quad).reshape(w_sq.shape)


def ratio_from_sq(sq: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m / norm, norm) with norm = sqrt(sq) (0 where rounding took sq at or below 0, see norm_from_sq) kept
    at least float32's tiny, so a zero row or column gives the ratio m / tiny, not inf."""
    norm = norm_from_sq(sq).clamp_min(torch.finfo(sq.dtype).tiny)
    return magnitude / norm, norm


def sq_grad(grad_ratio: torch.Tensor, ratio: torch.Tensor, norm: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """∂L/∂sq from ∂L/∂r for ratio_from_sq: −∂r · r / (2 norm²), and 0 where sq <= 0 (as norm_from_sq)."""
    return torch.where(sq > 0, -grad_ratio * ratio / (2 * norm * norm), torch.zeros_like(sq))


def output_axis_sq_grads(c: torch.Tensor, up: torch.Tensor, wd: torch.Tensor, gram: torch.Tensor,
                         down: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ_o c_o·sq_o (output_axis_sq), c (out,): (∂U (out, r), ∂(W Dᵀ) (out, r), ∂D through D Dᵀ
    (r, n)). ∂D's other part is ∂(W Dᵀ)ᵀ W: the caller reads W for it (alone, or inside a GEMM it runs anyway)."""
    cu = c[:, None] * up
    grad_up = (2 * scale) * c[:, None] * wd + (2 * scale * scale) * (cu @ gram)
    return grad_up, (2 * scale) * cu, (2 * scale * scale) * (up.T @ cu) @ down


# skinny products with a frozen weight W (out, n) at rank r: MKL runs a single (r, out) @ (out, n) or W Dᵀ far
# below its GEMM speed on a CPU (~3x the time of one read of W at 1280 x 11520). As batched products over blocks
# of W's rows they ran faster (2-core AMD EPYC, 2 threads, fp32, ms): Uᵀ W in blocks of 128 rows, 1280 x 11520
# 4.1 against 7.2, 640 x 5760 0.8 against 1.35; W Dᵀ as (D Wᵀ)ᵀ in blocks of 32 rows, 1280 x 11520 2.6 against
# 3.9, 10240 x 1280 2.5 against 4.8, 640 x 5760 0.44 against 0.61, 320 x 2880 0.11 against 0.15 (blocks of 16
# and 64 within 10% of 32 everywhere; 320 x 320 the same either way). A read of W alone: 1.0-1.4 ms at 1280 x 11520.
WEIGHT_ROW_BLOCK = 128
WEIGHT_TIMES_ROW_BLOCK = 32


def _row_blocks(w: torch.Tensor, rows: int) -> int:
    """How many blocks of `rows` rows a frozen CPU weight (out, n) splits into; 1 = run it unsplit."""
    out = w.shape[0]
    if w.device.type != "cpu" or not w.is_contiguous() or out < 2 * rows or out % rows:
        return 1
    return out // rows


def times_weight(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w for a (r, out) and a frozen w (out, n): (r, n)."""
    blocks = _row_blocks(w, WEIGHT_ROW_BLOCK)
    if blocks == 1:
        return a @ w
    return torch.bmm(a.reshape(a.shape[0], blocks, WEIGHT_ROW_BLOCK).transpose(0, 1),
                     w.view(blocks, WEIGHT_ROW_BLOCK, -1)).sum(0)


def weight_times(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w @ bᵀ for a frozen w (out, n) and b (r, n): (out, r); on the CPU the transpose of a contiguous (r, out)."""
    if w.device.type != "cpu":
        return w @ b.T
    blocks = _row_blocks(w, WEIGHT_TIMES_ROW_BLOCK)
    if blocks == 1:
        return (b @ w.T).T
    parts = torch.bmm(b.expand(blocks, -1, -1), w.view(blocks, WEIGHT_TIMES_ROW_BLOCK, -1).transpose(1, 2))
    return parts.transpose(0, 1).reshape(b.shape[0], -1).T  # (blocks, r, rows) -> (r, out) -> (out, r)


class _LowRankRatio(torch.autograd.Function):
    """m / ‖W + s·U D‖ for a frozen W as one autograd node with the closed-form gradients of lowrank_norm_sq.

    Autograd over the expression records some fifteen r-sized ops each way; on a 320x320 Linear those nodes
    cost more than their arithmetic (~0.3 ms of a 13 ms DoRA forward + backward on a 2-core CPU). Input axis,
    with C = c repeated over each channel's kernel positions (n,):
        ∂D = 2s (Uᵀ W) ⊙ C + 2s² (Uᵀ U D) ⊙ C,   ∂U = 2s W (D ⊙ C)ᵀ + 2s² U (D ⊙ C) Dᵀ
    """

    @staticmethod
    def forward(ctx, w_sq, weight, up, down, magnitude, scale: float, axis: str):
        out, rank = up.shape[0], down.shape[0]
        u, w, d = up.reshape(out, rank), weight.reshape(out, -1), down.reshape(rank, -1)
        sq, products = _norm_sq_and_products(w_sq, u, w, d, scale, axis)
        ratio, norm = ratio_from_sq(sq, magnitude)
        ctx.save_for_backward(weight, up, down, sq, norm, ratio, *products)
        ctx.scale, ctx.axis = scale, axis
        return ratio

    @staticmethod
    def backward(ctx, grad_ratio):
        weight, up, down, sq, norm, ratio, first, second = ctx.saved_tensors
        scale, out, rank = ctx.scale, up.shape[0], down.shape[0]
        u, w, d = up.reshape(out, rank), weight.reshape(out, -1), down.reshape(rank, -1)
        c = sq_grad(grad_ratio, ratio, norm, sq).reshape(-1)
        if ctx.axis == "output":
            grad_up, grad_wd, grad_down = output_axis_sq_grads(c, u, first, second, d, scale)
            grad_down = grad_down + times_weight(grad_wd.T, w)
        else:
            per_column = c.repeat_interleave(d.shape[1] // c.numel())  # (n,)
            dc = d * per_column
            grad_down = ((2 * scale) * first + (2 * scale * scale) * second) * per_column
            grad_up = (2 * scale) * weight_times(w, dc) + (2 * scale * scale) * (u @ (dc @ d.T))
        return (None, None, grad_up.view(up.shape), grad_down.view(down.shape), grad_ratio / norm, None, None)


def lowrank_ratio(w_sq: torch.Tensor, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float,
                  magnitude: torch.Tensor, axis: str, detach_norm: bool = False) -> torch.Tensor:
    """ratio() for ΔW = s·U D (LoRA/LoCon without Tucker) over a frozen W (no gradient to it), through
    lowrank_norm_sq's identity, as one node. detach_norm: the norm is a constant in backward (only m gets a
    gradient), the same value bit for bit; backward then reads W no more."""
    _check_axis(axis)
    dtype = compute_dtype(weight, up, down, magnitude)
    w_sq, weight, up, down = w_sq.to(dtype), weight.to(dtype).detach(), up.to(dtype), down.to(dtype)
    if detach_norm:
        with torch.no_grad():
            sq = lowrank_norm_sq(w_sq, weight, up, down, scale, axis)
        return ratio_from_sq(sq, magnitude.to(dtype))[0]
    return _LowRankRatio.apply(w_sq, weight, up, down, magnitude.to(dtype), scale, axis)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str,
                multiplier: float = 1.0, detach_norm: bool = False) -> torch.Tensor:
    """W + μ·(m ⊙ (W + ΔW) / ‖W + ΔW‖ − W), in the compute dtype (at least float32).

    One pass over the weight per call: the norm is of the weight, never of activations.
    """
    dtype = compute_dtype(weight, delta, magnitude)
    w = weight.to(dtype)
    decomposed = (w + delta.to(dtype)) * ratio(w, delta, magnitude, axis, detach_norm)
    if multiplier == 1.0:
        return decomposed
    return w + multiplier * (decomposed - w)


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str,
               multiplier: float = 1.0) -> torch.Tensor:
    """The full-rank difference μ·(W' − W) a DoRA module adds to W (what merge tools and SVD work on)."""
    w = weight.to(compute_dtype(weight, delta, magnitude))
    return dora_weight(w, delta, magnitude, axis, multiplier) - w


class _ScaledOutput(torch.autograd.Function):
    """out = r ⊙ y + (1 − r) ⊙ b, with r and b per channel (broadcast over y), in one pass each way.

    Output-axis DoRA: y = Wx + b + ΔWx gives W'x + b = r ⊙ (y − b) + b. Written with (1 − r) ⊙ b, r = 1 gives
    y exactly (step 0). Autograd over the plain expression would make y − b, (r − 1)·(y − b) and the sum of
    two gradients for y: three output-sized passes more. Backward: ∂y = g ⊙ r, ∂r = Σ g ⊙ y − b ⊙ Σ g.
    """

    @staticmethod
    def forward(ctx, y, r, bias):
        ctx.save_for_backward(y, r, bias)
        return y * r if bias is None else torch.addcmul((1 - r) * bias, y, r)

    @staticmethod
    def backward(ctx, grad):
        y, r, bias = ctx.saved_tensors
        grad_y = grad * r if ctx.needs_input_grad[0] else None
        grad_r = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_r = (grad * y).sum_to_size(r.shape)
            if bias is not None:
                grad_r = grad_r - bias * grad.sum_to_size(r.shape)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = (grad * (1 - r)).sum_to_size(bias.shape)
        return grad_y, grad_r, grad_bias


def scaled_output(y: torch.Tensor, r: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """r ⊙ (y − b) + b for per-channel r and b shaped to broadcast over y (see _ScaledOutput)."""
    return _ScaledOutput.apply(y, r, bias)


def channel_scale(r: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """The ratio as a per-channel factor for activations: output channels of y, or input channels of x.

    Linear activations are (..., features); conv activations are (B, C, H, W)."""
    vec = r.reshape(-1)
    return vec.view(-1, 1, 1) if is_conv else vec


def peft_to_internal(magnitude: torch.Tensor, weight_dims: int) -> torch.Tensor:
    """PEFT `lora_magnitude_vector` (Linear (out,), conv (1, out, 1, 1)) or ai-toolkit `magnitude` (out,)
    -> the output-axis layout (out, 1[, 1, 1]). Both normalise per output row."""
    out = magnitude.reshape(-1).shape[0]
    return magnitude.reshape(out, *([1] * (weight_dims - 1)))


def internal_to_peft(magnitude: torch.Tensor) -> torch.Tensor:
    """Output-axis (out, 1[, 1, 1]) -> PEFT's `lora_magnitude_vector`: (out,) for Linear, (1, out, 1, 1) conv."""
    if magnitude.dim() == 2:
        return magnitude.reshape(-1)
    return magnitude.reshape(1, -1, *([1] * (magnitude.dim() - 2)))


class FusedLinearDoRA(torch.autograd.Function):
    """DoRA over a frozen Linear with a LoRA ΔW = s·U D, in one node and without activation-sized DoRA passes.

    The ratio r (a vector: out for the output axis, in for the input axis) is folded into the weights, which
    are far smaller than the activations (320x320 against 4096x320 tokens in SD1.5):
        output axis  W'x + b = (r ⊙ W) x + b + s (r ⊙ U)(D x)          rows of W and U scaled
        input axis   W'x + b = (W ⊙ r) x + b + s U ((D ⊙ r) x)         columns of W and D scaled
    so the forward is FusedLinearLoRA's two GEMMs. r's gradient then needs one reduction, not W's gradient:
        output axis  ∂r = Σ_t g ⊙ (y − b) / r     (y − b = r ⊙ (W + sUD)x)
        input axis   ∂r = Σ_t x ⊙ ∂x / r          (∂x = r ⊙ (W + sUD)^T g)
    It needs r ≠ 0 everywhere; fused_linear_dora takes the unfused path otherwise.
    x [T, in], W [out, in] (frozen), b [out] | None (frozen), D [r, in], U [out, r], r [out] or [in].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float, r, axis: str):
        if axis == "output":
            weight, up = weight * r[:, None], up * r[:, None]
        else:
            weight, down = weight * r, down * r
        h = x @ down.T  # (T, rank)
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        y.addmm_(h, up.T, alpha=scale)
        ctx.save_for_backward(x, weight, bias, down, up, h, r, y if axis == "output" else None)
        ctx.scale, ctx.axis = scale, axis
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, down, up, h, r, y = ctx.saved_tensors  # weight, down, up with r folded in
        scale, output_axis, needs = ctx.scale, ctx.axis == "output", ctx.needs_input_grad
        grad_x = grad_down = grad_up = grad_r = None
        need_grad_x = needs[0] or (needs[6] and not output_axis)
        if needs[6] and output_axis:  # while grad is in cache: see FoldedLoRA.backward
            grad_r = ratio_grad(grad, x, None, y, bias, r, ctx.axis)
        grad_h = grad @ F_lora.transposed_times(up, scale).T if need_grad_x or needs[3] else None  # (T, rank)
        if need_grad_x:
            grad_x = (grad @ weight).addmm_(grad_h, down)
        if needs[3]:
            grad_down = grad_h.T @ x
            if not output_axis:
                grad_down = grad_down * r
        if needs[4]:
            grad_up = F_lora.transposed_times(h.T @ grad, scale)
            if output_axis:
                grad_up = grad_up * r[:, None]
        if needs[6] and not output_axis:
            grad_r = ratio_grad(grad, x, grad_x, y, bias, r, ctx.axis)
        return (grad_x if needs[0] else None), None, None, grad_down, grad_up, None, grad_r, None


def ratio_grad(grad, x, grad_x, y, bias, ratio, axis: str) -> torch.Tensor:
    """∂r of a node with the ratio folded into its weights: output axis Σ g ⊙ (y − b) / r (y − b = r ⊙ (W + ΔW)x),
    input axis Σ x ⊙ grad_x / r, summed over every dim but the channel (channel_sum)."""
    if axis == "output":
        g = channel_sum(grad * y)
        if bias is not None:
            g = g - bias * channel_sum(grad)
    else:
        g = channel_sum(x * grad_x)
    return g / ratio


# channel_sum(): rows per block when summing [T, C] over T. Measured on 2 threads (AMD EPYC, fp32): t.sum(0) of a
# tensor an elementwise op has just written took 756 µs at 4096 x 320 (16384 x 320: 2610), against 42 µs for the
# same tensor read again and 71 µs on one thread; summed in blocks of 128 rows and then over the blocks, 164 µs
# (1163). Consistent with the reduction splitting columns between the threads where the writer split rows, so
# that each thread reads the rows the other one wrote. Blocks of 16-256 rows all gained; 128 is near the best.
REDUCE_ROW_BLOCK = 128


def channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over every dim but the channel: [T, C] -> (C,) and [N, C, H, W] -> (C,). The inner dims go first, in a
    reduction split between threads the way the op that wrote t split it (see REDUCE_ROW_BLOCK); the few rows
    left go second. [N, C, H, W] at N = 2: 1314 -> 278 µs at 320 ch 64x64."""
    if t.dim() == 4:
        return t.sum((2, 3)).sum(0)
    rows, block = t.shape[0], REDUCE_ROW_BLOCK
    if rows < 2 * block:
        return t.sum(0)
    whole = rows - rows % block
    total = t[:whole].reshape(-1, block, t.shape[1]).sum(1).sum(0)  # reshape: a gradient may come transposed
    return total if whole == rows else total + t[whole:].sum(0)


def fused_linear_dora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                      up: torch.Tensor, scale: float, r: torch.Tensor, axis: str) -> torch.Tensor:
    """DoRA W'x + b for a frozen Linear and ΔW = s·U D, any leading dims; r = m / ‖W + ΔW‖ as a vector."""
    _check_axis(axis)
    # a zero magnitude: the folded form cannot give r's gradient there; a compiled graph cannot ask (the check
    # reads r back on the host)
    if torch.compiler.is_compiling() or bool((r == 0).any()):
        return _unfused_linear_dora(x, weight, bias, down, up, scale, r, axis)
    lead = x.shape[:-1]
    y = FusedLinearDoRA.apply(x.reshape(-1, x.shape[-1]), weight, bias, down, up, scale, r, axis)
    return y.reshape(*lead, y.shape[-1])


def _unfused_linear_dora(x, weight, bias, down, up, scale, r, axis):
    """The same DoRA with r applied to the activations: (W + ΔW)(r ⊙ x) + b, or r ⊙ (Wx + ΔWx) + (1 − r) ⊙ b."""
    if axis == "input":
        return F_lora.fused_linear(x * r, weight, bias, down, up, scale)
    return scaled_output(F_lora.fused_linear(x, weight, bias, down, up, scale), r, bias)
