"""Reading a training config: TOML file + `--key value` flags -> a validated TrainConfig, every problem at once.

    config = load_config("train.toml", {"network_dim": "16"})
    config.notes   # settings accepted without effect, each with why

The schema is lorakit.training.schema (TrainConfig, with NetworkConfig nested). Keys are sd-scripts' names;
kohya's own keys that lorakit does not implement are looked up in the key table (lorakit/data/kohya_keys.toml):
accepted with a note when they do not change what is trained, refused with the reason otherwise. Keys that
neither knows are errors with a "did you mean". `network_args = ["conv_dim=8", ...]` strings are typed here.
"""
from __future__ import annotations

import difflib
import math
import tomllib
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from lorakit.options import base_type, list_item_type
from lorakit.surgery.config import NetworkConfig
from lorakit.training.kohya_table import KOHYA_KEYS
from lorakit.training.schema import INTERNAL_NETWORK_FIELDS, NETWORK_KEY_OF_FIELD, PRESETS, TrainConfig

__all__ = ["ConfigError", "TrainConfig", "PRESETS", "FIELDS", "HINTS", "load_config", "build_config", "coerce",
           "parse_overrides", "read_config_values", "did_you_mean", "base_type", "default_of", "keys_help"]


class ConfigError(ValueError):
    """A configuration problem, naming the field (and file) and the fix."""


# ---- the key registry: TOML key -> (owner, field name) ---------------------------------------------------------


def _registry() -> dict[str, tuple[str, str]]:
    keys = {f.name: ("train", f.name) for f in fields(TrainConfig) if f.name != "network"}
    for f in fields(NetworkConfig):
        if f.name not in INTERNAL_NETWORK_FIELDS:
            keys[NETWORK_KEY_OF_FIELD.get(f.name, f.name)] = ("network", f.name)
    return keys


KEYS = _registry()
_TRAIN_HINTS = typing.get_type_hints(TrainConfig)
_NETWORK_HINTS = typing.get_type_hints(NetworkConfig)
_FIELDS_BY_OWNER = {"train": {f.name: f for f in fields(TrainConfig)}, "network": {f.name: f for f in fields(NetworkConfig)}}
FIELDS = {key: _FIELDS_BY_OWNER[owner][name] for key, (owner, name) in KEYS.items()}
HINTS = {key: (_TRAIN_HINTS if owner == "train" else _NETWORK_HINTS)[name] for key, (owner, name) in KEYS.items()}

# network_args: the key inside the list -> the TOML key it sets
NETWORK_ARG_KEYS = {(_FIELDS_BY_OWNER["network"][name].metadata.get("arg") or name): key
                    for key, (owner, name) in KEYS.items() if owner == "network"}
NETWORK_ARG_KEYS["use_cp"] = "use_tucker"  # LyCORIS's older name
NETWORK_ARG_KEYS["weight_decompose"] = "dora_wd"  # LyCORIS's older name for DoRA
NETWORK_ARGS_WITHOUT_EFFECT = {  # LyCORIS/kohya network_args accepted with a note
    "bypass_mode": "lorakit picks the cheaper exact path (bypass or merged) per layer by itself",
}
NETWORK_ARGS_REFUSED = {  # LyCORIS/kohya network_args lorakit cannot honour yet, with what to do instead
    "constrain": "is an OFT/BOFT option; lorakit trains LoRA/LoCon/LoHa/LoKr",
    "rescaled": "is an OFT/BOFT option; lorakit trains LoRA/LoCon/LoHa/LoKr",
}


def load_config(path: str | Path | None = None, overrides: dict[str, object] | None = None,
                source: str = "") -> TrainConfig:
    """TOML file (flat, or in tables as kohya writes them) + overrides -> validated TrainConfig."""
    where = source or (str(path) if path else "<overrides>")
    raw = read_config_values(path) if path is not None else {}
    raw.update(overrides or {})
    return build_config(raw, where)


