"""LoRA (Linear, 1x1 conv) and LoCon (kxk conv, optional Tucker `mid`) module."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional import dora_gemm as F_dora_gemm
from lorakit.adapters.functional import folded as F_folded
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
    dora_detach_norm: bool = False  # DoRA: ‖W + ΔW‖ a constant in backward (DoRA paper, PEFT, OneTrainer)


# folds(): activations (positions x (in + out)) per weight element from which the folded node is faster than
# the bypass, measured forward + backward per SD1.5 layer shape with the trainer's allocator setting (2-core
# Xeon, fp32; docs/benchmarks.md, "Folded LoRA"). GEMM-shaped layers (Linear, 1x1 conv): 320x320 at 4096
# tokens (ratio 25.6) gains 30% of the adapter's cost, at 1024 tokens (6.4) breaks even; 3x3 convs: 320
# out-channels at 64x64 (ratio 1.9-2.8) gain 5-13%, 320 at 32x32 (0.7) loses.
FOLD_ACTIVATIONS_PER_WEIGHT = {"gemm": 8.0, "kxk": 1.5}
# runs_dora_gemm(): activations per weight element up to which output-axis DoRA convs run as one GEMM with the
# norm's products (functional.dora_gemm), forward + backward on a 2-core AMD EPYC, fp32 (docs/benchmarks.md,
# "DoRA convs with few positions"): 1280 ch 3x3 at 8x8, batch 1 (ratio 0.011) 41 -> 30 ms, batch 2 (0.022)
# 54 -> 49, 640 ch at 8x8 (0.022) 9.7 -> 7.8; batch 4 (0.044) 82 -> 90 and 640 ch at 16x16 (0.089) lose.
DORA_GEMM_MAX_ACTIVATIONS_PER_WEIGHT = 0.03


def _autocasting(x: torch.Tensor) -> bool:
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # meta: FLOP models


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
        dora.configure(module, options)
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

    def _one_node_applies(self, x: torch.Tensor) -> bool:
        """The fused and folded nodes give no gradient to the layer's own weight/bias, do not autocast and
        have no dropouts."""
        layer = self.layer
        dropping = self.training and (self.dropouts.dropout > 0.0 or self.dropouts.rank_dropout > 0.0)
        return not (dropping or layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad)
                    or layer.weight.dtype != x.dtype or _autocasting(x))

    def folds(self, x: torch.Tensor) -> bool:
        """Whether the bypass runs folded (functional.folded): float32/float64 without autocast (a half W'
        would round s·U D away), no Tucker mid, DoRA only at multiplier 1 and not
        under torch.compile (its zero-ratio check reads the ratio back), a conv over an NCHW input with
        explicit padding, and activations large against the weight: positions·(in + out) at least
        FOLD_ACTIVATIONS_PER_WEIGHT times the weight's size (kxk convs: the rank-r convs the fold saves run
        slowly in oneDNN, so it pays off sooner). A detached module is judged from x alone (FLOP models)."""
        spec = self.spec
        if (x.dtype not in (torch.float32, torch.float64) or "mid" in self.param_names
                or _autocasting(x)
                or (self.dora_axis is not None and (self.multiplier != 1.0 or torch.compiler.is_compiling()))
                or (self._layer and not self._one_node_applies(x))):
            return False
        if spec.is_conv and (x.dim() != 4 or isinstance(spec.padding, str)):
            return False
        kxk = spec.is_conv and spec.kernel != (1, 1)
        activations = self._output_positions(x) * (spec.in_features + spec.out_features)
        return activations >= FOLD_ACTIVATIONS_PER_WEIGHT["kxk" if kxk else "gemm"] * math.prod(spec.weight_shape)

    def runs_dora_gemm(self, x: torch.Tensor) -> bool:
        """Whether the bypass runs as functional.dora_gemm: output-axis DoRA on a conv (no Tucker mid, explicit
        padding) over an NCHW float32/float64 CPU input, at multiplier 1, outside torch.compile, where the fused
        node applies and activations are small against the weight (measured on CPU only: elsewhere the
        conv's own kernel runs)."""
        spec = self.spec
        if not (self.dora_axis == "output" and spec.is_conv and x.dim() == 4 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and self.multiplier == 1.0
                and "mid" not in self.param_names and not isinstance(spec.padding, str)
                and not torch.compiler.is_compiling() and self._layer and self._one_node_applies(x)):
            return False
        activations = self._output_positions(x) * (spec.in_features + spec.out_features)
        return activations <= DORA_GEMM_MAX_ACTIVATIONS_PER_WEIGHT * math.prod(spec.weight_shape)

    def _dora_gemm_forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, spec, dt = self.layer, self.spec, x.dtype
        w_sq = dora.frozen_weight_sq(self, layer.weight, dt)
        return F_dora_gemm.conv_dora_gemm(x, layer.weight, layer.bias, self.down.to(dt), self.weights()["up"].to(dt),
                                          self.magnitude, w_sq, self.scale,
                                          F_folded.Geometry(spec.stride, spec.padding, spec.dilation),
                                          self.dora_detach_norm)

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer output through the folded node, or None for a DoRA ratio with an exact zero."""
        layer, spec, dt = self.layer, self.spec, x.dtype
        geometry = F_folded.Geometry(spec.stride, spec.padding, spec.dilation) if spec.is_conv else None
        ratio, scale = None, self.scale * self.multiplier
        if self.dora_axis is not None:
            ratio = dora.ratio(self).reshape(-1).to(dt)
            if bool((ratio == 0).any()):  # the ratio's gradient divides by it
                return None
        return F_folded.folded(x, layer.weight, layer.bias, self.down.to(dt), self.weights()["up"].to(dt), scale,
                               geometry, ratio, self.dora_axis)

    def _fused_node(self, x: torch.Tensor):
        """F_lora.fused_linear or fused_conv1x1 where one applies, else None (see _one_node_applies); the
        conv node takes a plain 1x1 conv (stride 1, no padding, no Tucker mid) over a contiguous NCHW input."""
        spec = self.spec
        if not self._one_node_applies(x):
            return None
        if not spec.is_conv:
            return F_lora.fused_linear
        plain_1x1 = (spec.kernel == (1, 1) and spec.stride == (1, 1) and spec.padding in ((0, 0), "valid", "same")
                     and "mid" not in self.param_names)
        return F_lora.fused_conv1x1 if plain_1x1 and x.dim() == 4 and x.is_contiguous() else None

    def undecomposed_bypass(self, x: torch.Tensor) -> torch.Tensor:
        node = self._fused_node(x)
        if node is None:
            return super().undecomposed_bypass(x)
        layer, dt = self.layer, x.dtype
        return node(x, layer.weight, layer.bias, self.down.to(dt), self.weights()["up"].to(dt), self.scale)

    def bypass_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_dora_gemm(x):
            return self._dora_gemm_forward(x)
        if self.folds(x):
            y = self._folded_forward(x)
            if y is not None:
                return y
        node = self._fused_node(x)
        if node is None or (self.dora_axis is not None and (self.multiplier != 1.0 or self.spec.is_conv)):
            return super().bypass_forward(x)
        layer, dt = self.layer, x.dtype
        if self.dora_axis is not None:
            r = dora.ratio(self).reshape(-1).to(dt)
            return F_dora.fused_linear_dora(x, layer.weight, layer.bias, self.down.to(dt),
                                            self.weights()["up"].to(dt), self.scale, r, self.dora_axis)
        return node(x, layer.weight, layer.bias, self.down.to(dt), self.weights()["up"].to(dt),
                    self.scale * self.multiplier)

    def bypass_flops(self, positions: int) -> int:
        return F_lora.flops(self.spec, self.rank, positions, tucker="mid" in self.param_names)
