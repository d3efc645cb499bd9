"""Datasets in kohya's conventions, checked before any training starts.

Two ways in, as in sd-scripts: a folder of `N_class tokens` subfolders (N repeats, class tokens as the
fallback caption), or a dataset TOML with [general], [[datasets]] and [[datasets.subsets]] (lower levels
override higher ones). `scan` opens every image and caption once and reports each problem with its path and
what was done (skipped or converted), so nothing fails hours into a run.
"""
from __future__ import annotations

import re
import tomllib
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lorakit.training.config import ConfigError, did_you_mean

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 8192 * 8192  # larger images are refused as possible decompression bombs


@dataclass
class Subset:
    image_dir: str
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    is_reg: bool = False


@dataclass
class DatasetSpec:
    subsets: list[Subset]
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64


SUBSET_KEYS = {f.name for f in fields(Subset)}
DATASET_KEYS = {f.name for f in fields(DatasetSpec)} - {"subsets"}


def as_size(resolution) -> tuple[int, int]:
    """512 -> (512, 512); [512, 768] / "512,768" -> (512, 768), as kohya reads resolution."""
    if isinstance(resolution, str):
        resolution = [int(v) for v in resolution.split(",") if v.strip()]
    if isinstance(resolution, (list, tuple)):
        return (int(resolution[0]), int(resolution[-1]))
    return (int(resolution), int(resolution))


def from_folder(train_data_dir: str | Path, caption_extension: str = ".txt", resolution=512,
                batch_size: int = 1) -> tuple[list[DatasetSpec], list[str]]:
    """kohya folder convention; returns the spec and warnings for folders that do not follow it."""
    root = Path(train_data_dir)
    if not root.is_dir():
        raise ConfigError(f"{root}: train_data_dir is not a folder")
    subsets, notes = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = re.match(r"^(\d+)_(.+)$", sub.name)
        if not m:
            notes.append(f"{sub}: ignored, the name must be `<repeats>_<class tokens>` (e.g. 10_sks dog)")
            continue
        subsets.append(Subset(str(sub), int(m.group(1)), m.group(2), caption_extension))
    if not subsets:
        raise ConfigError(f"{root}: no `<repeats>_<class tokens>` subfolders (e.g. `{root}/10_sks dog/`)")
    return [DatasetSpec(subsets, as_size(resolution), batch_size)], notes


def from_toml(path: str | Path) -> list[DatasetSpec]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read dataset TOML ({e})") from None
    _check_keys(path, "top level", data, {"general", "datasets"})
    general = data.get("general", {})
    _check_keys(path, "[general]", general, SUBSET_KEYS | DATASET_KEYS)
    specs = []
    for i, ds in enumerate(data.get("datasets", [])):
        _check_keys(path, f"[[datasets]] #{i + 1}", ds, SUBSET_KEYS | DATASET_KEYS | {"subsets"})
        merged = {**general, **{k: v for k, v in ds.items() if k != "subsets"}}
        subsets = []
        for j, sub in enumerate(ds.get("subsets", [])):
            _check_keys(path, f"[[datasets.subsets]] #{j + 1}", sub, SUBSET_KEYS)
            values = {k: v for k, v in {**merged, **sub}.items() if k in SUBSET_KEYS}
            if "image_dir" not in values:
                raise ConfigError(f"{path}: [[datasets.subsets]] #{j + 1} needs image_dir")
            subsets.append(Subset(**values))
        if not subsets:
            raise ConfigError(f"{path}: [[datasets]] #{i + 1} has no [[datasets.subsets]]")
        spec_values = {k: v for k, v in merged.items() if k in DATASET_KEYS}
        spec_values["resolution"] = as_size(spec_values.get("resolution", 512))
        specs.append(DatasetSpec(subsets, **spec_values))
    if not specs:
        raise ConfigError(f"{path}: no [[datasets]]")
    return specs


def _check_keys(path, where: str, table: dict, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}: {where}: unknown key {key!r}{did_you_mean(key, known)}")


@dataclass
class ImageItem:
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    subset: Subset
    bucket: tuple[int, int] | None = None


