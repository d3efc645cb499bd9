import random
import sys

import pytest
import torch
from PIL import Image

# PyPI's torchvision breaks beside the CPU torch; make sure diffusers never tries to import a broken one
sys.modules.setdefault("torchvision", None)
torch.set_num_threads(2)

from lorakit.models import shapes  # noqa: E402
from lorakit.models.tiny import build_components, save_folder  # noqa: E402
from lorakit.training.config import build_config  # noqa: E402


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


# ---- trainer fixtures: a randomly initialised tiny model folder and a 4-image dataset ----
@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("base") / "tiny-sd", *build_components(0), dtype=torch.float32)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "data" / "3_red shape"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(4):
        scene = rng.choice([s for s in shapes.all_scenes() if s.colour == "red"])
        Image.fromarray(shapes.render(scene, rng)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(scene.caption)
    return tmp_path / "data"


def train_config(tiny_folder, images, tmp_path, **kw):
    values = dict(pretrained_model_name_or_path=str(tiny_folder), train_data_dir=str(images), resolution=64,
                  train_batch_size=2, max_train_steps=4, network_dim=4, network_alpha=2, learning_rate=1e-3,
                  output_dir=str(tmp_path / "out"), output_name="t", seed=1)
    values.update(kw)
    return build_config({k: v for k, v in values.items() if v is not None})


