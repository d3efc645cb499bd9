"""Atomic file writes: a temp file in the same folder, fsync, rename, then fsync the folder.

A crash, a Ctrl-C or a full disk never leaves a half-written file, and an existing file stays intact until
the new one is complete. Every file lorakit writes (LoRAs, training state, samples, grids, reports) goes
through here. Files get normal permissions (the replaced file's mode, else 0666 & ~umask, as kohya's and
every other tool's files), so ComfyUI or a web server running as another user can read them. A temp file
left by a killed process (`.NAME.<pid>.<random>.tmp`) is removed by `remove_stale_temp_files`.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

_UMASK_LOCK = threading.Lock()
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # .NAME.<pid>.<random>.tmp


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write bytes, UTF-8 text, or whatever `data(file)` writes, to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # the rename itself survives a power cut only once the folder is synced
    return path


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        with _UMASK_LOCK:  # the umask can only be read by setting it
            umask = os.umask(0o022)
            os.umask(umask)
        return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without folder handles (Windows): the rename is as durable as it gets there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files that killed lorakit processes left in `folder`; returns what was removed.

    A temp file whose process is still alive (another run saving right now) is kept."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_file() and not _process_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
