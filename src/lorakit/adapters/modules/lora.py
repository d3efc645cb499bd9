"""LoRA (Linear, 1x1 conv) and LoCon (kxk conv, optional Tucker `mid`) module."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules import dora
from lorakit.adapters.modules.base import AdapterModule, Dropouts


@dataclass(frozen=True)
class LoRAOptions:
    use_tucker: bool = False  # kxk convs as down 1x1 -> mid kxk -> up 1x1 (`lora_mid`); diffusers cannot load it
    use_scalar: bool = False  # LyCORIS: trained scalar from 0, `up` starts random (folded into lora_up in files)
    dora_wd: bool = False  # DoRA: W' = m ⊙ (W + ΔW)/‖W + ΔW‖ with a trained magnitude m (`dora_scale` in files)
    wd_on_output: bool = False  # DoRA norm per output row (LyCORIS >= 3.2); default per input column (A1111/ComfyUI)


class LoRAModule(AdapterModule):
    algo = "lora"
    dropout_path = "bypass"  # masks act on the rank activations, which exist only on the bypass path
    scalar_targets = ("up",)

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float | None, options: LoRAOptions = LoRAOptions(),
               dropouts: Dropouts = Dropouts(), forward_mode: str = "auto", dtype=None, device=None,
               generator: torch.Generator | None = None) -> "LoRAModule":
        if options.dora_wd and dropouts.dropout > 0.0:
            raise ValueError("dropout acts on LoRA rank activations, which DoRA's merged forward does not form "
                             "(LyCORIS ignores it); use rank_dropout/module_dropout with dora_wd")
        weights = F_lora.init_weights(spec, rank, options.use_tucker, dtype, device, generator, options.use_scalar)
        if options.dora_wd:
            weights[dora.MAGNITUDE] = dora.placeholder(spec, options.wd_on_output, dtype, device)
        module = cls(spec, weights, alpha, dropouts, forward_mode)
        module._magnitude_pending = options.dora_wd
        if options.use_scalar:
            module.add_scalar()
        return module

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return F_lora.delta_weight(self.down, self.weights()["up"], self.scale, getattr(self, "mid", None))

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        p = self.dropouts.rank_dropout
        if self.training and p > 0.0:
            mask = self.dropouts.rescaled((torch.rand(x.shape[0], self.rank, device=x.device) >= p).to(x.dtype))
        dt = x.dtype
        mid = getattr(self, "mid", None)
        return F_lora.bypass_delta(x, self.spec, self.down.to(dt), self.weights()["up"].to(dt), self.scale,
                                   None if mid is None else mid.to(dt), mask, self.dropouts.dropout, self.training)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return None if "mid" in self.param_names else (self.weights()["up"], self.down, self.scale)

    def _fusable(self, x: torch.Tensor) -> bool:
        """The fused Linear node applies: it gives no gradient to the layer's own weight/bias, does not
        autocast and has no dropouts."""
        layer = self.layer
        dropping = self.training and (self.dropouts.dropout > 0.0 or self.dropouts.rank_dropout > 0.0)
        return (not self.spec.is_conv and not dropping and not layer.weight.requires_grad
                and (layer.bias is None or not layer.bias.requires_grad) and layer.weight.dtype == x.dtype
                and not torch.is_autocast_enabled(x.device.type))

    def undecomposed_bypass(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return super().undecomposed_bypass(x)
        layer, dt = self.layer, x.dtype
        return F_lora.fused_linear(x, layer.weight, layer.bias, self.down.to(dt), self.weights()["up"].to(dt),
                                   self.scale)

    def bypass_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x) or (self.dora_axis is not None and self.multiplier != 1.0):
            return super().bypass_forward(x)
        layer, dt = self.layer, x.dtype
        if self.dora_axis is not None:
            r = dora.ratio(self).reshape(-1).to(dt)
            return F_dora.fused_linear_dora(x, layer.weight, layer.bias, self.down.to(dt),
                                            self.weights()["up"].to(dt), self.scale, r, self.dora_axis)
        return F_lora.fused_linear(x, layer.weight, layer.bias, self.down.to(dt), self.weights()["up"].to(dt),
                                   self.scale * self.multiplier)

    def bypass_flops(self, positions: int) -> int:
        return F_lora.flops(self.spec, self.rank, positions, tucker="mid" in self.param_names)
