"""LyCORIS targeting presets (`preset=` in network_args), as data: lycoris-lora 4.1.3, lycoris/config.py.

A preset names module classes (every Linear/Conv inside a module of such a class is adapted, recursing) and
module paths (`re.match` against the path; that layer itself is adapted), for the U-Net and the text
encoders, plus whether kxk convs are adapted at all (`enable_conv`). `lycoris.kohya` without a preset uses
"full".

LyCORIS matches the classes and paths of the U-Net sd-scripts builds (kohya's library/original_unet.py and
sdxl_original_unet.py); lorakit's U-Net is diffusers', which differs in three places, translated here so a
preset selects what it selects in sd-scripts:
  - kohya's attention class is `CrossAttention`; diffusers calls it `Attention`;
  - kohya's SDXL U-Net has SGM paths (conv_in is input_blocks.0.0, conv_out out.2, time_embedding
    time_embed.0/2), so path targets are matched against those and the SD1 names find nothing there;
  - kohya's SDXL time/label embeddings are plain nn.Sequential, so `TimestepEmbedding` matches nothing on SDXL.
"""
from __future__ import annotations

from dataclasses import dataclass

# 4.1.3's block lists; the DiT/video entries never occur in an SD U-Net but are kept so the tables read as LyCORIS's
_DIT_BLOCKS = ("HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock", "MMDoubleStreamBlock",
               "MMSingleStreamBlock", "WanAttentionBlock", "HunyuanVideoTransformerBlock",
               "HunyuanVideoSingleTransformerBlock", "JointTransformerBlock", "FinalLayer",
               "QwenImageTransformerBlock", "LensTransformerBlock", "Ideogram4TransformerBlock",
               "ZImageTransformerBlock", "AceStepEncoderLayer", "AceStepDiTLayer", "TextFusionBlock", "Block",
               "PatchEmbed", "TimestepEmbedding", "LLMAdapterTransformerBlock")
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_FULL_UNET = ("Transformer2DModel",) + _CONV_BLOCKS + _DIT_BLOCKS
_FULL_LIN_UNET = ("Transformer2DModel", "ResnetBlock2D") + _DIT_BLOCKS
_TRANSFORMER_UNET = ("Transformer2DModel",) + _DIT_BLOCKS
_FULL_UNET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
# CLIPFlashAttention2 is transformers' flash-attention variant of CLIPAttention (kohya's list lacks it too)
_CLIP_ATTENTION = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
_FULL_TE = _CLIP_ATTENTION + ("CLIPMLP", "MT5Block", "BertLayer", "Gemma2Attention", "Gemma2FlashAttention2",
                              "Gemma2SdpaAttention", "Gemma2MLP", "Qwen3Attention", "Qwen3FlashAttention2",
                              "Qwen3SdpaAttention", "Qwen3MLP")
_ATTN_ONLY_TE = _CLIP_ATTENTION + ("BertAttention", "MT5LayerSelfAttention", "Gemma2Attention",
                                   "Gemma2FlashAttention2", "Gemma2SdpaAttention")

# kohya U-Net class -> the diffusers class of the same module
DIFFUSERS_CLASS = {"CrossAttention": "Attention"}
NOT_IN_KOHYA_SDXL = ("TimestepEmbedding",)


@dataclass(frozen=True)
class Preset:
    name: str
    enable_conv: bool
    unet_classes: tuple[str, ...]
    unet_names: tuple[str, ...]
    te_classes: tuple[str, ...]

    def unet_targets(self, family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(diffusers class names, path patterns) to search on a diffusers U-Net of `family`."""
        classes = [DIFFUSERS_CLASS.get(c, c) for c in self.unet_classes]
        if family == "sdxl":
            classes = [c for c in classes if c not in NOT_IN_KOHYA_SDXL]
        return tuple(dict.fromkeys(classes)), self.unet_names


PRESETS = {p.name: p for p in (
    Preset("full", True, _FULL_UNET, _FULL_UNET_NAMES, _FULL_TE),
    Preset("full-lin", False, _FULL_LIN_UNET, ("time_embedding.linear_1", "time_embedding.linear_2"), _FULL_TE),
    Preset("attn-mlp", False, _TRANSFORMER_UNET, (), _FULL_TE),
    Preset("attn-only", False, ("CrossAttention", "SelfAttention"), (), _ATTN_ONLY_TE),
    Preset("unet-only", True, _FULL_UNET, _FULL_UNET_NAMES, ()),
    Preset("unet-transformer-only", False, _TRANSFORMER_UNET, (), ()),
    Preset("unet-convblock-only", True, _CONV_BLOCKS, ("conv_in", "conv_out"), ()),
)}
LYCORIS_DEFAULT_PRESET = "full"  # what lycoris.kohya uses when network_args has no preset
