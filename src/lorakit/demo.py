"""`lorakit demo` (= `make demo`): the main job on the embedded tiny model, in a few minutes on a CPU.

A procedural style the base model has never seen (a sepia colour grade over its usual shapes) is written as
a kohya-style dataset; an attention-only LoRA (conv_dim 0) and a LoCon (conv_dim 8) are trained on it with
the same settings otherwise; both are rendered with the same prompts and seeds at every epoch, measured
(style carried, fidelity to the data, drift on unrelated prompts, saturation, artefacts, diversity),
diagnosed, and written up as grids and one HTML report. It prints where everything is and what it shows.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lorakit.evaluation.grid import Cell, Renderer
from lorakit.evaluation.runs import EvalPlan
from lorakit.evaluation.sweep import run_sweep
from lorakit.models import styles

STYLE = "sepia"  # a colour grade: the tiny VAE draws colours faithfully but smooths fine textures away


def demo_settings(data: Path, epochs: int) -> dict:
    return dict(train_data_dir=str(data), resolution=64, train_batch_size=4, max_train_epochs=epochs,
                network_dim=8, network_alpha=8.0, learning_rate=3e-3, network_train_unet_only=True, seed=0,
                lr_scheduler="constant")


def style_scores(renderer: Renderer, files: list[str], plan: EvalPlan) -> dict[str, float]:
    """How much of the style each file's samples carry (the style's own detector; training images: 1.0)."""
    out = {}
    for lora in ["none", *files]:
        images = [renderer.image(Cell(p, seed=s, lora=lora, steps=plan.steps, cfg=plan.cfg))
                  for p in plan.prompts for s in plan.seeds]
        out[lora] = float(np.mean([styles.style_score(STYLE, i) for i in images]))
    renderer.close()
    return out


def run_demo(output: str | Path = "lorakit-demo", epochs: int = 6, seeds: int = 2) -> dict:
    start = time.time()
    out = Path(output)
    print("no base model given: using lorakit's embedded tiny SD model (64x64, runs on a CPU)")
    data = styles.write_style_dataset(out / "data", count=8, repeats=5, seed=0, style=STYLE)
    print(f"dataset: 8 {STYLE} images x 5 repeats in {data} (kohya layout, captions '<scene>, {STYLE}')")
    plan = EvalPlan(prompts=styles.style_prompts(3), unrelated=styles.unrelated_prompts(2),
                    seeds=list(range(seeds)), steps=12, cfg=5.0)
    axes = [("conv_dim", ["0", "8"]), ("conv_alpha", ["4"])]
    renderer = Renderer()  # one loaded pipeline for the sweep's evaluation and the style scores
    summary = run_sweep(demo_settings(data, epochs), axes, out / "sweep", plan, renderer=renderer)
    finals = {e["name"]: e["files"][max(e["files"])] for e in summary["evaluations"]}  # keys: epochs
    scores = style_scores(renderer, list(finals.values()), plan)
    summary["style_score"] = scores
    summary["seconds"] = time.time() - start
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary, finals, scores, out)
    return summary


def print_summary(summary: dict, finals: dict[str, str], scores: dict[str, float], out: Path) -> None:
    print(f"\nlorakit demo finished in {summary['seconds'] / 60:.1f} min. What it shows:")
    print(f"  {'variant':<28}{STYLE:>9}{'fidelity':>10}{'drift':>8}  best epoch / verdict")
    print(f"  {'base model (no LoRA)':<28}{scores['none']:>9.3f}{summary['evaluations'][0]['base']['fidelity']:>10.3f}"
          f"{0.0:>8.3f}")
    for e in summary["evaluations"]:
        best = e["per_epoch"][e["best_epoch"]]
        kinds = ", ".join(v["kind"] for v in e["verdicts"][e["best_epoch"]])
        print(f"  {e['name']:<28}{scores[finals[e['name']]]:>9.3f}{best['fidelity']:>10.3f}{best['drift']:>8.3f}"
              f"  {e['best_epoch']} / {kinds}")
    print(f"  {STYLE}: the style's own detector (training images 1.0); fidelity: feature distance to the "
          "training images (lower = closer); drift: change on unrelated prompts (lower = left alone)")
    print(f"\nreport: {summary['report']}\ngrids:  {out / 'sweep' / 'grid_variants' / 'grid.png'} and "
          f"{out / 'sweep'}/<variant>/grid_epochs/\nfiles:  {out / 'sweep'}/<variant>/*.safetensors "
          f"(inspect one with `lorakit inspect FILE`)")
