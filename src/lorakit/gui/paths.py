"""Root folders: every path the GUI reads or writes must lie inside one of them.

Paths are resolved (symlinks and `..` followed) before the check, so `root/../etc` or a link that points out
of a root is refused. The GUI is a local tool, but a page left open to a network must not become a way to
read or overwrite arbitrary files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODEL_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIX = ".safetensors"


class PathNotAllowed(ValueError):
    """A path outside the configured root folders."""


@dataclass(frozen=True)
class Roots:
    folders: tuple[Path, ...]

    @staticmethod
    def of(folders: list[str | os.PathLike] | None) -> "Roots":
        chosen = folders or [Path.cwd()]
        return Roots(tuple(Path(f).expanduser().resolve() for f in chosen))

    def check(self, path: str | os.PathLike, what: str = "path") -> Path:
        """The resolved path, or PathNotAllowed naming the roots."""
        if not str(path).strip():
            raise PathNotAllowed(f"{what}: empty path")
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = self.folders[0] / candidate  # relative paths are relative to the first root
        resolved = candidate.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.folders):
            allowed = ", ".join(str(r) for r in self.folders)
            raise PathNotAllowed(f"{what} {path!r} is outside the allowed folders ({allowed}); start "
                                 "`lorakit gui --root DIR` to allow another folder")
        return resolved

    def existing(self, path: str | os.PathLike, what: str = "path") -> Path:
        resolved = self.check(path, what)
        if not resolved.exists():
            raise PathNotAllowed(f"{what} {path!r}: no such file or folder")
        return resolved

    def find_models(self, limit: int = 200) -> list[str]:
        """Single-file checkpoints and diffusers folders under the roots, for the base-model picker."""
        found: list[str] = []
        for root in self.folders:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                if "model_index.json" in filenames:
                    found.append(dirpath)
                    dirnames[:] = []  # a diffusers folder's parts are not models of their own
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.endswith(MODEL_SUFFIXES) and not _looks_like_lora(dirpath, f)]
                if len(found) >= limit:
                    return found[:limit]
        return found


def _looks_like_lora(dirpath: str, filename: str) -> bool:
    """A .safetensors without U-Net weights is a LoRA (or a VAE...), not a base model; headers only."""
    if not filename.endswith(LORA_SUFFIX):
        return False
    from lorakit.formats.safetensors_io import LoraFileError, read_header

    try:
        entries = read_header(os.path.join(dirpath, filename))[0]
    except (LoraFileError, OSError):
        return True
    return not any(key.startswith("model.diffusion_model.") for key in entries)
