"""The Evaluate and Tools tabs: forms over lorakit.gui.actions (the functions the CLI subcommands call)."""
from __future__ import annotations

import functools
import html

import gradio as gr

from lorakit.gui import actions
from lorakit.gui.paths import Roots

PRECISIONS = ["", "float", "fp16", "bf16"]


def _report_frame(path) -> str:
    """The self-contained HTML report inside the page (an iframe keeps its styles apart from gradio's)."""
    text = path.read_text(encoding="utf-8")
    return f'<iframe srcdoc="{html.escape(text)}" style="width:100%;height:720px;border:0"></iframe>'


def shown(fn):
    """Handlers return text; an API error becomes that text instead of a stack trace in the page."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            return f"**Error:** {e}"
    return wrapper


def evaluate_tab(roots: Roots, train) -> None:
    with gr.Accordion("Grid: a LoRA against the base model", open=True):
        prompt = gr.Textbox(label="Prompt", value="a red circle on a white background", elem_id="grid-prompt")
        loras = gr.Textbox(label="LoRA files", lines=2, info="one per line; several make the grid's axis",
                           elem_id="grid-loras")
        axis = gr.Textbox(label="Axis", info="empty: the LoRA files; or name=v1,v2 (multiplier, seed, steps, cfg, "
                                             "blocks, prompt with | between prompts)")
        with gr.Row():
            out = gr.Textbox(label="Grid folder", value=str(roots.folders[0] / "grid"))
            steps = gr.Number(label="Steps", value=20, minimum=1, maximum=200, precision=0, elem_id="grid-steps")
            seed = gr.Number(label="Seed", value=0, minimum=0, precision=0)
        base = gr.Textbox(label="Base model", info="empty: the embedded tiny model")
        go, message = gr.Button("Render grid", elem_id="grid-render"), gr.Markdown(elem_id="grid-message")
        image = gr.Image(label="Grid", type="filepath", elem_id="grid-image")
        go.click(lambda *a: _grid(roots, *a), [prompt, loras, axis, out, base, steps, seed], [message, image])
    with gr.Accordion("Diagnostics report of a finished run", open=False):
        run_dir = gr.Textbox(label="Run folder (output_dir)")
        name = gr.Textbox(label="Output name", value="lora")
        prompts = gr.Textbox(label="Prompts in the trained concept or style", lines=2)
        data = gr.Textbox(label="Training images folder")
        conv_dim = gr.Number(label="The run's conv_dim", value=0, minimum=0, precision=0)
        go, message, frame = gr.Button("Build report"), gr.Markdown(), gr.HTML()
        go.click(lambda *a: _report(roots, *a), [run_dir, name, prompts, data, conv_dim], [message, frame])
    with gr.Accordion("Sweep: train every combination, then grids, metrics and a report", open=False):
        gr.Markdown("Uses the Training tab's settings as the base; runs `lorakit sweep` in the background.")
        axes = gr.Textbox(label="Axes", lines=2, value="conv_dim=0,8", info="one key=v1,v2 per line")
        prompts = gr.Textbox(label="Prompts", lines=2)
        out = gr.Textbox(label="Sweep folder", value=str(roots.folders[0] / "sweep"))
        go, refresh = gr.Button("Start sweep"), gr.Button("Refresh")
        status, frame = gr.Textbox(label="Sweep status", lines=6, interactive=False), gr.HTML()
        job = actions.SweepJob(roots)
        go.click(shown(lambda a, p, o, *v: _sweep_start(job, train, a, p, o, v)), [axes, prompts, out] + [
            train.fields[n] for n in train.names], [status])
        refresh.click(lambda: _sweep_status(job), [], [status, frame])


def _grid(roots, prompt, loras, axis, out, base, steps, seed):
    try:
        page = actions.grid(roots, prompt, loras, axis, out, base, int(steps or 20), int(seed or 0))
        return f"Wrote {page}", str(page)
    except (ValueError, RuntimeError, OSError) as e:
        return f"**Error:** {e}", None


def _report(roots, run_dir, name, prompts, data, conv_dim):
    try:
        path = actions.diagnostics_report(roots, run_dir, name, prompts, data, conv_dim=int(conv_dim or 0))
        return f"Wrote {path}", _report_frame(path)
    except (ValueError, RuntimeError, OSError) as e:
        return f"**Error:** {e}", ""


def _sweep_start(job, train, axes, prompts, out, args):
    values = train.values(args)
    folder = job.start(values, train.architecture(values).conv_layers, axes, prompts, out)
    return f"started: lorakit sweep in {folder}"


def _sweep_status(job):
    text, report = job.status()
    return text, _report_frame(report) if report else ""


def tools_tab(roots: Roots) -> None:
    with gr.Accordion("Inspect a LoRA or checkpoint", open=True):
        path, modules = gr.Textbox(label="File", elem_id="inspect-file"), gr.Checkbox(label="List every module")
        go = gr.Button("Inspect", elem_id="inspect-go")
        out = gr.Textbox(label="Report", lines=12, interactive=False, elem_id="inspect-report")
        go.click(shown(lambda p, m: actions.inspect_report(roots, p, m)), [path, modules], [out])
    with gr.Accordion("Resize (SVD to a lower rank, same strength)", open=False):
        src, dst = gr.Textbox(label="Input LoRA"), gr.Textbox(label="Output file")
        with gr.Row():
            rank = gr.Number(label="Rank", minimum=1, precision=0)
            conv_rank = gr.Number(label="Conv rank", minimum=1, precision=0)
            precision = gr.Dropdown(PRECISIONS, value="", label="Precision")
        go, out = gr.Button("Resize"), gr.Markdown()
        go.click(shown(lambda *a: actions.resize(roots, *a)), [src, dst, rank, conv_rank, precision], [out])
    with gr.Accordion("Extract a LoRA from two checkpoints", open=False):
        base, tuned, dst = gr.Textbox(label="Base model"), gr.Textbox(label="Tuned model"), gr.Textbox(label="Output")
        with gr.Row():
            dim = gr.Number(label="Dim", value=4, minimum=1, precision=0)
            conv_dim = gr.Number(label="Conv dim (0: skip 3x3 convs)", value=0, minimum=0, precision=0)
        go, out = gr.Button("Extract"), gr.Markdown()
        go.click(shown(lambda *a: actions.extract(roots, *a)), [base, tuned, dst, dim, conv_dim], [out])
    with gr.Accordion("Merge LoRAs (into one LoRA, or into a checkpoint)", open=False):
        loras = gr.Textbox(label="LoRA files", lines=3, info="one per line: FILE or FILE:RATIO")
        dst, checkpoint = gr.Textbox(label="Output file"), gr.Textbox(label="Checkpoint (optional)")
        with gr.Row():
            mode = gr.Dropdown(["concat", "svd"], value="concat", label="Mode (LoRA + LoRA)")
            rank = gr.Number(label="Rank (svd)", minimum=1, precision=0)
        go, out = gr.Button("Merge"), gr.Markdown()
        go.click(shown(lambda *a: actions.merge(roots, *a)), [loras, dst, checkpoint, mode, rank], [out])
    with gr.Accordion("Block weights (LoRA Block Weight presets or vectors, baked in)", open=False):
        src, dst = gr.Textbox(label="Input LoRA"), gr.Textbox(label="Output file")
        weights = gr.Textbox(label="Weights", value="ALL", info="preset (ALL, INS, OUTS, MIDD, ...) or 17/26 values")
        go, out = gr.Button("Apply"), gr.Markdown()
        go.click(shown(lambda *a: actions.block_weights(roots, *a)), [src, dst, weights], [out])
