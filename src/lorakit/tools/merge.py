"""`lorakit merge`: LoRAs into a checkpoint, or several LoRAs into one, exactly, with per-LoRA ratios.

- Into a checkpoint: W += ratio · scale · up·down for every module (any algorithm), computed in float32
  and written as a single original-layout file. DoRA modules: W + ratio·(W' − W), as A1111 and ComfyUI
  apply a strength. kohya's plain LoRA-into-LoRA merge scales both factors by
  the ratio, so a ratio r contributes r² (sd-scripts #586/#868); here each ratio counts once.
- Into one LoRA, `concat`: ranks are stacked (down rows, up columns with ratio·scale folded in, alpha =
  total rank), an exact sum of the inputs. `svd`: the summed ΔW re-factorised to --rank/--conv-rank.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.adapters.modules import dora
from lorakit.formats.files import load_network_file
from lorakit.models.checkpoint import load_base_model, save_single_file
from lorakit.tools.lora_files import DTYPES, check_output, norm_tensors, read_modules, split_norm_deltas, write_result
from lorakit.tools.lowrank import LowRank, ToolError, factorize, factorize_factors, from_parsed


def parse_inputs(items: list[str]) -> list[tuple[str, float]]:
    """`file.safetensors` or `file.safetensors:0.7` -> (path, ratio); a ':' not followed by a number is
    part of the path."""
    out = []
    for item in items:
        path, sep, ratio = item.rpartition(":")
        try:
            out.append((path, float(ratio)) if sep and path else (item, 1.0))
        except ValueError:
            out.append((item, 1.0))
    return out


def _same_layout(module: LowRank, like: LowRank) -> LowRank:
    if module.down.dim() != like.down.dim():  # 1x1 stored 4-D in one file and 2-D in another
        if like.down.dim() == 4:
            return LowRank(module.name, module.down[:, :, None, None], module.up[:, :, None, None], module.alpha)
        return LowRank(module.name, module.down[:, :, 0, 0], module.up[:, :, 0, 0], module.alpha)
    return module


def merge_loras(inputs: list[tuple[str, float]], out: str | os.PathLike, mode: str = "concat",
                rank: int | None = None, conv_rank: int | None = None, precision: str | None = None) -> Path:
    out = check_output(out, *(p for p, _ in inputs))
    by_name: dict[str, list[tuple[LowRank, float]]] = {}
    metadata = {}
    norm_parts = []  # train_norm's deltas: summed exactly (ratio·w_norm), apart from the ranked modules
    for path, ratio in inputs:
        modules, meta = read_modules(path)
        modules, norms = split_norm_deltas(modules)
        norm_parts.append((norms, ratio))
        metadata = metadata or meta
        for name, parsed in modules.items():
            by_name.setdefault(name, []).append((from_parsed(parsed, path), ratio))
    tensors = {}
    for name, parts in by_name.items():
        shapes = {tuple(m.delta(torch.float32).shape) for m, _ in parts}
        if len(shapes) > 1:
            raise ToolError(f"module {name}: the inputs disagree on the layer shape {sorted(shapes)}; "
                            "are they for different base models?")
        tensors.update(_merge_module(name, parts, mode, rank, conv_rank).tensors())
    tensors.update(norm_tensors(norm_parts))
    if mode == "concat":
        metadata = {**metadata, "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}
    action = {"tool": "merge", "mode": mode, "inputs": [[os.path.basename(p), r] for p, r in inputs],
              "rank": rank, "conv_rank": conv_rank}
    return write_result(out, tensors, metadata, action, DTYPES.get(precision) if precision else None)


def _merge_module(name, parts, mode, rank, conv_rank) -> LowRank:
    if mode not in ("concat", "svd"):
        raise ToolError(f"merge mode {mode!r}: use concat (exact) or svd (to --rank)")
    first = parts[0][0]
    shape = first.weight_shape
    is_3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
    total = sum(m.rank for m, _ in parts)
    cap = (conv_rank or rank or total) if is_3x3 else (rank or total)
    if any(m.mid is not None for m, _ in parts):  # Tucker cores: sum the dense ΔWs, then factorise
        delta = sum(m.delta() * r for m, r in parts)
        return factorize(name, delta, cap if mode == "svd" else total)[0]
    if mode == "svd":  # the stacked factors are an exact factorisation of the sum: SVD from them
        factors = [(m.factors(), ratio) for m, ratio in parts]
        up = torch.cat([scaled_up * ratio for (scaled_up, _), ratio in factors], 1)
        down = torch.cat([down for (_, down), _ in factors], 0)
        return factorize_factors(name, up, down, shape, cap)[0]
    downs, ups = [], []
    for module, ratio in parts:
        module = _same_layout(module, first)
        downs.append(module.down.float())
        ups.append(module.up.float() * (module.scale * ratio))
    return LowRank(name, torch.cat(downs, 0), torch.cat(ups, 1), float(total))


@torch.no_grad()
def merge_into_checkpoint(base: str, inputs: list[tuple[str, float]], out: str | os.PathLike,
                          precision: str | None = "fp16") -> Path:
    """Bake LoRAs (any algorithm) into a base model and write one original-layout checkpoint."""
    out = check_output(out, base, *(p for p, _ in inputs))
    for path, _ in inputs:
        read_modules(path)  # every file's values checked before the (slow) base model loads
    model = load_base_model(base)
    pipe = model.pipeline
    text_encoders = model.text_encoders
    for path, ratio in inputs:
        network, _ = load_network_file(path, pipe.unet, text_encoders, apply=False)
        for name, adapter in network.adapters.items():
            weight = network.layer(name).weight
            if adapter.algo == "norm":  # train_norm: weight + ratio·w_norm and bias + ratio·b_norm, as loaders do
                bias = network.layer(name).bias
                new_weight, new_bias = adapter.applied(weight.float(), None if bias is None else bias.float(), ratio)
                weight.copy_(new_weight.to(weight.dtype))
                if bias is not None:
                    bias.copy_(new_bias.to(bias.dtype))
                continue
            if adapter.dora_axis is not None:  # A1111/ComfyUI's strength rule: W + ratio·(W' − W)
                merged = dora.applied_weight(adapter, weight.float(), adapter.delta_weight().float(), ratio)
            else:
                merged = weight.float() + adapter.delta_weight().float() * ratio
            weight.copy_(merged.to(weight.dtype))
    meta = {"lorakit_merged_loras": ", ".join(f"{os.path.basename(p)}:{r:g}" for p, r in inputs),
            "lorakit_base": os.path.basename(str(base))}
    return save_single_file(out, model.family, pipe.unet, pipe.vae, text_encoders, DTYPES.get(precision),
                            metadata=meta)
