"""Procedural styles the embedded model has never seen, as training folders on disk, and their detectors.

A style is 'how' things are drawn over the usual shapes: diagonal stripes darken every other band. The
detector knows the band pattern, so how much of the style a generated image carries is one number:
`stripe_score` = mean brightness off the bands minus on them, relative to the image's mean brightness
(about 0 for images without stripes, about 0.76 for a striped training image).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.models import shapes

STRIPE_DARKEN = 0.45


def stripe_bands(height: int, width: int) -> np.ndarray:
    """(H, W) bool: the diagonal bands (period 8 px) the striped style darkens."""
    return texture_mask("diagonal", height, width)


def striped(image: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32)
    out[stripe_bands(*image.shape[:2])] *= STRIPE_DARKEN
    return out.astype(np.uint8)


def texture_mask(kind: str, height: int, width: int, phase: int = 0) -> np.ndarray:
    """(H, W) bool masks of the textures the VAE learns to reproduce (so LoRA styles can be rendered)."""
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "diagonal":
        return ((xx + yy + phase) // 4) % 2 == 1
    if kind == "antidiagonal":
        return ((xx - yy + phase + 4 * width) // 4) % 2 == 1
    if kind == "horizontal":
        return ((yy + phase) // 2) % 2 == 1
    if kind == "vertical":
        return ((xx + phase) // 2) % 2 == 1
    if kind == "checker":
        return (((xx + phase) // 4) + ((yy + phase) // 4)) % 2 == 1
    raise ValueError(f"unknown texture {kind!r}")


TEXTURES = ("diagonal", "antidiagonal", "horizontal", "vertical", "checker")


def textured(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random texture (kind, phase, strength) over the image: VAE training data, never diffusion data."""
    out = image.astype(np.float32)
    mask = texture_mask(rng.choice(TEXTURES), *image.shape[:2], phase=rng.randrange(8))
    out[mask] *= rng.uniform(0.3, 0.7)
    return out.astype(np.uint8)


def vae_batch(batch: int, rng: random.Random, textured_share: float = 0.5) -> np.ndarray:
    """(batch, 3, H, W) float32 in [-1, 1]: shapes scenes, about half of them textured."""
    scenes = shapes.all_scenes()
    images = []
    for _ in range(batch):
        image = shapes.render(rng.choice(scenes), rng)
        images.append(textured(image, rng) if rng.random() < textured_share else image)
    return np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def stripe_score(image: np.ndarray) -> float:
    """(H, W, 3) uint8 -> how strongly the image carries the stripe pattern, in the pattern's own phase."""
    luma = image.astype(np.float32).mean(axis=2)
    bands = stripe_bands(*luma.shape)
    return float((luma[~bands].mean() - luma[bands].mean()) / (luma.mean() + 1.0))


def write_style_dataset(folder: str | Path, count: int = 8, repeats: int = 4, seed: int = 0,
                        trigger: str = "striped") -> Path:
    """kohya layout: `folder/{repeats}_{trigger}/NNN.png` + `.txt` captions '<scene caption>, <trigger>'.
    Returns the folder to pass as train_data_dir."""
    rng = random.Random(seed)
    subset = Path(folder) / f"{repeats}_{trigger}"
    subset.mkdir(parents=True, exist_ok=True)
    scenes = shapes.training_scenes()
    for i in range(count):
        scene = rng.choice(scenes)
        Image.fromarray(striped(shapes.render(scene, rng))).save(subset / f"{i:03d}.png")
        (subset / f"{i:03d}.txt").write_text(f"{scene.caption}, {trigger}\n", encoding="utf-8")
    return Path(folder)


def style_prompts(count: int = 4, seed: int = 1, trigger: str = "striped") -> list[str]:
    """Prompts in the trained style (held-out scenes), for samples and grids."""
    rng = random.Random(seed)
    return [f"{rng.choice(shapes.training_scenes()).caption}, {trigger}" for _ in range(count)]


def unrelated_prompts(count: int = 4, seed: int = 2) -> list[str]:
    """Plain scene prompts without the trigger: what a LoRA should leave alone (drift is measured here)."""
    rng = random.Random(seed)
    return [rng.choice(shapes.training_scenes()).caption for _ in range(count)]
