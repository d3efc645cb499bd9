"""From checked dataset items to training batches: resize/crop to buckets, cached latents, epochs of batches.

Latents are encoded once (and once more flipped when flip_aug is on) and kept in memory, optionally also on
disk (`cache_latents_to_disk`): one file per (image bytes, bucket, VAE weights), so a changed image or VAE
never reuses a stale latent. Images with color_aug or random_crop are the exception: they change at every
use, so they are encoded per micro-batch (LatentCache.batch). alpha_mask images carry a latent-size loss
mask beside their latents. Batches are formed within a bucket, as kohya does, so every batch has one shape.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lorakit.formats.atomic import atomic_write
from lorakit.formats.safetensors_io import LoraFileError, read_safetensors
from lorakit.training.augment import color_aug, crop_offset, latent_mask
from lorakit.training.dataset import ImageItem, load_rgb


def is_live(item: ImageItem) -> bool:
    """color_aug and random_crop change an image's pixels at every use, so its latent cannot be cached: it is
    encoded for each micro-batch instead (kohya turns latent caching off for them)."""
    return item.subset.color_aug or item.subset.random_crop


def live_note(items: list[ImageItem]) -> str | None:
    """The one line that tells the user which images are not cached, and why."""
    live = [i for i in items if is_live(i)]
    if not live:
        return None
    folders = ", ".join(sorted({str(i.subset.image_dir) for i in live}))
    return (f"latent caching is off for {len(live)} image(s) with color_aug or random_crop ({folders}): each use "
            "draws a new crop/colour, so the VAE encodes them at every step (as kohya, which refuses to cache "
            "them); this costs one VAE forward per image per step")


def _load(item: ImageItem) -> tuple[Image.Image, Image.Image | None]:
    """The upright RGB image and, for alpha_mask subsets, its alpha channel (all 255 when it has none). With
    alpha_mask the stored RGB is kept under transparent pixels, as kohya (no compositing on white): the mask
    gives them no weight."""
    if not item.subset.alpha_mask:
        return load_rgb(item.path), None
    with Image.open(item.path) as im:
        im = ImageOps.exif_transpose(im)
        if "A" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")
            return rgba.convert("RGB"), rgba.getchannel("A")
    rgb = load_rgb(item.path)
    return rgb, Image.new("L", rgb.size, 255)


def item_pixels(item: ImageItem, rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((3, H, W) in [-1, 1], (1, H, W) alpha in [0, 1] or None) at the item's bucket (W, H): resized to
    item.resized (bucket_no_upscale) or to cover the bucket, then cropped to it at the centre, or, given an
    rng and random_crop, at random offsets (x, then y, as kohya); given an rng and color_aug, recoloured."""
    width, height = item.bucket
    image, alpha = _load(item)
    size = item.resized
    if size is None:
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    alpha = alpha.resize(size, Image.LANCZOS) if alpha is not None else None  # separately: no premultiplying
    crop_rng = rng if item.subset.random_crop else None
    left = crop_offset(image.width - width, crop_rng)
    top = crop_offset(image.height - height, crop_rng)
    box = (left, top, left + width, top + height)
    pixels = torch.from_numpy(np.asarray(image.crop(box), dtype=np.float32).transpose(2, 0, 1).copy())
    if rng is not None and item.subset.color_aug:
        pixels = color_aug(pixels, rng)
    if alpha is not None:
        alpha = torch.from_numpy(np.asarray(alpha.crop(box), dtype=np.float32) / 255.0)[None]
    return pixels / 127.5 - 1.0, alpha


def image_tensor(item: ImageItem) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: scaled to cover the bucket, then centre-cropped to it."""
    return item_pixels(item)[0]


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) float32 latents on the CPU: the posterior mean, times the VAE's scaling factor."""
    dtype = next(vae.parameters()).dtype
    return (vae.encode(pixels.to(vae.device, dtype)).latent_dist.mean * vae.config.scaling_factor).float().cpu()


