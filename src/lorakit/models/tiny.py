"""The embedded tiny Stable-Diffusion-style model: lorakit's default base.

Its U-Net has exactly SD1.5's block topology (4 down levels of 2 layers, cross-attention in the first
three, a mid block, up levels of 3 layers, down/upsamplers), so all 25 blocks IN00..OUT11 exist and every
lorakit option (conv_dim, block dims, block LR weights) works on it unchanged. Widths shrink: 64x64 RGB
images, a VAE with 8x downsampling to 8x8x4 latents, and a 2-layer CLIP-style text encoder that uses the
real CLIP tokenizer. The weights ship in `lorakit/data/tiny-sd/` as a diffusers folder.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64), norm_num_groups=16)
TINY_TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def embedded_model_dir() -> Path:
    return Path(str(resources.files("lorakit.data").joinpath("tiny-sd")))


def build_components(seed: int = 0):
    """Freshly initialised (unet, vae, text_encoder) with the tiny architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE), CLIPTextModel(CLIPTextConfig(**TINY_TEXT))


def save_folder(folder: str | Path, unet, vae, text_encoder, dtype: torch.dtype = torch.float16) -> Path:
    """Write a diffusers StableDiffusionPipeline folder (weights in `dtype`), readable offline by diffusers."""
    import json

    from diffusers import DDIMScheduler

    from lorakit.models.tokenizer import tokenizer_files

    folder = Path(folder)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.to(dtype).save_pretrained(folder / name, safe_serialization=True)
        model.to(torch.float32)
    DDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    tokenizer_files(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def load_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline of the embedded (or another tiny) model, offline, weights in `dtype`."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder) if folder else embedded_model_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no embedded model weights; rebuild them with "
                                "`python -m lorakit.models.pretrain` (see its model card)")
    return StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
