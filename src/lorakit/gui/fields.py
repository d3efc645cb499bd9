"""Form field specs built from TrainConfig's schema: the GUI writes no help text, range or choice by hand.

Each TrainConfig field becomes one FieldSpec (kind, help, range, choices, default) placed in a group. Only the
labels users know from kohya_ss ("Network Rank (Dimension)") and the display names of choices are written
here. Conv fields apply only where they change training: an algorithm that adapts kxk convs and a model that
has them (and a U-Net being trained at all); elsewhere they are hidden and never written or passed on.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorakit.training.config import FIELDS, HINTS, PRESETS, base_type, default_of

LABELS = {
    "pretrained_model_name_or_path": "Base model", "train_data_dir": "Dataset folder", "algo": "Algorithm",
    "dora_wd": "DoRA",
    "network_dim": "Network Rank (Dimension)", "network_alpha": "Network Alpha",
    "conv_dim": "Convolution Rank (Dimension)", "conv_alpha": "Convolution Alpha",
    "block_dims": "Block dims", "block_alphas": "Block alphas", "conv_block_dims": "Conv block dims",
    "conv_block_alphas": "Conv block alphas", "block_lr_weights": "Block LR weights",
    "learning_rate": "Learning rate", "unet_lr": "U-Net learning rate", "text_encoder_lr": "Text encoder learning rate",
    "optimizer_type": "Optimizer", "lr_scheduler": "LR scheduler", "max_train_epochs": "Epochs",
    "max_train_steps": "Max train steps", "sample_prompts": "Sample prompts", "sample_every_n_epochs":
    "Sample every N epochs", "train_batch_size": "Batch size", "output_dir": "Output folder",
    "output_name": "Output name", "validation_split": "Validation split (held-out share)",
    "validation_seed": "Validation seed", "validate_every_n_epochs": "Validate every N epochs",
    "validate_every_n_steps": "Validate every N steps", "max_validation_steps": "Max validation images",
}
CHOICE_LABELS = {"algo": {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}}
PRESET_LABELS = {"character": "character", "style": "style", "character-style": "character + style"}
CUSTOM_PRESET = "custom"

GROUPS = {  # the Training tab's sections in order; every other field lands in "Advanced"
    "Model and data": ("pretrained_model_name_or_path", "train_data_dir", "resolution", "train_batch_size"),
    "Network": ("algo", "dora_wd", "network_dim", "network_alpha", "conv_dim", "conv_alpha"),  # DoRA: any algorithm
    "Block dims": ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights"),
    "Optimisation": ("learning_rate", "unet_lr", "text_encoder_lr", "optimizer_type", "lr_scheduler",
                     "lr_warmup_steps", "max_train_epochs", "max_train_steps"),
    "Validation": ("validation_split", "validation_seed", "validate_every_n_epochs", "validate_every_n_steps",
                   "max_validation_steps"),
    "Samples and outputs": ("sample_prompts", "sample_every_n_epochs", "output_dir", "output_name",
                            "save_every_n_epochs", "save_precision", "save_state"),
}
ADVANCED = "Advanced"
# set through other controls: the preset selector fills fields, typed fields replace kohya's network_args
# strings, the Resume button sets resume, and network_module only picks what `algo` already says
NOT_IN_FORM = ("preset", "network_args", "network_module", "resume")
CONV_FIELDS = ("conv_dim", "conv_alpha", "conv_block_dims", "conv_block_alphas")
CONV_ALGOS = ("locon", "loha", "lokr")  # in the GUI "LoRA" means attention/linear only, as in kohya_ss
PATH_FIELDS = ("pretrained_model_name_or_path", "train_data_dir", "dataset_config", "output_dir", "logging_dir",
               "latent_cache_dir")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    label: str
    help: str
    kind: str  # bool, int, float, choice, text, list, prompts
    default: object
    lo: float | None = None
    hi: float | None = None
    choices: tuple[tuple[str, str], ...] = ()  # (display, value)
    optional: bool = False  # may be left empty (the schema's default is None)
    group: str = ADVANCED


def field_kind(name: str) -> str:
    if name == "sample_prompts":
        return "prompts"  # a file in the schema; the form edits its lines and writes the file beside the TOML
    if FIELDS[name].metadata.get("choices"):
        return "choice"
    kind = base_type(HINTS[name])
    return {bool: "bool", int: "int", float: "float", list: "list"}.get(kind, "text")


def field_spec(name: str, group: str = ADVANCED) -> FieldSpec:
    f = FIELDS[name]
    meta = f.metadata
    names = CHOICE_LABELS.get(name, {})
    choices = tuple((names.get(c, c), c) for c in meta.get("choices") or ())
    default = default_of(name)
    return FieldSpec(name=name, label=LABELS.get(name, name.replace("_", " ").capitalize()), help=meta["help"],
                     kind=field_kind(name), default=default, lo=meta.get("lo"), hi=meta.get("hi"), choices=choices,
                     optional=default is None, group=group)


def form_fields() -> list[FieldSpec]:
    """Every schema field the form shows, grouped; the order is the order on the page."""
    placed = {name: group for group, names in GROUPS.items() for name in names}
    specs = [field_spec(name, group) for group, names in GROUPS.items() for name in names]
    specs += [field_spec(name) for name in FIELDS if name not in placed and name not in NOT_IN_FORM]
    return specs


def default_values() -> dict[str, object]:
    return {spec.name: spec.default for spec in form_fields()}


def uses_conv(algo: str) -> bool:
    return algo in CONV_ALGOS


def conv_fields_apply(algo: str, model_conv_layers: int, trains_unet: bool = True) -> bool:
    """Conv fields are shown (and written) only when they change what is trained."""
    return uses_conv(algo) and model_conv_layers > 0 and trains_unet


def preset_choices() -> list[tuple[str, str]]:
    return [(PRESET_LABELS.get(name, name), name) for name in PRESETS] + [(CUSTOM_PRESET, CUSTOM_PRESET)]


def preset_values(name: str) -> tuple[dict[str, object], str]:
    """(field values, the brief's one-line why). A preset with conv values picks LoCon so they are used."""
    if name == CUSTOM_PRESET:
        return {}, "custom: every value is yours"
    preset = dict(PRESETS[name])
    why = preset.pop("why")
    values = {**preset, "algo": "locon" if preset.get("conv_dim") else "lora"}
    if not values.get("conv_dim"):
        values["conv_alpha"] = None
    return values, why


BLOCK_PRESETS = {  # which U-Net blocks get the rank: a starting point for the block dims editor
    "uniform": lambda block: True,
    "input blocks only": lambda block: block.startswith("IN"),
    "middle and output blocks": lambda block: block.startswith(("M", "OUT")),
    "output blocks only": lambda block: block.startswith("OUT"),
    "no middle block": lambda block: not block.startswith("M"),
}


def block_preset_values(preset: str, block_names: tuple[str, ...], network_dim: int, conv_dim: int) -> dict:
    """block_dims (and conv_block_dims when conv_dim > 0) as comma text, one value per U-Net block."""
    chosen = [BLOCK_PRESETS[preset](b) and b not in ("EMB", "FINAL") for b in block_names]  # SDXL's ends: none
    values = {"block_dims": ", ".join(str(int(network_dim) if on else 0) for on in chosen)}
    if conv_dim:
        values["conv_block_dims"] = ", ".join(str(int(conv_dim) if on else 0) for on in chosen)
    return values
