"""Typed values for kohya dataset TOMLs ([general], [[datasets]], [[datasets.subsets]]).

A dataset key that the training config also has (keep_tokens, resolution, min_bucket_reso, ...) is checked
by that key's own schema field, so the two never disagree on a type or a range; `batch_size` is checked as
train_batch_size. The few keys that exist only here are declared below with the same `opt` metadata.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields

from lorakit.options import opt
from lorakit.training.config import KEYS, ConfigError, coerce, coerce_field


@dataclass
class DatasetOnlyKeys:
    image_dir: str = opt(None, "the subset's image folder")
    num_repeats: int = opt(1, "how often each image is used per epoch (kohya's N in `N_name`)", lo=1, hi=100_000)
    class_tokens: str | None = opt(None, "the caption of images without a caption file")
    is_reg: bool = opt(False, "regularization images (their loss is weighted by prior_loss_weight)")


_ONLY = {f.name: f for f in fields(DatasetOnlyKeys)}
_ONLY_HINTS = typing.get_type_hints(DatasetOnlyKeys)
ALIASES = {"batch_size": "train_batch_size"}  # dataset TOML name -> training config key


def dataset_value(key: str, value, label: str):
    """The value typed and range-checked, or ConfigError naming `label` (file, table and key)."""
    if key in _ONLY:
        return coerce_field(_ONLY[key], _ONLY_HINTS[key], value, label)
    name = ALIASES.get(key, key)
    if name in KEYS:
        return coerce(name, value, label=label)
    raise ConfigError(f"{label}: not a dataset key")


def typed_table(table: dict, where: str, known: set[str], problems: list[str], did_you_mean) -> dict:
    """A TOML table's known keys typed; unknown keys and bad values appended to problems (not raised)."""
    out = {}
    for key, value in table.items():
        if key not in known:
            problems.append(f"{where}: unknown key {key!r}{did_you_mean(key, known)}")
            continue
        try:
            out[key] = dataset_value(key, value, f"{where}: {key}")
        except ConfigError as e:
            problems.append(str(e))
    return out
