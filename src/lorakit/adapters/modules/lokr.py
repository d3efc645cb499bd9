"""LoKr module: Kronecker product of a small W1 and a (possibly low-rank) W2."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.adapters.functional import lokr as F_lokr
from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules import dora
from lorakit.adapters.modules.base import AdapterModule, Dropouts


@dataclass(frozen=True)
class LoKrOptions:
    factor: int = -1  # cap on the small Kronecker factor; -1 = most balanced split
    decompose_both: bool = False  # also factorise W1 as w1a @ w1b
    use_tucker: bool = False  # `lokr_t2` core for kxk convs (ComfyUI fails on it: off by default)
    full_matrix: bool = False  # W2 as a full matrix: scale 1, alpha ignored
    use_scalar: bool = False  # LyCORIS: trained scalar from 0, W2 starts random (folded into lokr_w1(_a) in files)
    unbalanced_factorization: bool = False  # LyCORIS: the larger factor of the output size goes to W1
    dora_wd: bool = False  # DoRA: W' = m ⊙ (W + ΔW)/‖W + ΔW‖ with a trained magnitude m (`dora_scale` in files)
    wd_on_output: bool = False  # DoRA norm per output row (LyCORIS >= 3.2); default per input column (A1111/ComfyUI)
    dora_detach_norm: bool = False  # DoRA: ‖W + ΔW‖ a constant in backward (DoRA paper, PEFT, OneTrainer)


def full_w1_numel(weights: dict[str, torch.Tensor]) -> int:
    if "w1" in weights:
        return weights["w1"].numel()
    return weights["w1a"].shape[0] * weights["w1b"].shape[1]


class LoKrModule(AdapterModule):
    algo = "lokr"
    scalar_targets = ("w1", "w1a")

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float | None, options: LoKrOptions = LoKrOptions(),
               dropouts: Dropouts = Dropouts(), forward_mode: str = "auto", dtype=None, device=None,
               generator: torch.Generator | None = None) -> "LoKrModule":
        if dropouts.dropout > 0.0:
            raise ValueError("dropout acts on LoRA rank activations; LoKr has none (use rank_dropout/module_dropout)")
        weights = F_lokr.init_weights(spec, rank, options.factor, options.decompose_both, options.use_tucker,
                                      options.full_matrix, dtype, device, generator, options.use_scalar,
                                      options.unbalanced_factorization)
        if options.dora_wd:
            weights[dora.MAGNITUDE] = dora.placeholder(spec, options.wd_on_output, dtype, device)
        module = cls(spec, weights, alpha if F_lokr.is_factorised(weights) else None, dropouts, forward_mode)
        dora.configure(module, options)
        if not F_lokr.is_factorised(weights):
            module.alpha.fill_(float(rank))  # both sides full: consumers use scale 1; store alpha = dim like LyCORIS
        if options.use_scalar:
            module.add_scalar()
        return module

    @property
    def rank(self) -> int:
        r = F_lokr.rank_of(self.weights())
        return 1 if r is None else r  # both sides full: no rank; scale is 1 whatever alpha says

    @property
    def scale(self) -> float:
        return F_lokr.scale_for(self.weights(), self.alpha_value)

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor:
        weights = {k: v.to(x.dtype) for k, v in self.weights().items()}
        return F_lokr.bypass_delta(x, self.spec, weights, self.scale)

    def bypass_flops(self, positions: int) -> int:
        return F_lokr.bypass_flops(self.weights(), self.spec, positions)

    def bypass_cost(self, positions: int) -> float:
        # The bypass runs W2 as c small GEMMs/convs with channel counts ~sqrt(in). Measured on a 2-core CPU
        # (benchmarks/adapters.py: 4096 tokens x 320, and 320-channel 3x3 convs at 64x64) they reach about
        # 1/5 of the base op's throughput: the dense merged path then wins unless ΔW is large for few positions.
        return self.bypass_flops(positions) * 5.0

    def build_flops(self) -> int:
        numel = math.prod(self.spec.weight_shape)
        w = self.weights()
        w2_numel = numel // full_w1_numel(w)
        low_rank = 0 if "w2" in w else w2_numel * self.rank * (2 if "t2" in w else 1)
        return numel + low_rank  # the Kronecker product plus building a low-rank W2

    def delta_weight(self) -> torch.Tensor:
        return F_lokr.delta_weight(self.weights(), self.scale, self.spec.weight_shape)

    def delta_sq_norm(self) -> torch.Tensor:
        """‖s·kron(W1, W2)‖² = s²·‖W1‖²·‖W2‖², with a low-rank W2 through its Grams: no ΔW built."""
        w = self.weights()
        w1_sq = F_lokr.full_w1(w).double().pow(2).sum()
        if "w2b" in w and "t2" not in w:
            w2_sq = F_lora.product_sq_norm(w["w2a"], w["w2b"], 1.0)
        else:
            w2_sq = torch.linalg.vector_norm(F_lokr.full_w2(w, self.spec.weight_shape), dtype=torch.float64) ** 2
        return w1_sq * w2_sq * self.scale ** 2
