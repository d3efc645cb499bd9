"""Judge a training run: render fixed prompts and seeds for every saved epoch and for the base model,
measure them (metrics.py), and give verdicts (diagnose.py) and a best epoch.

The plan is what to render: prompts in the trained concept/style, prompts unrelated to it (for drift),
seeds, steps and CFG. Every image is rendered one at a time from (prompt, seed), as in the grids.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lorakit.evaluation import diagnose, metrics
from lorakit.evaluation.grid import Cell, Renderer
from lorakit.formats.safetensors_io import read_header


@dataclass
class EvalPlan:
    prompts: list[str]
    unrelated: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 12
    cfg: float = 5.0
    size: int = 64


@dataclass
class RunEvaluation:
    name: str
    conv_dim: int
    per_epoch: dict[int, dict[str, float]]
    base: dict[str, float]
    data: dict[str, float]
    verdicts: dict[int, list[dict]]
    best_epoch: int
    best_why: str
    files: dict[int, str]
    folder: str = ""  # where the run's files and history are

    def to_json(self) -> dict:
        return asdict(self)


def epoch_files(run_dir: str | Path, output_name: str) -> dict[int, Path]:
    """Every file of a run, by the epoch its metadata records (the final file included)."""
    files = {}
    for path in sorted(Path(run_dir).glob(f"{output_name}*.safetensors")):
        if "-step" in path.stem:  # interrupted-run snapshots are not epochs
            continue
        _, meta, _ = read_header(path)
        files[int(meta.get("ss_epoch", 0))] = path
    return dict(sorted(files.items()))


def training_images(folder: str | Path, size: int) -> list[np.ndarray]:
    paths = [p for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS)) for p in paths]


def render_set(renderer: Renderer, plan: EvalPlan, lora: str) -> tuple[dict[str, list], list]:
    cell = Cell(prompt="", lora=lora, steps=plan.steps, cfg=plan.cfg, width=plan.size, height=plan.size)
    by_prompt = {p: [renderer.image(replace(cell, prompt=p, seed=s)) for s in plan.seeds]
                 for p in plan.prompts}
    unrelated = [renderer.image(replace(cell, prompt=p, seed=s))
                 for p in plan.unrelated for s in plan.seeds]
    return by_prompt, unrelated


def data_stats(images: list[np.ndarray], style: Callable[[np.ndarray], float] | None = None) -> dict[str, float]:
    stats = {"saturation": metrics.saturation(images), "artefacts": metrics.artefacts(images)}
    return {**stats, "style": float(np.mean([style(i) for i in images]))} if style else stats


def set_metrics(by_prompt: dict[str, list], data: list, unrelated: list, base_unrelated: list,
                style: Callable[[np.ndarray], float] | None = None) -> dict[str, float]:
    """metrics.sample_set_metrics, plus the mean of a style detector over the in-style samples when given."""
    found = metrics.sample_set_metrics(by_prompt, data, unrelated or None, base_unrelated or None)  # none: no drift
    if style:
        found["style"] = float(np.mean([style(i) for group in by_prompt.values() for i in group]))
    return found


def validation_by_epoch(history: dict) -> dict[int, dict]:
    """history["validation"] (training/validation.py) -> per epoch its last record (the epoch's end), with the
    base model's value (step 0, else the first record) and the lowest loss up to it: diagnose's input."""
    records = sorted(history.get("validation") or [], key=lambda r: r["step"])
    out = {}
    for n, record in enumerate(records):
        same = [r for r in records[:n + 1] if r["kind"] == record["kind"]]
        out[record["epoch"]] = {**record, "base": same[0]["loss"], "lowest": min(r["loss"] for r in same)}
    return out


def evaluate_run(renderer: Renderer, files: dict[int, Path], plan: EvalPlan, data: list[np.ndarray],
                 name: str = "run", conv_dim: int = 0, base: tuple | None = None, folder: str = "",
                 style: Callable[[np.ndarray], float] | None = None) -> RunEvaluation:
    """base: a (by_prompt, unrelated) base-model sample set to reuse across runs of a sweep. style: a detector
    (image -> score, training images high) that becomes the "style" signal of the verdicts. The run's
    validation loss is read from its history in `folder` (output name `name`) when it recorded one."""
    base_set, base_unrelated = base or render_set(renderer, plan, "none")
    base_metrics = set_metrics(base_set, data, base_unrelated, base_unrelated, style)
    stats = data_stats(data, style)
    validation = validation_by_epoch(load_history(folder, name)) if folder else {}
    per_epoch, verdicts = {}, {}
    for epoch, path in files.items():
        by_prompt, unrelated = render_set(renderer, plan, str(path))
        per_epoch[epoch] = set_metrics(by_prompt, data, unrelated, base_unrelated, style)
        if epoch in validation:
            per_epoch[epoch]["validation_loss"] = validation[epoch]["loss"]
        found = diagnose.diagnose(per_epoch[epoch], base_metrics, stats, conv_dim, validation.get(epoch))
        verdicts[epoch] = [v.to_json() for v in found]
    renderer.close()
    best, why = diagnose.best_epoch(per_epoch, base_metrics, stats, validation)
    return RunEvaluation(name, conv_dim, per_epoch, base_metrics, stats, verdicts, best, why,
                         {e: str(p) for e, p in files.items()}, folder)


def load_history(run_dir: str | Path, output_name: str) -> dict:
    path = Path(run_dir) / f"{output_name}-history.json"
    return json.loads(path.read_text()) if path.is_file() else {"steps": [], "norms": [], "samples": [],
                                                                 "validation": []}
