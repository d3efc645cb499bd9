"""`lorakit sweep CONFIG.toml --axis conv_dim=0,8,32 --axis conv_alpha=1,half,equal`: the brief's
systematic experiment as one command.

Every combination of the axes is trained one after another (each in its own folder, every epoch saved),
then rendered with the same prompts and seeds, measured, diagnosed and reported. A finished variant
leaves a `done.json`; an interrupted one its training state; running the same command again skips the
first and resumes the second, so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorakit.evaluation.runs import EvalPlan, RunEvaluation, epoch_files, evaluate_run, render_set, training_images
from lorakit.evaluation.grid import Renderer
from lorakit.evaluation.sweep_report import write_sweep_report
from lorakit.formats.atomic import atomic_write
from lorakit.training.config import FIELDS, ConfigError, build_config, default_of, did_you_mean
from lorakit.training.trainer import Trainer

RELATIVE_ALPHA = {"conv_alpha": "conv_dim", "network_alpha": "network_dim"}  # alpha axis -> its dim


@dataclass
class Variant:
    name: str
    settings: dict[str, object]


def parse_axis(text: str) -> tuple[str, list[str]]:
    key, eq, values = text.partition("=")
    key = key.strip()
    if not eq or not values.strip():
        raise ConfigError(f"--axis {text!r}: expected key=value1,value2 (e.g. conv_dim=0,8,32)")
    if key not in FIELDS:
        raise ConfigError(f"--axis {key!r} is not a training setting{did_you_mean(key, FIELDS)}")
    return key, [v.strip() for v in values.split(",") if v.strip()]


def variants(base: dict, axes: list[tuple[str, list[str]]]) -> list[Variant]:
    """Every combination; `half`/`equal` alphas resolve against the variant's dim; conv settings are
    dropped where conv_dim is 0 (duplicates then collapse into one variant)."""
    out, seen = [], set()
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in axes]):
        settings = dict(combo)
        for alpha, dim_key in RELATIVE_ALPHA.items():
            word = str(settings.get(alpha, "")).lower()
            if word in ("half", "equal"):
                dim = float(settings.get(dim_key, base.get(dim_key, default_of(dim_key))) or 0)
                settings[alpha] = dim / 2 if word == "half" else dim
        if float(settings.get("conv_dim", base.get("conv_dim", 0)) or 0) == 0:
            settings.pop("conv_alpha", None)
        key = json.dumps(settings, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        name = "_".join(f"{k}-{_short(v)}" for k, v in settings.items()) or "base"
        out.append(Variant(re.sub(r"[^A-Za-z0-9_.-]", "", name), settings))
    return out


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def train_variant(base: dict, variant: Variant, root: Path, device=None) -> Path:
    """Train one variant unless it is done; resume it if it was interrupted. Returns its folder."""
    folder = root / variant.name
    if (folder / "done.json").is_file():
        return folder
    values = {**base, **variant.settings, "output_dir": str(folder), "output_name": variant.name,
              "save_state": True}
    values.setdefault("save_every_n_epochs", 1)
    state = folder / f"{variant.name}-state"
    if (state / "state.pt").is_file():
        values["resume"] = str(state)
    config = build_config(values, f"sweep variant {variant.name}")
    result = Trainer(config, device).run()
    summary = {"settings": variant.settings, "steps": result.steps, "seconds": result.seconds,
               "final_loss": result.losses[-1], "files": [str(p) for p in result.files]}
    atomic_write(folder / "done.json", json.dumps(summary, indent=1, default=str))
    shutil.rmtree(state, ignore_errors=True)  # done: the resume state is no longer needed
    return folder


def train_in_turn(base: dict, chosen: list[Variant], root: Path, device=None) -> None:
    for n, variant in enumerate(chosen, 1):
        print(f"[sweep {n}/{len(chosen)}] {variant.name}" + (f" on {device}" if device else ""), flush=True)
        train_variant(base, variant, root, device)


def train_spread(base: dict, chosen: list[Variant], root: Path, devices: list[str]) -> None:
    """One worker process per device, each training its share of the variants in turn (spawned, not
    forked: CUDA does not survive a fork)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(devices), mp_context=context) as pool:
        jobs = [pool.submit(train_in_turn, base, chosen[i::len(devices)], root, device)
                for i, device in enumerate(devices)]
        for job in jobs:
            job.result()  # re-raises a worker's error here


