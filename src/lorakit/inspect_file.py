"""`lorakit inspect`: what a LoRA file holds, without a base model.

Reads our files and files written by kohya sd-scripts and LyCORIS: per module the algorithm, layer kind,
rank, alpha and effective scale; a per-block summary (IN00..OUT11 / SDXL slots / text-encoder layers,
conv vs linear); dtypes, size, metadata, and whether sshs_model_hash matches the tensor bytes.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch

from lorakit.adapters.functional import lokr as F_lokr
from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional.layer import scale_of
from lorakit.formats.kohya import KeyProblem, file_family, group_by_module, parse_module
from lorakit.formats.safetensors_io import LoraFileError, file_data_hash, read_header, read_safetensors
from lorakit.formats.values import nonfinite_tensors, rank_mismatches
from lorakit.surgery.blocks import SD_BLOCKS, SDXL_BLOCKS, block_of_kohya_name
from lorakit.surgery.targets import te_block_label

# kohya names of kxk convs, for layouts that flatten the kernel (LoHa, factorised LoKr)
# kxk convs by name (for LoHa/LoKr, whose conv factors are saved 2-D); conv_in/conv_out come with LyCORIS presets
_KXK_SUFFIXES = ("_conv1", "_conv2", "_conv", "_op", "_in_layers_2", "_out_layers_3", "_conv_in", "_conv_out",
                 "_input_blocks_0_0", "_out_2")


def inspect_file(path: str | os.PathLike) -> dict:
    header, _, _ = read_header(path)
    if any(k.startswith("model.diffusion_model.") for k in header):
        return inspect_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    try:
        groups = group_by_module(tensors)
    except KeyError as e:
        raise LoraFileError(path, "key has no '<module>.<tensor>' form", str(e.args[0])) from None
    if not groups:
        raise LoraFileError(path, "the file holds no LoRA modules (an empty or metadata-only safetensors file)")
    family = file_family(metadata, list(groups))
    modules = []
    for name, suffixed in sorted(groups.items()):
        try:
            parsed = parse_module(name, suffixed)
        except KeyProblem as e:
            raise LoraFileError(path, str(e), e.key) from None
        clash = rank_mismatches(parsed)
        if clash:
            raise LoraFileError(path, f"module {name}: {'; '.join(clash)}: the file is damaged or mis-converted",
                                name)
        modules.append(_describe(parsed, family))
    stored = metadata.get("sshs_model_hash")
    computed = file_data_hash(path)
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "family": family,
        "algorithms": dict(Counter(m["algo"] for m in modules)),
        "algorithm_labels": dict(Counter(m["label"] for m in modules)),  # with DoRA and its axis
        "warnings": dora_warnings(modules),
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())),
        "num_modules": len(modules),
        "num_parameters": sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha")),
        "components": dict(Counter(m["component"] for m in modules)),
        "kinds": dict(Counter(m["kind"] for m in modules)),
        "blocks": _block_summary([m for m in modules if m["kind"] != "norm"], family),
        "norm_deltas": dict(Counter(m["block"] or m["component"] for m in modules if m["kind"] == "norm")),
        "hash": {"stored": stored, "computed": computed, "matches": None if stored is None else stored == computed},
        "metadata": {k: _maybe_json(v) for k, v in sorted(metadata.items())},
        "modules": modules,
    }


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """A base-model single file, from its header alone: family, prediction type, parts, dtypes, size."""
    from lorakit.models.checkpoint import FAMILY_NAMES, detect_family, detect_prediction
    from lorakit.models.ldm_layout import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX

    header, metadata, _ = read_header(path)
    try:
        family = detect_family(header)
    except ValueError as e:
        raise LoraFileError(path, str(e)) from None
    prediction, why = detect_prediction(header, family)
    parts = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    parts.update({f"text_encoder{'_' + str(i + 1) if i else ''}": p for i, p in enumerate(TEXT_PREFIXES[family])})
    counts = {name: sum(k.startswith(prefix) for k in header) for name, prefix in parts.items()}
    params = {name: sum(math.prod(v["shape"]) for k, v in header.items() if k.startswith(prefix))
              for name, prefix in parts.items()}
    return {"file": str(path), "kind": "checkpoint", "size_bytes": Path(path).stat().st_size,
            "family": family, "family_name": FAMILY_NAMES[family], "prediction_type": prediction,
            "prediction_reason": why, "tensors": counts, "parameters": params,
            "missing": [name for name, n in counts.items() if n == 0],
            "dtypes": dict(Counter(v["dtype"] for v in header.values())), "metadata": metadata}


def format_checkpoint_report(report: dict) -> str:
    lines = [f"file        {report['file']}", f"size        {report['size_bytes']:,} bytes",
             f"base model  {report['family_name']} single file; prediction {report['prediction_type']} "
             f"({report['prediction_reason']})", f"dtypes      {report['dtypes']}"]
    for name, n in report["tensors"].items():
        lines.append(f"{name:<16}{n:>6} tensors {report['parameters'][name]:>14,} parameters")
    if report["missing"]:
        lines.append(f"missing     {', '.join(report['missing'])}: supply them separately to load this file")
    return "\n".join(lines)


def _describe(parsed, family: str) -> dict:
    w, name, algo = parsed.weights, parsed.name, parsed.algo.name
    if algo == "norm":
        return _describe_norm(parsed, family)
    if algo == "lora":
        rank, ref = w["down"].shape[0], w["down"]
        kind = _kind_from_shape(ref.shape) if "mid" not in w else f"conv{w['mid'].shape[2]}x{w['mid'].shape[3]}"
        scale = scale_of(parsed.alpha, rank)
    elif algo == "loha":
        rank = w["w1b"].shape[0]
        kind = f"conv{w['t1'].shape[2]}x{w['t1'].shape[3]}" if "t1" in w else _kind_from_name(name)
        scale = scale_of(parsed.alpha, rank)
    else:
        rank = F_lokr.rank_of(w)
        kind = _kind_from_shape(w["w2"].shape) if "w2" in w else (
            f"conv{w['t2'].shape[2]}x{w['t2'].shape[3]}" if "t2" in w else _kind_from_name(name))
        scale = F_lokr.scale_for(w, parsed.alpha)
    component, block = _component_and_block(name, family)
    norm, effective = _delta_stats(parsed, scale)
    return {"name": name, "algo": algo, "label": algorithm_label(parsed), "dora_axis": parsed.dora_axis,
            "dora_source": parsed.dora_source, "kind": kind, "rank": rank if rank is not None else "full",
            "alpha": parsed.alpha, "scale": scale, "component": component, "block": block,
            "norm": norm, "effective_rank": effective,
            "tucker": any(k in w for k in ("mid", "t1", "t2")), "nonfinite": nonfinite_tensors(parsed),
            "shapes": {parsed.algo.file_keys[k]: list(v.shape) for k, v in w.items()}}


def _describe_norm(parsed, family: str) -> dict:
    """A train_norm delta: no rank, no alpha (loaders apply it at scale 1); ‖·‖ over w_norm and b_norm."""
    component, block = _component_and_block(parsed.name, family)
    bad = nonfinite_tensors(parsed)
    norm = None if bad else float(torch.cat([v.double().reshape(-1) for v in parsed.weights.values()]).norm())
    return {"name": parsed.name, "algo": "norm", "label": ALGO_NAMES["norm"], "dora_axis": None,
            "dora_source": None, "kind": "norm", "rank": "-", "alpha": None, "scale": 1.0,
            "component": component, "block": block, "norm": norm, "effective_rank": None, "tucker": False,
            "nonfinite": bad, "shapes": {parsed.algo.file_keys[k]: list(v.shape) for k, v in parsed.weights.items()}}


ALGO_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "norm": "Norm (train_norm)"}
# how each DoRA layout is written, and which loaders compute it differently from the model that was trained
DORA_LOADER_NOTES = {
    "output": "A1111 normalises every dora_scale per input column, so it computes these modules wrong; ComfyUI's "
              "output-axis branch divides by ‖W‖ instead of ‖W + ΔW‖. lorakit and LyCORIS compute them as "
              "trained; write wd_on_output = false (input axis) for files meant for A1111/ComfyUI/Forge",
    "peft": "A1111 and ComfyUI read DoRA from dora_scale only: `lorakit convert --to kohya` writes it (output "
            "axis), with the output-axis caveats",
}


def algorithm_label(parsed) -> str:
    """'LoRA', or 'LoRA+DoRA (input axis)' / 'LoHa+DoRA (output axis, PEFT lora_magnitude_vector)'."""
    name = ALGO_NAMES[parsed.algo.name]
    if parsed.dora_axis is None:
        return name
    source = "" if parsed.dora_source == "dora_scale" else f", {parsed.dora_source}"
    return f"{name}+DoRA ({parsed.dora_axis} axis{source})"


def dora_warnings(modules: list[dict]) -> list[str]:
    """One line per DoRA layout some loaders compute differently, with the module count."""
    out = []
    output_axis = [m for m in modules if m["dora_axis"] == "output"]
    if output_axis:
        out.append(f"{len(output_axis)} module(s) hold output-axis DoRA: {DORA_LOADER_NOTES['output']}")
    foreign = [m for m in modules if m["dora_source"] not in (None, "dora_scale")]
    if foreign:
        out.append(f"{len(foreign)} module(s) store the DoRA magnitude as {foreign[0]['dora_source']}: "
                   f"{DORA_LOADER_NOTES['peft']}")
    return out


@torch.no_grad()
def _delta_stats(parsed, scale: float) -> tuple[float | None, int | None]:
    """‖ΔW‖_F and the effective rank (singular values holding 99% of ‖ΔW‖²), without forming big matrices
    where the factors allow (LoRA: the SVD comes from the factors, see functional.lora.svd_of_product)."""
    w, algo = {k: v.double() for k, v in parsed.weights.items()}, parsed.algo.name
    if any(k in w for k in ("mid", "t1", "t2")) or nonfinite_tensors(parsed):
        return None, None  # no norm for Tucker cores here; none at all for NaN/inf (an SVD would fail)
    if algo == "lora":
        up, down = w["up"].reshape(w["up"].shape[0], -1), w["down"].reshape(w["down"].shape[0], -1)
        s = F_lora.svd_of_product(up, down)[1] * abs(scale)
        energy = torch.cumsum(s ** 2, 0) / max(float((s ** 2).sum()), 1e-300)
        return float(s.pow(2).sum().sqrt()), int((energy < 0.99).sum()) + 1
    if algo == "loha":
        first = w["w1a"] @ w["w1b"].reshape(w["w1b"].shape[0], -1)
        second = w["w2a"] @ w["w2b"].reshape(w["w2b"].shape[0], -1)
        return float((first * second).norm()) * abs(scale), None
    w1 = w["w1"] if "w1" in w else w["w1a"] @ w["w1b"]
    w2 = w["w2"] if "w2" in w else w["w2a"] @ w["w2b"].reshape(w["w2b"].shape[0], -1)
    return float(w1.norm() * w2.norm()) * abs(scale), None  # ‖A ⊗ B‖ = ‖A‖·‖B‖


def _kind_from_shape(shape) -> str:
    if len(shape) == 2:
        return "linear"
    return "conv1x1" if tuple(shape[2:]) == (1, 1) else f"conv{shape[2]}x{shape[3]}"


def _kind_from_name(name: str) -> str:
    return "conv3x3" if name.startswith("lora_unet_") and name.endswith(_KXK_SUFFIXES) else "linear/1x1"


def _component_and_block(name: str, family: str) -> tuple[str, str | None]:
    if name.startswith("lora_unet_"):
        return "unet", block_of_kohya_name(name[len("lora_unet_"):], family)
    for prefix in ("lora_te1_", "lora_te2_", "lora_te_"):
        if name.startswith(prefix):
            component = prefix[len("lora_"):-1]
            parts = name.split("_layers_")
            return component, te_block_label(component, parts[1].split("_")[0] if len(parts) > 1 else "")
    return "other", None


def _block_summary(modules: list[dict], family: str) -> dict[str, dict[str, int]]:
    order = list(SDXL_BLOCKS if family == "sdxl" else SD_BLOCKS)
    empty = {"linear": 0, "conv": 0, "norm_linear": 0.0, "norm_conv": 0.0}
    summary: dict[str, dict] = defaultdict(lambda: dict(empty))
    for m in modules:
        key = m["block"] or m["component"]
        kind = "conv" if m["kind"].startswith("conv") and m["kind"] != "conv1x1" else "linear"
        summary[key][kind] += 1
        summary[key][f"norm_{kind}"] = (summary[key][f"norm_{kind}"] ** 2 + (m["norm"] or 0.0) ** 2) ** 0.5
    unet = {b: dict(summary[b]) if b in summary else dict(empty) for b in order}
    rest = {k: dict(v) for k, v in sorted(summary.items()) if k not in unet}
    return {**unet, **rest}


def _maybe_json(value: str):
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def format_report(report: dict, show_modules: bool = False) -> str:
    if report.get("kind") == "checkpoint":
        return format_checkpoint_report(report)
    lines = [f"file        {report['file']}",
             f"size        {report['size_bytes']:,} bytes, {report['num_parameters']:,} parameters",
             f"base        {report['family']}",
             f"algorithms  " + ", ".join(f"{k} x{v}" for k, v in report["algorithm_labels"].items()),
             f"dtypes      " + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items()),
             f"modules     {report['num_modules']} " + str(report["components"]) + " " + str(report["kinds"])]
    h = report["hash"]
    verdict = {True: "matches the tensor bytes", False: "DOES NOT match the tensor bytes", None: "absent"}[h["matches"]]
    lines.append(f"hash        sshs_model_hash {verdict} (computed {h['computed'][:12]}...)")
    for m in report["modules"]:
        if m["nonfinite"]:  # a diverged run or a broken converter: loaders would draw black or noise
            lines.append(f"NON-FINITE  {m['name']}: NaN/inf in {', '.join(m['nonfinite'])}; merge, resize and "
                         "convert refuse this file")
    for warning in report.get("warnings", []):
        lines.append(f"WARNING     {warning}")
    norms = sum(report.get("norm_deltas", {}).values())
    if norms:
        lines.append(f"norm deltas {norms} GroupNorm/LayerNorm layers (LyCORIS train_norm): weight + w_norm, "
                     "bias + b_norm, times the multiplier; no alpha")
    ranks = Counter((m["kind"], m["rank"], m["alpha"]) for m in report["modules"] if m["kind"] != "norm")
    lines.append("ranks       " + "; ".join(f"{k} rank {r} alpha {a} x{n}" for (k, r, a), n in sorted(
        ranks.items(), key=lambda kv: str(kv[0]))))
    lines.append("blocks      block   linear  conv   ‖ΔW‖ attention      conv")
    for block, c in report["blocks"].items():
        mark = f"{c['norm_linear']:>17.4g} {c['norm_conv']:>9.4g}" if c["linear"] or c["conv"] else "   (none)"
        lines.append(f"            {block:<7} {c['linear']:>6} {c['conv']:>5}{mark}")
    meta = report["metadata"]
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_base_model_version", "modelspec.architecture", "modelspec.title"):
        if key in meta:
            lines.append(f"{key:<24}{json.dumps(meta[key]) if not isinstance(meta[key], str) else meta[key]}")
    lines.append(f"(+{max(0, len(meta) - 7)} more metadata keys: --json shows all)")
    if show_modules:
        for m in report["modules"]:
            lines.append(f"  {m['name']:<90} {m['label']:<5} {m['kind']:<10} r={m['rank']} "
                         f"alpha={m['alpha']} scale={m['scale']:.4g} {m['block']} ‖ΔW‖={m['norm'] or 0:.4g} "
                         f"eff.rank={m['effective_rank'] or '-'}")
    return "\n".join(lines)
