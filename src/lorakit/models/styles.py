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

STRIPE_PERIOD = 8
STRIPE_DARKEN = 0.45


def stripe_bands(height: int, width: int, period: int = STRIPE_PERIOD) -> np.ndarray:
    """(H, W) bool: the diagonal bands the striped style darkens."""
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx + yy) // (period // 2)) % 2 == 1


def striped(image: np.ndarray, period: int = STRIPE_PERIOD) -> np.ndarray:
    out = image.astype(np.float32)
    out[stripe_bands(*image.shape[:2], period)] *= STRIPE_DARKEN
    return out.astype(np.uint8)


def stripe_score(image: np.ndarray, period: int = STRIPE_PERIOD) -> float:
    """(H, W, 3) uint8 -> how strongly the image carries the stripe pattern, in the pattern's own phase."""
    luma = image.astype(np.float32).mean(axis=2)
    bands = stripe_bands(*luma.shape, period)
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
