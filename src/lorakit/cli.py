"""The `lorakit` command line: thin wrappers over the Python API."""
from __future__ import annotations

import argparse
import json
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

    run_demo(args.output, steps=args.steps)
    return 0


def _cmd_check_dataset(args) -> int:
    from lorakit.training.dataset import format_dataset_report, load_specs, scan

    specs, notes = load_specs(args.target, args.caption_extension, args.resolution)
    report = scan(specs)
    report.notes[:0] = notes
    print(format_dataset_report(specs, report))
    return 1 if not report.items else 0


def _cmd_train(args, extra: list[str]) -> int:
    from lorakit.training.config import load_config, parse_overrides
    from lorakit.training.trainer import TrainingInterrupted, TrainingStopped, train

    config = load_config(args.config, parse_overrides(extra))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA / LoCon / LoHa / LoKr for Stable Diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what a LoRA file holds: algorithms, ranks, blocks, metadata, hash")
    p.add_argument("file", help=".safetensors LoRA file (ours, kohya sd-scripts or LyCORIS)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--modules", action="store_true", help="also list every module")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("train", help="train a LoRA/LoCon/LoHa/LoKr: lorakit train CONFIG.toml [--key value ...]")
    p.add_argument("config", nargs="?", help="TOML with kohya's keys (optional: all keys can be flags)")
    p.set_defaults(func=_cmd_train, takes_extra=True)
    p = sub.add_parser("check-dataset", help="check images, captions, repeats and buckets before training")
    p.add_argument("target", help="folder of `N_name` subfolders, or a kohya dataset .toml")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--resolution", type=int, default=512)
    p.set_defaults(func=_cmd_check_dataset)
    p = sub.add_parser("demo", help="smallest end-to-end run: LoCon on a tiny SD model, train, save, inspect")
    p.add_argument("--output", default="lorakit-demo", help="folder for the demo's files")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.set_defaults(func=_cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())
