"""`lorakit convert IN OUT --to kohya|diffusers [--precision fp32|fp16|bf16]`: key layouts and dtypes.

kohya (`lora_unet_..._to_q.lora_down.weight` + `.alpha`) <-> diffusers/PEFT (`unet.<module path>.lora_A.weight`,
`lora_B`), for LoRA and LoCon. PEFT files carry no alpha, so kohya -> diffusers folds scale = alpha/rank
into lora_B; diffusers -> kohya writes alpha = rank. Module paths come from the family's architecture
built on the meta device (nothing is allocated), so kohya names, which flatten paths with underscores,
map back unambiguously. train_norm's norm deltas (w_norm/b_norm) have no PEFT form: --to diffusers refuses
them; kohya -> kohya keeps them.

DoRA: an output-axis magnitude becomes PEFT's `lora_magnitude_vector` (both normalise per output row), and
back to `dora_scale` (out, 1[, 1, 1]); an input-axis file has no exact PEFT form and is refused with why.
"""
from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.formats.kohya import ModuleTensors, file_family
from lorakit.formats.safetensors_io import read_header, read_safetensors
from lorakit.tools.exact_delta import architecture_layers
from lorakit.tools.lora_files import DTYPES, check_output, read_modules, write_result
from lorakit.tools.lowrank import ToolError, from_parsed

TE_ROOTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
PEFT_KEYS = ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
             (".lora_magnitude_vector.weight", "dora_scale"), (".lora_magnitude_vector", "dora_scale"))


@lru_cache(maxsize=4)
def name_table(family: str) -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, module path) for a family's full-size architecture (meta device)."""
    return {name: (component, path) for name, (path, _, component) in architecture_layers(family).items()}


def detect_layout(keys) -> str:
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(k.startswith("lora_") for k in keys):
        return "kohya"
    raise ToolError("no LoRA keys found (neither kohya `lora_unet_...` nor diffusers `...lora_A.weight`)")


def kohya_to_diffusers(src, family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    modules, metadata = read_modules(src)
    table = name_table(family)
    tensors = {}
    for name, parsed in modules.items():
        if name not in table:
            raise ToolError(f"{src}: module {name} is not a layer of a {family} model")
        if parsed.algo.name == "norm":
            raise ToolError(f"{src}: module {name} is a train_norm norm delta (w_norm/b_norm), which PEFT/diffusers "
                            "files cannot hold; keep the kohya file (A1111, ComfyUI and LyCORIS load it)")
        magnitude = peft_magnitude(src, parsed, family)
        if magnitude is not None:  # the rest of the module is its plain LoRA part
            parsed = replace(parsed, weights={k: v for k, v in parsed.weights.items() if k != "magnitude"})
        module = from_parsed(parsed, str(src))
        if module.mid is not None:
            raise ToolError(f"{src}: module {name} uses a Tucker core (lora_mid), which PEFT cannot express")
        component, path = table[name]
        prefix = f"{TE_ROOTS[component]}.{path}"
        tensors[f"{prefix}.lora_A.weight"] = module.down
        tensors[f"{prefix}.lora_B.weight"] = (module.up.float() * module.scale).to(module.up.dtype)
        if magnitude is not None:
            # the U-Net takes the key PEFT writes; transformers' loader (text encoders) wants the parameter's name
            suffix = "" if component == "unet" else ".weight"
            tensors[f"{prefix}.lora_magnitude_vector{suffix}"] = magnitude
    return tensors, metadata


def peft_magnitude(src, parsed: ModuleTensors, family: str) -> torch.Tensor | None:
    """A DoRA module's magnitude as PEFT's `lora_magnitude_vector` ((out,) Linear, (1, out, 1, 1) conv), None
    without DoRA. PEFT normalises per output row, so an output-axis magnitude maps exactly. An input-axis one
    cannot: W' = (W + ΔW)·diag(m / ‖W + ΔW‖) per column is no row rescaling of W plus a rank-r change, so no
    PEFT file equals it, whatever W is."""
    if parsed.dora_axis is None:
        return None
    if parsed.dora_axis == "input":
        raise ToolError(f"{src}: module {parsed.name} is DoRA on the input axis (norm per input column: LyCORIS "
                        "legacy, OneTrainer, lorakit's default); PEFT/diffusers DoRA normalises per output row, and "
                        "no PEFT file equals an input-axis DoRA exactly. Train with wd_on_output = true for "
                        "diffusers, or write an exact plain LoRA: `lorakit resize --base BASE --rank <layer size>`, "
                        "then convert that")
    if parsed.algo.name != "lora":
        raise ToolError(f"{src}: module {parsed.name} is {parsed.algo.name}+DoRA; PEFT's DoRA is LoRA-based")
    magnitude = parsed.weights["magnitude"]
    dims = architecture_layers(family)[parsed.name][1].weight.dim()
    return F_dora.internal_to_peft(magnitude.reshape(magnitude.shape[0], *([1] * (dims - 1))))


def diffusers_to_kohya(src, family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    raw, metadata = read_safetensors(src)
    reverse = {f"{TE_ROOTS[c]}.{p}": n for n, (c, p) in name_table(family).items()}
    tensors = {}
    for key, tensor in raw.items():
        for part, kohya in PEFT_KEYS:
            if key.endswith(part):
                path = key[: -len(part)]
                if path not in reverse:
                    raise ToolError(f"{src}: {path} is not a layer of a {family} model")
                if kohya == "dora_scale":  # PEFT's per-output-row magnitude: the output-axis layout
                    dims = architecture_layers(family)[reverse[path]][1].weight.dim()
                    tensor = F_dora.peft_to_internal(tensor, dims)
                tensors[f"{reverse[path]}.{kohya}"] = tensor
                if kohya == "lora_down.weight":
                    tensors[f"{reverse[path]}.alpha"] = torch.tensor(float(tensor.shape[0]))
                break
        else:
            raise ToolError(f"{src}: key {key} is not a PEFT LoRA weight (lora_A/lora_B/lora_magnitude_vector)")
    return tensors, metadata


def _check_values(src, layout: str) -> None:
    """Refuse NaN/inf and rank clashes before converting (a converted file would carry them everywhere)."""
    if layout == "kohya":
        read_modules(src)
        return
    for key, tensor in read_safetensors(src)[0].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ToolError(f"{src}: tensor {key} holds non-finite values (NaN/inf); this file cannot be used")


def convert_file(src: str | os.PathLike, out: str | os.PathLike, to: str | None = None,
                 precision: str | None = None, family: str | None = None) -> Path:
    out = check_output(out, src)
    header, file_metadata, _ = read_header(src)  # keys and metadata without loading tensors
    keys = list(header)
    layout = detect_layout(keys)
    to = to or layout
    if to not in ("kohya", "diffusers"):
        raise ToolError(f"--to {to!r}: choose kohya or diffusers")
    if family is None:
        family = file_family(file_metadata, [k.split(".")[0] for k in keys])
        if layout == "diffusers" and any(k.startswith("text_encoder_2.") for k in keys):
            family = "sdxl"
    _check_values(src, layout)
    if layout == to:
        tensors, metadata = read_safetensors(src)
    elif to == "diffusers":
        tensors, metadata = kohya_to_diffusers(src, family)
    else:
        tensors, metadata = diffusers_to_kohya(src, family)
    action = {"tool": "convert", "source": os.path.basename(str(src)), "from": layout, "to": to,
              "precision": precision, "family": family}
    return write_result(out, tensors, metadata, action, DTYPES.get(precision) if precision else None)
