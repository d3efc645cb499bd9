"""Norm-layer deltas (LyCORIS `train_norm`): GroupNorm/LayerNorm weight and bias shifted by trained vectors.

Files hold `w_norm` and `b_norm`, each shaped like the layer's weight (C,), with no alpha and no rank: the
adapted layer computes norm(x)·(weight + m·w_norm) + (bias + m·b_norm) for multiplier m. Everything is
linear in the deltas, so the bypass form base(x) + m·(norm(x)·w_norm + b_norm) is the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NORM_CLASSES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@dataclass(frozen=True)
class NormSpec:
    """What a GroupNorm/LayerNorm computes besides its weight and bias."""

    kind: str  # 'groupnorm' or 'layernorm'
    weight_shape: tuple[int, ...]
    eps: float
    num_groups: int = 0  # GroupNorm only

    is_conv = False  # reports that split linear vs conv layers count norms with neither

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised input, before the affine weight and bias."""
        if self.kind == "groupnorm":
            return F.group_norm(x, self.num_groups, None, None, self.eps)
        return F.layer_norm(x, self.weight_shape, None, None, self.eps)

    def apply(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's own computation with another weight and bias."""
        if self.kind == "groupnorm":
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.layer_norm(x, self.weight_shape, weight, bias, self.eps)

    def affine_delta(self, normed: torch.Tensor, w_delta: torch.Tensor,
                     b_delta: torch.Tensor | None) -> torch.Tensor:
        """normed·w_delta + b_delta, broadcast as the layer broadcasts its weight (channels on dim 1 for
        GroupNorm, the trailing dims for LayerNorm)."""
        shape = (-1,) + (1,) * (normed.dim() - 2) if self.kind == "groupnorm" else self.weight_shape
        out = normed * w_delta.reshape(shape)
        return out if b_delta is None else out + b_delta.reshape(shape)

    @staticmethod
    def of(layer: torch.nn.Module) -> "NormSpec":
        if isinstance(layer, torch.nn.GroupNorm) and layer.affine:
            return NormSpec("groupnorm", (layer.num_channels,), float(layer.eps), layer.num_groups)
        if isinstance(layer, torch.nn.LayerNorm) and layer.weight is not None:
            return NormSpec("layernorm", tuple(layer.normalized_shape), float(layer.eps))
        raise TypeError(f"only affine GroupNorm/LayerNorm layers take norm deltas, got {type(layer).__name__}")


def is_trainable_norm(layer: torch.nn.Module) -> bool:
    """A GroupNorm/LayerNorm with a weight to shift (LyCORIS skips the rest)."""
    return isinstance(layer, NORM_CLASSES) and getattr(layer, "weight", None) is not None


def shifted(weight: torch.Tensor, bias: torch.Tensor | None, w_norm: torch.Tensor, b_norm: torch.Tensor | None,
            multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight + m·w_norm, bias + m·b_norm): the merged parameters. A layer without bias takes b_norm as its
    bias (LyCORIS adds b_norm to a missing bias as to zero)."""
    new_weight = weight + w_norm.reshape(weight.shape) * multiplier
    if b_norm is None:
        return new_weight, bias
    delta = b_norm.reshape(weight.shape) * multiplier
    return new_weight, delta if bias is None else bias + delta
