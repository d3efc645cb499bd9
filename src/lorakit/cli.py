"""The `lorakit` command line: thin wrappers over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_inspect(args) -> int:
    from lorakit.inspect_file import format_report, inspect_file

    report = inspect_file(args.file)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report, show_modules=args.modules))
    return 0


def _cmd_demo(args) -> int:
    from lorakit.demo import run_demo

    run_demo(args.output, epochs=args.epochs, seeds=args.seeds)
    return 0


def _cmd_check_dataset(args) -> int:
    from lorakit.training.dataset import format_dataset_report, load_specs, scan

    from lorakit.models.checkpoint import native_resolution

    # unset: the base model's native size, as train uses (the embedded tiny model's 64 without --model)
    resolution = args.resolution or native_resolution(args.model)
    specs, notes = load_specs(args.target, args.caption_extension, resolution)
    report = scan(specs)
    report.notes[:0] = notes
    print(format_dataset_report(specs, report))
    return 1 if not report.items else 0


def _cmd_train(args, extra: list[str]) -> int:
    from lorakit.training.config import load_config, parse_overrides
    from lorakit.training.trainer import TrainingInterrupted, TrainingStopped, train

    path = None
    if extra and not extra[0].startswith("--"):  # the config file is optional: only flags is fine too
        path, extra = extra[0], extra[1:]
    config = load_config(path, parse_overrides(extra))
    for note in config.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        result = train(config)
    except TrainingInterrupted as e:
        print(f"lorakit train: {e}", file=sys.stderr)
        return 130
    except TrainingStopped as e:
        print(f"lorakit train: stopped: {e}", file=sys.stderr)
        return 1
    if result.is_main:  # under `accelerate launch` every process returns here; one reports
        print(f"trained {result.steps} steps in {result.seconds:.0f} s; final loss {result.losses[-1]:.4f}")
        for path in result.files + result.samples:
            print(f"saved {path}")
    return 0


def _cmd_grid(args) -> int:
    from lorakit.evaluation.grid import (Axis, Cell, GridSpec, Renderer, check_output_folder, render_grid,
                                         with_baseline)

    check_output_folder(args.out)  # before the base model loads

    cell = Cell(prompt=args.prompt, seed=args.seed, steps=args.steps, cfg=args.cfg, multiplier=args.multiplier,
                negative=args.negative, width=args.size, height=args.size,
                lora=args.lora[0] if len(args.lora) == 1 else "none")
    axes = [Axis.parse(a) if a else None for a in (args.x, args.y, args.z)]
    if len(args.lora) > 1 and not any(a and a.name == "lora" for a in axes):
        if None not in axes:
            raise ValueError("several --lora files make a lora axis, but --x, --y and --z are all taken")
        axes[axes.index(None)] = Axis("lora", args.lora)
    if not args.no_baseline:
        axes = [with_baseline(a) if a else None for a in axes]
    if axes[0] is None:
        raise ValueError("grid needs --x AXIS=v1,v2 (axes: lora, multiplier, seed, prompt, steps, cfg)")
    spec = GridSpec(cell, x=axes[0], y=axes[1], z=axes[2])
    from tqdm.auto import tqdm

    with tqdm(total=len(spec.cells()), desc="grid", unit="image") as bar:
        meta = render_grid(Renderer(args.base), spec, args.out, progress=bar.update)
    print(f"wrote {', '.join(args.out + '/' + p for p in meta['pages'])}, {len(meta['cells'])} cells in "
          f"{args.out}/cells, {args.out}/grid.json")
    return 0


def _cmd_sweep(args, extra: list[str]) -> int:
    from lorakit.evaluation.runs import EvalPlan
    from lorakit.evaluation.sweep import parse_axis, run_sweep
    from lorakit.training.config import parse_overrides, read_config_values

    base = read_config_values(args.config) if args.config else {}
    base.update(parse_overrides(extra))
    from lorakit.models.checkpoint import native_resolution
    from lorakit.training.dataset import as_size

    size = as_size(base["resolution"])[0] if base.get("resolution") else \
        native_resolution(base.get("pretrained_model_name_or_path"))  # unset: the model's native size, as train
    plan = EvalPlan(prompts=args.prompt, unrelated=args.unrelated, seeds=list(range(args.seeds)),
                    steps=args.steps, size=size)
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    summary = run_sweep(base, [parse_axis(a) for a in args.axis], args.out, plan, devices)
    for e in summary["evaluations"]:
        kinds = ", ".join(v["kind"] for v in e["verdicts"][e["best_epoch"]])
        print(f"{e['name']}: best epoch {e['best_epoch']} ({kinds})")
    print(f"report: {summary['report']}")
    return 0


def _cmd_report(args) -> int:
    from lorakit.evaluation.runs import EvalPlan
    from lorakit.evaluation.sweep import report_run

    plan = EvalPlan(prompts=args.prompt, unrelated=args.unrelated, seeds=list(range(args.seeds)),
                    steps=args.steps, size=args.size)
    summary = report_run(args.run, args.name, plan, args.data, args.base, args.conv_dim)
    e = summary["evaluations"][0]
    print(f"best epoch {e['best_epoch']}: {e['best_why']}")
    for v in e["verdicts"][e["best_epoch"]]:
        print(f"  {v['line']}")
    print(f"report: {summary['report']}")
    return 0


def _cmd_gui(args) -> int:
    from lorakit.gui.server import serve

    serve(args.host, args.port, args.root, args.auth, args.allow_unauthenticated_remote)
    return 0


def add_gui_command(sub) -> None:
    p = sub.add_parser("gui", help="the web GUI (Gradio) on 127.0.0.1: training form, live run, evaluation, tools")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (another than loopback needs --auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--root", action="append", help="folder the GUI may read and write (repeatable; default: .)")
    p.add_argument("--auth", help="user:password login (or set LORAKIT_GUI_AUTH, kept out of the process list)")
    p.add_argument("--allow-unauthenticated-remote", action="store_true",
                   help="serve a non-loopback host without a login (only on a trusted network)")
    p.set_defaults(func=_cmd_gui)


def add_evaluation_commands(sub) -> None:
    p = sub.add_parser("grid", help="X/Y/Z image grid from fixed prompts and seeds (PNG + cells + JSON)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--lora", nargs="*", default=[], help="LoRA file(s); several make a lora axis")
    p.add_argument("--x", help="axis: name=v1,v2 (lora, multiplier, seed, prompt, steps, cfg); prompts: v1|v2")
    p.add_argument("--y", help="second axis")
    p.add_argument("--z", help="third axis: one page per value")
    p.add_argument("--base", help="base model (default: the embedded tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--multiplier", type=float, default=1.0)
    p.add_argument("--negative", default="")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--no-baseline", action="store_true", help="no no-LoRA row/column on a lora axis")
    p.add_argument("--out", default="grid")
    p.set_defaults(func=_cmd_grid)
    p = sub.add_parser("sweep", help="train every combination of --axis values, then grid, metrics, report")
    p.add_argument("config", nargs="?", help="training TOML (as for `lorakit train`)")
    p.add_argument("--axis", action="append", required=True, help="key=v1,v2 (conv_alpha: numbers, half, equal)")
    p.add_argument("--prompt", action="append", required=True, help="prompt in the trained concept/style")
    p.add_argument("--unrelated", action="append", default=[], help="prompt the LoRA should leave alone")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="sweep")
    p.add_argument("--devices", help="e.g. cuda:0,cuda:1: variants are spread over them (default: one device)")
    p.set_defaults(func=_cmd_sweep, takes_extra=True)
    p = sub.add_parser("report", help="measure, diagnose and write the HTML report of one finished training run")
    p.add_argument("run", help="the run's output_dir")
    p.add_argument("--name", default="lora", help="the run's output_name")
    p.add_argument("--prompt", action="append", required=True, help="prompt in the trained concept/style")
    p.add_argument("--unrelated", action="append", default=[], help="prompt the LoRA should leave alone")
    p.add_argument("--data", required=True, help="the training images' folder (for fidelity)")
    p.add_argument("--base", help="base model (default: the embedded tiny model)")
    p.add_argument("--conv-dim", type=int, default=0, help="the run's conv_dim (picks the right remedy)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA / LoCon / LoHa / LoKr for Stable Diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what a LoRA file holds: algorithms, ranks, blocks, metadata, hash")
    p.add_argument("file", help=".safetensors LoRA file (ours, kohya sd-scripts or LyCORIS)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--modules", action="store_true", help="also list every module")
    p.set_defaults(func=_cmd_inspect)
    from lorakit.training.config import keys_help

    p = sub.add_parser("train", help="train a LoRA/LoCon/LoHa/LoKr: lorakit train [CONFIG.toml] [--key value ...]",
                       usage="lorakit train [CONFIG.toml] [--key value | --key=value | --flag ...]",
                       description="CONFIG.toml uses sd-scripts' keys (kohya's --config_file TOML works as is); "
                                   "every key can also be a flag, which overrides the file. kohya keys lorakit "
                                   "does not implement are listed in docs/kohya-compatibility.md.",
                       epilog="config keys:\n" + keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_train, takes_extra=True)
    p = sub.add_parser("check-dataset", help="check images, captions, repeats and buckets before training")
    p.add_argument("target", help="folder of `N_name` subfolders, or a kohya dataset .toml")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--resolution", type=int, default=None,
                   help="bucket size in px; unset: the native size of --model, as train uses")
    p.add_argument("--model", default=None, help="the base model the dataset is for (a .safetensors/.ckpt file or "
                                                 "diffusers folder); unset: the embedded tiny model, as train")
    p.set_defaults(func=_cmd_check_dataset)
    p = sub.add_parser("demo", help="the main job on the embedded tiny model: attention-only LoRA vs LoCon on a "
                                    "new style, grids, metrics, verdicts, HTML report")
    p.add_argument("--output", default="lorakit-demo", help="folder for the demo's files")
    p.add_argument("--epochs", type=int, default=6, help="epochs per variant (10 steps each)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt in the evaluation")
    p.set_defaults(func=_cmd_demo)
    add_evaluation_commands(sub)
    add_gui_command(sub)
    from lorakit.cli_tools import add_tool_commands

    add_tool_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        build_parser().parse_args(argv)  # argparse's own error for unknown flags

    from lorakit.formats.safetensors_io import LoraFileError
    from lorakit.training.config import ConfigError

    try:
        return args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
    except (LoraFileError, ConfigError, ValueError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path that is a file, unwritable, missing, a full disk: name the path
        where = f"{e.filename}: " if e.filename else ""
        print(f"lorakit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # the safety net: one line, never a traceback, unless asked for
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit {args.command}: error: {type(e).__name__}: {e} (this is a lorakit bug if the input "
              "looks right: please report it with LORAKIT_DEBUG=1 set for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
