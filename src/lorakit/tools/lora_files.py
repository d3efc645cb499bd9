"""Reading a LoRA file into modules and writing a tool's result with truthful metadata.

Tools never modify their inputs: output paths equal to an input are refused; outputs are written
atomically with recomputed hashes and a `lorakit_history` entry that says what was done to the file.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from lorakit.formats.kohya import KeyProblem, ModuleTensors, group_by_module, parse_module
from lorakit.formats.safetensors_io import LoraFileError, read_safetensors, tensor_data_hash, write_safetensors
from lorakit.formats.values import value_problem
from lorakit.tools.lowrank import ToolError

DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_modules(path: str | os.PathLike) -> tuple[dict[str, ModuleTensors], dict[str, str]]:
    tensors, metadata = read_safetensors(path)
    if any(k.startswith("model.diffusion_model.") for k in tensors):
        raise ToolError(f"{path}: this is a model checkpoint, not a LoRA file")
    try:
        groups = group_by_module(tensors)
    except KeyError as e:
        raise LoraFileError(path, "key has no '<module>.<tensor>' form", str(e.args[0])) from None
    if not groups:
        raise ToolError(f"{path}: the file holds no LoRA modules (an empty or metadata-only safetensors file)")
    modules = {}
    for name, suffixed in groups.items():
        try:
            modules[name] = parse_module(name, suffixed)
        except KeyProblem as e:
            raise LoraFileError(path, str(e), e.key) from None
        problem = value_problem(modules[name])
        if problem:  # before any SVD or merge: a NaN would poison every output, a rank clash would crash
            raise ToolError(f"{path}: module {name}: {problem}; this file cannot be used (re-save it from a "
                            "good epoch, or check the tool that wrote it)")
    return modules, metadata


def split_norm_deltas(modules: dict[str, ModuleTensors]) -> tuple[dict[str, ModuleTensors], dict[str, ModuleTensors]]:
    """(ranked modules, train_norm's norm deltas): the deltas are whole vectors with no rank to resize or
    factorise, so tools carry them over (or sum them) apart."""
    norms = {n: m for n, m in modules.items() if m.algo.name == "norm"}
    return {n: m for n, m in modules.items() if n not in norms}, norms


def norm_tensors(norms: list[tuple[dict[str, ModuleTensors], float]]) -> dict[str, torch.Tensor]:
    """File tensors of Σ ratio·delta over inputs (norm deltas add exactly, as loaders apply them), no alpha,
    in the first input's dtype."""
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for modules, ratio in norms:
        for name, parsed in modules.items():
            for internal, tensor in parsed.weights.items():
                key = f"{name}.{parsed.algo.file_keys[internal]}"
                out[key] = out.get(key, 0) + tensor.double() * ratio
                dtypes.setdefault(key, tensor.dtype)  # one input at ratio 1 is copied bit for bit
    return {k: v.to(dtypes[k]) for k, v in out.items()}


def check_output(out: str | os.PathLike, *inputs) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ToolError(f"{out}: outputs are written as .safetensors")
    for source in inputs:
        if source and Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise ToolError(f"{out}: the output would overwrite an input; tools never modify their inputs")
    return out


def write_result(out: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 action: dict, dtype: torch.dtype | None = None) -> Path:
    """Write tensors with the inputs' metadata updated: hashes recomputed, the action recorded."""
    if dtype is not None:
        tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in tensors.items()}
    meta = {k: v for k, v in metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))}
    history = json.loads(meta.get("lorakit_history", "[]"))
    history.append({**action, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    meta["lorakit_history"] = json.dumps(history)
    digest = tensor_data_hash(tensors)
    meta["sshs_model_hash"] = digest
    meta["modelspec.hash_sha256"] = "0x" + digest
    write_safetensors(out, tensors, {k: str(v) for k, v in meta.items()})
    return Path(out)