@dataclass
class LatentCache:
    latents: list[torch.Tensor | None]  # per item, (4, h, w); None: encoded at each use (is_live)
    flipped: list[torch.Tensor | None]
    masks: list[torch.Tensor | None] = field(default_factory=list)  # (1, h, w) loss masks (alpha_mask)
    items: list[ImageItem] = field(default_factory=list)
    vae: object = None

    @staticmethod
    @torch.no_grad()
    def build(items: list[ImageItem], vae, batch_size: int = 8, progress=None,
              disk: str | Path | None = None) -> "LatentCache":
        latents: list = [None] * len(items)
        flipped: list = [None] * len(items)
        masks: list = [None] * len(items)
        store = DiskCache(disk, vae) if disk else None
        by_bucket = defaultdict(list)
        for i, item in enumerate(items):
            if is_live(item) or store and store.load(item, i, latents, flipped, masks):
                if progress is not None:
                    progress(1)
                continue
            by_bucket[item.bucket].append(i)
        for indices in by_bucket.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                pixels, alphas = zip(*(item_pixels(items[i]) for i in chunk))
                pixels = torch.stack(pixels)
                for i, z, alpha in zip(chunk, encode(vae, pixels), alphas):
                    latents[i] = z
                    masks[i] = latent_mask(alpha, z.shape[-2:]) if alpha is not None else None
                if any(items[i].subset.flip_aug for i in chunk):
                    for i, z in zip(chunk, encode(vae, pixels.flip(-1))):
                        flipped[i] = z if items[i].subset.flip_aug else None
                if store:
                    for i in chunk:
                        store.save(items[i], latents[i], flipped[i], masks[i])
                if progress is not None:
                    progress(len(chunk))
        return LatentCache(latents, flipped, masks, list(items), vae)

    @torch.no_grad()
    def batch(self, indices: list[int], rng: random.Random,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents (B, 4, h, w), loss masks (B, 1, h, w) or None) of one same-bucket micro-batch, on device.

        First one flip draw per image that can flip, in batch order; then the live images (is_live) are
        cropped, recoloured and encoded now, drawing from rng in batch order. Masks: the alpha_mask images'
        masks (flipped with their image), ones for the others; None when no image has one, as kohya."""
        items = self.items
        flips = [(items[j].subset.flip_aug if self.latents[j] is None else self.flipped[j] is not None)
                 and rng.random() < 0.5 for j in indices]
        fresh = {}
        live = [(j, f) for j, f in zip(indices, flips) if self.latents[j] is None]
        if live:
            drawn = [item_pixels(items[j], rng) for j, _ in live]
            pixels = torch.stack([p.flip(-1) if f else p for (_, f), (p, _) in zip(live, drawn)])
            for (j, f), (_, alpha), z in zip(live, drawn, encode(self.vae, pixels)):
                mask = latent_mask(alpha, z.shape[-2:]) if alpha is not None else None
                fresh[j] = z, mask.flip(-1) if f and mask is not None else mask
        latents, masks = [], []
        for j, f in zip(indices, flips):
            if j in fresh:
                z, mask = fresh[j]
            else:
                z = self.flipped[j] if f else self.latents[j]
                mask = self.masks[j] if self.masks else None
                mask = mask.flip(-1) if f and mask is not None else mask
            latents.append(z)
            masks.append(mask)
        stacked = torch.stack(latents).to(device)
        if all(m is None for m in masks):
            return stacked, None
        ones = torch.ones((1, *stacked.shape[-2:]))
        return stacked, torch.stack([ones if m is None else m for m in masks]).to(device)


def loss_weights(items: list[ImageItem], indices: list[int], prior_loss_weight: float) -> torch.Tensor | None:
    """(B,) per-sample loss weights: prior_loss_weight for reg images, 1 for the others (kohya's
    loss_weights); None when every weight is 1, so batches without reg images compute exactly as before."""
    weights = [prior_loss_weight if items[j].subset.is_reg else 1.0 for j in indices]
    return None if all(w == 1.0 for w in weights) else torch.tensor(weights)


class DiskCache:
    """Latents as `<folder>/<vae fingerprint>/<image sha256>_<w>x<h>[_r<w>x<h>][_alpha].safetensors` (atomic
    writes): bucket_no_upscale's own resize and alpha_mask's uncomposited RGB give other pixels, so other
    files; an alpha_mask file also holds the latent-size mask."""

    def __init__(self, folder: str | Path, vae):
        digest = hashlib.sha256(repr(sorted(vae.config.items())).encode())
        for tensor in vae.state_dict().values():  # the weights themselves: a retrained VAE gets new files
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        self.folder = Path(folder) / digest.hexdigest()[:16]
        self._paths: dict[tuple, Path] = {}

    def path(self, item: ImageItem) -> Path:
        key = (str(item.path), item.bucket, item.resized, item.subset.alpha_mask)
        if key not in self._paths:  # hashing an image once, though load() and save() both ask
            image = hashlib.sha256(Path(item.path).read_bytes()).hexdigest()[:32]
            resized = f"_r{item.resized[0]}x{item.resized[1]}" if item.resized else ""
            alpha = "_alpha" if item.subset.alpha_mask else ""
            self._paths[key] = self.folder / f"{image}_{item.bucket[0]}x{item.bucket[1]}{resized}{alpha}.safetensors"
        return self._paths[key]

    def load(self, item: ImageItem, i: int, latents: list, flipped: list, masks: list) -> bool:
        path = self.path(item)
        if not path.is_file():
            return False
        try:
            tensors, _ = read_safetensors(path)
        except LoraFileError:
            return False  # damaged: encode again and overwrite
        if item.subset.flip_aug and "flipped" not in tensors or item.subset.alpha_mask and "mask" not in tensors:
            return False
        latents[i] = tensors["latent"]
        flipped[i] = tensors.get("flipped") if item.subset.flip_aug else None
        masks[i] = tensors.get("mask") if item.subset.alpha_mask else None
        return True

    def save(self, item: ImageItem, latent: torch.Tensor, flipped: torch.Tensor | None,
             mask: torch.Tensor | None = None) -> None:
        from safetensors.torch import save

        tensors = {"latent": latent.contiguous()}
        if flipped is not None:
            tensors["flipped"] = flipped.contiguous()
        if mask is not None:
            tensors["mask"] = mask.contiguous()
        atomic_write(self.path(item), save(tensors))


def epoch_batches(items: list[ImageItem], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Every item `repeats` times (its subset's num_repeats; reg images balanced to the train count),
    shuffled, grouped into same-bucket batches, batches shuffled."""
    by_bucket = defaultdict(list)
    for i, item in enumerate(items):
        by_bucket[item.bucket].extend([i] * item.repeats)
    batches = []
    for indices in by_bucket.values():
        rng.shuffle(indices)
        batches += [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(items: list[ImageItem], batch_size: int) -> int:
    counts = defaultdict(int)
    for item in items:
        counts[item.bucket] += item.repeats
    return sum(-(-n // batch_size) for n in counts.values())
