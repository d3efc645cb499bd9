"""Procedural styles the embedded model has never seen, as training folders on disk, and their detectors.

A style is 'how' things are drawn over the usual shapes; each comes with a detector, so how much of the
style a generated image carries is one number.

- `sepia` (the demo's style): a brown monochrome colour grade. Detector: the share of pixels that lie on
  the sepia colour line (training images: 1.0). The tiny VAE draws colours faithfully, so this style can
  be learned and seen.
- `striped`: diagonal dark bands with an 8-pixel period. Detector: brightness off the bands minus on them,
  relative to the mean (striped images about 0.76). The tiny VAE (8x8 latents) smooths such fine textures
  away, which the model card measures; it stays here as the texture probe.
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


def vae_batch(batch: int, rng: random.Random, textured_share: float = 0.5, sepia_share: float = 0.0) -> np.ndarray:
    """(batch, 3, H, W) float32 in [-1, 1]: shapes scenes, a share of them textured, a share sepia-graded."""
    scenes = shapes.all_scenes()
    images = []
    for _ in range(batch):
        image = shapes.render(rng.choice(scenes), rng)
        if rng.random() < textured_share:
            image = textured(image, rng)
        elif rng.random() < sepia_share:
            image = sepia(image)
        images.append(image)
    return np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def stripe_score(image: np.ndarray) -> float:
    """(H, W, 3) uint8 -> how strongly the image carries the stripe pattern, in the pattern's own phase."""
    luma = image.astype(np.float32).mean(axis=2)
    bands = stripe_bands(*luma.shape)
    return float((luma[~bands].mean() - luma[bands].mean()) / (luma.mean() + 1.0))


SEPIA_TINT = np.array([112.0, 66.0, 20.0]) / np.linalg.norm([112.0, 66.0, 20.0])  # unit RGB direction
LUMA = np.array([0.299, 0.587, 0.114])


def sepia(image: np.ndarray) -> np.ndarray:
    """Brown monochrome: each pixel's luma along the sepia tint, dimmed to 65% so that no channel clips."""
    luma = image.astype(np.float32) @ LUMA
    out = luma[..., None] * (SEPIA_TINT / float(SEPIA_TINT @ LUMA)) * 0.65
    return np.clip(out, 0, 255).round().astype(np.uint8)


def sepia_score(image: np.ndarray, tolerance: float = 20.0) -> float:
    """Share of pixels within `tolerance` (RGB units) of the sepia colour line."""
    x = image.astype(np.float32)
    along = x @ SEPIA_TINT
    distance = np.linalg.norm(x - along[..., None] * SEPIA_TINT, axis=2)
    return float((distance < tolerance).mean())


STYLES = {"sepia": (sepia, sepia_score), "striped": (striped, stripe_score)}


def style_score(style: str, image: np.ndarray) -> float:
    return STYLES[style][1](image)


def write_style_dataset(folder: str | Path, count: int = 8, repeats: int = 4, seed: int = 0,
                        style: str = "sepia", tagged: bool = True) -> Path:
    """kohya layout: `folder/{repeats}_{style}/NNN.png` + `.txt` captions '<scene caption>, <style>', or with
    tagged=False the bare scene caption (the base model's own caption grammar: the LoRA alone carries the
    style). Returns the folder to pass as train_data_dir."""
    rng = random.Random(seed)
    subset = Path(folder) / f"{repeats}_{style}"
    subset.mkdir(parents=True, exist_ok=True)
    scenes = shapes.training_scenes()
    transform = STYLES[style][0]
    for i in range(count):
        scene = rng.choice(scenes)
        Image.fromarray(transform(shapes.render(scene, rng))).save(subset / f"{i:03d}.png")
        caption = f"{scene.caption}, {style}" if tagged else scene.caption
        (subset / f"{i:03d}.txt").write_text(f"{caption}\n", encoding="utf-8")
    return Path(folder)


def style_prompts(count: int = 4, seed: int = 1, trigger: str | None = "sepia") -> list[str]:
    """Prompts in the trained style, for samples and grids; trigger None: bare scene captions."""
    rng = random.Random(seed)
    captions = [rng.choice(shapes.training_scenes()).caption for _ in range(count)]
    return [f"{c}, {trigger}" if trigger else c for c in captions]


def unrelated_prompts(count: int = 4, seed: int = 2) -> list[str]:
    """Plain scene prompts without the trigger: what a LoRA should leave alone (drift is measured here)."""
    rng = random.Random(seed)
    return [rng.choice(shapes.training_scenes()).caption for _ in range(count)]
