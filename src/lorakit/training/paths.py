"""Every path a training config names, checked before anything heavy loads; all problems in one error.

Inputs must exist and be of the right kind (a folder of images, a TOML, a LoRA file, a resume state that the
weights-only loader accepts); outputs must be folders we can write (not files, not read-only). Each line
names the key, the path and the fix.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

from lorakit.training.schema import TrainConfig

STATE_FILE = "state.pt"  # the same name lorakit.training.state writes


def path_problems(config: TrainConfig) -> list[str]:
    out = []
    out += _input(config, "train_data_dir", folder=True)
    out += _input(config, "reg_data_dir", folder=True)
    out += _input(config, "dataset_config", folder=False)
    out += _input(config, "sample_prompts", folder=False)
    out += _input(config, "network_weights", folder=False)
    model = config.pretrained_model_name_or_path
    if model and not Path(model).exists():
        out.append(f"pretrained_model_name_or_path = {model!r}: no such file or folder (a .safetensors single "
                   "file or a diffusers folder; unset = the embedded tiny model)")
    out += _resume(config.resume)
    out += _output(config, "output_dir")
    out += _output(config, "logging_dir")
    out += _output(config, "latent_cache_dir")
    return out


def _input(config: TrainConfig, key: str, folder: bool) -> list[str]:
    value = getattr(config, key)
    if not value:
        return []
    path = Path(value)
    if not path.exists():
        return [f"{key} = {value!r}: does not exist"]
    if folder and not path.is_dir():
        return [f"{key} = {value!r}: is a file; it must be a folder (of `N_name` subfolders)"]
    if not folder and path.is_dir():
        return [f"{key} = {value!r}: is a folder; it must be a file"]
    if not os.access(path, os.R_OK):
        return [f"{key} = {value!r}: not readable by this user"]
    return []


def _output(config: TrainConfig, key: str) -> list[str]:
    value = getattr(config, key)
    if not value:
        return []
    path = Path(value)
    if path.exists() and not path.is_dir():
        return [f"{key} = {value!r}: is a file; give a folder (it is created if missing)"]
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        return [f"{key} = {value!r}: {existing} is not a writable folder; choose another place or fix its "
                "permissions"]
    return []


def _resume(value: str | None) -> list[str]:
    if not value:
        return []
    folder = Path(value)
    state = folder / STATE_FILE
    if not state.is_file():
        return [f"resume = {value!r}: no {STATE_FILE} there; resume takes the `<output_name>-state` folder that "
                "an interrupted run or save_state wrote"]
    import torch

    try:  # the weights-only loader runs no code; a refusal here is a foreign or hostile file
        torch.load(state, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        return [f"resume = {value!r}: {state} is refused by the weights-only loader, so none of its code ran "
                f"({str(e).splitlines()[0]}); it is not a state lorakit wrote"]
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        return [f"resume = {value!r}: {state} is damaged ({e}); resume from an intact state folder or start anew"]
    return []
