"""The diffusion stage's encoded latent pool: the same latents a fresh encode of each jittered render gives."""
import random

import numpy as np
import torch
from diffusers import AutoencoderKL

from lorakit.models import pretrain, shapes
from lorakit.models.tiny import TINY_VAE


def test_latent_pool_holds_each_scenes_renders_encoded_in_order():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    scenes = shapes.training_scenes(0)[:3]
    means, stds, captions = pretrain.encode_latent_pool(vae, scenes, renders_per_scene=2, seed=5)
    assert means.shape == stds.shape == (6, 4, 8, 8)
    assert captions == [scenes[0].caption] * 2 + [scenes[1].caption] * 2 + [scenes[2].caption] * 2
    assert bool((stds > 0).all())
    rng = random.Random(5 + 1)  # replay the pool's renders: fresh jitter for every copy of a scene
    renders = [shapes.render(s, rng) for s in scenes for _ in range(2)]
    assert not np.array_equal(renders[0], renders[1])
    x = torch.from_numpy(np.stack(renders).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    torch.testing.assert_close(means, posterior.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stds, posterior.std, rtol=1e-4, atol=1e-5)
