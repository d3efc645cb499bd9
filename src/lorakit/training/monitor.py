"""What a run reports while it trains: TensorBoard scalars and a JSON history beside the LoRA files.

TensorBoard (when `logging_dir` is set): loss, the held-out validation loss (`loss/validation`, when
validation_split is set), learning rate per group, and per block the norm of ΔW split
into attention/linear and conv layers (`dW_attention/IN04`, `dW_conv/OUT03`), the numbers that say which
part learns and which bakes in. The history file (`{output_name}-history.json`) keeps the same numbers for
lorakit's own report and diagnostics; it is rewritten atomically at each epoch end and, while steps run, at
most every `flush_every_s` seconds, so a watcher (the GUI) sees live progress against `total_steps`.

With `log_prefix` the events go into `logging_dir/<log_prefix><YYYYmmddHHMMSS>`, one folder per run as kohya
names them; the history records that folder, so a resumed run writes on in the same one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lorakit.formats.atomic import atomic_write


class Monitor:
    def __init__(self, history_path: str | Path, logging_dir: str | Path | None = None, resume_step: int = 0,
                 total_steps: int | None = None, flush_every_s: float = 2.0, log_prefix: str | None = None):
        self.path = Path(history_path)
        self.history = {"steps": [], "norms": [], "samples": [], "validation": []}
        old = {}
        if resume_step and self.path.is_file():  # keep what happened before the interruption, drop the rest
            old = json.loads(self.path.read_text())
            self.history = {key: [e for e in old.get(key, []) if e["step"] <= resume_step] for key in self.history}
        self.history["total_steps"] = total_steps
        self.flush_every_s, self._flushed_at = flush_every_s, time.monotonic()
        self.writer, self.log_dir = None, None
        if logging_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir = run_log_dir(logging_dir, log_prefix, old.get("log_dir"))
            self.history["log_dir"] = str(self.log_dir)
            self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1 if resume_step else None)

    def step(self, step: int, epoch: int, loss: float, lrs: dict[str, float],
             scalars: dict[str, float] | None = None) -> None:
        """scalars: more TensorBoard tags for this step (max_norm/keys_scaled, ...), kept in the history too."""
        entry = {"step": step, "epoch": epoch, "loss": loss, "lr": lrs}
        self.history["steps"].append({**entry, "scalars": scalars} if scalars else entry)
        if self.writer:
            self.writer.add_scalar("loss/current", loss, step)
            for name, lr in lrs.items():
                self.writer.add_scalar(f"lr/{name}", lr, step)
            for tag, value in (scalars or {}).items():
                self.writer.add_scalar(tag, value, step)
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def norms(self, step: int, epoch: int, norms: dict[str, dict[str, float]]) -> None:
        """norms: block -> {"linear": ‖ΔW‖, "conv": ‖ΔW‖} (LoraNetwork.delta_norms)."""
        self.history["norms"].append({"step": step, "epoch": epoch, "blocks": norms})
        if self.writer:
            for block, parts in norms.items():
                self.writer.add_scalar(f"dW_attention/{block}", parts["linear"], step)
                if parts["conv"]:
                    self.writer.add_scalar(f"dW_conv/{block}", parts["conv"], step)

    def validation(self, record: dict) -> None:
        """record: {"step", "epoch", "loss", "kind" ("split" | "caption_only"), "images", "timesteps"}, as
        training/validation.py computes it; TensorBoard tag loss/validation. Written out at once: it is rare."""
        self.history["validation"].append(record)
        if self.writer:
            self.writer.add_scalar("loss/validation", record["loss"], record["step"])
        self.flush()

    def samples(self, step: int, epoch: int, paths: list[Path]) -> None:
        self.history["samples"].append({"step": step, "epoch": epoch, "files": [p.name for p in paths]})

    def flush(self) -> None:
        atomic_write(self.path, json.dumps(self.history, indent=1))
        self._flushed_at = time.monotonic()
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.writer:
            self.writer.close()


def run_log_dir(logging_dir: str | Path, log_prefix: str | None, resumed: str | None = None) -> Path:
    """Where TensorBoard events go: logging_dir itself, or with log_prefix kohya's per-run folder
    `<log_prefix><YYYYmmddHHMMSS>` inside it; a resumed run keeps the folder its history names."""
    if not log_prefix:
        return Path(logging_dir)
    if resumed and Path(resumed).parent == Path(logging_dir) and Path(resumed).name.startswith(log_prefix):
        return Path(resumed)
    return Path(logging_dir) / f"{log_prefix}{time.strftime('%Y%m%d%H%M%S', time.localtime())}"
