"""Starting a network from a LoRA file: kohya's `network_weights` and `dim_from_weights`.

network_weights alone: the network is built from the config, then every module the file also holds takes
the file's tensors and alpha (kohya loads the file with load_state_dict(strict=False): file modules the
network lacks, and network modules the file lacks, are left as they are). A module held by both whose
algorithm or shapes differ is an error naming dim_from_weights; kohya would raise on shapes and silently
skip a different algorithm. The file's alpha is loaded with its tensors so the network starts from exactly
the file's ΔW (kohya copies alpha too but keeps the scale computed from the config, a FIXME in its source).
With use_scalar the scalar becomes 1, as LyCORIS's load hook does: files hold it folded in.

dim_from_weights: the network is the file's own (kohya's create_network_from_weights): each module with the
file's algorithm, dims and alpha, so mixed ranks continue as they are; the config's dropouts, LR weights and
LoRA+ still apply, and a side the config does not train (network_train_*_only) is dropped.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from lorakit.formats.files import load_network_file, module_from_tensors
from lorakit.formats.kohya import KeyProblem, group_by_module, parse_module
from lorakit.formats.safetensors_io import LoraFileError, read_safetensors
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import LoraNetwork, create_network


def start_network(unet: nn.Module | None, text_encoders: list[nn.Module], config: NetworkConfig,
                  seed: int | None = None, network_weights: str | os.PathLike | None = None,
                  dim_from_weights: bool = False) -> LoraNetwork:
    """The network a run starts from: built from the config, from a file's dims, or with a file's weights."""
    if dim_from_weights:
        if not network_weights:
            raise ValueError("dim_from_weights needs network_weights (the LoRA file to take dims from)")
        return network_from_weights(network_weights, unet, text_encoders, config)
    network = create_network(unet, text_encoders, config, seed=seed)
    if network_weights:
        load_start_weights(network, network_weights)
    return network


def network_from_weights(path: str | os.PathLike, unet: nn.Module | None, text_encoders: list[nn.Module],
                         config: NetworkConfig) -> LoraNetwork:
    """The file's modules (algorithm, dims, alpha, weights) with the config's training options, attached."""
    network, _ = load_network_file(path, unet, text_encoders, apply=False)
    network.config = config
    for name, info in list(network.info.items()):
        if not (config.train_unet if info.component == "unet" else config.train_text_encoder):
            network.remove(name)
    if not network.adapters:
        raise LoraFileError(path, "no module of this file is on a side the config trains "
                                  "(network_train_unet_only / network_train_text_encoder_only)")
    for adapter in network.adapters.values():
        adapter.dropouts, adapter.forward_mode = config.dropouts(), config.forward_mode
    return network.apply_to()


@torch.no_grad()
def load_start_weights(network: LoraNetwork, path: str | os.PathLike) -> tuple[int, list[str]]:
    """Copy the file's weights and alpha into the network's modules of the same name (in place).

    Returns (modules loaded, file modules the network does not have)."""
    tensors, _ = read_safetensors(path)
    try:
        groups = group_by_module(tensors)
    except KeyError as e:
        raise LoraFileError(path, "key has no '<module>.<tensor>' form", str(e.args[0])) from None
    loaded, absent = 0, []
    for name, suffixed in groups.items():
        if name not in network.adapters:
            absent.append(name)
            continue
        adapter = network.adapters[name]
        try:
            parsed = parse_module(name, suffixed)
        except KeyProblem as e:
            raise LoraFileError(path, str(e), e.key) from None
        ours = {k: tuple(getattr(adapter, k).shape) for k in adapter.param_names}
        if parsed.algo.name == adapter.algo:
            source = module_from_tensors(path, parsed, network.layer(name), torch.float32)
            theirs = {k: tuple(getattr(source, k).shape) for k in source.param_names}
        if parsed.algo.name != adapter.algo or theirs != ours:
            found = parsed.algo.name if parsed.algo.name != adapter.algo else theirs
            raise LoraFileError(path, f"holds {found} where the network built from the config has {adapter.algo} "
                                      f"{ours}; set dim_from_weights to take the file's modules as they are", name)
        for k in adapter.param_names:
            getattr(adapter, k).copy_(getattr(source, k))
        if adapter.alpha is not None:  # norm deltas have none
            adapter.alpha.copy_(source.alpha)
        if getattr(adapter, "scalar", None) is not None:
            adapter.scalar.fill_(1.0)  # the file's factors already carry the scalar
        loaded += 1
    if not loaded:
        raise LoraFileError(path, f"none of its {len(groups)} modules is in the network built from the config "
                                  "(another base model, or other targets?)")
    return loaded, absent
