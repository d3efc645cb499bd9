"""LoHa module: Hadamard product of two low-rank products (rank r buys rank r²)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.adapters.functional import loha as F_loha
from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules import dora
from lorakit.adapters.modules.base import AdapterModule, Dropouts


@dataclass(frozen=True)
class LoHaOptions:
    use_tucker: bool = False  # `hada_t1/t2` cores for kxk convs
    use_scalar: bool = False  # LyCORIS: trained scalar from 0, w2a starts random (folded into hada_w1_a in files)
    dora_wd: bool = False  # DoRA: W' = m ⊙ (W + ΔW)/‖W + ΔW‖ with a trained magnitude m (`dora_scale` in files)
    wd_on_output: bool = False  # DoRA norm per output row (LyCORIS >= 3.2); default per input column (A1111/ComfyUI)
    dora_detach_norm: bool = False  # DoRA: ‖W + ΔW‖ a constant in backward (DoRA paper, PEFT, OneTrainer)


class LoHaModule(AdapterModule):
    algo = "loha"
    scalar_targets = ("w1a",)

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float | None, options: LoHaOptions = LoHaOptions(),
               dropouts: Dropouts = Dropouts(), forward_mode: str = "auto", dtype=None, device=None,
               generator: torch.Generator | None = None) -> "LoHaModule":
        if dropouts.dropout > 0.0:
            raise ValueError("dropout acts on LoRA rank activations; LoHa has none (use rank_dropout/module_dropout)")
        weights = F_loha.init_weights(spec, rank, options.use_tucker, dtype, device, generator, options.use_scalar)
        if options.dora_wd:
            weights[dora.MAGNITUDE] = dora.placeholder(spec, options.wd_on_output, dtype, device)
        module = cls(spec, weights, alpha, dropouts, forward_mode)
        dora.configure(module, options)
        if options.use_scalar:
            module.add_scalar()
        return module

    @property
    def rank(self) -> int:
        return F_loha.rank_of(self.weights())

    def build_flops(self) -> int:
        numel = math.prod(self.spec.weight_shape)
        return 2 * numel * self.rank + numel  # two rank-r products and their Hadamard product

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Through the exact rank-r² factors (see khatri_rao_factors)."""
        up, down = F_loha.khatri_rao_factors({k: v.to(x.dtype) for k, v in self.weights().items()})
        if self.spec.is_conv:
            up, down = up[:, :, None, None], down.reshape(down.shape[0], *self.spec.weight_shape[1:])
        return F_lora.bypass_delta(x, self.spec, down, up, self.scale)

    def bypass_flops(self, positions: int) -> int | None:
        if "t1" in self.param_names:
            return None  # Tucker cores: no cheap factorisation, always merged
        return F_lora.flops(self.spec, self.rank ** 2, positions)

    def delta_weight(self) -> torch.Tensor:
        return F_loha.delta_weight(self.weights(), self.scale, self.spec.weight_shape)

    def delta_sq_norm(self) -> torch.Tensor:
        """Through the exact rank-r² factors (khatri_rao_factors), in float64: no ΔW built."""
        if "t1" in self.param_names:
            return super().delta_sq_norm()
        weights = self.weights()
        up, down = F_loha.khatri_rao_factors({k: weights[k].double() for k in ("w1a", "w1b", "w2a", "w2b")})
        return F_lora.product_sq_norm(up, down, self.scale)