def read_config_values(path: str | Path) -> dict[str, object]:
    """The raw key/values of a training TOML (kohya's tables flattened), not yet validated."""
    try:
        return _flatten(tomllib.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read TOML ({e})") from None


def _flatten(data: dict) -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in KEYS:  # kohya groups keys in tables; names stay unique
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


def build_config(raw: dict[str, object], where: str = "<config>") -> TrainConfig:
    """Validate everything, then build. All problems are reported in one ConfigError."""
    problems: list[str] = []
    notes: list[str] = []
    values = _preset_values(raw.get("preset"), problems)
    for key, value in raw.items():
        _take_key(key, value, values, problems, notes)
    for key, value in _network_arg_values(values.get("network_args") or [], problems, notes).items():
        values[key] = value
    config = _assemble(values, problems, notes)
    if problems:
        head = f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the config"
        raise ConfigError(head + ":\n" + "\n".join(f"  - {p}" for p in problems))
    config.notes = notes
    return config


def _preset_values(preset, problems: list[str]) -> dict:
    if preset is None:
        return {}
    if preset not in PRESETS:
        problems.append(f"preset = {preset!r} is unknown; choose one of {sorted(PRESETS)}")
        return {}
    return {k: v for k, v in PRESETS[preset].items() if k != "why"}


def _take_key(key: str, value, values: dict, problems: list[str], notes: list[str]) -> None:
    """One raw key: a schema key is typed and range-checked; a kohya key follows its table status."""
    entry = KOHYA_KEYS.get(key)
    if entry is not None and entry.values_ok and str(value).lower() not in [str(v).lower() for v in entry.values_ok]:
        problems.append(f"{key} = {value!r}: {entry.values_refused_note}")
        return
    if key in KEYS:
        try:
            values[key] = coerce(key, value)
        except ConfigError as e:
            problems.append(str(e))
        return
    if entry is None:
        problems.append(f"unknown key {key!r}{did_you_mean(key, [*KEYS, *KOHYA_KEYS])}")
    elif entry.status == "no_effect":
        notes.append(f"{key}: accepted, no effect: {entry.note}")
    elif entry.status == "refused" and _is_kohya_default(entry, value):
        notes.append(f"{key} = {value!r}: accepted, no effect: it is kohya's default (off)")
    elif entry.status == "refused":
        problems.append(f"{key} is not supported: {entry.note}")
    else:  # the table says implemented but the schema has no such key: a lorakit bug, said plainly
        problems.append(f"{key}: listed as implemented in lorakit's kohya key table but missing from its schema "
                        "(please report this)")


def _is_kohya_default(entry, value) -> bool:
    """A refused key left at sd-scripts' default (a false flag, an empty value) asks for nothing."""
    if value in (None, "", [], False) or (entry.type == "bool-flag" and str(value).lower() == "false"):
        return True
    return entry.default is not None and str(value) == str(entry.default)


def _network_arg_values(args: list[str], problems: list[str], notes: list[str]) -> dict[str, object]:
    out = {}
    # LyCORIS reads use_cp over use_tucker whatever their order (kohya_ss writes both): take use_cp last
    for item in sorted(args, key=lambda item: str(item).partition("=")[0].strip() == "use_cp"):
        arg, eq, value = str(item).partition("=")
        arg, value = arg.strip(), value.strip()
        if not eq:
            problems.append(f"network_args item {item!r} is not key=value")
        elif arg in NETWORK_ARGS_WITHOUT_EFFECT:
            notes.append(f"network_args {arg}: accepted, no effect: {NETWORK_ARGS_WITHOUT_EFFECT[arg]}")
        elif arg in NETWORK_ARGS_REFUSED:
            if value.lower() not in ("false", "none", "0", ""):
                problems.append(f"network_args {arg}={value}: {NETWORK_ARGS_REFUSED[arg]}")
        elif arg not in NETWORK_ARG_KEYS:
            known = [*NETWORK_ARG_KEYS, *NETWORK_ARGS_WITHOUT_EFFECT, *NETWORK_ARGS_REFUSED]
            problems.append(f"network_args key {arg!r} is not supported{did_you_mean(arg, known)}")
        elif arg == "dropout" and value.lower() in ("none", "null", ""):
            continue  # kohya writes dropout=None when --network_dropout is unset
        else:
            key = NETWORK_ARG_KEYS[arg]
            try:
                out[key] = coerce(key, value, from_string=True, label=f"network_args {arg}")
            except ConfigError as e:
                problems.append(str(e))
    return out


def _assemble(values: dict, problems: list[str], notes: list[str]) -> TrainConfig | None:
    """Typed values -> TrainConfig with its NetworkConfig; cross-field problems and notes are collected."""
    train = {k: v for k, v in values.items() if KEYS[k][0] == "train"}
    net = {KEYS[k][1]: v for k, v in values.items() if KEYS[k][0] == "network"}
    net["train_unet"] = not values.get("network_train_text_encoder_only", False)
    net["train_text_encoder"] = not values.get("network_train_unet_only", False)
    network = NetworkConfig.__new__(NetworkConfig)  # fields first, checks collected below (not raised one by one)
    for f in fields(NetworkConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        setattr(network, f.name, net.get(f.name, default))
    problems.extend(network.problems())
    config = TrainConfig(network=network, **train)
    notes.extend(config.network_config().notes())  # the network as built (lycoris.kohya's default preset)
    problems.extend(cross_field_problems(config))
    from lorakit.training.optim import optimization_checks  # optim imports ConfigError from here

    more_problems, more_notes = optimization_checks(config)
    problems.extend(more_problems)
    notes.extend(more_notes)
    return config


def cross_field_problems(config: TrainConfig) -> list[str]:
    """Checks across keys of the training schema (each line names the keys and the fix)."""
    out = []
    if config.resolution is not None and len(config.resolution) not in (1, 2):
        out.append(f"resolution = {config.resolution}: give one side (512) or \"W,H\" (512,768)")
    if config.min_bucket_reso > config.max_bucket_reso:
        out.append(f"min_bucket_reso = {config.min_bucket_reso} is above max_bucket_reso = "
                   f"{config.max_bucket_reso}; swap them")
    if config.enable_bucket and config.bucket_reso_steps % 8:
        out.append(f"bucket_reso_steps = {config.bucket_reso_steps} must be a multiple of 8: bucket sides become "
                   "latent sizes through the VAE's 8x downsampling; use 64 (kohya's default) or 32")
    if config.min_timestep is not None and config.max_timestep is not None and \
            config.min_timestep >= config.max_timestep:
        out.append(f"min_timestep = {config.min_timestep} must be below max_timestep = {config.max_timestep}")
    lrs = [config.learning_rate if v is None else v for v in (config.unet_lr, config.text_encoder_lr)]
    if all(lr == 0 for lr in lrs):
        out.append("learning_rate, unet_lr and text_encoder_lr leave every learning rate at 0: nothing would "
                   "train; set learning_rate (1e-4 is common)")
    out += noise_and_loss_problems(config)
    if config.dim_from_weights and not config.network_weights:
        out.append("dim_from_weights needs network_weights (the LoRA file to take dims from)")
    if config.dynamo_mode != "default" and config.dynamo_backend not in ("inductor", "no"):  # "no": nothing compiles
        out.append(f"dynamo_mode = {config.dynamo_mode!r} is a mode of the inductor backend; dynamo_backend is "
                   f"{config.dynamo_backend!r}: set dynamo_backend = \"inductor\" or leave dynamo_mode out")
    return out


def default_of(key: str):
    """The schema default of a TOML key (a fresh copy for list defaults)."""
    f = FIELDS[key]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def noise_and_loss_problems(config: TrainConfig) -> list[str]:
    """The combinations kohya's verify_training_args refuses, named with their keys."""
    out = []
    if config.adaptive_noise_scale is not None and not config.noise_offset:
        out.append("adaptive_noise_scale needs noise_offset (it is added to the offset); set noise_offset, e.g. "
                   "0.05, or remove adaptive_noise_scale")
    if config.scale_v_pred_loss_like_noise_pred and not config.v_parameterization:
        out.append("scale_v_pred_loss_like_noise_pred is for v-prediction models: set v_parameterization = true "
                   "or remove it")
    if config.v_pred_like_loss and config.v_parameterization:
        out.append("v_pred_like_loss is for epsilon models; with v_parameterization the loss already is v: "
                   "remove one")
    if config.loss_type in ("huber", "smooth_l1") and config.huber_c <= 0:
        out.append(f"huber_c = {config.huber_c} must be above 0 for loss_type {config.loss_type} (0.1 is kohya's "
                   "default)")
    return out


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def coerce(key: str, value, where: str = "", from_string: bool = False, label: str | None = None):
    """Value -> the key's type, finite and range-checked. Strings (CLI, network_args) are parsed.

    `where` is accepted for callers that name a file; the message names the key (label) either way."""
    return coerce_field(FIELDS[key], HINTS[key], value, label or key, f"{where}: " if where else "", from_string,
                        is_resolution=key == "resolution")


def coerce_field(f, hint, value, label: str, prefix: str = "", from_string: bool = False,
                 is_resolution: bool = False):
    """coerce() for any schema field declared with lorakit.options.opt (dataset TOML tables use it too)."""
    kind, meta = base_type(hint), f.metadata
    if value is None or (from_string and str(value).lower() in ("none", "null")):
        if f.default is None:
            return None
        raise ConfigError(f"{prefix}{label} cannot be empty ({meta['help']})")
    try:
        value = _typed(kind, hint, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}{label} = {value!r} is not a valid {kind.__name__} ({e}); {meta['help']}") from None
    if is_resolution and len(value) == 1:
        value = value * 2  # kohya: one number is a square
    return _checked(label, value, meta, prefix)


def _typed(kind, hint, value):
    if kind is list:
        if isinstance(value, str) and str in typing.get_args(hint) and value.strip()[:1].isalpha():
            return value.strip()  # a list field that also takes a name (kohya's "cosine+.25" LR-weight curves)
        items = value.split(",") if isinstance(value, str) else (list(value) if isinstance(value, (list, tuple))
                                                                 else [value])
        inner = list_item_type(hint)
        return [_scalar(inner, v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
    return _scalar(kind, value)


def _scalar(kind, value):
    if kind is bool:
        return _parse_bool(value)
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError("a number is required, not true/false")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("it must be a finite number")
        if kind is int and number != int(number):
            raise ValueError("a whole number is required")
        return int(number) if kind is int else number
    if isinstance(value, (dict, list)):
        raise ValueError("a single value is required")
    return str(value)


def _checked(label: str, value, meta, prefix: str):
    choices = meta.get("choices")
    if choices:
        match = [c for c in choices if str(c).lower() == str(value).lower()]  # kohya: case-insensitive
        if not match:
            raise ConfigError(f"{prefix}{label} = {value!r} is not one of {list(choices)}"
                              f"{did_you_mean(str(value), [str(c) for c in choices])}")
        value = match[0]
    for v in value if isinstance(value, list) else [value]:
        if meta.get("lo") is not None and v < meta["lo"] or meta.get("hi") is not None and v > meta["hi"]:
            raise ConfigError(f"{prefix}{label} = {value!r} is outside [{meta.get('lo')}, {meta.get('hi')}]; "
                              f"{meta['help']}")
    return value


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--key value` / `--key=value` / `--flag` pairs from the command line (values typed later by coerce)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {item!r}")
        key, eq, value = item[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            is_flag = key in KEYS and base_type(HINTS[key]) is bool or \
                key in KOHYA_KEYS and KOHYA_KEYS[key].type == "bool-flag"
            if is_flag and not takes_value:
                value = "true"
            elif takes_value:
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"command line: --{key} needs a value")
        out[key] = value
        i += 1
    return out


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def keys_help() -> str:
    """Every config key with its help text (for `lorakit train --help`)."""
    lines = []
    for key in KEYS:
        meta, default = FIELDS[key].metadata, default_of(key)
        extra = f" [{', '.join(map(str, meta['choices']))}]" if meta.get("choices") else ""
        lines.append(f"  --{key} ({base_type(HINTS[key]).__name__}, default {default}){extra}\n      {meta['help']}")
    return "\n".join(lines)
