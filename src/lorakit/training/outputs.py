"""What a run leaves behind when it saves or stops: LoRA files with kohya metadata, and stop requests."""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import torch

from lorakit.formats.files import save_network
from lorakit.training.optim import plan_optimizer


class TrainingStopped(RuntimeError):
    """The run stopped early (NaN/inf loss, a failed save); the message says where and what is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the current LoRA and the training state were saved; `--resume state_dir` continues."""

    def __init__(self, message: str, lora: Path, state_dir: Path):
        super().__init__(message)
        self.lora, self.state_dir = lora, state_dir


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request the loop honours at the next step boundary (so the
    state saved is consistent); a second SIGINT interrupts at once. Handlers live only inside `with`."""

    def __init__(self):
        self.requested, self.signal_name, self._previous = False, "", {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lora_metadata(trainer, progress) -> dict[str, str]:
    cfg, report = trainer.config, trainer.report
    dirs = {Path(s.image_dir).name: {"n_repeats": s.num_repeats,
                                     "img_count": sum(1 for i in report.items if i.subset is s)}
            for spec in trainer.specs for s in spec.subsets}
    return {"ss_epoch": str(progress.epoch), "ss_steps": str(progress.step),
            "ss_learning_rate": str(cfg.learning_rate), "ss_unet_lr": str(cfg.unet_lr),
            "ss_text_encoder_lr": str(cfg.text_encoder_lr),
            "ss_optimizer": plan_optimizer(cfg.optimizer_type, cfg.optimizer_args).description,
            "ss_max_grad_norm": str(cfg.max_grad_norm), "ss_scale_weight_norms": str(cfg.scale_weight_norms),
            "ss_training_comment": str(cfg.training_comment),
            "ss_lr_scheduler": cfg.lr_scheduler, "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
            "ss_num_train_images": str(report.num_train_images), "ss_seed": str(cfg.seed),
            "ss_resolution": f"({cfg.resolution[0]}, {cfg.resolution[1]})", "ss_clip_skip": str(cfg.clip_skip),
            "ss_noise_offset": str(cfg.noise_offset), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_mixed_precision": cfg.mixed_precision, "ss_batch_size_per_device": str(trainer.specs[0].batch_size),
            "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
            "ss_num_processes": str(trainer.procs.world),
            "ss_sd_model_name": Path(trainer.base.source).name, "ss_max_train_steps": str(trainer.total_steps()),
            "ss_tag_frequency": json.dumps({k: dict(v) for k, v in report.tag_frequency.items()}),
            "ss_dataset_dirs": json.dumps(dirs)}


def save_lora(trainer, path: Path, progress) -> Path:
    cfg = trainer.config
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.save_precision)
    try:
        return save_network(trainer.network, path, dtype=dtype, title=path.stem,
                            metadata=lora_metadata(trainer, progress),
                            v_prediction=trainer.base.prediction_type == "v_prediction", minimal=cfg.no_metadata)
    except OSError as e:
        raise TrainingStopped(f"could not write {path} ({e.strerror or e}); any earlier file of that name is "
                              "intact. Free disk space, then continue with --resume if a state was saved") from None


# ---- file names and kohya's save_last_n_* rotation -------------------------------------------------------------
def epoch_file_stem(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"  # kohya's EPOCH_FILE_NAME


def step_file_stem(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"  # kohya's STEP_FILE_NAME


def removed_epoch(epoch: int, every: int, last_n: int | None) -> int | None:
    """kohya's get_remove_epoch_no: saving epoch e deletes the file of epoch e - every·last_n, so the last
    last_n epoch files remain (the final file is apart from these)."""
    if not last_n:
        return None
    old = epoch - every * last_n
    return old if old > 0 else None


def removed_step(step: int, every: int, last_n: int | None) -> int | None:
    """kohya's get_remove_step_no: saving step s deletes the save at s - last_n - 1 rounded down to a multiple
    of every, so the step files of the last last_n steps remain."""
    if not last_n:
        return None
    old = step - last_n - 1
    old -= old % every
    return old if old > 0 else None
