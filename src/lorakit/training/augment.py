"""Pixel augmentations and loss masks as kohya sd-scripts defines them (train_util.AugHelper,
trim_and_resize_if_required and apply_masked_loss at 48d368fa), as functions of explicit random draws.

color_aug: with probability 0.33 an image is changed, half the time by a hue rotation of up to ±8 OpenCV
hue units (±16°), half the time by a gamma curve x ↦ x^γ, γ ~ U(0.95, 1.05), on 0..255 values. random_crop:
the crop from the resized image to its bucket starts at a uniform offset instead of the centre. The draws
come from the caller's per-micro-batch random.Random, so a resumed run replays them.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

HUE_LIMIT_DEGREES = 16.0  # kohya's hue_shift_limit 8 in OpenCV's 0..180 hue scale
COLOR_AUG_PROBABILITY = 0.33
GAMMA_RANGE = (0.95, 1.05)


def crop_offset(excess: int, rng: random.Random | None) -> int:
    """Where a crop of `excess` surplus pixels starts: excess // 2 (centre), or with an rng (random_crop)
    a uniform integer in [0, excess]."""
    return excess // 2 if rng is None or excess <= 0 else rng.randint(0, excess)


def draw_color_aug(rng: random.Random) -> tuple[str, float] | None:
    """kohya's color_aug draws, in its order: u ≤ 0.33 picks an augmentation, then u' > 0.5 a hue shift of
    U(-16°, 16°), else a gamma of U(0.95, 1.05). None: the image stays as it is."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return None
    if rng.random() > 0.5:
        return "hue", rng.uniform(-HUE_LIMIT_DEGREES, HUE_LIMIT_DEGREES)
    return "gamma", rng.uniform(*GAMMA_RANGE)


def hue_shift(rgb: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the hue of (3, H, W) RGB in [0, 1] by `degrees`, keeping HSV saturation and value.

    With V = max(r, g, b), C = V - min(r, g, b) and hue H in sextants (0..6), H' = (H + degrees/60) mod 6
    and each channel is V - C·clamp(min(k, 4 - k), 0, 1) with k = (n + H') mod 6, n = 5, 3, 1 for r, g, b.
    kohya does this in OpenCV's 8-bit HSV (hue in 2° steps); here it is exact in float.
    """
    r, g, b = rgb
    value, _ = rgb.max(dim=0)
    chroma = value - rgb.min(dim=0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (torch.where(chroma > 0, hue, torch.zeros_like(hue)) + degrees / 60.0) % 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue) % 6
        out.append(value - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out)


def gamma_curve(pixels255: torch.Tensor, gamma: float) -> torch.Tensor:
    """kohya's random gamma on 0..255 values: floor(clamp(x^γ, 0, 255)) (its uint8 cast truncates)."""
    return torch.clamp(pixels255 ** gamma, 0, 255).floor()


def color_aug(pixels255: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """(3, H, W) RGB on 0..255 after kohya's color_aug, with the draws of draw_color_aug."""
    drawn = draw_color_aug(rng)
    if drawn is None:
        return pixels255
    kind, amount = drawn
    if kind == "gamma":
        return gamma_curve(pixels255, amount)
    return hue_shift(pixels255 / 255.0, amount) * 255.0


def latent_mask(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) loss mask from a (1, H, W) alpha in [0, 1]: area-resized to the latent size, as kohya's
    apply_masked_loss does (for H = 8h, W = 8w: the mean of each 8x8 block, so a block is 0 only where every
    pixel's alpha is 0)."""
    return F.interpolate(alpha[None].float(), size=size, mode="area")[0]
