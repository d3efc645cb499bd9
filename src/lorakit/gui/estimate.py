"""The live estimate: the network the settings would train, built for real on a weightless copy of the base.

The base model's architecture is built on PyTorch's meta device (no memory, no weights read: SDXL takes a
second), then `create_network` runs with the form's settings exactly as training will run it. So the numbers
are the real module counts and parameter counts, not a formula, and the file size is what `save_network`
writes: tensor bytes in the save precision plus the safetensors header (the training run adds a few KB of
dataset notes to the metadata).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.registry import get_algorithm
from lorakit.formats.files import network_metadata
from lorakit.surgery.network import LoraNetwork, create_network
from lorakit.surgery.targets import find_targets
from lorakit.training.config import TrainConfig

SAVE_DTYPES = {"float": (torch.float32, "F32"), "fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16")}
HASH_KEYS = {"sshs_model_hash": "0" * 64, "modelspec.hash_sha256": "0x" + "0" * 64}  # same length as real ones


@dataclass
class BaseArchitecture:
    """A base model's U-Net and text encoders on the meta device, and what the GUI needs to know of it."""
    unet: torch.nn.Module
    text_encoders: list
    family: str
    source: str
    conv_layers: int  # kxk convs LoCon/LoHa/LoKr can adapt
    block_names: tuple[str, ...]  # the order of block_dims values


@dataclass
class Estimate:
    parameters: int
    file_bytes: int
    modules: dict[str, int]  # component -> count (unet, te / te1, te2)
    blocks: list[dict] = field(default_factory=list)  # {block, attention, conv, parameters} per block

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.modules.items())
        return (f"{self.parameters:,} trainable parameters; file ≈ {self.file_bytes / 1e6:.2f} MB "
                f"({self.file_bytes:,} bytes before the run's dataset notes); modules {counts}")


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _folder_architecture(folder: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = UNet2DConditionModel.load_config(str(folder / "unet"))
    unet = _on_meta(lambda: UNet2DConditionModel.from_config(unet_config))
    encoders = []
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (folder / sub / "config.json").is_file():
            config = CLIPTextConfig.from_pretrained(str(folder / sub))
            encoders.append(_on_meta(lambda: cls(config)))
    return unet, encoders


def _single_file_family(path: Path) -> str:
    from lorakit.formats.safetensors_io import read_header
    from lorakit.models.checkpoint import detect_family, read_checkpoint

    keys = read_header(path)[0] if path.suffix.lower() == ".safetensors" else read_checkpoint(path)
    return detect_family(keys)


@functools.lru_cache(maxsize=4)
def base_architecture(model: str = "") -> BaseArchitecture:
    """'' = the embedded tiny model; else a diffusers folder or a single-file checkpoint (keys read only)."""
    from lorakit.models.configs import build_text_encoders, build_unet
    from lorakit.models.tiny import embedded_model_dir
    from lorakit.surgery.blocks import UNetLayout

    path = Path(model) if model else embedded_model_dir()
    if path.is_dir():
        unet, encoders = _folder_architecture(path)
    elif path.is_file():
        family = _single_file_family(path)
        unet, encoders = build_unet(family, "meta"), build_text_encoders(family, "meta")
    else:
        raise FileNotFoundError(f"{model}: no such file or folder")
    conv = sum(1 for t in find_targets(unet, [], True) if t.is_kxk_conv)
    layout = UNetLayout.of(unet)
    return BaseArchitecture(unet, encoders, layout.family, str(path), conv, layout.block_names)


def _file_bytes(network: LoraNetwork, save_precision: str, title: str) -> int:
    """Size of the .safetensors save_network writes: 8-byte length, JSON header padded to 8, tensor data.
    The header's length depends on the offsets' digits, so tensors are laid out as safetensors lays them
    out: by element size (largest first), then by name."""
    dtype, dtype_name = SAVE_DTYPES[save_precision]
    tensors = []  # (element size, key, dtype name, shape)
    for name, adapter in network.adapters.items():
        algo = get_algorithm(adapter.algo)
        tensors += [(dtype.itemsize, f"{name}.{algo.file_keys[internal]}", dtype_name, list(t.shape))
                    for internal, t in adapter.weights().items()]
        if adapter.alpha is not None:  # norm deltas are saved without one
            tensors.append((4, f"{name}.alpha", "F32", []))
    entries, offset = {}, 0
    for itemsize, key, dtype_label, shape in sorted(tensors, key=lambda t: (-t[0], t[1])):
        size = itemsize * math.prod(shape)
        entries[key] = {"dtype": dtype_label, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    entries["__metadata__"] = {**network_metadata(network, title), **HASH_KEYS}
    header = len(json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return 8 + (header + 7) // 8 * 8 + offset


def block_rows(network: LoraNetwork) -> list[dict]:
    """Per block (U-Net blocks in table order, then text encoders): attention/linear vs kxk-conv modules."""
    rows: dict[str, dict] = {}
    for name, adapter in network.adapters.items():
        info = network.info[name]
        block = info.block or info.component.upper()
        row = rows.setdefault(block, {"block": block, "attention": 0, "conv": 0, "parameters": 0})
        if adapter.algo != "norm":  # train_norm's deltas count only in the parameters
            row["attention" if adapter.spec.kind in ("linear", "conv1x1") else "conv"] += 1  # 1x1 = a linear map
        row["parameters"] += sum(p.numel() for p in adapter.parameters())
    order = {b: i for i, b in enumerate(network.block_names)}
    return sorted(rows.values(), key=lambda r: (r["block"] not in order, order.get(r["block"], 0), r["block"]))


def estimate(config: TrainConfig, arch: BaseArchitecture) -> Estimate:
    network = create_network(arch.unet, arch.text_encoders, config.network_config(), apply=False)
    return Estimate(parameters=network.trainable_parameters(),
                    file_bytes=_file_bytes(network, config.save_precision, config.output_name),
                    modules=network.counts(), blocks=block_rows(network))
