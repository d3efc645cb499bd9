"""Saving a LoraNetwork as a kohya/LyCORIS .safetensors file and loading such files onto a model."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.functional.norm import NormSpec, is_trainable_norm
from lorakit.adapters.modules.norm import NormModule
from lorakit.formats.kohya import (KeyProblem, ModuleTensors, build_metadata, group_by_module, minimal_metadata,
                                   module_to_tensors, parse_module)
from lorakit.formats.safetensors_io import LoraFileError, read_safetensors, tensor_data_hash, write_safetensors
from lorakit.surgery.blocks import UNetLayout, block_of_kohya_name
from lorakit.surgery.network import AdapterInfo, LoraNetwork
from lorakit.surgery.targets import all_named_layers, find_targets
from lorakit.adapters.registry import get_algorithm


def network_tensors(network: LoraNetwork, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in network.adapters.items():
        algo = get_algorithm(adapter.algo)
        alpha = None if adapter.alpha is None else float(adapter.alpha)  # norm deltas carry no alpha
        tensors.update(module_to_tensors(name, algo, adapter.weights(), alpha, dtype))
    return tensors


def save_network(network: LoraNetwork, path: str | os.PathLike, dtype: torch.dtype | None = None,
                 title: str | None = None, metadata: dict[str, str] | None = None,
                 v_prediction: bool = False, minimal: bool = False) -> Path:
    """Write the network atomically with ss_*/modelspec metadata and a correct sshs_model_hash; minimal: only
    what kohya's --no_metadata keeps (the keys that say how to load the file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    tensors = network_tensors(network, dtype)
    meta = network_metadata(network, title or path.stem, v_prediction, metadata)
    if minimal:
        meta = minimal_metadata(meta)
    digest = tensor_data_hash(tensors)  # the data region does not depend on the metadata
    meta["sshs_model_hash"] = digest
    meta["modelspec.hash_sha256"] = "0x" + digest
    write_safetensors(path, tensors, meta)
    return path


