"""`lorakit import-config`: a bmaltais/kohya_ss LoRA-tab JSON ("Save config") -> a training TOML with the
sd-scripts key names that `lorakit train` reads.

    keys, notes, prompts = convert_kohya_ss(json.load(f), prompts_file="train-prompts.txt")
    done = import_kohya_ss("kohya_ss.json", "train.toml")    # writes the TOML (+ prompt file), atomically

The conversion repeats what kohya_ss does with the JSON (read at commit 45088f04): `update_my_data` when it
opens the file, then `lora_gui.train_model`, which writes the TOML handed to train_network.py. So the keys,
the values and the fields left out (empty, 0 or off: its `value not in ["", False, None]` filter) are the
ones kohya_ss would have used. Every JSON field ends up as a key, in the "left out" list, or in a note; LoRA
types lorakit does not train are refused with one line.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

from lorakit.formats.atomic import atomic_write
from lorakit.tools.kohya_ss_fields import (
    ACCELERATE, CONDITIONS, CONVERT, FAMILY_CHECKBOXES, GROUP_NOTES, GUI_DEFAULTS, GUI_ONLY, KOHYA_BLOCK_FIELDS,
    KOHYA_IGNORES, LEGACY, LIST_KEYS, LORA_TYPES, LORAPLUS_FIELDS, LYCORIS_SHADOWS, NETWORK_DEFAULTS, NETWORK_FIELDS,
    OTHER_FAMILY_FIELDS, OTHER_FAMILY_PREFIXES, PASS, REFUSED, SUPPORTED, UPGRADE_NUMBERS, LoraType, arg_text, as_bool,
    condition_holds, is_off, show)


class Conversion(NamedTuple):
    keys: dict[str, object]  # sd-scripts key -> value, sorted by key as kohya_ss writes them
    notes: list[str]
    prompts: str | None      # sample prompt text for the file that `sample_prompts` names


class _Run:
    """The JSON being converted and what has become of each field."""

    def __init__(self, data: dict):
        self.data, self.keys, self.notes = data, {}, []
        self.used: set[str] = set()
        self.off: list[str] = []       # present but empty/0/off: left out as kohya_ss does
        self.unused: list[str] = []    # set, but kohya_ss does not pass it in this configuration
        self.prompts: str | None = None

    def take(self, name: str, default=None):
        self.used.add(name)
        return self.data.get(name, default)

    def left_out(self, name: str) -> None:
        if name in self.data:
            self.off.append(name)


# ---- steps of the conversion, in kohya_ss's order ----

def _upgrade(run: _Run) -> None:
    """update_my_data: the fix-ups kohya_ss applies to a JSON it opens."""
    d, note = run.data, run.notes.append
    if "use_8bit_adam" in d and "optimizer" not in d:
        d["optimizer"] = "AdamW8bit" if as_bool(d.pop("use_8bit_adam")) else "AdamW"
        note(f"use_8bit_adam (older kohya_ss) -> optimizer_type = {d['optimizer']!r}")
    if d.get("lora_network_weights") is not None:  # renamed; kohya_ss moves even an empty value
        d["network_weights"] = d.pop("lora_network_weights")
        note("lora_network_weights (older kohya_ss) -> network_weights")
    if d.get("LoRA_type") == "LoCon":
        d["LoRA_type"] = "LyCORIS/LoCon"
        note("LoRA_type 'LoCon' (older kohya_ss) read as 'LyCORIS/LoCon', as kohya_ss does")
    if isinstance(d.get("xformers"), bool):
        d["xformers"] = "xformers" if d["xformers"] else "none"
    if d.get("use_wandb") == "True":  # any other value is dropped by kohya_ss: listed with the old fields
        del d["use_wandb"]
        d["log_with"] = "wandb"
        note("use_wandb (older kohya_ss) -> log_with = 'wandb'")
    if d.get("save_model_as") not in (None, "safetensors", "ckpt"):
        note(f"save_model_as {d['save_model_as']!r} -> 'safetensors', as kohya_ss does for LoRAs")
        d["save_model_as"] = "safetensors"
    if d.get("image_folder") not in (None, "") and d.get("train_data_dir") in (None, ""):
        d["train_data_dir"] = d.pop("image_folder")
        note("image_folder (finetune tab) -> train_data_dir")
    for name, (kind, fallback) in UPGRADE_NUMBERS.items():
        if d.get(name) is not None:
            try:
                d[name] = kind(d[name])
            except (TypeError, ValueError):
                d[name] = fallback


def _lora_type(run: _Run) -> tuple[str, LoraType]:
    for box, family in FAMILY_CHECKBOXES.items():
        if not as_bool(run.take(box)):
            run.left_out(box)
        else:
            raise ValueError(f"this kohya_ss config trains {family} ({box} is on); lorakit trains SD1, SD2 and "
                             f"SDXL LoRAs")
    name = run.take("LoRA_type", "Standard")
    if name in LORA_TYPES:
        return name, LORA_TYPES[name]
    why = REFUSED.get(name, "unknown to lorakit")
    raise ValueError(f"LoRA type {name!r} is not supported ({why}); lorakit trains {SUPPORTED}")


def _network(run: _Run, type_name: str, spec: LoraType) -> None:
    run.keys["network_module"] = spec.module
    args, defaults = [], []
    for item in spec.args:
        arg, _, source = item.partition("=") if "=" in item else (item, "", item)
        if source.startswith(":"):
            value = source[1:]
        else:
            value = run.take(source)
            if value in (None, ""):
                value = GUI_DEFAULTS[source]
                defaults.append(f"{source}={arg_text(value)}")
        text = f"{arg}={arg_text(value)}"
        if text not in args:
            args.append(text)
    if defaults:
        run.notes.append(f"absent from the JSON, kohya_ss's GUI defaults used: {', '.join(defaults)}")
    _shadowed(run, type_name, dict(a.split("=", 1) for a in args))
    if spec.conv_dropped:
        _conv_dropped(run, type_name)
    if spec.kohya_blocks:
        args += _kv_args(run, KOHYA_BLOCK_FIELDS)
    args += _kv_args(run, LORAPLUS_FIELDS)  # for every type
    if args:
        run.keys["network_args"] = args
    _other_type_fields(run, type_name)


def _shadowed(run: _Run, type_name: str, args: dict[str, str]) -> None:
    """LyCORIS copies a deprecated arg over its new name (use_cp over use_tucker) before reading it."""
    for new, old in LYCORIS_SHADOWS.items():
        if new in args and old in args and as_bool(args[new]) != as_bool(args[old]):
            run.notes.append(f"kohya_ss would have silently dropped {new}={args[new]} for LoRA type {type_name}: it "
                             f"also passes {old}={args[old]}, which LyCORIS reads in its place; kept as in kohya_ss "
                             f"(lorakit reads it the same way); set {old}={args[new]} in network_args to change it")


def _conv_dropped(run: _Run, type_name: str) -> None:
    present = [(n, run.take(n)) for n in ("conv_dim", "conv_alpha") if run.data.get(n) not in (None, "")]
    if any(not is_off(v) for _, v in present):
        values = ", ".join(f"{n}={arg_text(v)}" for n, v in present)
        run.notes.append(f"kohya_ss would have silently dropped {values} for LoRA type {type_name}; not carried "
                         f"over, as in kohya_ss; choose Kohya LoCon to train conv layers")
    else:
        for name, _ in present:
            run.left_out(name)


def _kv_args(run: _Run, names: tuple[str, ...]) -> list[str]:
    """`name=value` network_args items for the fields that are set, as kohya_ss appends them."""
    out = []
    for name in names:
        value = run.take(name)
        if is_off(value):
            run.left_out(name)
            continue
        text = arg_text(value)
        if re.search(r"\s", text):
            text = re.sub(r"\s+", "", text)
            run.notes.append(f"{name}: spaces removed (kohya_ss splits network_args at spaces, which would cut "
                             f"this list into pieces)")
        out.append(f"{name}={text}")
    return out


def _other_type_fields(run: _Run, type_name: str) -> None:
    """Network fields of other LoRA types: kohya_ss does not pass them for this one."""
    unused = []
    for name in sorted(NETWORK_FIELDS - run.used):
        value = run.take(name)
        if name not in run.data or is_off(value) or value == NETWORK_DEFAULTS.get(name):
            run.left_out(name)
        else:
            unused.append(show(name, value))
    if unused:
        run.notes.append(f"not used by LoRA type {type_name} in kohya_ss, not carried over: {', '.join(unused)}")


def _learning_rates(run: _Run) -> None:
    lr, te, unet, t5 = (float(run.take(n) or 0) for n in ("learning_rate", "text_encoder_lr", "unet_lr", "t5xxl_lr"))
    if lr == te == unet == 0:
        raise ValueError("learning_rate, text_encoder_lr and unet_lr are all 0; kohya_ss refuses to train")
    if te == 0 and t5 > 0:
        raise ValueError("t5xxl_lr is set but text_encoder_lr is 0; kohya_ss refuses to train")
    if lr:
        run.keys["learning_rate"] = lr
    if te and t5:
        # kohya_ss passes [te, t5]; sd-scripts gives the second text encoder (SDXL's) the second value
        run.keys["text_encoder_lr"] = [te, t5]
        run.notes.append(f"t5xxl_lr={t5:g}: kohya_ss passes text_encoder_lr = [{te:g}, {t5:g}], so SDXL's second "
                         f"text encoder trains at {t5:g}")
    elif te:
        run.keys["text_encoder_lr"] = te  # kohya_ss's [te, te] reads the same in sd-scripts
    if unet:
        run.keys["unet_lr"] = unet
    if te == 0 and unet != 0:
        run.keys["network_train_unet_only"] = True
    if te != 0 and unet == 0:
        run.keys["network_train_text_encoder_only"] = True
    for name in ("learning_rate", "text_encoder_lr", "unet_lr", "t5xxl_lr"):
        if not run.data.get(name):
            run.left_out(name)


def _steps(run: _Run) -> None:
    """epoch / max_train_* / warmup as train_model turns them into sd-scripts keys."""
    epoch, epochs, steps = (int(run.take(n) or 0) for n in ("epoch", "max_train_epochs", "max_train_steps"))
    with_dataset = bool(run.data.get("dataset_config"))
    if epochs:
        run.keys["max_train_epochs"] = epochs
    if steps:
        run.keys["max_train_steps"] = steps
    if epoch and not (epochs or steps or with_dataset):
        # kohya_ss counts the images in train_data_dir to make max_train_steps = epoch x steps per epoch;
        # sd-scripts computes the same from max_train_epochs
        run.keys["max_train_epochs"] = epoch
        run.notes.append(f"epoch={epoch} -> max_train_epochs = {epoch} (kohya_ss counts the images to turn it into "
                         f"the same max_train_steps)")
    elif epoch:
        run.notes.append(f"epoch={epoch}: not carried over; kohya_ss uses it only to count steps when none of "
                         f"max_train_steps, max_train_epochs, dataset_config is set")
    for name, value in (("epoch", epoch), ("max_train_epochs", epochs), ("max_train_steps", steps)):
        if not value and name not in run.keys:
            run.left_out(name)
    _warmup(run, steps, with_dataset)


def _warmup(run: _Run, steps: int, with_dataset: bool) -> None:
    percent = float(run.take("lr_warmup") or 0)
    try:
        fixed = float(run.take("lr_warmup_steps") or 0)
    except (TypeError, ValueError):
        fixed = 0.0
    if with_dataset and steps > 0 and fixed <= 0 and percent:
        fixed, percent = round(percent * steps / 100), 0.0
    elif with_dataset and steps == 0:
        fixed = 0.0
    if fixed > 0 and percent:
        run.notes.append(f"lr_warmup={percent:g}% not used: lr_warmup_steps wins, as in kohya_ss")
    warmup = int(fixed) if fixed > 0 else percent / 100
    if warmup:
        run.keys["lr_warmup_steps"] = warmup
        if isinstance(warmup, float):
            run.notes.append(f"lr_warmup={percent:g}% -> lr_warmup_steps = {warmup:g}, a ratio of the training "
                             f"steps as sd-scripts reads values below 1")
    else:
        run.left_out("lr_warmup")
        run.left_out("lr_warmup_steps")


def _special(run: _Run) -> None:
    """Fields whose key or value train_model derives rather than copies."""
    attention = run.take("xformers")
    if attention in ("xformers", "sdpa"):
        run.keys[attention] = True
    elif attention in (None, "", "none"):
        run.left_out("xformers")
    else:
        run.notes.append(f"xformers={attention!r} is not a kohya_ss choice (none, sdpa, xformers); not carried over")
    if as_bool(run.data.get("train_inpainting")):
        on = [n for n in ("cache_latents", "cache_latents_to_disk") if as_bool(run.take(n))]
        for name in {"cache_latents", "cache_latents_to_disk"} - set(on):
            run.left_out(name)
        if on:
            run.notes.append(f"{', '.join(on)} off: kohya_ss disables latent caching for train_inpainting "
                             f"(masks are drawn per step)")
        run.notes.append("train_inpainting = true is an option of the newer sd-scripts that kohya_ss pins; "
                         "lorakit train does not know it")
    prompts = run.take("sample_prompts")
    if isinstance(prompts, str) and prompts.strip():
        run.prompts = prompts
    else:
        run.left_out("sample_prompts")
    name = run.take("wandb_run_name")
    if name not in (None, ""):
        run.keys["wandb_run_name"] = str(name)
    elif "wandb" in str(run.data.get("log_with") or "") and run.data.get("output_name"):
        run.keys["wandb_run_name"] = str(run.data["output_name"])  # kohya_ss's fallback
    else:
        run.left_out("wandb_run_name")
    for name in ("huggingface_token", "wandb_api_key"):
        if is_off(run.take(name)):
            run.left_out(name)
        else:
            run.notes.append(f"{name} is set but not copied: a secret does not belong in a plain-text training "
                             f"file; pass --{name} on the command line instead")
    for name, why in KOHYA_IGNORES.items():
        if is_off(run.take(name)):
            run.left_out(name)
        else:
            run.notes.append(f"{show(name, run.data[name])}: dropped by kohya_ss ({why}); not carried over")


def _plain(run: _Run) -> None:
    """Fields kohya_ss copies to a key, typed and filtered as it does."""
    for name, field in PASS.items():
        if name not in run.data or name in run.used:
            continue
        value = run.take(name)
        if field.when and not condition_holds(field.when, run.data):
            if is_off(value):
                run.left_out(name)
            else:
                run.unused.append(f"{show(name, value)} ({CONDITIONS[field.when][3]})")
            continue
        try:
            typed = None if value in (None, "") else CONVERT[field.kind](value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} = {value!r} is not a valid {field.kind} ({e})") from None
        if is_off(typed) and not (field.always and typed is not None):
            run.left_out(name)
        else:
            run.keys[field.key] = typed
    if run.unused:
        run.notes.append(f"not passed by kohya_ss in this configuration: {', '.join(run.unused)}")


def _literal(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _additional(run: _Run) -> None:
    """additional_parameters: kohya_ss appends them to the command line, where they override the TOML."""
    text = run.take("additional_parameters")
    if is_off(text) or not str(text).strip():
        run.left_out("additional_parameters")
        return
    found: dict[str, list[str]] = {}
    stray, key = [], None
    for token in str(text).replace('"', "").split():  # kohya_ss's own tokenising
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            key = key.replace("-", "_")
            found[key] = [value] if eq else []
        elif key is None:
            stray.append(token)
        else:
            found[key].append(token)
    shown = []
    for key, values in found.items():
        value = values if key in LIST_KEYS else (_literal(values[0]) if len(values) == 1 else values or True)
        before = run.keys.get(key)
        run.keys[key] = value
        shown.append(f"{key} = {json.dumps(value)}" + (f" (was {json.dumps(before)})" if before is not None else ""))
    if shown:
        run.notes.append(f"from additional_parameters: {'; '.join(shown)}")
    if stray:
        run.notes.append(f"additional_parameters: {' '.join(stray)!r} before any --option; not carried over")


def _account(run: _Run) -> None:
    """One note per kind of field that has no key, so that nothing vanishes silently."""
    groups: dict[str, list[str]] = {"gui": [], "accelerate": [], "family": [], "legacy": [], "unknown": []}
    for name in run.data:
        if name in run.used:
            continue
        value = run.data[name]
        if name in GUI_ONLY:
            groups["gui"].append(name + (f" ({GUI_ONLY[name]})" if GUI_ONLY[name] else ""))
        elif name in ACCELERATE:
            groups["accelerate"].append(show(name, value))
        elif name in OTHER_FAMILY_FIELDS or name.startswith(OTHER_FAMILY_PREFIXES):
            groups["family"].append(name)
        elif name in LEGACY:
            groups["legacy"].append(show(name, value))
        else:
            groups["unknown"].append(show(name, value))
    for group, names in groups.items():
        if names:
            run.notes.append(f"{GROUP_NOTES[group]}: {', '.join(names)}")
    if run.off:
        run.notes.append(f"{GROUP_NOTES['off']}: {', '.join(sorted(set(run.off)))}")


def convert_kohya_ss(data: dict, prompts_file: str = "sample-prompts.txt") -> Conversion:
    """A kohya_ss LoRA-tab JSON (as saved) -> sd-scripts keys, notes, and the sample prompt text (if any) for
    the file `prompts_file` that the keys name. ValueError for LoRA types and models lorakit does not train."""
    if not isinstance(data, dict):
        raise ValueError("a kohya_ss config is a JSON object of GUI fields")
    if "LoRA_type" not in data and "network_dim" not in data:
        raise ValueError("not a kohya_ss LoRA config: it has neither LoRA_type nor network_dim")
    run = _Run(dict(data))
    _upgrade(run)
    type_name, spec = _lora_type(run)
    _network(run, type_name, spec)
    _learning_rates(run)
    _steps(run)
    _special(run)
    _plain(run)
    if run.prompts is not None:
        run.keys["sample_prompts"] = prompts_file
    _additional(run)
    _account(run)
    return Conversion(dict(sorted(run.keys.items())), run.notes, run.prompts)


# ---- files ----

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)  # Python's int/float reprs (16, 0.5, 1e-05) are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def to_toml(keys: dict[str, object], comments: list[str] = ()) -> str:
    """Flat TOML (sd-scripts reads flat or tabled files alike), comments first."""
    lines = [f"# {line}" for line in comments]
    for key, value in keys.items():
        name = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def read_kohya_json(path: str | Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is fine
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class Imported(NamedTuple):
    path: Path
    notes: list[str]
    prompts_path: Path | None


def import_kohya_ss(json_path: str | Path, toml_path: str | Path) -> Imported:
    """Convert a kohya_ss JSON and write the TOML (and its sample prompt file beside it), atomically."""
    data = read_kohya_json(json_path)
    toml_path = Path(toml_path)
    prompts_path = toml_path.with_name(f"{toml_path.stem}-prompts.txt").resolve()
    try:
        keys, notes, prompts = convert_kohya_ss(data, str(prompts_path))
    except ValueError as e:
        raise ValueError(f"{json_path}: {e}") from None
    header = [f"converted from the kohya_ss config {Path(json_path).name} by `lorakit import-config`",
              f"run with: lorakit train {toml_path.name}"] + [f"note: {n}" for n in notes]
    if prompts is not None:
        atomic_write(prompts_path, prompts.rstrip("\n") + "\n")
    atomic_write(toml_path, to_toml(keys, header))
    return Imported(toml_path, notes, prompts_path if prompts is not None else None)
