"""kohya / LyCORIS key layout: pure converters between module weights and file tensors, plus metadata.

File key = `<kohya module name>.<suffix>`; module names never contain a dot, so the first dot splits a key.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.registry import Algorithm, algorithms, detect_algorithm
from lorakit.surgery.blocks import family_of_kohya_names

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
# what kohya keeps with --no_metadata (train_util.SS_METADATA_MINIMUM_KEYS): enough to load and classify the file
SS_METADATA_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args")


@dataclass
class ModuleTensors:
    """One module as read from a file: its algorithm, weights under internal names, and alpha."""

    name: str
    algo: Algorithm
    weights: dict[str, torch.Tensor]
    alpha: float | None
    dora_source: str | None = None  # the key DoRA's magnitude came from: dora_scale, lora_magnitude_vector, magnitude

    @property
    def dora_axis(self) -> str | None:
        """'output' or 'input' for a DoRA module (from the stored layout, see functional.dora), else None."""
        m = self.weights.get("magnitude")
        if m is None:
            return None
        return "input" if m.dim() >= 2 and m.shape[1] != 1 else "output"  # (1, 1): one norm either way


def module_to_tensors(name: str, algo: Algorithm, weights: dict[str, torch.Tensor], alpha: float | None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Internal weights -> file tensors. alpha is written (0-d float32) for every ranked module, as every
    consumer expects; None (norm deltas, which LyCORIS saves without one) writes none."""
    out = {}
    for internal, tensor in weights.items():
        t = tensor.detach()
        out[f"{name}.{algo.file_keys[internal]}"] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, dot, suffix = key.partition(".")
        if not dot:
            raise KeyError(key)
        groups.setdefault(name, {})[suffix] = tensor
    return groups


class KeyProblem(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


# DoRA magnitudes that are not LyCORIS's dora_scale; both are per output row (1-D, or PEFT conv (1, out, 1, 1))
FOREIGN_MAGNITUDES = ("lora_magnitude_vector", "lora_magnitude_vector.weight", "magnitude")


def _dora_source(name: str, suffixed: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """PEFT's `lora_magnitude_vector` and ai-toolkit's `magnitude` -> `dora_scale` in the output-axis layout
    (out, 1[, 1, 1]); LyCORIS/OneTrainer `dora_scale` is kept as stored (its shape tells the axis)."""
    found = [k for k in ("dora_scale", *FOREIGN_MAGNITUDES) if k in suffixed]
    if len(found) > 1:
        raise KeyProblem(f"{name}.{found[1]}", f"two DoRA magnitudes ({', '.join(found)}); keep one")
    if not found or found[0] == "dora_scale":
        return suffixed, found[0] if found else None
    key = found[0]
    m = suffixed[key]
    conv = any(t.dim() == 4 for k, t in suffixed.items() if k != key)
    if m.dim() not in (1, 4) or (m.dim() == 4 and (m.shape[0] != 1 or m.shape[2:] != (1, 1))):
        raise KeyProblem(f"{name}.{key}", f"{key} of shape {list(m.shape)}: expected (out,) or (1, out, 1, 1)")
    rest = {k: v for k, v in suffixed.items() if k != key}
    rest["dora_scale"] = F_dora.peft_to_internal(m, 4 if conv else 2)
    return rest, key.removesuffix(".weight")


def parse_module(name: str, suffixed: dict[str, torch.Tensor]) -> ModuleTensors:
    """File tensors of one module -> ModuleTensors, with the algorithm detected from the key names."""
    suffixed, dora_source = _dora_source(name, suffixed)
    algo = detect_algorithm(set(suffixed))
    if algo is None:
        known = sorted({s for a in algorithms() for s in a.file_keys.values()})
        raise KeyProblem(f"{name}.{sorted(suffixed)[0]}", f"keys {sorted(suffixed)} match no supported algorithm "
                                                          f"(known suffixes: {known} + alpha)")
    by_suffix = {v: k for k, v in algo.file_keys.items()}
    weights = {}
    for suffix, tensor in suffixed.items():
        if suffix == "alpha":
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            raise KeyProblem(f"{name}.{suffix}", f"dtype {tensor.dtype} is not a float type")
        weights[by_suffix[suffix]] = tensor
    alpha = None
    if "alpha" in suffixed:
        a = suffixed["alpha"]
        if a.numel() != 1:
            raise KeyProblem(f"{name}.alpha", f"alpha must hold one value, has shape {list(a.shape)}")
        alpha = float(a.float().reshape(()))
        if not torch.isfinite(torch.tensor(alpha)):
            raise KeyProblem(f"{name}.alpha", "alpha is not finite")
    return ModuleTensors(name, algo, weights, alpha, dora_source)


def build_metadata(family: str, network_dim: int | str, network_alpha: float | str, network_args: dict,
                   title: str, algo: str, v_prediction: bool = False, extra: dict[str, str] | None = None) -> dict:
    """ss_* (kohya) and modelspec.* (SAI ModelSpec 1.0.1) keys; every value a string."""
    # networks.lora lacks them (and cannot load w_norm/b_norm)
    lycoris_only = ("use_tucker", "preset", "use_scalar", "rank_dropout_scale", "dora_wd", "train_norm")
    plain_lora = algo == "lora" and not any(network_args.get(k) for k in lycoris_only)
    version = BASE_MODEL_VERSION[family] + ("_v" if v_prediction and family != "sdxl" else "")
    arch = "stable-diffusion-v2-768-v/lora" if v_prediction and family == "sd2" else ARCHITECTURE[family]
    meta = {
        "ss_network_module": "networks.lora" if plain_lora else "lycoris.kohya",
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(network_alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch,
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if family == "sdxl"
                                     else "diffusers"),
        "modelspec.title": title,
        "modelspec.resolution": RESOLUTION[family],
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": "lorakit",
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def minimal_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """kohya's --no_metadata: SS_METADATA_MINIMUM_KEYS and the modelspec.* keys, no training details."""
    return {k: v for k, v in metadata.items() if k in SS_METADATA_MINIMUM_KEYS or k.startswith("modelspec.")}


def file_family(metadata: dict[str, str], names) -> str:
    """Base family of a LoRA file: from ss_base_model_version / ss_v2 when written, else from module names."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return family_of_kohya_names(list(names))
