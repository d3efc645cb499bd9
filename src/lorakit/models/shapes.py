"""Procedural dataset for the embedded tiny model: coloured shapes on coloured backgrounds, with captions.

"a large red circle on a blue background, top left". Everything is drawn in code from a seed, so the
pretraining data (and the evaluation's held-out prompts) are reproducible anywhere, offline.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np

PALETTE = {  # name -> RGB; chosen far apart so a nearest-colour check is unambiguous
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 50),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
             "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
SIZES = {"small": (0.30, 0.36), "large": (0.44, 0.50)}  # shape extent as a fraction of the image side
IMAGE_SIZE = 64
STRICT_IOU = 0.75  # judge(min_iou=...) for the strict figure: a clean outline, not just the closest template


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    position: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {self.position}"

    @staticmethod
    def parse(caption: str) -> "Scene":
        head, position = caption.rsplit(", ", 1)
        words = head.split()
        return Scene(colour=words[2], shape=words[3], background=words[6], position=position, size=words[1])


def all_scenes() -> list[Scene]:
    return [Scene(c, s, b, p, z) for c, s, b, p, z in itertools.product(PALETTE, SHAPES, PALETTE, POSITIONS, SIZES)
            if c != b]


def held_out_triples(seed: int = 0, count: int = 16) -> set[tuple[str, str, str]]:
    """(colour, shape, background) combinations never shown in training: the evaluation's prompts."""
    triples = sorted({(s.colour, s.shape, s.background) for s in all_scenes()})
    return set(random.Random(seed).sample(triples, count))


def training_scenes(seed: int = 0) -> list[Scene]:
    held = held_out_triples(seed)
    return [s for s in all_scenes() if (s.colour, s.shape, s.background) not in held]


def shape_mask(shape: str, cx: float, cy: float, extent: float, size: int = IMAGE_SIZE,
               angle: float = 0.0) -> np.ndarray:
    """Boolean (size, size) mask; centre and extent in pixels, extent = side / diameter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    half = extent / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base down, height = extent
        t = (dy + half) / extent  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: random.Random | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 image; rng jitters position, size and colour a little (None: the canonical image)."""
    rng = rng or random.Random(0)
    jitter = (lambda a: rng.uniform(-a, a)) if rng else (lambda a: 0.0)
    fx, fy = POSITIONS[scene.position]
    lo, hi = SIZES[scene.size]
    extent = rng.uniform(lo, hi) * size
    cx, cy = (fx + jitter(0.05)) * size, (fy + jitter(0.05)) * size
    image = np.empty((size, size, 3), np.float32)
    image[:] = _shade(PALETTE[scene.background], jitter)
    image[shape_mask(scene.shape, cx, cy, extent, size)] = _shade(PALETTE[scene.colour], jitter)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shade(rgb, jitter) -> np.ndarray:
    return np.array(rgb, np.float32) + np.array([jitter(12) for _ in range(3)], np.float32)


def sample_batch(scenes: list[Scene], batch: int, rng: random.Random) -> tuple[np.ndarray, list[str]]:
    """(batch, 3, H, W) float32 in [-1, 1] and captions."""
    chosen = [rng.choice(scenes) for _ in range(batch)]
    images = np.stack([render(s, rng) for s in chosen]).astype(np.float32) / 127.5 - 1.0
    return images.transpose(0, 3, 1, 2), [s.caption for s in chosen]


def judge(image: np.ndarray, min_iou: float = 0.5) -> tuple[str | None, str | None]:
    """(colour, shape) seen in an (H, W, 3) uint8 image, or None where nothing clear is there.

    Shape = the template with the best intersection-over-union, if that IoU exceeds `min_iou`. Circle and
    square templates overlap by IoU pi/4 = 0.785, so the choice is made by the ranking; a stricter
    `min_iou` (STRICT_IOU) also asks that the shape be drawn cleanly (rendered scenes: median IoU 1.0,
    5th percentile 0.93).
    """
    colour, scores = judge_scores(image)
    return colour, pick_shape(scores, min_iou)


def pick_shape(scores: dict[str, float], min_iou: float = 0.5) -> str | None:
    """The best-scoring shape of judge_scores' {shape: IoU}, if its IoU exceeds `min_iou`."""
    if not scores:
        return None
    best = max(scores, key=scores.get)
    return best if scores[best] > min_iou else None


def judge_scores(image: np.ndarray) -> tuple[str | None, dict[str, float]]:
    """(colour, {shape: template IoU}) of the one shape in an image; (None, {}) where there is none.

    Background = median colour of the border; foreground = pixels far from it (none, or more than 60% of the
    image, means no clear shape), of which only the largest 4-connected region counts: a decoder's stray
    pixels at the image edge would otherwise stretch the bounding box to the whole image. Colour = nearest
    palette entry to the region's median; each shape's template is drawn at the region's bounding box.
    """
    img = image.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(img - background, axis=2) > 60
    if not 12 <= foreground.sum() <= 0.6 * h * w:  # nothing there, or no background to speak of (noise)
        return None, {}
    foreground = largest_component(foreground)
    if foreground.sum() < 12:  # only specks: noise, not a shape
        return None, {}
    rgb = np.median(img[foreground], axis=0)
    colour = min(PALETTE, key=lambda c: float(np.linalg.norm(rgb - np.array(PALETTE[c]))))
    ys, xs = np.nonzero(foreground)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    extent = ((x1 - x0) + (y1 - y0)) / 2
    return colour, {s: _iou(foreground, shape_mask(s, (x0 + x1) / 2, (y0 + y1) / 2, extent, h)) for s in SHAPES}


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of an (H, W) bool mask (flood fill; 64x64 masks take milliseconds)."""
    labels = np.zeros(mask.shape, np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], stack, size = label, [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_label else mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
