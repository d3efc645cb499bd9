"""diffusers -> original single-file layout (LDM for SD1/SD2, SGM for SDXL): pure key/tensor converters.

diffusers ships only the other direction; saving a merged model as one file that A1111/ComfyUI load needs
this one. Prefixes: U-Net `model.diffusion_model.`, VAE `first_stage_model.`, text encoders
`cond_stage_model.transformer.` (SD1 CLIP-L), `cond_stage_model.model.` (SD2 OpenCLIP),
`conditioner.embedders.0.transformer.` + `conditioner.embedders.1.model.` (SDXL CLIP-L + OpenCLIP bigG).
"""
from __future__ import annotations

import re

import torch

from lorakit.surgery.blocks import UNetLayout, to_ldm_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"sd1": ["cond_stage_model.transformer."], "sd2": ["cond_stage_model.model."],
                 "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict[str, torch.Tensor], layout: UNetLayout) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        out[UNET_PREFIX + to_ldm_path(module, layout) + "." + param] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", new)
        if m:
            part, side, i, kind, j, rest = m.groups()
            i = int(i) if side == "down" else num_up_blocks - 1 - int(i)  # LDM numbers decoder levels upwards
            if kind == "resnets":
                head = rest.split(".")[0]
                new = f"{part}.{side}.{i}.block.{j}.{rest.replace(head, _VAE_RESNET.get(head, head), 1)}"
            else:
                new = f"{part}.{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", new)
        if m:
            part, kind, j, rest = m.groups()
            if kind == "resnets":
                head = rest.split(".")[0]
                new = f"{part}.mid.block_{int(j) + 1}.{rest.replace(head, _VAE_RESNET.get(head, head), 1)}"
            else:
                for ours, theirs in _VAE_ATTENTION.items():
                    if rest.startswith(ours + "."):
                        rest = theirs + rest[len(ours):]
                        break
                new = f"{part}.mid.attn_1.{rest}"
                if tensor.dim() == 2:  # LDM's VAE attention uses 1x1 convs
                    tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel -> `<prefix>text_model.*` (transformers 5 state dicts lack `text_model.`)."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("text_projection"):
            continue
        body = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + body] = tensor
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP names (q/k/v fused into in_proj, text_projection transposed)."""
    state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias")}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state.pop(src + f"self_attn.{p}_proj.{kind}")
                                                         for p in ("q", "k", "v")])
            for ours, theirs in names.items():
                out[dst + f"{theirs}.{kind}"] = state.pop(src + f"{ours}.{kind}")
    leftover = [k for k in state if not k.endswith("position_ids")]
    if leftover:
        raise ValueError(f"text encoder keys with no OpenCLIP name: {leftover[:5]}")
    return out


def to_original_layout(family: str, unet=None, vae=None, text_encoders=()) -> dict[str, torch.Tensor]:
    """All given components as one original-layout state dict."""
    out: dict[str, torch.Tensor] = {}
    if unet is not None:
        out.update(unet_to_ldm(unet.state_dict(), UNetLayout.of(unet)))
    if vae is not None:
        out.update(vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types)))
    for prefix, encoder in zip(TEXT_PREFIXES[family], text_encoders):
        convert = open_clip_to_ldm if prefix.endswith(".model.") else clip_to_ldm
        out.update(convert(encoder.state_dict(), prefix))
    return out
