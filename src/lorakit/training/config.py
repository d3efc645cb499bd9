"""TrainConfig: one typed schema for TOML files, `--key value` CLI overrides and (later) GUI fields.

Names follow kohya's sd-scripts where they exist, so existing configs work. Every field carries help text
and, where it applies, a range or a set of choices. Unknown keys are errors with a "did you mean"; kohya's
`network_args = ["conv_dim=8", ...]` strings are parsed once, here, into typed fields.
"""
from __future__ import annotations

import difflib
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from lorakit.surgery.config import NetworkConfig


class ConfigError(ValueError):
    """A configuration problem, naming the field (and file) and the fix."""


def opt(default, help: str, *, lo=None, hi=None, choices=None):
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices})


PRESETS = {  # from the design brief's table of starting points
    "character": dict(network_dim=32, network_alpha=16.0, conv_dim=0,
                      why="attention learns the concept (face, clothes); no conv keeps the base model's look"),
    "style": dict(network_dim=8, network_alpha=8.0, conv_dim=32, conv_alpha=16.0,
                  why="conv layers carry texture, colour and line quality; conv_alpha = conv_dim/2 damps baking-in"),
    "character-style": dict(network_dim=32, network_alpha=16.0, conv_dim=32, conv_alpha=16.0,
                            why="both the concept (attention) and the look (conv), at moderate strength"),
}


