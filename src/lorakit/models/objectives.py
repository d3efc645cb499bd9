"""The diffusion training objective as pure functions: noising, targets, noise offset, the per-element loss
(l2, l1, Huber, smooth L1), loss masks and the SNR-based loss weights, each as kohya sd-scripts defines it.

With ᾱ_t the cumulative product of (1 - β): x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε; the epsilon target is ε, the
v target is √ᾱ_t·ε - √(1-ᾱ_t)·x_0; SNR_t = ᾱ_t / (1-ᾱ_t). A zero-terminal-SNR schedule has ᾱ_T = 0 (SNR 0),
so nothing here divides by ᾱ or by an unclamped SNR. Pyramid noise, timesteps and input perturbation are in
lorakit.models.noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    """min(SNR, γ)/SNR for epsilon prediction, min(SNR, γ)/(SNR + 1) for v (Hang et al. 2023, as kohya).

    The epsilon weight is computed as min(γ/SNR, 1): the same number, and 1 (its limit) rather than 0/0 at
    SNR = 0."""
    s = snr(alphas_cumprod, timesteps)
    if v_prediction:
        return torch.clamp(s, max=gamma) / (s + 1)
    return torch.clamp(gamma / s, max=1.0)


def offset_noise(latents: torch.Tensor, offset: float, generator: torch.Generator | None = None,
                 adaptive_scale: float | None = None, random_strength: bool = False) -> torch.Tensor:
    """N(0, 1) noise plus o·N(0, 1) per sample and channel, constant over H x W (kohya's noise_offset and
    apply_noise_offset).

    o = offset, or offset·u with one u ~ U(0, 1) for the whole batch when random_strength; with an
    adaptive_scale a, o becomes max(0, o + a·|mean_HW(latents)|) per sample and channel. Draws, in kohya's
    order: the noise, u, the offsets. offset 0 draws nothing more (and ignores adaptive_scale, as kohya).
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if not offset:
        return noise
    strength = offset * float(torch.rand(1, generator=generator)) if random_strength else offset
    if adaptive_scale is not None:
        strength = torch.clamp(strength + adaptive_scale * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
    shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=latents.dtype).to(latents.device)
    return noise + strength * shift


def weighted_mse(pred, tgt, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over everything but the batch, times a per-sample weight, then the batch mean."""
    per_sample = (pred.float() - tgt.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * weights).mean() if weights is not None else per_sample.mean()


# ---- the per-element loss, masks and SNR-based weights (kohya's conditional_loss and post_process_loss) ----
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    """The Huber threshold c_t per sample (kohya's get_huber_threshold_if_needed), with T = len(ᾱ):

    constant: c_t = huber_c·scale;  exponential: c_t = exp(ln(huber_c)·t/T)·scale = huber_c^(t/T)·scale;
    snr: c_t = (1 - huber_c)/(1 + σ_t)² + huber_c with σ_t = √((1-ᾱ_t)/ᾱ_t), i.e. 1 at t = 0 falling to
    about huber_c; written as (1 - huber_c)·ᾱ_t/(√ᾱ_t + √(1-ᾱ_t))² + huber_c, which is exactly huber_c
    (not 1/0) at ᾱ_t = 0. kohya's `huber_scale` applies to constant and exponential only.
    """
    t = timesteps.to(alphas_cumprod.device)
    if schedule == "constant":
        return torch.full(t.shape, huber_c * scale, dtype=alphas_cumprod.dtype, device=t.device)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t.to(alphas_cumprod.dtype) / len(alphas_cumprod)) * scale
    if schedule == "snr":
        a = alphas_cumprod[t]
        return (1 - huber_c) * a / (a.sqrt() + (1 - a).sqrt()) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r} is unknown; choose constant, exponential or snr")


def elementwise_loss(pred: torch.Tensor, tgt: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per element (kohya's conditional_loss with reduction "none"), with d = pred - tgt and c the
    per-sample threshold from huber_threshold:

    l2: d²;  l1: |d|;  huber: 2c·(√(d² + c²) - c) (≈ d² for |d| ≪ c, ≈ 2c·|d| for |d| ≫ c);
    smooth_l1: 2·(√(d² + c²) - c) (≈ d²/c for |d| ≪ c, ≈ 2|d| for |d| ≫ c).
    """
    d = pred - tgt
    if loss_type == "l2":
        return d.pow(2)
    if loss_type == "l1":
        return d.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type {loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs the per-sample threshold huber_c (see huber_threshold)")
    c = _per_sample(huber_c, d)
    # √(d² + c²) - c written as d²/(√(d² + c²) + c): equal, but without float32 cancellation for |d| ≪ c
    # (the floor only matters at d = c = 0)
    smooth = 2 * d * d / (torch.sqrt(d * d + c * c) + c).clamp_min(torch.finfo(d.dtype).tiny)
    return c * smooth if loss_type == "huber" else smooth


def masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """loss·m, with the (B, 1, h, w) mask m in [0, 1] area-resized to the loss's H x W first when its size
    differs (kohya's apply_masked_loss). The later mean over C x H x W is not renormalised by the mask."""
    mask = mask.to(device=loss.device, dtype=loss.dtype)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask


def _clamped_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    # kohya caps SNR at 1000 (t = 0 would be near-infinite); the floor 1e-3 lies below SD's smallest SNR
    # (0.0047) and keeps the weights finite on a zero-terminal-SNR schedule, where SNR_T = 0.
    return snr(alphas_cumprod, timesteps).clamp(1e-3, 1000.0)


def v_pred_scale(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """s_t = SNR_t/(SNR_t + 1), SNR_t capped at 1000 (kohya's get_snr_scale): the weight that makes a v loss
    scale like an epsilon loss (scale_v_pred_loss_like_noise_pred)."""
    s = _clamped_snr(alphas_cumprod, timesteps)
    return s / (s + 1)


def add_v_pred_like_loss(loss: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                         strength: float) -> torch.Tensor:
    """L + λ·L/s_t with s_t from v_pred_scale (kohya's add_v_prediction_like_loss, v_pred_like_loss = λ)."""
    return loss + loss / v_pred_scale(alphas_cumprod, timesteps).to(loss) * strength


def debiased_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """1/√SNR_t for epsilon prediction, 1/(SNR_t + 1) for v, SNR_t capped at 1000 (kohya's
    apply_debiased_estimation; Yu et al. 2024)."""
    s = _clamped_snr(alphas_cumprod, timesteps)
    return 1 / (s + 1) if v_prediction else s.rsqrt()
