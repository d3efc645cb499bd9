"""`lorakit merge`: LoRAs into a checkpoint, or several LoRAs into one, exactly, with per-LoRA ratios.

- Into a checkpoint: W += ratio · scale · up·down for every module (any algorithm), computed in float32
  and written as a single original-layout file. DoRA modules: W + ratio·(W' − W), as A1111 and ComfyUI
  apply a strength. kohya's plain LoRA-into-LoRA merge scales both factors by
  the ratio, so a ratio r contributes r² (sd-scripts #586/#868); here each ratio counts once.
- Into one LoRA, `concat`: ranks are stacked (down rows, up columns with ratio·scale folded in, alpha =
  total rank), an exact sum of the inputs. `svd`: the summed ΔW re-factorised to --rank/--conv-rank.
  LoHa, LoKr and DoRA modules (W' − W, which needs the base model: --base) enter as their exact dense ΔW;
  a layer with one is the SVD of the sum (concat: at its numerical rank, exact). The report gives the
  kept ‖ΔW‖² per module.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lorakit.adapters.modules import dora
from lorakit.formats.files import load_network_file
from lorakit.formats.kohya import file_family
from lorakit.models.checkpoint import load_base_model, save_single_file
from lorakit.tools.exact_delta import LayerSource, exact_delta, is_plain_lora
from lorakit.tools.lora_files import DTYPES, check_output, norm_tensors, read_modules, split_norm_deltas, write_result
from lorakit.tools.lowrank import LowRank, ResizeReport, ToolError, factorize, factorize_factors, from_parsed


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
                 rank: int | None = None, conv_rank: int | None = None, precision: str | None = None,
                 base: str | os.PathLike | None = None) -> ResizeReport:
    """base: the model the files were trained on; needed for DoRA modules, optional for LoHa/LoKr."""
    out = check_output(out, *(p for p, _ in inputs))
    if mode not in ("concat", "svd"):
        raise ToolError(f"merge mode {mode!r}: use concat (exact) or svd (to --rank)")
    by_name: dict[str, list[tuple[LowRank | torch.Tensor, float, int]]] = {}
    labels: dict[str, set[str]] = {}
    metadata, sources, dtype = {}, {}, torch.float32
    norm_parts = []  # train_norm's deltas: summed exactly (ratio·w_norm), apart from the ranked modules
    for path, ratio in inputs:
        modules, meta = read_modules(path)
        modules, norms = split_norm_deltas(modules)
        norm_parts.append((norms, ratio))
        for parsed in modules.values():  # written in the widest input dtype (float32 at least)
            dtype = torch.promote_types(dtype, next(iter(parsed.weights.values())).dtype)
        metadata = metadata or meta
        family = file_family(meta, modules)
        source = sources.setdefault(None if base else family, LayerSource(base, family))
        for name, parsed in modules.items():
            if is_plain_lora(parsed):
                part = from_parsed(parsed, path)
                part_rank = part.rank
            else:  # LoHa, LoKr, DoRA: the exact dense ΔW (DoRA: W' − W)
                part, part_rank = exact_delta(path, parsed, source)
            by_name.setdefault(name, []).append((part, ratio, part_rank))
            labels.setdefault(name, set()).add(parsed.algo.name + ("+dora" if parsed.dora_axis else ""))
    tensors, report = {}, ResizeReport(path=str(out))
    for name, parts in by_name.items():
        shape = _layer_shape(name, parts)
        new, retained = _merge_module(name, parts, shape, mode, rank, conv_rank)
        tensors.update(new.tensors(dtype))
        report.add(name, ",".join(sorted(labels[name])), shape, sum(r for _, _, r in parts), new, retained)
    tensors.update(norm_tensors(norm_parts))
    if mode == "concat":
        metadata = {**metadata, "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}
    action = {"tool": "merge", "mode": mode, "inputs": [[os.path.basename(p), r] for p, r in inputs],
              "rank": rank, "conv_rank": conv_rank}
    write_result(out, tensors, metadata, action, DTYPES.get(precision) if precision else None)
    return report


def _flat(shape: tuple) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _layer_shape(name: str, parts) -> tuple:
    """The layer's weight shape: a dense ΔW's (from the layer itself), else the LoRA factors' (4-D if any is)."""
    shapes = [tuple(m.shape) if isinstance(m, torch.Tensor) else tuple(m.weight_shape) for m, _, _ in parts]
    if len({_flat(s) for s in shapes}) > 1:
        raise ToolError(f"module {name}: the inputs disagree on the layer shape {sorted(set(shapes))}; "
                        "are they for different base models?")
    dense = [tuple(m.shape) for m, _, _ in parts if isinstance(m, torch.Tensor)]
    return dense[0] if dense else max(shapes, key=len)


def _merge_module(name, parts, shape, mode, rank, conv_rank) -> tuple[LowRank, float]:
    """(the merged LoRA, the kept share of ‖ΣΔW‖²): exact for concat, the best rank-r for svd."""
    is_3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
    total = sum(r for _, _, r in parts)
    cap = (conv_rank or rank or total) if is_3x3 else (rank or total)
    if any(isinstance(m, torch.Tensor) or m.mid is not None for m, _, _ in parts):  # sum dense ΔWs, factorise
        delta = sum((m if isinstance(m, torch.Tensor) else m.delta()).reshape(shape) * r for m, r, _ in parts)
        return factorize(name, delta, cap if mode == "svd" else None)
    if mode == "svd":  # the stacked factors are an exact factorisation of the sum: SVD from them
        up = torch.cat([m.factors()[0] * ratio for m, ratio, _ in parts], 1)
        down = torch.cat([m.factors()[1] for m, _, _ in parts], 0)
        return factorize_factors(name, up, down, shape, cap)
    first = parts[0][0]
    downs, ups = [], []
    for module, ratio, _ in parts:
        module = _same_layout(module, first)
        downs.append(module.down.double())
        ups.append(module.up.double() * (module.scale * ratio))
    return LowRank(name, torch.cat(downs, 0), torch.cat(ups, 1), float(total)), 1.0


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
