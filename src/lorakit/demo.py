"""`lorakit demo`: the smallest end-to-end run the adapter core allows.

Builds a tiny SD1-topology U-Net and CLIP text encoder (random weights: the pretrained embedded model
comes with the base-model work), puts a LoCon on it (network_dim 8 / conv_dim 8), trains it for a few
steps on procedural striped latents with the diffusion loss, saves a kohya-format file, inspects it,
and reloads it to check the model output is reproduced exactly.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.formats.files import load_network_file, save_network
from lorakit.inspect_file import format_report, inspect_file
from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network


def striped_latents(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 4, size, size) latents with diagonal stripes: a 'style' the random base model does not produce."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = torch.rand(n, 1, 1, 1, generator=g) * 6.28
    freq = 1.0 + torch.rand(n, 4, 1, 1, generator=g)
    return torch.sin((xx + yy)[None, None] * freq + phase)


def diffusion_loss(unet, latents, context, timesteps, noise, alphas_cumprod) -> torch.Tensor:
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    return F.mse_loss(unet(noisy, timesteps, context).sample, noise)


def run_demo(output: str | Path = "lorakit-demo", steps: int = 30, seed: int = 0) -> dict:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet, (text_encoder,) = build_unet("tiny-sd1", seed=seed), build_text_encoders("tiny-sd1", seed=seed)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    config = NetworkConfig(algo="lora", network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4,
                           train_text_encoder=False)
    network = create_network(unet, [text_encoder], config, seed=seed)
    print(f"base model: tiny SD1-topology U-Net (random weights, {sum(p.numel() for p in unet.parameters()):,} "
          f"params); adapters: {network.counts()} LoCon modules, {network.trainable_parameters():,} trainable")

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # SD's scaled_linear schedule
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    data = striped_latents(16, seed=seed)
    with torch.no_grad():
        context = text_encoder(torch.full((1, 8), 320)).last_hidden_state  # one fixed prompt embedding
    g = torch.Generator().manual_seed(seed + 1)
    eval_t = torch.randint(0, 1000, (16,), generator=g)
    eval_noise = torch.randn(16, 4, 8, 8, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(diffusion_loss(unet, data, context.expand(16, -1, -1), eval_t, eval_noise, alphas_cumprod))

    before = eval_loss()
    optimizer = torch.optim.AdamW(network.param_groups(default_lr=3e-3))
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(data), (4,), generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        loss = diffusion_loss(unet, data[idx], context.expand(4, -1, -1), t, torch.randn(4, 4, 8, 8, generator=g),
                              alphas_cumprod)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    after = eval_loss()
    print(f"trained {steps} steps in {elapsed:.1f} s ({elapsed / max(steps, 1) * 1000:.0f} ms/step): "
          f"held-out diffusion loss {before:.4f} -> {after:.4f}")

    path = save_network(network, out / "demo_locon.safetensors", title="demo_locon")
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        reference = unet(x, torch.tensor([500, 500]), context.expand(2, -1, -1)).sample
    network.restore()
    reloaded, _ = load_network_file(path, unet, [text_encoder])
    with torch.no_grad():
        again = unet(x, torch.tensor([500, 500]), context.expand(2, -1, -1)).sample
    diff = float((again - reference).abs().max())
    report = inspect_file(path)
    print(format_report(report))
    print(f"\nsaved {path} ({path.stat().st_size:,} bytes); reloaded output differs by {diff:.2e} (max abs)")
    return {"loss_before": before, "loss_after": after, "file": str(path), "reload_diff": diff}
