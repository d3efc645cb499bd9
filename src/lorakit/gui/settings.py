"""Form values <-> the training TOML that `lorakit train` reads, through the one schema.

    raw = form_to_config_values(values, conv_layers=...)   # typed, range-checked; hidden fields dropped
    path = save_settings(values, "run.toml", conv_layers=...)
    load_config(path) == config_from_form(values, conv_layers=...)   # what the CLI runs = what the form says

Values the form hides (conv settings where no conv layer is adapted) are never written, so a saved file
holds only values that training uses. The sample prompts live in a text file beside the TOML, which is what
the schema's `sample_prompts` names.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lorakit.formats.atomic import atomic_write
from lorakit.gui.fields import CONV_FIELDS, PATH_FIELDS, conv_fields_apply, field_spec, form_fields
from lorakit.gui.paths import Roots
from lorakit.training.config import TrainConfig, build_config, coerce, read_config_values

WHERE = "GUI settings"


def conv_applies(values: dict, conv_layers: int) -> bool:
    return conv_fields_apply(str(values.get("algo") or "lora"), conv_layers,
                             trains_unet=not values.get("network_train_text_encoder_only"))


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def form_to_config_values(values: dict, conv_layers: int, prompts_file: str | Path | None = None) -> dict:
    """The form's values as typed TrainConfig values (ConfigError names a bad field); empty and hidden
    fields are left out, so the schema defaults apply as they do for the CLI."""
    keep_conv = conv_applies(values, conv_layers)
    raw: dict[str, object] = {}
    for spec in form_fields():
        value = values.get(spec.name)
        if spec.kind == "prompts":
            if prompts_file is not None and not _is_empty(value):
                raw[spec.name] = str(prompts_file)
            continue
        if _is_empty(value) or (spec.name in CONV_FIELDS and not keep_conv):
            continue
        raw[spec.name] = coerce(spec.name, value, WHERE, from_string=isinstance(value, str))
    return raw


def config_from_form(values: dict, conv_layers: int, prompts_file: str | Path | None = None) -> TrainConfig:
    return build_config(form_to_config_values(values, conv_layers, prompts_file), WHERE)


def check_paths(raw: dict, roots: Roots) -> dict:
    """Every path setting resolved and inside the roots (an empty base model means the embedded one);
    absolute, so the TOML means the same from any working folder."""
    resolved = dict(raw)
    for name in PATH_FIELDS:
        if raw.get(name):
            resolved[name] = str(roots.check(raw[name], field_spec(name).label))
    return resolved


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's int/float reprs are valid TOML (1e-05, 0.5, 16)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are a subset of TOML's basic-string escapes


def to_toml(raw: dict, comment: str = "") -> str:
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{key} = {toml_value(value)}" for key, value in raw.items()]
    return "\n".join(lines) + "\n"


def prompts_path_for(toml_path: str | Path) -> Path:
    path = Path(toml_path)
    return path.with_name(f"{path.stem}-prompts.txt")


def save_settings(values: dict, toml_path: str | Path, conv_layers: int, roots: Roots | None = None,
                  preset: str | None = None) -> Path:
    """Validate the form, then write the TOML (and the prompt file beside it). Nothing is written when a
    value is invalid."""
    toml_path = roots.check(toml_path, "settings file") if roots else Path(toml_path)
    if toml_path.suffix != ".toml":
        raise ValueError(f"{toml_path}: settings files end in .toml")
    prompts = values.get("sample_prompts")
    prompts_file = prompts_path_for(toml_path) if not _is_empty(prompts) else None
    raw = form_to_config_values(values, conv_layers, prompts_file)
    if roots:
        raw = check_paths(raw, roots)
    build_config(raw, WHERE)  # every cross-field check before anything is written
    if prompts_file is not None:
        atomic_write(prompts_file, str(prompts).strip() + "\n")
    note = f"preset {preset!r} filled the network values below\n" if preset and preset != "custom" else ""
    atomic_write(toml_path, to_toml(raw, f"lorakit training settings, written by `lorakit gui`\n{note}"
                                         f"run with: lorakit train {toml_path.name}"))
    return toml_path


def config_to_form(config: TrainConfig) -> dict:
    """A validated config as form values (lists as comma text, the prompt file's lines as text)."""
    values = {}
    for spec in form_fields():
        value = getattr(config, spec.name)
        if spec.kind == "list" and value is not None:
            value = ", ".join(str(v) for v in value)
        elif spec.kind == "prompts":
            value = _read_prompts(value)
        values[spec.name] = value
    if values["algo"] == "lora" and (config.conv_dim or config.conv_block_dims):
        values["algo"] = "locon"  # the GUI's "LoRA" is attention-only; this file trains conv layers too
    return values


def _read_prompts(path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


def load_settings(toml_path: str | Path, roots: Roots | None = None) -> dict:
    """A training TOML (ours or hand-written, kohya tables included) -> form values; ConfigError if invalid."""
    path = roots.existing(toml_path, "settings file") if roots else Path(toml_path)
    return config_to_form(build_config(read_config_values(path), str(path)))
