"""`lorakit extract BASE TUNED OUT --dim D --conv-dim C`: a LoRA/LoCon from the difference of two models.

Both models load through the user path (single file or diffusers folder, same architecture). Every layer
kohya would target is compared; ΔW = W_tuned - W_base is re-factorised by SVD to `dim` (linear and 1x1)
or `conv_dim` (3x3; 0 skips them) with alpha = rank. Layers whose difference is negligible are skipped
and counted. No quantile clamping: the result is the best rank-r approximation, not a clipped one.
GroupNorm/LayerNorm layers (what train_norm adapts) are not extracted, as in kohya's script: the ones whose
weight or bias differs are counted (stats["norms_not_extracted"]) so the CLI can say so.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.adapters.functional.norm import is_trainable_norm
from lorakit.formats.kohya import build_metadata
from lorakit.models.checkpoint import load_base_model
from lorakit.surgery.targets import find_targets
from lorakit.tools.lora_files import DTYPES, check_output, write_result
from lorakit.tools.lowrank import ToolError, factorize


@torch.no_grad()
def extract_lora(base: str, tuned: str, out: str | os.PathLike, dim: int = 4, conv_dim: int = 0,
                 min_diff: float = 1e-6, precision: str | None = "fp16") -> tuple[Path, dict]:
    out = check_output(out, base, tuned)
    a, b = load_base_model(base), load_base_model(tuned)
    if a.family != b.family:
        raise ToolError(f"{base} is {a.family} but {tuned} is {b.family}: extract needs the same architecture")
    targets_a = find_targets(a.pipeline.unet, a.text_encoders, conv_dim > 0)
    targets_b = {t.name: t for t in find_targets(b.pipeline.unet, b.text_encoders, conv_dim > 0)}
    tensors, stats = {}, {"extracted": 0, "unchanged": 0, "min_retained": 1.0}
    for t in targets_a:
        other = targets_b.get(t.name)
        if other is None or other.layer.weight.shape != t.layer.weight.shape:
            raise ToolError(f"{tuned}: layer {t.name} is missing or has another shape; not the same architecture")
        delta = other.layer.weight.double() - t.layer.weight.double()
        if float(delta.abs().max()) <= min_diff:
            stats["unchanged"] += 1
            continue
        rank = conv_dim if t.is_kxk_conv else dim
        module, retained = factorize(t.name, delta, rank)
        tensors.update(module.tensors(torch.float32))
        stats["extracted"] += 1
        stats["min_retained"] = min(stats["min_retained"], retained)
    stats["norms_not_extracted"] = _changed_norms(a, b, min_diff)
    if not tensors:
        raise ToolError(f"{base} and {tuned} do not differ in any targeted layer: nothing to extract")
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))} if conv_dim else {}
    metadata = build_metadata(a.family, dim, float(dim), args, Path(out).stem, "lora")
    action = {"tool": "extract", "base": os.path.basename(str(base)), "tuned": os.path.basename(str(tuned)),
              "dim": dim, "conv_dim": conv_dim, **stats}
    return write_result(out, tensors, metadata, action, DTYPES.get(precision) if precision else None), stats


def _changed_norms(a, b, min_diff: float) -> int:
    """How many GroupNorm/LayerNorm layers inside the targeted modules (train_norm's choice) differ."""
    def norms(model):
        return {t.name: t.layer for t in find_targets(model.pipeline.unet, model.text_encoders, True, norms=True)
                if is_trainable_norm(t.layer)}

    tuned = norms(b)
    count = 0
    for name, layer in norms(a).items():
        other = tuned.get(name)
        if other is None:
            continue
        pairs = [(layer.weight, other.weight)] + ([(layer.bias, other.bias)] if layer.bias is not None else [])
        count += any(float((y.double() - x.double()).abs().max()) > min_diff for x, y in pairs)
    return count
