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
        """A saved state the run did not finish from. A finished run (its history reached total_steps) leaves
        nothing to resume, though the state it resumed from may still be on disk."""
        if not (self.state_dir / "state.pt").is_file():
            return False
        history = _read_history(self.history)
        steps, total = history.get("steps") or [], history.get("total_steps")
        return not (steps and total and steps[-1]["step"] >= total)


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


class BackgroundProcess:
    """One child process started from an argument list (never a shell string), output to a log file."""

    def __init__(self):
        self._process: subprocess.Popen | None = None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def launch(self, argv: list[str], log_path: Path, cwd: Path) -> None:
        if self.running():
            raise RuntimeError("a job is already going; stop it first")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("HF_HUB_OFFLINE", "1")  # lorakit never downloads; say so to the libraries too
        with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own handle
            self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                             start_new_session=True)  # the GUI's Ctrl-C is not the run's

    def poll(self) -> int | None:
        return self._process.poll() if self._process else None

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGINT (lorakit saves what it has), then wait; kill only if it does not end in `timeout`."""
        process = self._process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def wait(self, timeout: float | None = None) -> int | None:
        return self._process.wait(timeout) if self._process else None


def lorakit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli", *args]


class RunManager:
    """One training process at a time, owned by this GUI."""

    def __init__(self, roots: Roots):
        self.roots = roots
        self.files: RunFiles | None = None
        self.process = BackgroundProcess()
        self._lock = threading.Lock()
        self._since = 0.0  # samples older than this belong to an earlier run

    def running(self) -> bool:
        return self.process.running()

    def start(self, values: dict, conv_layers: int, resume: bool = False, preset: str | None = None) -> RunFiles:
        with self._lock:
            if self.running():
                raise RuntimeError("a training run is already going; stop it first")
            output_dir = self.roots.check(values.get("output_dir") or "output", "output folder")
            files = RunFiles(output_dir, str(values.get("output_name") or "lora"))
            if resume and not files.can_resume():
                raise RuntimeError(f"nothing to resume: {files.state_dir} holds no saved state of an unfinished "
                                   "run (a stopped run saves one)")
            save_settings(values, files.toml, conv_layers, self.roots, preset)
            if not resume:  # a new run: progress and samples of an earlier run of that name are not its own
                files.history.unlink(missing_ok=True)
            self._since = 0.0 if resume else time.time()
            argv = lorakit_command("train", str(files.toml))
            self.process.launch(argv + (["--resume", str(files.state_dir)] if resume else []), files.log, output_dir)
            self.files = files
            return files

    def stop(self, timeout: float = 120.0) -> int | None:
        """Ask the trainer to stop (it saves the LoRA and its state, then exits 130)."""
        return self.process.stop(timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        return self.process.wait(timeout)

    def can_resume(self, output_dir: str, output_name: str) -> bool:
        """Whether Resume applies to the run these settings name: not while a run goes, and only from a
        state that run did not finish."""
        if self.running():
            return False
        try:
            folder = self.roots.check(output_dir or "output", "output folder")
        except ValueError:
            return False
        return RunFiles(folder, str(output_name or "lora")).can_resume()

    def status(self) -> RunStatus:
        files = self.files
        if files is None:
            return RunStatus("idle")
        history = _read_history(files.history)
        steps = history.get("steps", [])
        code = self.process.poll()
        state = "running" if code is None else {0: "finished", INTERRUPTED: "interrupted"}.get(code, "failed")
        return RunStatus(state=state, step=steps[-1]["step"] if steps else 0, total=history.get("total_steps"),
                         losses=[(s["step"], s["loss"]) for s in steps], samples=files.samples(self._since),
                         log_tail=_tail(files.log), returncode=code, can_resume=files.can_resume())
