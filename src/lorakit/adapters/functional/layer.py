"""How a frozen layer applies a weight: the one place that knows Linear vs Conv2d."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerSpec:
    """Shape and geometry of a frozen Linear or Conv2d layer.

    weight_shape is (out, in) for Linear and (out, in, kh, kw) for Conv2d.
    """

    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def kind(self) -> str:
        """'linear', 'conv1x1' or 'conv3x3'-style label used in reports and rank selection."""
        if not self.is_conv:
            return "linear"
        kh, kw = self.kernel
        return "conv1x1" if (kh, kw) == (1, 1) else f"conv{kh}x{kw}"

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """op(x, weight): the layer's own computation with another weight of the same shape."""
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        return F.linear(x, weight, bias)

    @staticmethod
    def of(layer: torch.nn.Module) -> "LayerSpec":
        if isinstance(layer, torch.nn.Linear):
            return LayerSpec(tuple(layer.weight.shape))
        if isinstance(layer, torch.nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"grouped Conv2d (groups={layer.groups}) is not supported")
            if layer.padding_mode != "zeros":
                raise ValueError(f"Conv2d padding_mode={layer.padding_mode!r} is not supported (only 'zeros')")
            return LayerSpec(tuple(layer.weight.shape), tuple(layer.stride), layer.padding, tuple(layer.dilation))
        raise TypeError(f"only Linear and Conv2d layers can be adapted, got {type(layer).__name__}")


def effective_alpha(alpha: float | None, rank: int) -> float:
    """kohya/LyCORIS rule: alpha missing or 0 means alpha = rank (scale 1). The one place this rule lives."""
    return float(rank) if alpha is None or float(alpha) == 0.0 else float(alpha)


def scale_of(alpha: float | None, rank: int) -> float:
    """ΔW scale = alpha / rank, with effective_alpha's rule for a missing or zero alpha."""
    return effective_alpha(alpha, rank) / rank


def draw_device(device, generator: torch.Generator | None):
    """Where a seeded initial draw is made: on its generator's device (the run's CPU generator), then moved to
    `device`, so one seed starts the same adapters on any device (a CPU generator cannot fill a CUDA tensor)."""
    return device if generator is None else generator.device