def run_sweep(base: dict, axes: list[tuple[str, list[str]]], root: str | Path, plan: EvalPlan,
              devices: list[str] | None = None, renderer: Renderer | None = None, style=None, findings=None) -> dict:
    """Train every variant (spread over `devices` when there are several), then evaluate and report.
    style, findings: as evaluate_sweep."""
    root = Path(root)
    chosen = variants(base, axes)
    for variant in chosen:  # build every config first: a bad combination fails before any training
        build_config({**base, **variant.settings}, f"sweep variant {variant.name}")
    if devices and len(devices) > 1:
        train_spread(base, chosen, root, devices)
    else:
        train_in_turn(base, chosen, root, devices[0] if devices else None)
    return evaluate_sweep(base, chosen, root, plan, renderer, style, findings)


def dataset_images(base: dict, size: int) -> list:
    """The training images of a config (folder or dataset TOML), for the fidelity metric."""
    from lorakit.training.dataset import load_specs

    source = base.get("dataset_config") or base.get("train_data_dir")
    if not source:
        raise ConfigError("the sweep config names no training data (train_data_dir or dataset_config)")
    specs, _ = load_specs(source, str(base.get("caption_extension", ".txt")), size)
    return [image for spec in specs for subset in spec.subsets for image in training_images(subset.image_dir, size)]


def report_run(folder: str | Path, output_name: str, plan: EvalPlan, data_dir: str, base_model: str | None = None,
               conv_dim: int = 0) -> dict:
    """`lorakit report`: the same measurements, verdicts and HTML page for one finished training run."""
    folder = Path(folder)
    files = epoch_files(folder, output_name)
    if not files:
        raise ConfigError(f"{folder}: no {output_name}*.safetensors files (set --name to the run's output_name)")
    renderer = Renderer(base_model)
    data = training_images(data_dir, plan.size)
    evaluation = evaluate_run(renderer, files, plan, data, output_name, conv_dim, folder=str(folder))
    summary = {"evaluations": [evaluation.to_json()], "plan": plan.__dict__}
    summary["report"] = str(write_sweep_report(folder, [Variant(output_name, {})], [evaluation], plan, renderer,
                                               title=f"lorakit run: {output_name}"))
    return summary


def evaluate_sweep(base: dict, chosen: list[Variant], root: Path, plan: EvalPlan,
                   renderer: Renderer | None = None, style=None, findings=None) -> dict:
    """style: a detector (image -> score) for the verdicts' style signal; findings: (evaluations) -> plain words
    on what the comparison found, shown in the report under the verdict table and kept in the summary."""
    renderer = renderer or Renderer(base.get("pretrained_model_name_or_path"))
    data = dataset_images(base, plan.size)
    base_set = render_set(renderer, plan, "none")
    evaluations: list[RunEvaluation] = []
    for variant in chosen:
        files = epoch_files(root / variant.name, variant.name)
        conv_dim = int(float(variant.settings.get("conv_dim", base.get("conv_dim", 0)) or 0))
        evaluations.append(evaluate_run(renderer, files, plan, data, variant.name, conv_dim, base=base_set,
                                        folder=str(root / variant.name), style=style))
    summary = {"variants": [v.__dict__ for v in chosen], "evaluations": [e.to_json() for e in evaluations],
               "plan": plan.__dict__}
    summary["findings"] = findings(evaluations) if findings else None
    atomic_write(root / "sweep.json", json.dumps(summary, indent=1, default=str))
    summary["report"] = str(write_sweep_report(root, chosen, evaluations, plan, renderer,
                                               findings=summary["findings"]))
    return summary
