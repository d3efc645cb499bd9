"""Architecture configs (no weights) for full-size and tiny SD1.x / SD2.x / SDXL models.

Tiny models keep the exact block topology of the real ones (same down/up block types, layers per block,
attention placement), so block tables, targeting and file names are the same; only widths shrink.
"""
from __future__ import annotations

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=1024)
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

TINY_SD1_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=8)
TINY_SD2_UNET = dict(TINY_SD1_UNET, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
# SDXL's two encoders differ in width (768 / 1280), which is how loaders tell them apart: keep that
TINY_CLIP_G = dict(OPENCLIP_BIGG, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=48)
TINY_SDXL_UNET = dict(SDXL_UNET, sample_size=8, block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 2),
                      cross_attention_dim=32 + 48, attention_head_dim=(2, 2, 4), norm_num_groups=8,
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8)

FAMILIES = {
    "sd1": (SD15_UNET, [CLIP_L]), "sd2": (SD2_UNET, [OPENCLIP_H]), "sdxl": (SDXL_UNET, [CLIP_L, OPENCLIP_BIGG]),
    "tiny-sd1": (TINY_SD1_UNET, [TINY_CLIP]), "tiny-sd2": (TINY_SD2_UNET, [TINY_CLIP]),
    "tiny-sdxl": (TINY_SDXL_UNET, [TINY_CLIP, TINY_CLIP_G]),
}


def build_unet(name: str, device: str | torch.device = "cpu", seed: int = 0):
    """A randomly initialised UNet2DConditionModel of a known architecture (device 'meta' allocates nothing)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**FAMILIES[name][0]).eval()


def build_text_encoders(name: str, device: str | torch.device = "cpu", seed: int = 0) -> list:
    """CLIPTextModel (and CLIPTextModelWithProjection as SDXL's second encoder), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    configs = FAMILIES[name][1]
    encoders = []
    with torch.device(device):
        for i, cfg in enumerate(configs):
            cls = CLIPTextModelWithProjection if (len(configs) == 2 and i == 1) else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**cfg)).eval())
    return encoders


SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025)
SCHEDULERS = {  # SD's DDPM training schedule; samplers are built from it
    "sd1": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
}
SCHEDULERS["sd2"] = SCHEDULERS["sdxl"] = SCHEDULERS["sd1"]
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def write_config_folder(folder, family: str, unet_config: dict | None = None, vae_config: dict | None = None,
                        text_configs: list[dict] | None = None, prediction_type: str = "epsilon"):
    """A weightless diffusers folder (model_index, component configs, scheduler, tokenizer) that
    `from_single_file(config=folder, local_files_only=True)` needs to load a checkpoint offline."""
    import json
    from pathlib import Path

    from transformers import CLIPTextConfig

    from lorakit.models.tokenizer import tokenizer_files

    folder = Path(folder)
    unet_config = unet_config or FAMILIES[family][0]
    vae_config = vae_config or (SDXL_VAE if family == "sdxl" else SD_VAE)
    text_configs = text_configs or FAMILIES[family][1]
    _write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet_config})
    _write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae_config})
    scheduler = dict(SCHEDULERS[family], prediction_type=prediction_type)
    _write_json(folder / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler", **scheduler})
    index = {"_class_name": PIPELINES[family], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
    names = ["text_encoder", "text_encoder_2"][:len(text_configs)]
    for i, (name, cfg) in enumerate(zip(names, text_configs)):
        arch = "CLIPTextModelWithProjection" if (family == "sdxl" and i == 1) else "CLIPTextModel"
        config = CLIPTextConfig(**cfg)
        config.architectures = [arch]
        config.save_pretrained(folder / name)
        tokenizer = "tokenizer" if i == 0 else "tokenizer_2"
        tokenizer_files(folder / tokenizer)
        index[name], index[tokenizer] = ["transformers", arch], ["transformers", "CLIPTokenizer"]
    if family != "sdxl":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _write_json(path, data: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}, indent=2))
