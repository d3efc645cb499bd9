"""What the eye looks for in a sample set, as numbers. Images are (H, W, 3) uint8 arrays; sets are lists.

- saturation: mean HSV saturation (over-trained LoRAs burn colours)
- artefacts: share of spectral energy in the top frequency band (noise, "deep-fried" high-frequency junk)
- diversity: mean pairwise distance between images of one prompt across seeds (collapse -> 0)
- fidelity: distance between a sample set and the training images in an offline feature space
  (colour histograms + the radial power spectrum, which carries texture), lower = closer to the data
- drift: how much the LoRA changes images for prompts unrelated to its data (same seeds, with vs without)
"""
from __future__ import annotations

import numpy as np

HIST_BINS = 8
SPECTRUM_BANDS = 8


def as_float(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def saturation(images: list[np.ndarray]) -> float:
    values = []
    for image in images:
        x = as_float(image)
        high, low = x.max(axis=2), x.min(axis=2)
        values.append(np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0).mean())
    return float(np.mean(values))


def radial_spectrum(image: np.ndarray, bands: int = SPECTRUM_BANDS) -> np.ndarray:
    """(bands,) share of the (mean-removed) luminance power in each radial frequency band, low to high."""
    luma = as_float(image).mean(axis=2)
    power = np.abs(np.fft.fftshift(np.fft.fft2(luma - luma.mean()))) ** 2
    h, w = luma.shape
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.hypot((yy - h // 2) / (h / 2), (xx - w // 2) / (w / 2)) / np.sqrt(2)  # 0 .. 1
    index = np.minimum((radius * bands).astype(int), bands - 1)
    totals = np.bincount(index.ravel(), weights=power.ravel(), minlength=bands)
    return totals / max(totals.sum(), 1e-12)


def artefacts(images: list[np.ndarray]) -> float:
    """Mean share of energy in the top half of the frequency range (flat images: about 0; noise: about 0.75)."""
    return float(np.mean([radial_spectrum(i)[SPECTRUM_BANDS // 2:].sum() for i in images]))


def diversity(images: list[np.ndarray]) -> float:
    """Mean pairwise RMS difference (0..1); identical images give exactly 0."""
    flat = [as_float(i).ravel() for i in images]
    pairs = [np.sqrt(np.mean((a - b) ** 2)) for k, a in enumerate(flat) for b in flat[k + 1:]]
    return float(np.mean(pairs)) if pairs else 0.0


def features(image: np.ndarray) -> np.ndarray:
    x = as_float(image)
    hist = np.concatenate([np.histogram(x[..., c], bins=HIST_BINS, range=(0, 1))[0] for c in range(3)])
    hist = hist / max(hist.sum(), 1)
    spectrum = np.log1p(radial_spectrum(image) * 100)
    return np.concatenate([hist, spectrum])


def fidelity(samples: list[np.ndarray], training: list[np.ndarray]) -> float:
    """Distance between the mean features of the samples and of the training images (0 = same statistics)."""
    a = np.mean([features(i) for i in samples], axis=0)
    b = np.mean([features(i) for i in training], axis=0)
    return float(np.linalg.norm(a - b))


def drift(with_lora: list[np.ndarray], without_lora: list[np.ndarray]) -> float:
    """Mean RMS difference between paired images (same prompt and seed), 0..1."""
    if len(with_lora) != len(without_lora):
        raise ValueError(f"drift needs paired images: {len(with_lora)} vs {len(without_lora)}")
    return float(np.mean([np.sqrt(np.mean((as_float(a) - as_float(b)) ** 2))
                          for a, b in zip(with_lora, without_lora)]))


def sample_set_metrics(samples_by_prompt: dict[str, list[np.ndarray]], training: list[np.ndarray],
                       unrelated: list[np.ndarray] | None = None,
                       unrelated_base: list[np.ndarray] | None = None) -> dict[str, float]:
    """All metrics of one sample set: images grouped by prompt (several seeds each)."""
    every = [i for group in samples_by_prompt.values() for i in group]
    out = {"saturation": saturation(every), "artefacts": artefacts(every),
           "diversity": float(np.mean([diversity(g) for g in samples_by_prompt.values()])),
           "fidelity": fidelity(every, training)}
    if unrelated is not None and unrelated_base is not None:
        out["drift"] = drift(unrelated, unrelated_base)
    return out
