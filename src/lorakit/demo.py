"""`lorakit demo`: the smallest end-to-end run the adapter core allows, on the embedded tiny model.

Loads the embedded tiny SD model (no base model given, and it says so), puts a LoCon on its U-Net
(network_dim 8 / conv_dim 8), trains it for a few steps on a procedural style the base model has never
seen (diagonal stripes over the usual shapes), saves a kohya-format file, inspects it, and reloads it to
check that the model output is reproduced exactly. The full experiment (grids, sweeps, report) is the
evaluation work that comes next.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from lorakit.formats.files import load_network_file, save_network
from lorakit.inspect_file import format_report, inspect_file
from lorakit.models import objectives, shapes
from lorakit.models.checkpoint import load_base_model
from lorakit.models.tokenizer import clip_tokenizer
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network


def striped(image: np.ndarray, period: int = 8) -> np.ndarray:
    """Darken alternate diagonal bands: a texture ('how' it is drawn) for conv layers to pick up."""
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    bands = ((xx + yy) // (period // 2)) % 2 == 1
    out = image.astype(np.float32)
    out[bands] *= 0.45
    return out.astype(np.uint8)


def style_batch(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    scenes = [rng.choice(shapes.training_scenes()) for _ in range(count)]
    images = np.stack([striped(shapes.render(s, rng)) for s in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(images.transpose(0, 3, 1, 2)), [s.caption + ", striped" for s in scenes]


def diffusion_loss(unet, latents, context, timesteps, noise, alphas_cumprod) -> torch.Tensor:
    noisy = objectives.add_noise(latents, noise, alphas_cumprod, timesteps)
    return objectives.weighted_mse(unet(noisy, timesteps, context).sample, noise)


def run_demo(output: str | Path = "lorakit-demo", steps: int = 30, seed: int = 0) -> dict:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = load_base_model()
    print("\n".join(base.notes))
    pipe = base.pipeline
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    config = NetworkConfig(algo="lora", network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4,
                           train_text_encoder=False)
    network = create_network(unet, [text_encoder], config, seed=seed)
    print(f"LoCon on the U-Net: {network.counts()['unet']} modules, {network.trainable_parameters():,} trainable "
          f"parameters (network_dim 8 / conv_dim 8)")

    images, captions = style_batch(32, seed)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        ids = clip_tokenizer()(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = text_encoder(ids).last_hidden_state
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(seed + 1)
    eval_t, eval_noise = torch.randint(0, 1000, (32,), generator=g), torch.randn(latents.shape, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(diffusion_loss(unet, latents, context, eval_t, eval_noise, alphas_cumprod))

    before = eval_loss()
    optimizer = torch.optim.AdamW(network.param_groups(default_lr=2e-3))
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (4,), generator=g)
        loss = diffusion_loss(unet, latents[idx], context[idx], torch.randint(0, 1000, (4,), generator=g),
                              torch.randn((4, *latents.shape[1:]), generator=g), alphas_cumprod)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    after = eval_loss()
    print(f"trained {steps} steps at batch 4 in {elapsed:.1f} s ({elapsed / max(steps, 1) * 1000:.0f} ms/step): "
          f"diffusion loss on the striped style {before:.4f} -> {after:.4f}")

    path = save_network(network, out / "demo_locon.safetensors", title="demo_locon")
    x = torch.randn((2, *latents.shape[1:]), generator=g)
    with torch.no_grad():
        reference = unet(x, torch.tensor([500, 500]), context[:2]).sample
    network.restore()
    load_network_file(path, unet, [text_encoder])
    with torch.no_grad():
        again = unet(x, torch.tensor([500, 500]), context[:2]).sample
    diff = float((again - reference).abs().max())
    print(format_report(inspect_file(path)))
    print(f"\nsaved {path} ({path.stat().st_size:,} bytes); reloaded output differs by {diff:.2e} (max abs)")
    return {"loss_before": before, "loss_after": after, "file": str(path), "reload_diff": diff}
