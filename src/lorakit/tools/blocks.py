"""`lorakit blocks IN OUT --weights PRESET|VECTOR`: per-block multipliers baked into a file.

Accepts the LoRA Block Weight extension's presets and vectors: 17 or 26 values for SD1/SD2, 12 or 20 for
SDXL (BASE = the text encoders first). As in LBW, short vectors leave the blocks they do not list at 0,
and modules outside the 25 (SDXL: 20) blocks keep weight 1. A weight multiplies the module's first
factor (LoRA up, LoHa w1a, LoKr w1 or w1a; a train_norm delta, linear in both its tensors: w_norm and b_norm);
weight 0 removes the module, so its effect is exactly gone.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.formats.kohya import file_family
from lorakit.surgery.blocks import block_of_kohya_name
from lorakit.tools.lora_files import check_output, read_modules, write_result
from lorakit.tools.lowrank import ToolError

SD_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SD_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
XL_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
XL_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
LISTS = {("sd", 26): SD_26, ("sd", 17): SD_17, ("sdxl", 20): XL_20, ("sdxl", 12): XL_12}
PRESETS_17 = {  # LBW's code defaults (17 values: BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11)
    "NONE": [0] * 17, "ALL": [1] * 17, "ALL0.5": [0.5] * 17,
    "INS": [1, 1, 1, 1] + [0] * 13, "IND": [1, 0, 0, 0, 1, 1, 1] + [0] * 10,
    "INALL": [1] * 7 + [0] * 10, "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1] + [0] * 7 + [1, 1, 1, 1] + [0] * 5, "OUTS": [1] + [0] * 11 + [1] * 5,
    "OUTALL": [1] + [0] * 7 + [1] * 9,
}
FIRST_FACTOR = {"lora": "up", "loha": "w1a", "lokr": ("w1", "w1a"), "norm": "w_norm"}


def parse_weights(text: str, family: str) -> dict[str, float]:
    """PRESET or comma-separated vector -> weight per LBW block name (blocks not listed: 0)."""
    kind = "sdxl" if family == "sdxl" else "sd"
    values = PRESETS_17.get(text.strip().upper())
    if values is None:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ToolError(f"--weights {text!r}: not a preset ({', '.join(PRESETS_17)}) or a list of numbers") from None
    if kind == "sdxl" and len(values) == 17:
        raise ToolError("LBW's presets are 17-value SD1/SD2 vectors; for SDXL give 12 or 20 values")
    names = LISTS.get((kind, len(values)))
    if names is None:
        allowed = "17 or 26" if kind == "sd" else "12 or 20"
        raise ToolError(f"--weights has {len(values)} values; a {family} LoRA takes {allowed} (BASE first)")
    full = SD_26 if kind == "sd" else XL_20
    return {**dict.fromkeys(full, 0.0), **dict(zip(names, values))}


def lbw_block(module: str, family: str) -> str | None:
    """LBW block of a kohya module name: BASE for text encoders, None outside the blocks."""
    if module.startswith("lora_te"):
        return "BASE"
    block = block_of_kohya_name(module.removeprefix("lora_unet_"), family)
    if family == "sdxl" and block in ("M01", "M02"):
        return "M00"  # SGM's middle block is one LBW block
    return block if block not in ("EMB", "FINAL") else None


def apply_block_weights(src: str | os.PathLike, out: str | os.PathLike, weights: str) -> tuple[Path, dict]:
    out = check_output(out, src)
    modules, metadata = read_modules(src)
    family = file_family(metadata, modules)
    table = parse_weights(weights, family)
    tensors, counts = {}, {"scaled": 0, "removed": 0, "kept": 0}
    for name, parsed in modules.items():
        block = lbw_block(name, family)
        w = 1.0 if block is None else table.get(block, 0.0)
        if w == 0.0:
            counts["removed"] += 1
            continue
        if parsed.dora_axis is not None and w != 1.0:  # m·(W+w·ΔW)/‖W+w·ΔW‖ is not a w-scaled change
            raise ToolError(f"{src}: module {name} is DoRA; its effect does not scale with a factor, so block "
                            f"{block} can take weight 0 (removed) or 1 (kept), not {w:g}")
        counts["kept" if w == 1.0 else "scaled"] += 1
        factor = FIRST_FACTOR[parsed.algo.name]
        if isinstance(factor, tuple):
            factor = factor[0] if factor[0] in parsed.weights else factor[1]
        norm = parsed.algo.name == "norm"
        for internal, tensor in parsed.weights.items():
            key = f"{name}.{parsed.algo.file_keys[internal]}"
            tensors[key] = tensor * w if internal == factor or norm else tensor
        if not norm:  # norm deltas are written without alpha, as LyCORIS does
            alpha = parsed.alpha if parsed.alpha is not None else 0.0  # 0 = "alpha = rank", as read
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if not tensors:
        raise ToolError(f"--weights {weights!r} removes every module of {src}; nothing would be left")
    action = {"tool": "blocks", "source": os.path.basename(str(src)), "weights": weights, **counts}
    return write_result(out, tensors, metadata, action), counts