@dataclass
class DatasetReport:
    items: list[ImageItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<path>: <what>; <what was done>"
    notes: list[str] = field(default_factory=list)
    tag_frequency: dict[str, Counter] = field(default_factory=dict)
    missing_captions: int = 0

    @property
    def num_train_images(self) -> int:
        """Images x repeats, as kohya counts an epoch."""
        return sum(i.subset.num_repeats for i in self.items if not i.subset.is_reg)


def scan(specs: list[DatasetSpec]) -> DatasetReport:
    report = DatasetReport()
    for spec in specs:
        buckets = make_buckets(spec) if spec.enable_bucket else None
        for subset in spec.subsets:
            folder = Path(subset.image_dir)
            if not folder.is_dir():
                report.problems.append(f"{folder}: image_dir does not exist; subset skipped")
                continue
            tags = report.tag_frequency.setdefault(folder.name, Counter())
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    if path.suffix != subset.caption_extension and path.is_file():
                        report.notes.append(f"{path}: not an image extension; ignored")
                    continue
                item = _check_image(path, subset, spec, report)
                if item is None:
                    continue
                item.bucket = nearest_bucket(item.size, buckets) if buckets else spec.resolution
                tags.update(t.strip() for t in item.caption.split(",") if t.strip())
                report.items.append(item)
    return report


def _check_image(path: Path, subset: Subset, spec: DatasetSpec, report: DatasetReport) -> ImageItem | None:
    if path.stat().st_size == 0:
        report.problems.append(f"{path}: empty (0-byte) file; skipped")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height}")
                im.load()  # decodes every byte: truncated files fail here, not hours later
                mode, exif_rotated = im.mode, im.getexif().get(0x0112, 1) not in (1, None)
                size = ImageOps.exif_transpose(im).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        report.problems.append(f"{path}: {e.args[0] if e.args else 'too many pixels'} exceeds {MAX_PIXELS:,} "
                               "pixels (decompression-bomb guard); skipped")
        return None
    except UnidentifiedImageError:
        report.problems.append(f"{path}: not an image (unreadable by PIL); skipped")
        return None
    except (OSError, SyntaxError, ValueError) as e:
        report.problems.append(f"{path}: corrupt or truncated image ({e}); skipped")
        return None
    if mode not in ("RGB", "L"):
        report.notes.append(f"{path}: mode {mode}; converted to RGB" + (" (alpha composited on white)"
                                                                        if "A" in mode or mode == "P" else ""))
    if exif_rotated:
        report.notes.append(f"{path}: EXIF orientation; rotated upright")
    if min(size) < min(spec.resolution) // 2:
        report.notes.append(f"{path}: {size[0]}x{size[1]} is much smaller than the {spec.resolution[0]}px "
                            "resolution; it will be upscaled (blurry)")
    return ImageItem(path, _read_caption(path, subset, report), size, subset)


def _read_caption(path: Path, subset: Subset, report: DatasetReport) -> str:
    cap = path.with_suffix(subset.caption_extension)
    if not cap.is_file():
        report.missing_captions += 1
        return subset.class_tokens or ""
    raw = cap.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        report.problems.append(f"{cap}: caption is not UTF-8; read as Windows-1252 (re-save it as UTF-8)")
    return text.strip().splitlines()[0].strip() if text.strip() else (subset.class_tokens or "")


def load_rgb(path: str | Path) -> Image.Image:
    """An image upright (EXIF) and in RGB; transparency is composited on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        if im.mode.startswith("I;16") or im.mode == "I":
            return im.point(lambda v: v / 256).convert("L").convert("RGB")
        return im.convert("RGB")


def make_buckets(spec: DatasetSpec) -> list[tuple[int, int]]:
    """kohya-style buckets: sides in steps of bucket_reso_steps within [min, max], area <= resolution²."""
    area = spec.resolution[0] * spec.resolution[1]
    step = spec.bucket_reso_steps
    buckets = set()
    width = spec.min_bucket_reso
    while width <= spec.max_bucket_reso:
        height = min(spec.max_bucket_reso, (area // width) // step * step)
        if height >= spec.min_bucket_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - aspect), -b[0] * b[1]))


def load_specs(target: str | Path, caption_extension: str = ".txt", resolution=512) -> tuple[list, list]:
    """A folder (kohya convention) or a dataset TOML -> (specs, notes)."""
    target = Path(target)
    if target.is_file() and target.suffix == ".toml":
        return from_toml(target), []
    return from_folder(target, caption_extension, resolution)


def format_dataset_report(specs: list[DatasetSpec], report: DatasetReport) -> str:
    lines = [f"images      {len(report.items)} usable, {report.num_train_images} per epoch with repeats, "
             f"{len(report.problems)} problem(s), {report.missing_captions} without caption (class tokens used)"]
    for spec in specs:
        for s in spec.subsets:
            count = sum(1 for i in report.items if i.subset is s)
            lines.append(f"subset      {s.image_dir}: {count} images x {s.num_repeats} repeats"
                         + (f", class tokens {s.class_tokens!r}" if s.class_tokens else "") + (" (reg)" if s.is_reg else ""))
    buckets = Counter(i.bucket for i in report.items)
    lines.append("buckets     " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items())))
    for folder, tags in report.tag_frequency.items():
        top = ", ".join(f"{t} ({n})" for t, n in tags.most_common(10))
        lines.append(f"tags        {folder}: {top}")
    lines += [f"PROBLEM     {p}" for p in report.problems] + [f"note        {n}" for n in report.notes]
    return "\n".join(lines)
