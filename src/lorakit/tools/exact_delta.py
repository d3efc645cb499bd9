"""The exact ΔW of file modules that are not plain LoRA factors: LoHa, LoKr, and DoRA's W' − W.

resize, merge into one LoRA and convert re-factorise these with an SVD of the dense change. The change is
computed by the adapters' own modules and functional math (the ΔW every loader applies), never re-derived
here. Two things a file alone does not say:
- the layer's weight shape: LoHa (and LoKr with a 2-D w2b) store conv factors flattened to (r, in·kh·kw).
  It comes from the base model when one is given, else from the file's family architecture built on the
  meta device (nothing allocated); a file for another size of model is refused with the way out.
- a DoRA module's base weight W: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ depends on it, so DoRA needs the base model.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import nn

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.formats.files import adapter_from_tensors
from lorakit.formats.kohya import ModuleTensors
from lorakit.formats.safetensors_io import LoraFileError
from lorakit.models.checkpoint import load_base_model
from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.targets import all_named_layers
from lorakit.tools.lowrank import ToolError, dora_needs_base


def is_plain_lora(parsed: ModuleTensors) -> bool:
    """A LoRA/LoCon module without DoRA: its factors already are a low-rank factorisation of ΔW."""
    return parsed.algo.name == "lora" and parsed.dora_axis is None


@lru_cache(maxsize=4)
def architecture_layers(family: str) -> dict[str, tuple[str, nn.Module, str]]:
    """kohya name -> (module path, layer, component) of a family's full-size architecture on the meta device."""
    return all_named_layers(build_unet(family, device="meta"), build_text_encoders(family, device="meta"))


class LayerSource:
    """The layers the modules of one or more files adapt: the base model's (loaded once, on first need) when
    `base` is given, else the family architecture's (shapes only)."""

    def __init__(self, base: str | os.PathLike | None, family: str):
        self.base, self.family = base, family
        self._layers: dict | None = None

    def layers(self) -> dict[str, tuple[str, nn.Module, str]]:
        if self._layers is None:
            if self.base is None:
                self._layers = architecture_layers(self.family)
            else:
                model = load_base_model(self.base)
                self._layers = all_named_layers(model.pipeline.unet, model.text_encoders)
        return self._layers

    def layer(self, path: str, name: str) -> nn.Module:
        layers = self.layers()
        if name not in layers:
            where = f"the base model {self.base}" if self.base else f"a {self.family} model"
            raise ToolError(f"{path}: module {name} is not a layer of {where}; pass the base model the file was "
                            "trained on with --base")
        return layers[name][1]


@torch.no_grad()
def exact_delta(path: str, parsed: ModuleTensors, source: LayerSource) -> tuple[torch.Tensor, int]:
    """(ΔW in float64 shaped like the layer's weight, the module's rank). DoRA: W' − W at strength 1."""
    if parsed.dora_axis is not None and source.base is None:
        raise dora_needs_base(path, parsed)
    layer = source.layer(path, parsed.name)
    try:
        adapter = adapter_from_tensors(path, parsed, LayerSpec.of(layer), torch.float64)
    except LoraFileError as e:
        if source.base is not None:
            raise
        raise ToolError(f"{e}; the shapes were taken from a full-size {source.family} model: pass the base model "
                        "the file was trained on with --base") from None
    delta = adapter.delta_weight()
    if adapter.dora_axis is not None:
        delta = F_dora.dora_delta(layer.weight.double(), delta, adapter.magnitude, adapter.dora_axis)
    return delta, adapter.rank