def network_metadata(network: LoraNetwork, title: str, v_prediction: bool = False,
                     metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The ss_*/modelspec.* metadata save_network writes (before the two hash keys)."""
    cfg = network.config
    algo = get_algorithm(cfg.algo).name if cfg else next(iter(network.adapters.values())).algo
    dim = cfg.network_dim if cfg else "Dynamic"
    alpha = float(cfg.network_alpha) if cfg else "Dynamic"
    args = cfg.network_args() if cfg else {"algo": algo}
    return build_metadata(network.family, dim, alpha, args, title, algo, v_prediction, metadata)


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    unmatched: list[str] = field(default_factory=list)  # module names with no layer in the model


def load_network_file(path: str | os.PathLike, unet: nn.Module | None = None, text_encoders=(),
                      partial: bool = False, dtype: torch.dtype = torch.float32, apply: bool = True,
                      multiplier: float = 1.0) -> tuple[LoraNetwork, LoadReport]:
    """Build a network exactly as the file describes (any mix of algorithms, ranks, conv layers) and attach it.

    Every module is parsed and shape-checked against its layer before anything is attached; an unknown
    key, a module with no layer (unless partial=True, then reported) or a wrong shape is one LoraFileError.
    """
    tensors, metadata = read_safetensors(path)
    layers = all_named_layers(unet, list(text_encoders))
    layout = UNetLayout.of(unet) if unet is not None else None
    blocks = {t.name: t.block for t in find_targets(unet, list(text_encoders), True)}
    try:
        groups = group_by_module(tensors)
    except KeyError as e:
        raise LoraFileError(path, "key has no '<module>.<tensor>' form", str(e.args[0])) from None
    report = LoadReport(str(path))
    network = LoraNetwork(layout.family if layout else "sd1", layout.block_names if layout else ())
    for name, suffixed in groups.items():
        try:
            parsed = parse_module(name, suffixed)
        except KeyProblem as e:
            raise LoraFileError(path, str(e), e.key) from None
        if name not in layers:
            report.unmatched.append(name)
            continue
        module_path, layer, component = layers[name]
        adapter = module_from_tensors(path, parsed, layer, dtype)
        adapter.multiplier = multiplier
        block = blocks.get(name) or (block_of_kohya_name(name[len("lora_unet_"):], layout.family)
                                     if component == "unet" else None)  # layers only LyCORIS presets target
        network.add(name, adapter, layer, AdapterInfo(component, block, module_path))
    if report.unmatched and not partial:
        shown = ", ".join(report.unmatched[:5]) + (" ..." if len(report.unmatched) > 5 else "")
        raise LoraFileError(path, f"{len(report.unmatched)} module(s) match no layer of this model: {shown}. "
                                  "Is this file for another base model (SD1/SD2/SDXL)? Pass partial=True to load "
                                  "the rest", report.unmatched[0])
    report.loaded = len(network.adapters)
    network.file_metadata = metadata
    return (network.apply_to() if apply else network), report


def module_from_tensors(path, parsed: ModuleTensors, layer: nn.Module, dtype: torch.dtype):
    """The module a file's tensors describe for `layer`: a norm delta or a ranked adapter, shape-checked."""
    if (parsed.algo.name == "norm") != is_trainable_norm(layer):
        what = "norm delta (w_norm)" if parsed.algo.name == "norm" else f"{parsed.algo.name} adapter"
        raise LoraFileError(path, f"holds a {what} for a {type(layer).__name__} layer", parsed.name)
    if parsed.algo.name != "norm":
        return adapter_from_tensors(path, parsed, LayerSpec.of(layer), dtype)
    try:
        module = NormModule(NormSpec.of(layer), {k: v.to(dtype) for k, v in parsed.weights.items()})
        module.check_layer(layer)
    except ValueError as e:
        raise LoraFileError(path, f"norm delta does not fit the layer: {e}", parsed.name) from None
    return module


def adapter_from_tensors(path, parsed: ModuleTensors, spec: LayerSpec, dtype: torch.dtype):
    """Reshape to our layout (2-D/4-D 1x1 either way, LoKr 4-D w2b), check shapes on meta, build the module."""
    weights = {k: _fit_layout(k, v, spec, parsed.algo.name) for k, v in parsed.weights.items()}
    module_cls = parsed.algo.module
    try:
        probe = module_cls(spec, {k: v.to("meta") for k, v in weights.items()}, parsed.alpha)
        shape = tuple(probe.delta_weight().shape)
    except (RuntimeError, ValueError, IndexError) as e:
        raise LoraFileError(path, f"tensor shapes {_shapes(parsed)} do not form a {parsed.algo.name} "
                                  f"adapter: {e}", parsed.name) from None
    if shape != spec.weight_shape:
        raise LoraFileError(path, f"adapter gives ΔW {list(shape)} but the layer weight is "
                                  f"{list(spec.weight_shape)}; shapes {_shapes(parsed)}", parsed.name)
    return module_cls(spec, {k: v.to(dtype) for k, v in weights.items()}, parsed.alpha)


def _fit_layout(internal: str, t: torch.Tensor, spec: LayerSpec, algo: str) -> torch.Tensor:
    if internal == "magnitude" and t.dim() != len(spec.weight_shape):  # DoRA on a 1x1 conv saved 2-D, or back
        return t.reshape(*t.shape[:2], 1, 1) if spec.is_conv else t.reshape(t.shape[:2])
    if algo == "lora" and internal in ("down", "up"):
        if spec.is_conv and t.dim() == 2:  # 2-D weights on a 1x1 conv (or a DyLoRA 2-D up)
            return t[:, :, None, None]
        if not spec.is_conv and t.dim() == 4 and t.shape[2:] == (1, 1):  # SD2 proj_in saved as 1x1 conv
            return t[:, :, 0, 0]
    if algo == "lokr" and internal == "w2b" and t.dim() == 4:  # functional.lokr.weight_gen writes (r, d, k, k)
        return t.reshape(t.shape[0], -1)
    if algo in ("loha", "lokr") and internal == "w2" and not spec.is_conv and t.dim() == 4:
        return t[:, :, 0, 0]
    return t


def _shapes(parsed: ModuleTensors) -> dict[str, list[int]]:
    return {parsed.algo.file_keys[k]: list(v.shape) for k, v in parsed.weights.items()}
