"""DoRA on any adapter module (LoRA/LoCon, LoHa, LoKr): the trained magnitude and the DoRA forwards.

A DoRA module is an ordinary module whose weights include `magnitude`, stored in the file layout of
functional.dora ((out, 1[, 1, 1]) output axis, (1, in[, 1, 1]) input axis), so its shape says the axis.
A freshly created magnitude is a placeholder until the module is attached: then it becomes ‖W‖ of the
layer it adapts, which makes step 0 the base model exactly. Files loaded onto a module carry their own.

These functions take the module (not imported here: base.py imports this file).
"""
from __future__ import annotations

import weakref

import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional.layer import LayerSpec

MAGNITUDE = "magnitude"


def placeholder(spec: LayerSpec, wd_on_output: bool, dtype=None, device=None) -> torch.Tensor:
    """The magnitude before the module sees its layer (ones; set to ‖W‖ on attach)."""
    axis = "output" if wd_on_output else "input"
    return torch.ones(F_dora.magnitude_shape(spec.weight_shape, axis), dtype=dtype, device=device)


def axis_of(spec: LayerSpec, weights: dict[str, torch.Tensor]) -> str | None:
    """'output' / 'input' for a DoRA module, None without a magnitude; a misfit shape is an error."""
    magnitude = weights.get(MAGNITUDE)
    if magnitude is None:
        return None
    axis = F_dora.axis_of(tuple(magnitude.shape), spec.weight_shape)
    if axis is None:
        raise ValueError(f"DoRA magnitude {list(magnitude.shape)} fits neither axis of weight "
                         f"{list(spec.weight_shape)}: expected {list(F_dora.magnitude_shape(spec.weight_shape, 'output'))}"
                         f" (output) or {list(F_dora.magnitude_shape(spec.weight_shape, 'input'))} (input)")
    return axis


def configure(module, options) -> None:
    """What a created module takes from its options (dora_wd, dora_detach_norm): a magnitude made here
    becomes ‖W‖ on attach; a detached norm is a constant in backward (the DoRA paper's §4.3, PEFT,
    OneTrainer): ΔW's gradient comes through W + ΔW alone, none through ‖W + ΔW‖."""
    module._magnitude_pending = options.dora_wd
    module.dora_detach_norm = options.dora_wd and options.dora_detach_norm


@torch.no_grad()
def init_from_layer(module, weight: torch.Tensor) -> None:
    """m = ‖W‖ on the module's axis (so W' = W until training moves ΔW or m)."""
    module.magnitude.copy_(F_dora.init_magnitude(weight, module.dora_axis, module.magnitude.dtype))


def applied_weight(module, weight: torch.Tensor, delta: torch.Tensor, multiplier: float) -> torch.Tensor:
    """W + μ·(W' − W) in at least float32: the weight the merged forward, merge and merge tools use."""
    return F_dora.dora_weight(weight, delta, module.magnitude, module.dora_axis, multiplier,
                              module.dora_detach_norm)


def frozen_weight_sq(module, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W‖² on the module's axis for a frozen weight, computed once and kept while it is the same tensor with
    the same contents (a merge or an in-place load bumps its version; a replaced weight is another object:
    a weak reference tells them apart, where a reused memory address would not). Writes through `.data`
    bypass the version counter: lorakit makes none to a frozen weight."""
    key = (weight._version, weight.dtype, weight.device, dtype)
    cached = module.__dict__.get("_frozen_weight_sq")
    if cached is None or cached[0]() is not weight or cached[1] != key:
        with torch.no_grad():
            cached = (weakref.ref(weight), key, F_dora.weight_sq(weight.to(dtype), module.dora_axis))
        module.__dict__["_frozen_weight_sq"] = cached
    return cached[2]


def ratio(module) -> torch.Tensor:
    """m / ‖W + ΔW‖ for the module's current weights, in the magnitude's layout (at least float32). For a
    rank-r ΔW = s·U D over a frozen W the norm comes from the r-sized identity of lowrank_norm_sq instead of
    building ΔW and W + ΔW (and their backward): same value, several weight-sized passes fewer. With a
    detached norm only m gets a gradient here, and no ΔW is built in the graph."""
    weight, factors, detach = module.layer.weight, module.lowrank_factors(), module.dora_detach_norm
    if factors is None or weight.requires_grad:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            delta = module.delta_weight()
        return F_dora.ratio(weight, delta, module.magnitude, module.dora_axis, detach)
    up, down, scale = factors
    dtype = F_dora.compute_dtype(weight, up, down, module.magnitude)
    return F_dora.lowrank_ratio(frozen_weight_sq(module, weight, dtype), weight, up, down, scale,
                                module.magnitude, module.dora_axis, detach)


def bypass_forward(module, x: torch.Tensor) -> torch.Tensor:
    """The layer output without building W' (exact): the ratio r = m/‖W + ΔW‖ per channel scales
    the output (output axis: W'x = r ⊙ (Wx + ΔWx)) or the input (input axis: W'x = (W + ΔW)(r ⊙ x)).
    The point is a base weight that gets no gradient (and, for LoRA, no ΔW built at all: see ratio()).
    Written as base + change so that step 0 (ratio exactly 1, ΔW = 0) is the layer's own output bit for bit:
    output axis, with y = Wx + b + ΔWx: W'x + b = r ⊙ y + (1 − r) ⊙ b; input axis (W + ΔW)(r ⊙ x) + b."""
    layer, spec = module.layer, module.spec
    scale = F_dora.channel_scale(ratio(module), spec.is_conv).to(x.dtype)
    if module.dora_axis == "output":
        bias = None if layer.bias is None else (layer.bias.view(-1, 1, 1) if spec.is_conv else layer.bias)
        y = F_dora.scaled_output(module.undecomposed_bypass(x), scale, None if bias is None else bias.to(x.dtype))
    else:
        y = module.undecomposed_bypass(x * scale)
    if module.multiplier != 1.0:
        base = module._base(x)
        y = base + module.multiplier * (y - base)
    return y
