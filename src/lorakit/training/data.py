"""From checked dataset items to training batches: resize/crop to buckets, cached latents, epochs of batches.

Latents are encoded once (and once more flipped when flip_aug is on) and kept in memory, optionally also on
disk (`cache_latents_to_disk`): one file per (image bytes, bucket, VAE weights), so a changed image or VAE
never reuses a stale latent. Batches are formed within a bucket, as kohya does, so every batch has one shape.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorakit.formats.atomic import atomic_write
from lorakit.formats.safetensors_io import LoraFileError, read_safetensors
from lorakit.training.dataset import ImageItem, load_rgb


def image_tensor(item: ImageItem) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: scaled to cover the bucket, then centre-cropped to it."""
    width, height = item.bucket
    image = load_rgb(item.path)
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


@dataclass
class LatentCache:
    latents: list[torch.Tensor]  # per item, (4, h, w)
    flipped: list[torch.Tensor | None]

    @staticmethod
    @torch.no_grad()
    def build(items: list[ImageItem], vae, batch_size: int = 8, progress=None,
              disk: str | Path | None = None) -> "LatentCache":
        latents: list = [None] * len(items)
        flipped: list = [None] * len(items)
        store = DiskCache(disk, vae) if disk else None
        by_bucket = defaultdict(list)
        for i, item in enumerate(items):
            if store and store.load(item, i, latents, flipped):
                if progress is not None:
                    progress(1)
                continue
            by_bucket[item.bucket].append(i)
        scale = vae.config.scaling_factor
        dtype = next(vae.parameters()).dtype
        for indices in by_bucket.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                pixels = torch.stack([image_tensor(items[i]) for i in chunk]).to(vae.device, dtype)
                for i, z in zip(chunk, vae.encode(pixels).latent_dist.mean * scale):
                    latents[i] = z.float().cpu()
                if any(items[i].subset.flip_aug for i in chunk):
                    for i, z in zip(chunk, vae.encode(pixels.flip(-1)).latent_dist.mean * scale):
                        flipped[i] = z.float().cpu() if items[i].subset.flip_aug else None
                if store:
                    for i in chunk:
                        store.save(items[i], latents[i], flipped[i])
                if progress is not None:
                    progress(len(chunk))
        return LatentCache(latents, flipped)


class DiskCache:
    """Latents as `<folder>/<vae fingerprint>/<image sha256>_<w>x<h>.safetensors` (atomic writes)."""

    def __init__(self, folder: str | Path, vae):
        digest = hashlib.sha256(repr(sorted(vae.config.items())).encode())
        for tensor in vae.state_dict().values():  # the weights themselves: a retrained VAE gets new files
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        self.folder = Path(folder) / digest.hexdigest()[:16]
        self._paths: dict[tuple, Path] = {}

    def path(self, item: ImageItem) -> Path:
        key = (str(item.path), item.bucket)
        if key not in self._paths:  # hashing an image once, though load() and save() both ask
            image = hashlib.sha256(Path(item.path).read_bytes()).hexdigest()[:32]
            self._paths[key] = self.folder / f"{image}_{item.bucket[0]}x{item.bucket[1]}.safetensors"
        return self._paths[key]

    def load(self, item: ImageItem, i: int, latents: list, flipped: list) -> bool:
        path = self.path(item)
        if not path.is_file():
            return False
        try:
            tensors, _ = read_safetensors(path)
        except LoraFileError:
            return False  # damaged: encode again and overwrite
        if item.subset.flip_aug and "flipped" not in tensors:
            return False
        latents[i] = tensors["latent"]
        flipped[i] = tensors.get("flipped") if item.subset.flip_aug else None
        return True

    def save(self, item: ImageItem, latent: torch.Tensor, flipped: torch.Tensor | None) -> None:
        from safetensors.torch import save

        tensors = {"latent": latent.contiguous()}
        if flipped is not None:
            tensors["flipped"] = flipped.contiguous()
        atomic_write(self.path(item), save(tensors))


def epoch_batches(items: list[ImageItem], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Every item num_repeats times, shuffled, grouped into same-bucket batches, batches shuffled."""
    by_bucket = defaultdict(list)
    for i, item in enumerate(items):
        by_bucket[item.bucket].extend([i] * item.subset.num_repeats)
    batches = []
    for indices in by_bucket.values():
        rng.shuffle(indices)
        batches += [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(items: list[ImageItem], batch_size: int) -> int:
    counts = defaultdict(int)
    for item in items:
        counts[item.bucket] += item.subset.num_repeats
    return sum(-(-n // batch_size) for n in counts.values())
