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

from lorakit.training.buckets import bucket_resolutions, checked_bucket_range, nearest_bucket, no_upscale_bucket
from lorakit.training.config import ConfigError, did_you_mean
from lorakit.training.dataset_values import typed_table

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
    # kohya's other caption keys (their meaning: captions.process_caption)
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_every_n_epochs: int | None = None
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False  # color_aug and random_crop: encoded by the VAE at every use, never cached
    random_crop: bool = False
    alpha_mask: bool = False  # the alpha channel weights the loss (masked_loss)
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
    bucket_no_upscale: bool = False
    # kohya's per-dataset validation keys; None: the training config's (training/validation.split_datasets)
    validation_split: float | None = None
    validation_seed: int | None = None


SUBSET_KEYS = {f.name for f in fields(Subset)}
DATASET_KEYS = {f.name for f in fields(DatasetSpec)} - {"subsets"}
PER_FOLDER_KEYS = {"image_dir", "num_repeats", "class_tokens", "is_reg"}  # never from the training config


def subset_defaults(config) -> dict:
    """The training config's value of every subset and dataset key it also has (batch_size is
    train_batch_size). As in kohya, these are what the dataset made from train_data_dir / reg_data_dir
    uses, and the last fallback of a dataset TOML's [[datasets.subsets]] < [[datasets]] < [general]."""
    names = {f.name for f in fields(config)} & ((SUBSET_KEYS | DATASET_KEYS) - PER_FOLDER_KEYS)
    values = {name: getattr(config, name) for name in names}
    values.update(batch_size=config.train_batch_size)
    if config.resolution is None:  # unset: the trainer fills in the model's native size before this
        values.pop("resolution", None)
    else:
        values.update(resolution=as_size(config.resolution))
    return values


def as_size(resolution) -> tuple[int, int]:
    """512 -> (512, 512); [512, 768] / "512,768" -> (512, 768), as kohya reads resolution."""
    if isinstance(resolution, str):
        resolution = [int(v) for v in resolution.split(",") if v.strip()]
    if isinstance(resolution, (list, tuple)):
        return (int(resolution[0]), int(resolution[-1]))
    return (int(resolution), int(resolution))


def from_folder(train_data_dir: str | Path, caption_extension: str = ".txt", resolution=512,
                batch_size: int = 1, defaults: dict | None = None,
                reg_data_dir: str | Path | None = None) -> tuple[list[DatasetSpec], list[str]]:
    """kohya folder convention; returns the spec and warnings for folders that do not follow it. The
    `N_name` subfolders of reg_data_dir join the same dataset as is_reg subsets, as in kohya."""
    values = {**(defaults or {}), "caption_extension": caption_extension}
    notes: list[str] = []
    subsets = _folder_subsets(train_data_dir, "train_data_dir", values, notes)
    if reg_data_dir is not None:
        subsets += _folder_subsets(reg_data_dir, "reg_data_dir", {**values, "is_reg": True}, notes)
    spec_values = {k: v for k, v in values.items() if k in DATASET_KEYS}
    spec_values.update(resolution=as_size(resolution), batch_size=batch_size)
    return [DatasetSpec(subsets, **spec_values)], notes


def _folder_subsets(folder: str | Path, key: str, values: dict, notes: list[str]) -> list[Subset]:
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: {key} is not a folder")
    subsets = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = re.match(r"^(\d+)_(.+)$", sub.name)
        if not m:
            notes.append(f"{sub}: ignored, the name must be `<repeats>_<class tokens>` (e.g. 10_sks dog)")
            continue
        if int(m.group(1)) < 1:  # kohya would build an epoch without these images; say so instead
            raise ConfigError(f"{sub}: {m.group(1)} repeats: the folder would never be used; rename it to "
                              f"`1_{m.group(2)}` or more (the number is how often each image is seen per epoch)")
        subset_values = {k: v for k, v in values.items() if k in SUBSET_KEYS}
        subsets.append(Subset(str(sub), int(m.group(1)), m.group(2), **subset_values))
    if not subsets:
        raise ConfigError(f"{root}: no `<repeats>_<class tokens>` subfolders in {key} (e.g. `{root}/10_sks dog/`)")
    return subsets


