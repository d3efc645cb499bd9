"""The sweep's HTML page: grids over variants and epochs, loss curves, ΔW norms, metrics, verdicts."""
from __future__ import annotations

import html
import math
from pathlib import Path

from lorakit.evaluation import report
from lorakit.evaluation.grid import Axis, Cell, GridSpec, Renderer, render_grid
from lorakit.evaluation.runs import EvalPlan, RunEvaluation, load_history

VALIDATION_LABELS = {"split": "validation (held-out images)",
                     "caption_only": "validation (training images, unrelated captions)"}
METRIC_COLUMNS = ["saturation", "artefacts", "diversity", "fidelity", "drift"]


def smoothed(points: list[tuple[float, float]], keep: float = 0.9) -> list[tuple[float, float]]:
    out, running = [], None
    for x, y in points:
        running = y if running is None else keep * running + (1 - keep) * y
        out.append((x, running))
    return out


def variant_grid(root: Path, evaluations: list[RunEvaluation], plan: EvalPlan, renderer: Renderer) -> str:
    """The final file of each variant against the base, on the same prompts and seed."""
    finals = [e.files[max(e.files)] for e in evaluations if e.files]
    prompts = plan.prompts[:3] + plan.unrelated[:1]
    spec = GridSpec(base_cell(plan), x=Axis("lora", ["none", *finals]), y=Axis("prompt", prompts))
    render_grid(renderer, spec, root / "grid_variants")
    return (f'<img alt="variants grid" src="{report.data_uri(root / "grid_variants" / "grid.png")}">'
            f'<p>Final file of each variant (columns) on the same prompts and seed {plan.seeds[0]}'
            + ("; the last row is a prompt unrelated to the training data (drift)." if plan.unrelated else ".")
            + "</p>")


def base_cell(plan: EvalPlan) -> Cell:
    return Cell(prompt=plan.prompts[0], seed=plan.seeds[0], steps=plan.steps, cfg=plan.cfg, width=plan.size,
                height=plan.size)


def epoch_grids(evaluations: list[RunEvaluation], plan: EvalPlan, renderer: Renderer) -> str:
    pages = []
    for evaluation in evaluations:
        if not evaluation.files:
            continue
        spec = GridSpec(base_cell(plan), x=Axis("lora", ["none", *evaluation.files.values()]),
                        y=Axis("prompt", plan.prompts[:2]))
        folder = Path(evaluation.folder) / "grid_epochs"
        render_grid(renderer, spec, folder)
        pages.append(f"<h3>{html.escape(evaluation.name)}: epochs</h3>"
                     f'<img alt="{html.escape(evaluation.name)} epochs" src="{report.data_uri(folder / "grid.png")}">')
    return "".join(pages)


def verdicts_and_findings(evaluations: list[RunEvaluation], findings: str | None) -> str:
    rows = [{"variant": e.name, "epoch": e.best_epoch, "why": e.best_why, "verdicts": e.verdicts[e.best_epoch]}
            for e in evaluations]
    # FINDINGS: the plain-words summary of the comparison (issue 17 part A provides the text)
    summary = f'<div class="findings"><h3>What the comparison found</h3>{report.paragraphs(findings)}</div>' \
        if findings else ""
    return report.verdict_table(rows) + summary


def loss_charts(evaluations: list[RunEvaluation]) -> str:
    """Per variant: the smoothed training loss and, when the run recorded it, the held-out validation loss
    (history["validation"]: fixed timesteps and noise, so its points compare across epochs and variants)."""
    charts = []
    for e in evaluations:
        history = load_history(e.folder, e.name)
        series = {"train (smoothed)": smoothed([(s["step"], s["loss"]) for s in history["steps"]])}
        validation = history.get("validation") or []
        for kind in dict.fromkeys(v["kind"] for v in validation):
            label = VALIDATION_LABELS.get(kind, f"validation ({kind})")
            series[label] = [(v["step"], v["loss"]) for v in validation if v["kind"] == kind]
        note = "" if validation else "<p><small>No validation loss was recorded for this run: train loss only." \
                                     "</small></p>"
        charts.append(f"<div>{report.line_chart(series, f'{e.name}: loss')}{note}</div>")
    return f'<div class="side">{"".join(charts)}</div>'


def metrics_rows(evaluations: list[RunEvaluation]) -> list[dict]:
    rows = []
    if evaluations:
        rows.append({"run": "base model (no LoRA)", "epoch": "", **evaluations[0].base, "drift": 0.0})
        rows.append({"run": "training images", "epoch": "", **evaluations[0].data})
    for e in evaluations:
        for epoch, values in e.per_epoch.items():
            kinds = ", ".join(v["kind"] for v in e.verdicts[epoch])
            rows.append({"run": e.name, "epoch": epoch, **values, "verdict": kinds,
                         "best": "*" if epoch == e.best_epoch else ""})
    return rows


def norm_charts(evaluations: list[RunEvaluation]) -> str:
    over_epochs, parts = {}, []
    for e in evaluations:
        norms = load_history(e.folder, e.name)["norms"]
        if not norms:
            continue
        for kind, label in (("linear", "attention"), ("conv", "conv")):
            series = [(n["epoch"], math.sqrt(sum(b[kind] ** 2 for b in n["blocks"].values()))) for n in norms]
            if any(v for _, v in series):
                over_epochs[f"{e.name} {label}"] = series
        last = {block: {"attention": v["linear"], "conv": v["conv"]} for block, v in norms[-1]["blocks"].items()}
        parts.append(report.bar_chart(last, f"{e.name}: ‖ΔW‖ per block at epoch {norms[-1]['epoch']}"))
    head = report.line_chart(over_epochs, "total ‖ΔW‖ over epochs, attention vs conv") if over_epochs else ""
    return head + "".join(parts)


def write_sweep_report(root: Path, chosen, evaluations: list[RunEvaluation], plan: EvalPlan,
                       renderer: Renderer, title: str | None = None, findings: str | None = None) -> Path:
    """findings: plain words on what the comparison found, shown under the verdict table."""
    settings = [{"variant": v.name, **{k: str(val) for k, val in v.settings.items()}} for v in chosen]
    keys = sorted({k for v in chosen for k in v.settings})
    sections = [
        ("Verdicts and the variants side by side", report.side_by_side(
            verdicts_and_findings(evaluations, findings), variant_grid(root, evaluations, plan, renderer))),
        ("Loss: training and held-out validation", loss_charts(evaluations)),
        ("Variants", report.table(settings, ["variant", *keys])),
        ("Grids over epochs", epoch_grids(evaluations, plan, renderer)),
        ("Metrics", "<p>Per epoch, on the same prompts and seeds. fidelity: feature distance to the training "
                    "images (lower = closer); drift: change on unrelated prompts (lower = leaves them alone); "
                    "* = suggested epoch.</p>" + report.table(metrics_rows(evaluations),
                                                                 ["run", "epoch", *METRIC_COLUMNS, "verdict", "best"])),
        ("What learns where: ‖ΔW‖ per block, attention vs conv", norm_charts(evaluations)),
    ]
    return report.write_report(root / "report.html", title or f"lorakit sweep: {root.name}", sections)
