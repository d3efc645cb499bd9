"""LoHa module: Hadamard product of two low-rank products (rank r buys rank r²)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.adapters.functional import loha as F_loha
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules.base import AdapterModule, Dropouts


@dataclass(frozen=True)
class LoHaOptions:
    use_tucker: bool = False  # `hada_t1/t2` cores for kxk convs


class LoHaModule(AdapterModule):
    algo = "loha"

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float | None, options: LoHaOptions = LoHaOptions(),
               dropouts: Dropouts = Dropouts(), forward_mode: str = "auto", dtype=None, device=None,
               generator: torch.Generator | None = None) -> "LoHaModule":
        if dropouts.dropout > 0.0:
            raise ValueError("dropout acts on LoRA rank activations; LoHa has none (use rank_dropout/module_dropout)")
        weights = F_loha.init_weights(spec, rank, options.use_tucker, dtype, device, generator)
        return cls(spec, weights, alpha, dropouts, forward_mode)

    @property
    def rank(self) -> int:
        return F_loha.rank_of(self.weights())

    def delta_weight(self) -> torch.Tensor:
        return F_loha.delta_weight(self.weights(), self.scale, self.spec.weight_shape)