def from_toml(path: str | Path, defaults: dict | None = None) -> list[DatasetSpec]:
    """A kohya dataset TOML; every unknown key and bad value in it is reported in one ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read dataset TOML ({e})") from None
    problems: list[str] = []
    known = SUBSET_KEYS | DATASET_KEYS
    for key in data:
        if key not in ("general", "datasets"):
            problems.append(f"{path}: top level: unknown key {key!r}{did_you_mean(key, ['general', 'datasets'])}")
    general = typed_table(data.get("general", {}), f"{path}: [general]", known, problems, did_you_mean)
    specs = []
    for i, ds in enumerate(data.get("datasets", [])):
        where = f"{path}: [[datasets]] #{i + 1}"
        level = typed_table({k: v for k, v in ds.items() if k != "subsets"}, where, known, problems, did_you_mean)
        merged = {**(defaults or {}), **general, **level}
        subsets = []
        for j, sub in enumerate(ds.get("subsets", [])):
            sub_where = f"{where} [[datasets.subsets]] #{j + 1}"
            values = {k: v for k, v in {**merged, **typed_table(sub, sub_where, SUBSET_KEYS, problems,
                                                                 did_you_mean)}.items() if k in SUBSET_KEYS}
            if "image_dir" not in values:
                problems.append(f"{sub_where}: needs image_dir (the subset's image folder)")
                continue
            subsets.append(Subset(**values))
        if not ds.get("subsets"):
            problems.append(f"{where}: has no [[datasets.subsets]]")
        spec_values = {k: v for k, v in merged.items() if k in DATASET_KEYS}
        spec_values["resolution"] = as_size(spec_values.get("resolution", 512))
        spec = DatasetSpec(subsets, **spec_values)
        if spec.enable_bucket:  # checked here too, so the message names the file and the table
            try:
                checked_bucket_range(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso,
                                     spec.bucket_reso_steps, where)
            except ConfigError as e:
                problems.append(str(e))
        specs.append(spec)
    if not data.get("datasets"):
        problems.append(f"{path}: no [[datasets]] table")
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the dataset TOML:\n" +
                          "\n".join(f"  - {p}" for p in problems))
    return specs


@dataclass
class ImageItem:
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    subset: Subset
    bucket: tuple[int, int] | None = None
    repeats: int | None = None  # uses per epoch: the subset's num_repeats, or more/0 for reg images (balance_reg)
    resized: tuple[int, int] | None = None  # size before cropping to the bucket; None: scaled to cover it

    def __post_init__(self):
        if self.repeats is None:
            self.repeats = self.subset.num_repeats


@dataclass
class DatasetReport:
    items: list[ImageItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<path>: <what>; <what was done>"
    notes: list[str] = field(default_factory=list)
    tag_frequency: dict[str, Counter] = field(default_factory=dict)
    missing_captions: int = 0

    @property
    def num_train_images(self) -> int:
        """Images x repeats, as kohya counts them (reg images not included)."""
        return sum(i.repeats for i in self.items if not i.subset.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Reg images x repeats after balance_reg: as many as the train images, or 0."""
        return sum(i.repeats for i in self.items if i.subset.is_reg)


def scan(specs: list[DatasetSpec]) -> DatasetReport:
    report = DatasetReport()
    for spec in specs:
        buckets, start = bucket_set(spec, report.notes), len(report.items)
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
                if not _place(item, spec, buckets, report):
                    continue
                tags.update(t.strip() for t in item.caption.split(",") if t.strip())
                report.items.append(item)
        _balance_reg(report, start)
    return report


