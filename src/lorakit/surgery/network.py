"""LoraNetwork: the set of adapters attached to a U-Net and its text encoders.

    net = create_network(unet, [text_encoder], NetworkConfig(network_dim=16, network_alpha=8, conv_dim=8))
    opt = torch.optim.AdamW(net.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5))
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.functional.norm import is_trainable_norm
from lorakit.adapters.modules.base import AdapterModule
from lorakit.adapters.modules.norm import NormModule
from lorakit.adapters.registry import get_algorithm
from lorakit.surgery.blocks import UNetLayout
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.targets import (TEXT_ENCODER_CLASSES, UNET_ATTENTION_CLASSES, UNET_CONV_CLASSES,
                                     find_targets, no_target_error)


@dataclass(frozen=True)
class AdapterInfo:
    """Where one adapter sits: for reports, param groups and per-block statistics."""

    component: str  # unet / te / te1 / te2
    block: str | None
    path: str


class LoraNetwork(nn.Module):
    def __init__(self, family: str, block_names: tuple[str, ...], config: NetworkConfig | None = None):
        super().__init__()
        self.family = family
        self.block_names = block_names
        self.config = config
        self.adapters = nn.ModuleDict()
        self.info: dict[str, AdapterInfo] = {}
        self._layers: dict[str, nn.Module] = {}
        self.skipped: list[str] = []  # targets whose resolved dim is 0

    def add(self, name: str, adapter: AdapterModule | NormModule, layer: nn.Module, info: AdapterInfo) -> None:
        if name in self.adapters:
            raise ValueError(f"duplicate adapter name {name}")
        self.adapters[name] = adapter
        self._layers[name] = layer
        self.info[name] = info

    def remove(self, name: str) -> None:
        """Drop adapter `name` (detached first), e.g. a side the config does not train."""
        self.adapters[name].detach()
        del self.adapters[name]
        del self._layers[name], self.info[name]

    def layer(self, name: str) -> nn.Module:
        """The model layer adapter `name` belongs to."""
        return self._layers[name]

    # ---- lifecycle ---------------------------------------------------------------------------
    def apply_to(self) -> "LoraNetwork":
        """Attach every adapter to its layer (idempotent)."""
        for name, adapter in self.adapters.items():
            if not adapter._layer:
                adapter.attach(self._layers[name])
        return self

    def restore(self) -> None:
        """Detach every adapter: the model computes exactly what it did before."""
        for adapter in self.adapters.values():
            adapter.detach()

    def merge(self) -> None:
        for adapter in self.adapters.values():
            adapter.merge()

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()

    def set_multiplier(self, multiplier: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = float(multiplier)

    # ---- optimisation ------------------------------------------------------------------------
    def param_groups(self, unet_lr: float | None = None, text_encoder_lr: float | None = None,
                     default_lr: float = 1e-4) -> list[dict]:
        """One group per (text encoder | U-Net block); LR 0 drops the group (kohya: frozen side).

        Block LR weights (block_lr_weights or kohya's down/mid/up_lr_weight) scale each block's LR. LoRA+
        (kohya and LyCORIS alike) moves LoRA/LoCon `up` matrices into a `<group>_plus` group at LR x ratio;
        LoHa/LoKr have no lora_up, so LoRA+ leaves them as they are."""
        cfg = self.config
        lr_weights = cfg.lr_weights(self.family) if cfg is not None else None
        weights = dict(zip(self.block_names, lr_weights)) if lr_weights is not None else {}
        groups: dict[str, dict] = {}
        for name, adapter in self.adapters.items():
            info = self.info[name]
            if info.component == "unet":
                lr = (default_lr if unet_lr is None else unet_lr) * weights.get(info.block, 1.0)
                key = f"unet_{info.block}" if weights else "unet"
            else:
                lr, key = (default_lr if text_encoder_lr is None else text_encoder_lr), "text_encoder"
            ratio = cfg.loraplus_ratio(info.component) if cfg is not None else None
            for pname, param in adapter.named_parameters():
                plus = ratio is not None and adapter.algo == "lora" and pname == "up"
                group_lr, group_key = (lr * ratio, f"{key}_plus") if plus else (lr, key)
                if group_lr:
                    group = groups.setdefault(group_key, {"name": group_key, "lr": group_lr, "params": []})
                    group["params"].append(param)
        return list(groups.values())

    # ---- reporting ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(Counter(info.component for info in self.info.values()))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def delta_norms(self) -> dict[str, dict[str, float]]:
        """‖ΔW‖ (Frobenius, times multiplier) per block, split into attention/linear vs conv layers (norm
        deltas are neither and are left out)."""
        out: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                if adapter.algo == "norm":
                    continue
                kind = "conv" if adapter.spec.is_conv and adapter.spec.kernel != (1, 1) else "linear"
                block = self.info[name].block or self.info[name].component
                sq = float(adapter.delta_sq_norm()) * adapter.multiplier ** 2  # no ΔW built
                entry = out.setdefault(block, {"linear": 0.0, "conv": 0.0})
                entry[kind] += sq
        return {b: {k: v ** 0.5 for k, v in d.items()} for b, d in out.items()}


def create_network(unet: nn.Module | None = None, text_encoders: list[nn.Module] | tuple = (),
                   config: NetworkConfig | None = None, dtype: torch.dtype | None = None,
                   seed: int | None = None, apply: bool = True) -> LoraNetwork:
    """Build adapters on `unet` and `text_encoders` following kohya's targeting, then attach them."""
    config = config or NetworkConfig()
    text_encoders = list(text_encoders) if config.train_text_encoder else []
    unet = unet if config.train_unet else None
    layout = UNetLayout.of(unet) if unet is not None else None
    family = layout.family if layout else ("sdxl" if len(text_encoders) == 2 else "sd1")
    block_names = layout.block_names if layout else ()
    if layout is not None:
        config.check_block_lengths(layout.num_blocks, layout.family)
    preset = config.preset
    targets = find_targets(unet, text_encoders, config.with_conv, preset, norms=config.train_norm)
    if not targets:
        searched = (UNET_ATTENTION_CLASSES + UNET_CONV_CLASSES if config.with_conv else UNET_ATTENTION_CLASSES)
        searched = searched + TEXT_ENCODER_CLASSES if preset is None else preset.unet_classes + preset.te_classes
        raise no_target_error([m for m in [unet, *text_encoders] if m is not None], searched)
    algo = get_algorithm(config.algo)
    options, dropouts = config.algo_options(), config.dropouts()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    on_meta = any(t.layer.weight.device.type == "meta" for t in targets)
    net = LoraNetwork(family, block_names, config)
    for target in targets:
        if is_trainable_norm(target.layer):  # train_norm: zero deltas, no rank
            adapter = NormModule.create(target.layer, dropouts, config.forward_mode, dtype=dtype or torch.float32,
                                        device=target.layer.weight.device)
            net.add(target.name, adapter, target.layer, AdapterInfo(target.component, target.block, target.path))
            continue
        if target.component == "unet":
            block_index = block_names.index(target.block) if target.block in block_names else None
            dim, alpha = config.rank_for(block_index, target.is_kxk_conv, family)
        else:
            dim, alpha = config.network_dim, config.network_alpha
        if dim <= 0:
            net.skipped.append(target.name)
            continue
        spec = LayerSpec.of(target.layer)
        adapter = algo.module.create(spec, dim, alpha, options, dropouts, config.forward_mode,
                                     dtype=dtype or torch.float32, device=target.layer.weight.device,
                                     generator=None if on_meta else generator)
        net.add(target.name, adapter, target.layer, AdapterInfo(target.component, target.block, target.path))
    if not net.adapters:
        raise ValueError(f"every targeted layer got dim 0 ({len(net.skipped)} skipped): check block_dims / "
                         "conv_block_dims / block_lr_weights")
    return net.apply_to() if apply else net
