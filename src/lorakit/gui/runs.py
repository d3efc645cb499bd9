"""Training as a background process: start, stop, resume, and progress read from the files the run writes.

A run is `python -m lorakit.cli train <output_dir>/<output_name>.toml`, an argument list (never a shell
string), so what the GUI starts is exactly what the saved TOML says and what a user could rerun by hand.
Stop sends SIGINT: the trainer finishes the step, saves the LoRA and its state, and exits with 130; Resume
starts the same TOML with `--resume <output_name>-state`. Progress comes from `<output_name>-history.json`
(the trainer rewrites it every few seconds), samples from `sample/`, errors from the run's log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.gui.paths import Roots
from lorakit.gui.settings import save_settings

INTERRUPTED = 130  # the trainer's exit code after saving the state on SIGINT/SIGTERM


@dataclass(frozen=True)
class RunFiles:
    output_dir: Path
    name: str

    @property
    def toml(self) -> Path:
        return self.output_dir / f"{self.name}.toml"

    @property
    def log(self) -> Path:
        return self.output_dir / f"{self.name}-train.log"

    @property
    def history(self) -> Path:
        return self.output_dir / f"{self.name}-history.json"

    @property
    def state_dir(self) -> Path:
        return self.output_dir / f"{self.name}-state"

    def samples(self, since: float = 0.0) -> list[Path]:
        folder = self.output_dir / "sample"
        found = sorted(folder.glob(f"{self.name}_e*.png")) if folder.is_dir() else []
        return [p for p in found if p.stat().st_mtime >= since]

    def can_resume(self) -> bool:
        return (self.state_dir / "state.pt").is_file()


@dataclass
class RunStatus:
    state: str  # idle, running, finished, interrupted, failed
    step: int = 0
    total: int | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    log_tail: str = ""
    returncode: int | None = None
    can_resume: bool = False

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        loss = f", loss {self.losses[-1][1]:.4f}" if self.losses else ""
        code = f" (exit code {self.returncode})" if self.returncode not in (None, 0) else ""
        return f"{self.state}: step {self.step}{total}{loss}{code}"


def _read_history(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet (the run is loading the model)
        return {}


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws its bar with carriage returns: keep the last drawing of each line
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


class RunManager:
    """One training process at a time, owned by this GUI."""

    def __init__(self, roots: Roots):
        self.roots = roots
        self.files: RunFiles | None = None
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._since = 0.0  # samples older than this belong to an earlier run

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, values: dict, conv_layers: int, resume: bool = False, preset: str | None = None) -> RunFiles:
        with self._lock:
            if self.running():
                raise RuntimeError("a training run is already going; stop it first")
            output_dir = self.roots.check(values.get("output_dir") or "output", "output folder")
            files = RunFiles(output_dir, str(values.get("output_name") or "lora"))
            if resume and not files.can_resume():
                raise RuntimeError(f"nothing to resume: {files.state_dir} holds no saved state (a stopped run "
                                   "saves one)")
            save_settings(values, files.toml, conv_layers, self.roots, preset)
            if not resume:  # a new run: progress and samples of an earlier run of that name are not its own
                files.history.unlink(missing_ok=True)
            self._since = 0.0 if resume else time.time()
            argv = [sys.executable, "-m", "lorakit.cli", "train", str(files.toml)]
            if resume:
                argv += ["--resume", str(files.state_dir)]
            with open(files.log, "w", encoding="utf-8") as log:
                self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=output_dir,
                                                 env=self._child_env(), start_new_session=True)
            self.files = files
            return files

    @staticmethod
    def _child_env() -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("HF_HUB_OFFLINE", "1")  # lorakit never downloads; say so to the libraries too
        return env

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGINT, then wait for the trainer to save its state; the exit code (130 = state saved)."""
        process = self._process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # a second chance would not help: the state is lost either way, say so in the log
            return process.wait()

    def status(self) -> RunStatus:
        files = self.files
        if files is None:
            return RunStatus("idle")
        history = _read_history(files.history)
        steps = history.get("steps", [])
        code = self._process.poll() if self._process else None
        state = "running" if code is None else {0: "finished", INTERRUPTED: "interrupted"}.get(code, "failed")
        return RunStatus(state=state, step=steps[-1]["step"] if steps else 0, total=history.get("total_steps"),
                         losses=[(s["step"], s["loss"]) for s in steps], samples=files.samples(self._since),
                         log_tail=_tail(files.log), returncode=code, can_resume=files.can_resume())

    def wait(self, timeout: float | None = None) -> int | None:
        return self._process.wait(timeout) if self._process else None
