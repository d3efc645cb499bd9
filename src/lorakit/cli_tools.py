"""`lorakit resize | extract | merge | blocks | convert | import-config`: the file tools' command lines
(lorakit.tools does the work; these functions only parse and print)."""
from __future__ import annotations

import argparse

PRECISIONS = ("float", "fp16", "bf16")


def whole_number(least: int):
    """argparse type: an int >= least (argparse names the flag and the value in its error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} is below {least}")
        return value
    parse.__name__ = f"whole number >= {least}"
    return parse


def finite_number(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _cmd_resize(args) -> int:
    from lorakit.tools.resize import resize_file

    report = resize_file(args.input, args.output, args.rank, args.conv_rank, args.dynamic, args.param, args.precision,
                         args.base)
    _print_energy(report, args.verbose, "resized")
    return 0


def _print_energy(report, verbose: bool, done: str) -> None:
    if verbose:
        print("\n".join(report.lines()))
    kept = [m["retained"] for m in report.modules]
    print(f"{done} {len(kept)} modules -> {report.path}; kept ‖ΔW‖²: min {min(kept):.2%}, "
          f"mean {sum(kept) / len(kept):.2%} (--verbose: per module)")


def _cmd_extract(args) -> int:
    from lorakit.tools.extract import extract_lora

    out, stats = extract_lora(args.base, args.tuned, args.output, args.dim, args.conv_dim, precision=args.precision)
    print(f"extracted {stats['extracted']} modules ({stats['unchanged']} layers unchanged) -> {out}; "
          f"least kept ‖ΔW‖²: {stats['min_retained']:.2%}")
    if stats["norms_not_extracted"]:
        print(f"note: {stats['norms_not_extracted']} GroupNorm/LayerNorm layers differ too; a LoRA/LoCon holds "
              "Linear/Conv changes only, so they are not in the file (as in kohya's extract)")
    return 0


def _cmd_merge(args) -> int:
    from lorakit.tools.merge import merge_into_checkpoint, merge_loras, parse_inputs

    inputs = parse_inputs(args.loras)
    if args.checkpoint:
        out = merge_into_checkpoint(args.checkpoint, inputs, args.output, args.precision)
        print(f"merged {len(inputs)} LoRA(s) into {args.checkpoint} -> {out}")
    else:
        report = merge_loras(inputs, args.output, args.mode, args.rank, args.conv_rank, args.precision, args.base)
        _print_energy(report, args.verbose, f"merged {len(inputs)} LoRA(s) ({args.mode}):")
    return 0


def _cmd_blocks(args) -> int:
    from lorakit.tools.blocks import apply_block_weights

    out, counts = apply_block_weights(args.input, args.output, args.weights)
    print(f"{out}: {counts['kept']} modules unchanged, {counts['scaled']} scaled, {counts['removed']} removed")
    return 0


def _cmd_convert(args) -> int:
    from lorakit.tools.convert import convert_file

    out = convert_file(args.input, args.output, args.to, args.precision, args.family)
    print(f"converted -> {out}")
    return 0


def _cmd_import_config(args) -> int:
    from lorakit.tools.import_kohya_ss import import_kohya_ss

    done = import_kohya_ss(args.input, args.output)
    for note in done.notes:
        print(f"note: {note}")
    if done.prompts_path:
        print(f"wrote {done.prompts_path}")
    print(f"wrote {done.path} (run: lorakit train {done.path})")
    return 0


BASE_HELP = ("the base model the file was trained on: needed for DoRA modules (W' − W depends on W), "
             "optional for LoHa/LoKr (layer shapes; default: the file's family architecture)")


def add_tool_commands(sub) -> None:
    p = sub.add_parser("resize", help="SVD rank reduction that keeps the strength (writes the new alpha)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--rank", type=whole_number(1), help="new rank for linear/1x1 layers (the cap with --dynamic)")
    p.add_argument("--conv-rank", type=whole_number(1), help="new rank for 3x3 conv layers (default: --rank)")
    p.add_argument("--dynamic", choices=("sv_ratio", "sv_fro", "sv_cumulative"), help="per-module rank rule")
    p.add_argument("--param", type=finite_number, help="the dynamic rule's parameter")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--verbose", action="store_true", help="print kept energy per module")
    p.add_argument("--base", "-m", help=BASE_HELP)
    p.set_defaults(func=_cmd_resize)
    p = sub.add_parser("extract", help="a LoRA/LoCon from the difference of two checkpoints")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("output")
    p.add_argument("--dim", type=whole_number(1), default=4)
    p.add_argument("--conv-dim", type=whole_number(0), default=0, help="rank for 3x3 convs (0: skip them)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.set_defaults(func=_cmd_extract)
    p = sub.add_parser("merge", help="LoRAs into a checkpoint (--checkpoint) or into one LoRA, exactly")
    p.add_argument("loras", nargs="+", help="FILE or FILE:RATIO")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--checkpoint", help="base model to bake the LoRAs into")
    p.add_argument("--mode", choices=("concat", "svd"), default="concat", help="LoRA+LoRA: exact concat or SVD")
    p.add_argument("--rank", type=whole_number(1))
    p.add_argument("--conv-rank", type=whole_number(1))
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--base", "-m", help=BASE_HELP)
    p.add_argument("--verbose", action="store_true", help="print kept energy per module")
    p.set_defaults(func=_cmd_merge)
    p = sub.add_parser("blocks", help="bake LoRA Block Weight presets or vectors into a file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--weights", required=True, help="preset (ALL, INS, OUTS, ...) or 17/26 (SD) 12/20 (SDXL) values")
    p.set_defaults(func=_cmd_blocks)
    p = sub.add_parser("convert", help="kohya <-> diffusers/PEFT keys; fp32/fp16/bf16")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=("kohya", "diffusers"))
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="override the detected base model family")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("import-config", help="a kohya_ss GUI LoRA config (JSON) -> training TOML (sd-scripts keys)")
    p.add_argument("input", help="the JSON that kohya_ss's LoRA tab saves")
    p.add_argument("--output", "-o", required=True, help="the TOML to write")
    p.set_defaults(func=_cmd_import_config)
