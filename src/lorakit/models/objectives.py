"""The diffusion training objective as pure functions: noising, targets, min-SNR weights, noise offset.

With ᾱ_t the cumulative product of (1 - β): x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε; the epsilon target is ε, the
v target is √ᾱ_t·ε - √(1-ᾱ_t)·x_0; SNR_t = ᾱ_t / (1-ᾱ_t).
"""
from __future__ import annotations

import torch


def sd_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's scaled_linear schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(latents, noise, alphas_cumprod, timesteps) -> torch.Tensor:
    a = _per_sample(alphas_cumprod[timesteps], latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target(latents, noise, alphas_cumprod, timesteps, v_prediction: bool) -> torch.Tensor:
    if not v_prediction:
        return noise
    a = _per_sample(alphas_cumprod[timesteps], latents)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def snr(alphas_cumprod, timesteps) -> torch.Tensor:
    a = alphas_cumprod[timesteps]
    return a / (1 - a)


def min_snr_weight(alphas_cumprod, timesteps, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min(SNR, γ)/SNR for epsilon prediction, min(SNR, γ)/(SNR + 1) for v (Hang et al. 2023, as kohya)."""
    s = snr(alphas_cumprod, timesteps)
    return torch.clamp(s, max=gamma) / (s + 1 if v_prediction else s)


def offset_noise(latents: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, 1) noise plus offset · N(0, 1) per sample and channel, constant over H x W (kohya's noise_offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=latents.dtype)
    return noise.to(latents.device)


def weighted_mse(pred, tgt, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over everything but the batch, times a per-sample weight, then the batch mean."""
    per_sample = (pred.float() - tgt.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * weights).mean() if weights is not None else per_sample.mean()
