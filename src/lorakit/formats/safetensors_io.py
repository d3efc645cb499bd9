"""Safetensors reading that validates before it loads, and atomic writing with the kohya tensor hash.

Reading never executes code: `.ckpt`/`.pt`/`.bin` pickles are refused. The header is checked (length,
JSON, dtypes, shapes, offsets inside the file, no overlaps) before any tensor is read, so a truncated or
hostile file fails with one message naming the file and the key, and nothing is half-loaded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorakit.formats.atomic import atomic_write

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class LoraFileError(ValueError):
    """A file that cannot be read as asked; the message names the file (and key) and the fix."""

    def __init__(self, path: str | os.PathLike, message: str, key: str | None = None):
        self.path, self.key, self.detail = str(path), key, message
        where = f"{path}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {message}")


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, header length N) after validating the whole header against the file size."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(path, "pickle checkpoints can run code when loaded and are not read; convert the file "
                                  "to .safetensors with a tool you trust (weights-only loading), then retry")
    if not path.is_file():
        raise LoraFileError(path, "no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(path, f"file is {size} bytes: too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise LoraFileError(path, f"header length {n} exceeds {MAX_HEADER_BYTES} bytes: not a safetensors file "
                                      "or a hostile one")
        if 8 + n > size:
            raise LoraFileError(path, f"header says {n} bytes but the file has {size - 8}: truncated file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(path, f"header is not valid JSON ({e}): not a safetensors file or corrupted") from None
    if not isinstance(header, dict):
        raise LoraFileError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise LoraFileError(path, "__metadata__ must map strings to strings", "__metadata__")
    _check_entries(path, header, size - 8 - n)
    return header, metadata, n


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise LoraFileError(path, "malformed tensor entry (needs dtype, shape, data_offsets)", key)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise LoraFileError(path, f"unsupported dtype {dtype!r}", key)
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise LoraFileError(path, f"bad shape {shape!r}", key)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise LoraFileError(path, f"bad data_offsets {offsets!r}", key)
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise LoraFileError(path, f"data [{begin}, {end}) lies outside the {data_size} data bytes: truncated", key)
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise LoraFileError(path, f"{end - begin} bytes do not hold a {dtype} tensor of shape {shape}", key)
        spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise LoraFileError(path, f"tensor data overlaps {k0}", k1)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated load of every tensor and the metadata."""
    _, metadata, _ = read_header(path)
    try:
        tensors = st_load(Path(path).read_bytes())
    except Exception as e:  # safetensors raises its own error types
        raise LoraFileError(path, f"could not decode tensors: {e}") from None
    return tensors, metadata


def tensor_data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's sshs_model_hash: sha256 of the serialised tensor bytes after the header (metadata-independent)."""
    blob = st_save(tensors)
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()


def file_data_hash(path: str | os.PathLike) -> str:
    """sha256 of the bytes after the header of a file on disk (A1111's LoRA hash)."""
    _, _, n = read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash or full disk never leaves a
    half-written file, and an existing file stays intact until the new one is complete."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    atomic_write(path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata))
