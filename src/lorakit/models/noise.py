"""What a training step draws, as pure functions: pyramid noise, timesteps, input perturbation, and the
zero-terminal-SNR schedule. Each follows kohya sd-scripts (library/train_util.py
get_noise_noisy_latents_and_timesteps, library/custom_train_functions.py) but takes an explicit
torch.Generator, so a micro-batch's draws depend only on its own seed. Offset noise is
lorakit.models.objectives.offset_noise.

Draws are made on the CPU (where the generator lives) and then moved to the tensors' device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled to zero SNR at the last timestep (Lin et al. 2023, kohya's
    fix_noise_scheduler_betas_for_zero_terminal_snr).

    With s_t = √ᾱ_t: s'_t = (s_t - s_T)·s_0 / (s_0 - s_T) and ᾱ'_t = s'_t². So ᾱ'_0 = ᾱ_0, ᾱ'_T = 0 exactly, and
    since s' is an increasing affine map of s, SNR'_t = ᾱ'_t / (1 - ᾱ'_t) still falls with t. kohya goes back
    through betas (α_t = ᾱ'_t / ᾱ'_{t-1}, then a cumulative product); that round trip is the identity up to
    rounding, so it is skipped here and the arithmetic is done in float64.
    """
    s = alphas_cumprod.detach().cpu().double().sqrt()  # on the CPU: not every accelerator has float64
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return (s * s).to(alphas_cumprod)


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform integers t ∈ [min_timestep, max_timestep), one per sample; every t = max_timestep when
    min_timestep >= max_timestep (kohya's get_timesteps)."""
    if min_timestep < max_timestep:
        return torch.randint(min_timestep, max_timestep, (batch,), generator=generator)
    return torch.full((batch,), max_timestep, dtype=torch.long)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, kohya's pyramid_noise_like.

    For i = 0 .. iterations-1: r_i ~ U(2, 4); (h_i, w_i) = (max(1, ⌊H / r_i^i⌋), max(1, ⌊W / r_i^i⌋));
    n ← n + bilinear_upsample(z_i)·discount^i with z_i ~ N(0, 1) of shape (B, C, h_i, w_i); stop after the
    first level with a side of 1. The result is n / std(n), std over the whole batch (unbiased), so the
    noise is back to about unit variance. i = 0 adds a second full-resolution draw, as in kohya.
    """
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2  # a random factor rather than always 2x
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        z = torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype).to(noise.device)
        noise = noise + F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def perturbed_noise(noise: torch.Tensor, gamma: float, random_strength: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, kohya's ip_noise_gamma): ε + γ'·ξ with ξ ~ N(0, 1) like ε, and
    γ' = γ, or γ·u with one u ~ U(0, 1) for the whole batch when random_strength.

    Only the U-Net's input is noised with this; the target keeps ε.
    """
    strength = gamma * float(torch.rand(1, generator=generator)) if random_strength else gamma
    xi = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)
    return noise + strength * xi
