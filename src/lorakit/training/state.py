"""Training state on disk: what `lorakit train --resume DIR` needs to continue exactly where a run stopped.

A state folder holds one `state.pt` (adapter weights, optimizer and LR-schedule state, progress, losses)
and the run's settings as `config.json`. Randomness is not stored: the trainer derives every random draw
from (seed, epoch) and (seed, micro-batch index), so a resumed run replays the same draws as an
uninterrupted one. The file is written to a temporary name and renamed, so a crash or a full disk during a
save leaves the previous state intact.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit.formats.atomic import atomic_write

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
# settings that change what the saved tensors mean; anything else (LR, steps, outputs) may change on resume
# (the module set, each module's tensors, or the optimizer's param groups)
SHAPE_KEYS = ("algo", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "block_dims", "block_alphas",
              "conv_block_dims", "conv_block_alphas", "network_train_unet_only",
              "network_train_text_encoder_only", "seed", "optimizer_type",
              "network_module", "lycoris_preset", "use_tucker", "use_scalar", "factor", "decompose_both",
              "full_matrix", "unbalanced_factorization", "train_norm", "block_lr_weights", "down_lr_weight",
              "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio",
              "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "dim_from_weights",
              "dora_wd", "wd_on_output")


class ResumeError(ValueError):
    """The resume folder is missing, damaged, or was made with settings that cannot continue here."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # micro-batches of this epoch already consumed
    micro: int = 0  # micro-batches consumed in all
    losses: list[float] = field(default_factory=list)


def save_state(folder: str | Path, network, optimizer, scheduler, progress: Progress, settings: dict,
               scaler=None) -> Path:
    """scaler: fp16's GradScaler, whose loss scale and growth counter a resumed run must continue from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"network": network.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "progress": asdict(progress)}
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    atomic_write(folder / STATE_FILE, lambda f: torch.save(payload, f))
    atomic_write(folder / CONFIG_FILE, json.dumps(settings, indent=1, default=str))
    return folder


def load_state(folder: str | Path, network, optimizer, scheduler, settings: dict, scaler=None) -> Progress:
    """Restore network/optimizer/scheduler in place; refuse a state made with different network settings."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"{folder}: no {STATE_FILE} here; --resume takes the `<output_name>-state` folder that "
                          "an interrupted run or save_state wrote")
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{folder / CONFIG_FILE}: unreadable ({e}); it records the run's settings: restore it "
                          "or start a new run") from None
    changed = [k for k in SHAPE_KEYS if k in saved and json.dumps(saved[k], default=str)
               != json.dumps(settings.get(k), default=str)]
    if changed:
        raise ResumeError(f"{folder}: cannot resume with changed settings " + ", ".join(
            f"{k} ({saved[k]!r} -> {settings.get(k)!r})" for k in changed) + "; start a new run instead")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(payload["network"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        return Progress(**payload["progress"])
    except pickle.UnpicklingError as e:  # weights-only loading refused an object: nothing ran, say so plainly
        raise ResumeError(f"{path}: refused by the weights-only loader, so none of its code ran ({e}); this is "
                          "not a state lorakit wrote. Resume from a `<output_name>-state` folder of a lorakit "
                          "run, or start a new run") from None
    except (RuntimeError, KeyError, TypeError, EOFError, ValueError, OSError) as e:
        raise ResumeError(f"{path}: cannot restore the training state ({e}); the file is damaged or from another "
                          "lorakit version: start a new run or resume from an intact state folder") from None
