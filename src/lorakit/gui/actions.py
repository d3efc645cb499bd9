"""What the Evaluate and Tools tabs do: the same Python functions the CLI subcommands call, with every path
checked against the root folders first. Each returns text (or paths) for the page to show; errors are
exceptions the view turns into one message.
"""
from __future__ import annotations

from pathlib import Path

from lorakit.gui.paths import Roots
from lorakit.gui.runs import BackgroundProcess, lorakit_command
from lorakit.gui.settings import save_settings


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _optional_int(value) -> int | None:
    return None if value in (None, "") or value != value else int(value)  # NaN: an emptied number box


def dataset_report(roots: Roots, target: str, caption_extension: str = ".txt", resolution=None,
                   model: str | None = None) -> str:
    """`lorakit check-dataset`, inline. Resolution empty: the base model's native size, as training uses."""
    from lorakit.models.checkpoint import native_resolution
    from lorakit.training.dataset import format_dataset_report, load_specs, scan

    if not resolution:
        resolution = native_resolution(roots.existing(model, "base model") if model else None)
    specs, notes = load_specs(roots.existing(target, "dataset folder"), caption_extension or ".txt", resolution)
    report = scan(specs)
    report.notes[:0] = notes
    return format_dataset_report(specs, report)


def inspect_report(roots: Roots, path: str, modules: bool = False) -> str:
    from lorakit.inspect_file import format_report, inspect_file

    return format_report(inspect_file(roots.existing(path, "file")), show_modules=modules)


def resize(roots: Roots, src: str, out: str, rank, conv_rank, precision: str | None) -> str:
    from lorakit.tools.resize import resize_file

    report = resize_file(roots.existing(src, "input"), roots.check(out, "output"), _optional_int(rank),
                         _optional_int(conv_rank), precision=precision or None)
    kept = [m["retained"] for m in report.modules]
    return (f"resized {len(kept)} modules -> {report.path}; kept ‖ΔW‖²: min {min(kept):.2%}, "
            f"mean {sum(kept) / len(kept):.2%}")


def extract(roots: Roots, base: str, tuned: str, out: str, dim, conv_dim) -> str:
    from lorakit.tools.extract import extract_lora

    path, stats = extract_lora(str(roots.existing(base, "base model")), str(roots.existing(tuned, "tuned model")),
                               roots.check(out, "output"), int(dim or 4), int(conv_dim or 0))
    return f"extracted {stats['extracted']} modules ({stats['unchanged']} layers unchanged) -> {path}"


def merge(roots: Roots, loras: str, out: str, checkpoint: str = "", mode: str = "concat", rank=None) -> str:
    """loras: one `FILE` or `FILE:RATIO` per line; with a checkpoint they are baked into it."""
    from lorakit.tools.merge import merge_into_checkpoint, merge_loras, parse_inputs

    inputs = [(str(roots.existing(path, "LoRA")), ratio) for path, ratio in parse_inputs(_lines(loras))]
    if not inputs:
        raise ValueError("give at least one LoRA file (one per line, FILE or FILE:RATIO)")
    if checkpoint:
        path = merge_into_checkpoint(str(roots.existing(checkpoint, "checkpoint")), inputs, roots.check(out, "output"))
        return f"merged {len(inputs)} LoRA(s) into {checkpoint} -> {path}"
    report = merge_loras(inputs, roots.check(out, "output"), mode, _optional_int(rank))
    kept = min((m["retained"] for m in report.modules), default=1.0)
    return f"merged {len(inputs)} LoRA(s) ({mode}) -> {report.path}; least kept ‖ΔW‖²: {kept:.2%}"


def block_weights(roots: Roots, src: str, out: str, weights: str) -> str:
    from lorakit.tools.blocks import apply_block_weights

    path, counts = apply_block_weights(roots.existing(src, "input"), roots.check(out, "output"), weights)
    return f"{path}: {counts['kept']} modules unchanged, {counts['scaled']} scaled, {counts['removed']} removed"


def grid(roots: Roots, prompt: str, loras: str, x_axis: str, out: str, base: str = "", steps: int = 20,
         seed: int = 0) -> Path:
    """`lorakit grid` with one axis (lora files by default, with the no-LoRA column); the first page's PNG."""
    from lorakit.evaluation.grid import Axis, Cell, GridSpec, Renderer, render_grid, with_baseline

    files = [str(roots.existing(p, "LoRA")) for p in _lines(loras)]
    axis = Axis.parse(x_axis) if x_axis.strip() else Axis("lora", files)
    if axis.name == "lora":
        axis = with_baseline(axis)
    cell = Cell(prompt=prompt, seed=int(seed), steps=int(steps), lora=files[0] if len(files) == 1 else "none")
    out_dir = roots.check(out, "grid folder")
    renderer = Renderer(str(roots.existing(base, "base model")) if base else None)
    try:
        meta = render_grid(renderer, GridSpec(cell, x=axis), out_dir)
    finally:
        renderer.close()
    return out_dir / meta["pages"][0]


def diagnostics_report(roots: Roots, run_dir: str, name: str, prompts: str, data_dir: str, base: str = "",
                       conv_dim: int = 0) -> Path:
    """`lorakit report`: measurements, verdicts and the HTML report of one finished run."""
    from lorakit.evaluation.runs import EvalPlan
    from lorakit.evaluation.sweep import report_run

    plan = EvalPlan(prompts=_lines(prompts), seeds=[0, 1], steps=12)
    if not plan.prompts:
        raise ValueError("give at least one prompt in the trained concept or style")
    summary = report_run(roots.existing(run_dir, "run folder"), name, plan, str(roots.existing(data_dir, "images")),
                         str(roots.existing(base, "base model")) if base else None, int(conv_dim or 0))
    return Path(summary["report"])


class SweepJob:
    """`lorakit sweep` in the background: trains every combination of the axes from the current settings."""

    def __init__(self, roots: Roots):
        self.roots, self.process, self.out = roots, BackgroundProcess(), None

    def start(self, values: dict, conv_layers: int, axes: str, prompts: str, out: str) -> Path:
        out_dir = self.roots.check(out, "sweep folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        toml = save_settings(values, out_dir / "sweep-base.toml", conv_layers, self.roots)
        argv = lorakit_command("sweep", str(toml), "--out", str(out_dir))
        for axis in _lines(axes):
            argv += ["--axis", axis]
        for prompt in _lines(prompts):
            argv += ["--prompt", prompt]
        self.process.launch(argv, out_dir / "sweep.log", out_dir)
        self.out = out_dir
        return out_dir

    def status(self) -> tuple[str, Path | None]:
        if self.out is None:
            return "no sweep started", None
        code = self.process.poll()
        report = self.out / "report.html"
        state = "running" if code is None else ("finished" if code == 0 else f"failed (exit code {code})")
        log = (self.out / "sweep.log").read_text(encoding="utf-8", errors="replace").splitlines()[-8:]
        return f"{state}\n" + "\n".join(line.split("\r")[-1] for line in log), report if report.is_file() else None
