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
TINY_SDXL_UNET = dict(SDXL_UNET, sample_size=8, block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 2),
                      cross_attention_dim=64, attention_head_dim=(2, 2, 4), norm_num_groups=8,
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)

FAMILIES = {
    "sd1": (SD15_UNET, [CLIP_L]), "sd2": (SD2_UNET, [OPENCLIP_H]), "sdxl": (SDXL_UNET, [CLIP_L, OPENCLIP_BIGG]),
    "tiny-sd1": (TINY_SD1_UNET, [TINY_CLIP]), "tiny-sd2": (TINY_SD2_UNET, [TINY_CLIP]),
    "tiny-sdxl": (TINY_SDXL_UNET, [TINY_CLIP, TINY_CLIP]),
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
