"""NormModule: LyCORIS's `train_norm` delta on a frozen GroupNorm/LayerNorm (w_norm, b_norm).

It has the AdapterModule surface the network, trainer and file code use (algo, spec, param_names, weights(),
alpha, multiplier, dropouts, forward_mode, attach/detach, merge/unmerge, delta_weight) without a rank: the
deltas are whole vectors, zero at creation so step 0 is the base model, and no alpha scales them (files
carry none, as LyCORIS writes them). Dropouts: module_dropout skips the delta for a call; dropout and
rank_dropout act on rank activations and ΔW rows, which a norm delta does not have.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters.functional import norm as F_norm
from lorakit.adapters.functional.norm import NormSpec
from lorakit.adapters.modules.base import FORWARD_MODES, Dropouts, compute_dtype


@dataclass(frozen=True)
class NormOptions:
    """The norm delta takes no options (the registry's interface wants a dataclass)."""


class NormModule(nn.Module):
    algo = "norm"
    dora_axis = None
    rank = 0  # no factorisation: reports list norm deltas apart from ranked adapters

    def __init__(self, spec: NormSpec, weights: dict[str, torch.Tensor], alpha: float | None = None,
                 dropouts: Dropouts = Dropouts(), forward_mode: str = "auto"):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        for name, tensor in weights.items():
            if tuple(tensor.shape) != (spec.weight_shape[0],) and tuple(tensor.shape) != spec.weight_shape:
                raise ValueError(f"{name} has shape {list(tensor.shape)}; the layer's weight is "
                                 f"{list(spec.weight_shape)}")
            self.register_parameter(name, nn.Parameter(tensor.reshape(spec.weight_shape)))
        if "w_norm" not in weights:
            raise ValueError("a norm delta needs w_norm")
        self.spec = spec
        self.param_names = tuple(weights)
        self.alpha = None  # LyCORIS writes no alpha for norm deltas; loaders apply them at scale 1
        self.multiplier = 1.0
        self.dropouts = dropouts
        self.forward_mode = forward_mode
        self._layer: list[nn.Module] = []  # hidden from named_parameters(): the base layer is not ours
        self._merged = False
        self._backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def create(cls, layer: nn.Module, dropouts: Dropouts = Dropouts(), forward_mode: str = "auto", dtype=None,
               device=None) -> "NormModule":
        """Zero deltas for `layer` (b_norm only where the layer has a bias, as LyCORIS)."""
        spec = NormSpec.of(layer)
        names = ("w_norm", "b_norm") if getattr(layer, "bias", None) is not None else ("w_norm",)
        weights = {n: torch.zeros(spec.weight_shape, dtype=dtype or torch.float32, device=device) for n in names}
        return cls(spec, weights, None, dropouts, forward_mode)

    # ---- the AdapterModule surface -----------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.param_names}

    def delta_weight(self) -> torch.Tensor:
        """The weight's delta (without the multiplier); the bias's is delta_bias()."""
        return self.w_norm

    def delta_bias(self) -> torch.Tensor | None:
        return getattr(self, "b_norm", None)

    def applied(self, weight: torch.Tensor, bias: torch.Tensor | None,
                multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight + m·w_norm, bias + m·b_norm), the deltas cast to the weight's dtype."""
        b = self.delta_bias()
        return F_norm.shifted(weight, bias, self.w_norm.to(weight.dtype), None if b is None else b.to(weight.dtype),
                              multiplier)

    @property
    def layer(self) -> nn.Module:
        if not self._layer:
            raise RuntimeError("norm delta is not attached to a layer")
        return self._layer[0]

    def check_layer(self, layer: nn.Module) -> None:
        """ValueError unless these deltas fit `layer` (its kind, size, groups, eps and bias)."""
        if NormSpec.of(layer) != self.spec:
            raise ValueError(f"norm delta expects {self.spec}, layer is {NormSpec.of(layer)}")
        if "b_norm" in self.param_names and layer.bias is None:
            raise ValueError("b_norm given but the layer has no bias to shift")

    def attach(self, layer: nn.Module) -> None:
        self.check_layer(layer)
        patched = layer.__dict__.get("forward")
        if patched is not None and getattr(patched, "__func__", None) is not type(layer).forward:
            raise RuntimeError(f"{type(layer).__name__} layer already has its forward replaced; restore that first")
        self._layer = [layer]
        layer.forward = self.forward

    def detach(self) -> None:
        if self._merged:
            self.unmerge()
        if self._layer:
            self.layer.__dict__.pop("forward", None)
            self._layer = []

    # ---- forward -----------------------------------------------------------------------------
    def _base(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return self.spec.apply(x, layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged or self.multiplier == 0.0:
            return self._base(x)
        if self.training and self.dropouts.module_dropout > 0.0:
            if torch.rand((), device="cpu").item() < self.dropouts.module_dropout:
                return self._base(x)
        if self.forward_mode == "bypass":
            return self.bypass_forward(x)
        layer = self.layer
        dtype = compute_dtype(layer.weight, x)
        weight, bias = self.applied(layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype),
                                    self.multiplier)
        return self.spec.apply(x, weight, bias)

    def bypass_forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + m·(norm(x)·w_norm + b_norm): the base layer untouched, the delta on the side."""
        y = self._base(x)
        normed = self.spec.normalize(x)
        b = self.delta_bias()
        delta = self.spec.affine_delta(normed, self.w_norm.to(normed.dtype), None if b is None else b.to(normed.dtype))
        return y + (delta * self.multiplier).to(y.dtype)

    # ---- merge / unmerge ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """weight += m·w_norm, bias += m·b_norm in place (float32, or float64 for a float64 layer); unmerge()
        restores both exactly."""
        if self._merged:
            return
        layer = self.layer
        self._backup = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
        dt = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        weight, bias = self.applied(layer.weight.to(dt), None if layer.bias is None else layer.bias.to(dt),
                                    self.multiplier)
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        weight, bias = self._backup
        self.layer.weight.copy_(weight)
        if bias is not None:
            self.layer.bias.copy_(bias)
        self._backup, self._merged = None, False

    @property
    def merged(self) -> bool:
        return self._merged

    def extra_repr(self) -> str:
        return f"{self.spec.kind} {self.spec.weight_shape}, norm delta"
