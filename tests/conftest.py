import sys

import pytest
import torch

# PyPI's torchvision breaks beside the CPU torch; make sure diffusers never tries to import a broken one
sys.modules.setdefault("torchvision", None)
torch.set_num_threads(2)


@pytest.fixture
def tiny_sd1():
    from lorakit.models.configs import build_text_encoders, build_unet

    return build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")


def unet_inputs(unet, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10] * batch)
    ctx = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g),
                                        "time_ids": torch.randn(batch, 6, generator=g)}}
    return x, t, ctx, extra


def randomize(network, std=0.1, seed=0):
    """Give every adapter non-zero weights (fresh adapters are exact no-ops by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