@dataclass
class TrainConfig:
    # ---- model ----
    pretrained_model_name_or_path: str | None = opt(None, "base model: single file or diffusers folder; "
                                                          "unset = the embedded tiny model")
    v_parameterization: bool = opt(False, "the base model predicts v (SD2 768-v)")
    clip_skip: int = opt(1, "use the n-th last text-encoder layer", lo=1, hi=12)
    # ---- network (see lorakit.surgery.config.NetworkConfig) ----
    preset: str | None = opt(None, "starting values from the design brief", choices=tuple(PRESETS))
    algo: str = opt("lora", "lora (= locon), loha or lokr", choices=("lora", "locon", "loha", "lokr"))
    network_module: str | None = opt(None, "kohya name: networks.lora or lycoris.kohya (algo then picks)")
    network_dim: int = opt(8, "rank of attention/linear adapters", lo=1, hi=4096)
    network_alpha: float = opt(4.0, "attention/linear strength: alpha/dim", lo=0.0)
    conv_dim: int = opt(0, "rank of 3x3-conv adapters (LoCon); 0 = plain LoRA", lo=0, hi=4096)
    conv_alpha: float | None = opt(None, "conv strength: conv_alpha/conv_dim (unset: 1.0 as in kohya)", lo=0.0)
    block_dims: list[int] | None = opt(None, "per-block network_dim (25 SD1/2, 23 SDXL)")
    block_alphas: list[float] | None = opt(None, "per-block network_alpha")
    conv_block_dims: list[int] | None = opt(None, "per-block conv_dim")
    conv_block_alphas: list[float] | None = opt(None, "per-block conv_alpha")
    block_lr_weights: list[float] | None = opt(None, "per-block LR multipliers; 0 drops the block")
    network_dropout: float = opt(0.0, "dropout on rank activations (LoRA/LoCon)", lo=0.0, hi=0.99)
    rank_dropout: float = opt(0.0, "rank dropout probability", lo=0.0, hi=0.99)
    module_dropout: float = opt(0.0, "module dropout probability", lo=0.0, hi=0.99)
    network_args: list[str] | None = opt(None, 'kohya form: ["conv_dim=8", "conv_alpha=4", "algo=loha"]')
    network_train_unet_only: bool = opt(False, "do not train the text encoder")
    network_train_text_encoder_only: bool = opt(False, "do not train the U-Net")
    # ---- data ----
    train_data_dir: str | None = opt(None, "folder of `N_name` subfolders (kohya convention)")
    dataset_config: str | None = opt(None, "kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    resolution: int = opt(512, "training resolution (square side)", lo=64, hi=4096)
    train_batch_size: int = opt(1, "batch size", lo=1, hi=1024)
    caption_extension: str = opt(".txt", "caption file extension")
    cache_latents_to_disk: bool = opt(False, "also keep VAE latents on disk (reused while image and VAE are unchanged)")
    latent_cache_dir: str | None = opt(None, "where disk latents go (unset: <output_dir>/latent-cache)")
    # ---- optimisation ----
    learning_rate: float = opt(1e-4, "default learning rate", lo=0.0, hi=1.0)
    unet_lr: float | None = opt(None, "U-Net LR (unset: learning_rate; 0 freezes)", lo=0.0, hi=1.0)
    text_encoder_lr: float | None = opt(None, "text-encoder LR (unset: learning_rate; 0 freezes)", lo=0.0, hi=1.0)
    optimizer_type: str = opt("AdamW", "optimizer", choices=("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor"))
    lr_scheduler: str = opt("constant", "LR schedule", choices=("constant", "cosine", "linear",
                                                                "constant_with_warmup"))
    lr_warmup_steps: int = opt(0, "warmup steps", lo=0)
    max_train_steps: int = opt(1600, "training steps (max_train_epochs overrides)", lo=1)
    max_train_epochs: int | None = opt(None, "training epochs", lo=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", lo=1)
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    mixed_precision: str = opt("no", "autocast dtype", choices=("no", "fp16", "bf16"))
    seed: int = opt(42, "random seed", lo=0)
    noise_offset: float = opt(0.0, "noise offset", lo=0.0, hi=1.0)
    min_snr_gamma: float | None = opt(None, "min-SNR weighting gamma (5 is common)", lo=0.0)
    # ---- outputs ----
    output_dir: str = opt("output", "where files go")
    output_name: str = opt("lora", "file stem of saved LoRAs")
    save_every_n_epochs: int | None = opt(None, "save a file every N epochs", lo=1)
    save_precision: str = opt("fp16", "dtype of saved tensors", choices=("float", "fp16", "bf16"))
    sample_every_n_epochs: int | None = opt(None, "render samples every N epochs", lo=1)
    sample_prompts: str | None = opt(None, "prompt file (kohya syntax: --n --w --h --d --l --s)")
    logging_dir: str | None = opt(None, "TensorBoard log folder: loss, LR, per-block dW norms (attention vs conv)")
    save_state: bool = opt(False, "also save the training state with every epoch file (for --resume)")
    resume: str | None = opt(None, "continue from a `<output_name>-state` folder (same losses as an unbroken run)")

    def network_config(self) -> NetworkConfig:
        algo = "lora" if self.algo == "locon" else self.algo
        return NetworkConfig(
            algo=algo, network_dim=self.network_dim, network_alpha=self.network_alpha, conv_dim=self.conv_dim,
            conv_alpha=self.conv_alpha, block_dims=self.block_dims, block_alphas=self.block_alphas,
            conv_block_dims=self.conv_block_dims, conv_block_alphas=self.conv_block_alphas,
            block_lr_weights=self.block_lr_weights, dropout=self.network_dropout, rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout, train_unet=not self.network_train_text_encoder_only,
            train_text_encoder=not self.network_train_unet_only)


FIELDS = {f.name: f for f in fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)  # resolved annotations (this module uses postponed evaluation)
NETWORK_ARG_KEYS = ("algo", "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims",
                    "conv_block_alphas", "block_lr_weights", "rank_dropout", "module_dropout", "dropout")


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
        if isinstance(value, dict) and key not in FIELDS:  # kohya groups keys in tables; names stay unique
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


def build_config(raw: dict[str, object], where: str = "<config>") -> TrainConfig:
    values = {}
    preset = raw.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}: preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
        values.update({k: v for k, v in PRESETS[preset].items() if k != "why"})
    for key, value in raw.items():
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, FIELDS)}")
        values[key] = coerce(key, value, where)
    for key, value in parse_network_args(values.get("network_args") or [], where).items():
        values[key] = value
    module = values.get("network_module")
    if module not in (None, "networks.lora", "lycoris.kohya"):
        raise ConfigError(f"{where}: network_module {module!r} is not supported; use networks.lora or lycoris.kohya")
    config = TrainConfig(**values)
    try:
        config.network_config()  # cross-field checks (conv settings without conv_dim, dropout on loha, ...)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def parse_network_args(args: list[str], where: str) -> dict[str, object]:
    out = {}
    for item in args:
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"{where}: network_args item {item!r} is not key=value")
        if key not in NETWORK_ARG_KEYS:
            raise ConfigError(f"{where}: network_args key {key!r} is not supported{did_you_mean(key, NETWORK_ARG_KEYS)}")
        name = "network_dropout" if key == "dropout" else key
        if key == "dropout" and value.strip().lower() in ("none", "null", ""):
            continue  # kohya writes dropout=None when --network_dropout is unset
        out[name] = coerce(name, value.strip(), where, from_string=True)
    return out


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def coerce(key: str, value, where: str, from_string: bool = False):
    """Value -> the field's type, range-checked. Strings (CLI, network_args) are parsed."""
    f = FIELDS[key]
    kind = base_type(HINTS[key])
    meta = f.metadata
    if value is None or (from_string and str(value).lower() in ("none", "null")):
        if f.default is not MISSING and f.default is None:
            return None
        raise ConfigError(f"{where}: {key} cannot be empty ({meta['help']})")
    try:
        if kind is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            inner = _list_item_type(HINTS[key])
            value = [inner(str(v).strip()) if isinstance(v, str) else inner(v) for v in items if str(v).strip()]
        elif kind is bool:
            value = _parse_bool(value)
        elif kind in (int, float):
            if isinstance(value, bool):
                raise ValueError("a number is required, not true/false")
            value = _number(kind, value)
        else:
            value = str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {key} = {value!r} is not a valid {kind.__name__} ({e}); {meta['help']}") from None
    _check_range(key, value, meta, where)
    if meta.get("choices") and value not in meta["choices"]:
        value = next(c for c in meta["choices"] if c.lower() == str(value).lower())
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
            if key in FIELDS and base_type(HINTS[key]) is bool and not takes_value:
                value = "true"
            elif takes_value:
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"command line: --{key} needs a value")
        out[key] = value
        i += 1
    return out


def _check_range(key, value, meta, where):
    values = value if isinstance(value, list) else [value]
    if meta.get("choices") and value not in meta["choices"]:
        canonical = [c for c in meta["choices"] if c.lower() == str(value).lower()]  # kohya: case-insensitive
        if canonical:
            return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {key} = {value!r} is not one of {list(meta['choices'])}{did_you_mean(str(value), meta['choices'])}")
    for v in values:
        if meta.get("lo") is not None and v < meta["lo"] or meta.get("hi") is not None and v > meta["hi"]:
            raise ConfigError(f"{where}: {key} = {value!r} is outside [{meta.get('lo')}, {meta.get('hi')}]; {meta['help']}")


def _number(kind, value):
    if kind is int:
        number = float(value)
        if number != int(number):
            raise ValueError("a whole number is required")
        return int(number)
    return float(value)


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def base_type(hint):
    """int | None -> int; list[int] | None -> list; plain types unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return list if typing.get_origin(hint) is list else hint


def _list_item_type(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint)[0]
