"""Aspect-ratio buckets as kohya sd-scripts makes and picks them (model_util.make_bucket_resolutions and
train_util.BucketManager at 48d368fa).

With enable_bucket every image trains at one of a fixed set of (W, H) sizes of about the resolution's area,
sides multiples of bucket_reso_steps within [min_bucket_reso, max_bucket_reso]: the one of nearest aspect
ratio, which the image is scaled to cover and then cropped to. With bucket_no_upscale there is no fixed set
(min/max are not used): an image larger than the area is scaled down to it, and its bucket is its own size
rounded down to the steps, so a small image is cropped a little but never enlarged.
"""
from __future__ import annotations

import math

from lorakit.training.config import ConfigError

VAE_FACTOR = 8  # pixels per latent cell: bucket sides must be multiples of it


def bucket_resolutions(resolution: tuple[int, int], min_reso: int, max_reso: int,
                       steps: int) -> list[tuple[int, int]]:
    """kohya's fixed bucket set, sorted. With A = W·H and s = steps: the square side floor(√A / s)·s, and
    for w = min, min + s, ... ≤ max the pairs (w, h) and (h, w) with h = min(max, floor(floor(A / w) / s)·s)
    whenever h ≥ min."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (area // width) // steps * steps)
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
        width += steps
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket equal to the image size if there is one, else the first bucket (in sorted order) with the
    least |w_b/h_b - w/h| (kohya's select_bucket, which takes numpy's first argmin)."""
    if tuple(size) in buckets:
        return tuple(size)
    aspect = size[0] / size[1]
    return min(sorted(buckets), key=lambda b: abs(b[0] / b[1] - aspect))


def round_to_steps(x: float, steps: int) -> int:
    """int(x + 0.5) rounded down to a multiple of steps (kohya's BucketManager.round_to_steps)."""
    x = int(x + 0.5)
    return x - x % steps


def no_upscale_bucket(size: tuple[int, int], resolution: tuple[int, int],
                      steps: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized size) with bucket_no_upscale (kohya's select_bucket with no_upscale).

    An image of w·h ≤ A = W·H keeps its size; a larger one is scaled to area A at its aspect r = w/h, one side
    rounded to the steps and the other following r (whichever rounding keeps r closer). The bucket is the
    resized size rounded down to the steps: 200x150 at resolution 512, steps 64 trains at 192x128, cropped
    from the unscaled image."""
    width, height = size
    area, aspect = resolution[0] * resolution[1], size[0] / size[1]
    if width * height > area:
        scaled_w = math.sqrt(area * aspect)
        scaled_h = area / scaled_w
        by_w = round_to_steps(scaled_w, steps)
        h_of_w = round_to_steps(by_w / aspect, steps)
        by_h = round_to_steps(scaled_h, steps)
        w_of_h = round_to_steps(by_h * aspect, steps)
        error_w = abs(by_w / h_of_w - aspect) if h_of_w else math.inf
        error_h = abs(w_of_h / by_h - aspect) if by_h else math.inf
        if error_w < error_h:
            resized = (by_w, int(by_w / aspect + 0.5))
        else:
            resized = (int(by_h * aspect + 0.5), by_h)
    else:
        resized = (width, height)
    return (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized


def checked_bucket_range(resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int,
                         where: str = "") -> tuple[int, int, list[str]]:
    """(min, max, notes) as kohya adjusts them: min rounded down and max rounded up to multiples of the steps
    (with a note each); refused when the steps are not a multiple of the VAE's 8, min > max, or the
    resolution lies outside [min, max]."""
    prefix = f"{where}: " if where else ""
    if steps % VAE_FACTOR:
        raise ConfigError(f"{prefix}bucket_reso_steps = {steps} must be a multiple of {VAE_FACTOR}: bucket sides "
                          f"become latent sizes through the VAE's {VAE_FACTOR}x downsampling; use 64 (kohya's "
                          "default) or 32")
    if min_reso > max_reso:
        raise ConfigError(f"{prefix}min_bucket_reso = {min_reso} is above max_bucket_reso = {max_reso}; swap them")
    notes = []
    if min_reso % steps:
        notes.append(f"{prefix}min_bucket_reso {min_reso} -> {min_reso - min_reso % steps}, a multiple of "
                     f"bucket_reso_steps {steps} (as kohya)")
        min_reso -= min_reso % steps
    if max_reso % steps:
        notes.append(f"{prefix}max_bucket_reso {max_reso} -> {max_reso + steps - max_reso % steps}, a multiple "
                     f"of bucket_reso_steps {steps} (as kohya)")
        max_reso += steps - max_reso % steps
    if min(resolution) < min_reso:
        raise ConfigError(f"{prefix}min_bucket_reso = {min_reso} is above the resolution's shorter side "
                          f"{min(resolution)}; lower min_bucket_reso or raise resolution")
    if max(resolution) > max_reso:
        raise ConfigError(f"{prefix}max_bucket_reso = {max_reso} is below the resolution's longer side "
                          f"{max(resolution)}; raise max_bucket_reso or lower resolution")
    return min_reso, max_reso, notes
