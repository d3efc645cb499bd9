"""Judge a training run: render fixed prompts and seeds for every saved epoch and for the base model,
measure them (metrics.py), and give verdicts (diagnose.py) and a best epoch.

The plan is what to render: prompts in the trained concept/style, prompts unrelated to it (for drift),
seeds, steps and CFG. Every image is rendered one at a time from (prompt, seed), as in the grids.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

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


def data_stats(images: list[np.ndarray]) -> dict[str, float]:
    return {"saturation": metrics.saturation(images), "artefacts": metrics.artefacts(images)}


def evaluate_run(renderer: Renderer, files: dict[int, Path], plan: EvalPlan, data: list[np.ndarray],
                 name: str = "run", conv_dim: int = 0, base: tuple | None = None, folder: str = "") -> RunEvaluation:
    """base: a (by_prompt, unrelated) base-model sample set to reuse across runs of a sweep."""
    base_set, base_unrelated = base or render_set(renderer, plan, "none")
    base_metrics = metrics.sample_set_metrics(base_set, data, base_unrelated, base_unrelated)
    stats = data_stats(data)
    per_epoch, verdicts = {}, {}
    for epoch, path in files.items():
        by_prompt, unrelated = render_set(renderer, plan, str(path))
        per_epoch[epoch] = metrics.sample_set_metrics(by_prompt, data, unrelated, base_unrelated)
        found = diagnose.diagnose(per_epoch[epoch], base_metrics, stats, conv_dim)
        verdicts[epoch] = [{"kind": v.kind, "line": v.line(), "evidence": v.evidence} for v in found]
    renderer.close()
    best, why = diagnose.best_epoch(per_epoch, base_metrics, stats)
    return RunEvaluation(name, conv_dim, per_epoch, base_metrics, stats, verdicts, best, why,
                         {e: str(p) for e, p in files.items()}, folder)


def load_history(run_dir: str | Path, output_name: str) -> dict:
    path = Path(run_dir) / f"{output_name}-history.json"
    return json.loads(path.read_text()) if path.is_file() else {"steps": [], "norms": [], "samples": []}