def bucket_set(spec: DatasetSpec, notes: list[str]) -> list[tuple[int, int]] | None:
    """The spec's fixed buckets, after kohya's checks and min/max adjustment (noted); None without buckets
    (one size) and with bucket_no_upscale (a bucket per image, see _place)."""
    if not spec.enable_bucket:
        return None
    spec.min_bucket_reso, spec.max_bucket_reso, adjusted = checked_bucket_range(
        spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
    notes += adjusted
    if spec.bucket_no_upscale:
        notes.append("bucket_no_upscale: min_bucket_reso and max_bucket_reso are not used; each image's bucket is "
                     "its size (scaled down to the resolution's area if larger) rounded down to bucket_reso_steps")
        return None
    return make_buckets(spec)


def _place(item: ImageItem, spec: DatasetSpec, buckets, report: DatasetReport) -> bool:
    if not (spec.enable_bucket and spec.bucket_no_upscale):
        item.bucket = nearest_bucket(item.size, buckets) if buckets else spec.resolution
        return True
    item.bucket, item.resized = no_upscale_bucket(item.size, spec.resolution, spec.bucket_reso_steps)
    if min(item.bucket) > 0:
        return True
    report.problems.append(f"{item.path}: {item.size[0]}x{item.size[1]} has a side below bucket_reso_steps "
                           f"{spec.bucket_reso_steps}, so bucket_no_upscale gives it no bucket; skipped")
    return False


def balance_reg(items: list[ImageItem]) -> list[ImageItem]:
    """kohya's DreamBoothDataset rule, "reg images are repeated to match the number of train images": with
    T = Σ train images x repeats, reg images are taken in order, each with its own repeats, until T is
    reached; if one pass falls short, further passes add one repeat per image, in order, until T. Sets the
    reg items' repeats; returns the reg images not needed (more reg than train), which kohya leaves out."""
    target = sum(i.repeats for i in items if not i.subset.is_reg)
    reg = [i for i in items if i.subset.is_reg]
    used, count, first = set(), 0, True
    while reg and count < target:
        for item in reg:
            if first:
                used.add(id(item))
                count += item.repeats
            else:
                item.repeats += 1
                count += 1
            if count >= target:
                break
        first = False
    unused = [i for i in reg if id(i) not in used]
    for item in unused:
        item.repeats = 0
    return unused


def _balance_reg(report: DatasetReport, start: int) -> None:
    items = report.items[start:]
    unused = balance_reg(items)
    reg = [i for i in items if i.subset.is_reg and i.repeats]
    if reg:
        report.notes.append(f"reg images: {len(reg)} image(s) used {sum(i.repeats for i in reg)} times per epoch, "
                            "as many as the train images x repeats; their loss is weighted by prior_loss_weight")
    if unused:
        shown = ", ".join(str(i.path) for i in unused[:3]) + (" ..." if len(unused) > 3 else "")
        report.notes.append(f"reg images: {len(unused)} not used (more reg than train images x repeats), as in "
                            f"kohya: {shown}")
        dropped = {id(i) for i in unused}
        report.items[start:] = [i for i in items if id(i) not in dropped]


def _check_image(path: Path, subset: Subset, spec: DatasetSpec, report: DatasetReport) -> ImageItem | None:
    try:
        size_bytes = path.stat().st_size
    except OSError as e:  # a dangling symlink, a file removed while scanning, no permission
        report.problems.append(f"{path}: cannot be read ({e.strerror}); skipped")
        return None
    if size_bytes == 0:
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
        alpha = "A" in mode or mode == "P"
        report.notes.append(f"{path}: mode {mode}; converted to RGB" + (
            (" (alpha is the loss mask)" if subset.alpha_mask else " (alpha composited on white)") if alpha else ""))
    if exif_rotated:
        report.notes.append(f"{path}: EXIF orientation; rotated upright")
    if min(size) < min(spec.resolution) // 2 and not (spec.enable_bucket and spec.bucket_no_upscale):
        report.notes.append(f"{path}: {size[0]}x{size[1]} is much smaller than the {spec.resolution[0]}px "
                            "resolution; it will be upscaled (blurry)")
    return ImageItem(path, _read_caption(path, subset, report), size, subset)


def _read_caption(path: Path, subset: Subset, report: DatasetReport) -> str:
    cap = path.with_suffix(subset.caption_extension)
    if not cap.is_file():
        report.missing_captions += 1
        report.notes.append(f"{path}: no caption file {cap.name}; the caption is the class tokens "
                            f"{subset.class_tokens or ''!r}")
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
    """kohya's buckets for the spec (see buckets.bucket_resolutions)."""
    return bucket_resolutions(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)


def load_specs(target: str | Path, caption_extension: str = ".txt", resolution=512,
               defaults: dict | None = None, reg_data_dir: str | Path | None = None) -> tuple[list, list]:
    """A folder (kohya convention) or a dataset TOML -> (specs, notes); defaults: subset_defaults(config).
    reg_data_dir joins a folder dataset; a TOML names its reg subsets itself (is_reg), so there it is
    ignored with a note, as kohya ignores it beside a dataset config."""
    target = Path(target)
    if target.is_file() and target.suffix == ".toml":
        notes = [f"reg_data_dir {reg_data_dir}: ignored beside a dataset TOML (as kohya); add it to the TOML as a "
                 "[[datasets.subsets]] with is_reg = true"] if reg_data_dir else []
        return from_toml(target, defaults), notes
    return from_folder(target, caption_extension, resolution, defaults=defaults, reg_data_dir=reg_data_dir)


def format_dataset_report(specs: list[DatasetSpec], report: DatasetReport) -> str:
    reg = f" + {report.num_reg_images} reg" if report.num_reg_images else ""
    lines = [f"images      {len(report.items)} usable, {report.num_train_images}{reg} per epoch with repeats, "
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
