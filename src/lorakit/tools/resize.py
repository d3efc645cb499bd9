"""`lorakit resize IN OUT --rank R [--conv-rank R] | --dynamic METHOD --param P`: SVD rank reduction.

Each module's ΔW (scale included) is re-factorised to the best rank-r approximation and written with
alpha = r, so the strength is kept exactly at full rank and optimally below it. Unlike kohya's script,
1x1 convs count as linear layers (they are attention projections in SD1/SD2) and only 3x3 kernels use
--conv-rank; a rank above a layer's size is capped instead of failing.

Every algorithm resizes to a LoRA/LoCon: LoHa and LoKr through the SVD of their exact ΔW, DoRA modules
through that of W' − W (which needs the base model: --base). The report gives the kept ‖ΔW‖² per module.
"""
from __future__ import annotations

import os

from lorakit.formats.kohya import file_family
from lorakit.tools.exact_delta import LayerSource, exact_delta, is_plain_lora
from lorakit.tools.lora_files import DTYPES, check_output, norm_tensors, read_modules, split_norm_deltas, write_result
from lorakit.tools.lowrank import ResizeReport, factorize, factorize_factors, from_parsed


def resize_file(src: str | os.PathLike, out: str | os.PathLike, rank: int | None = None,
                conv_rank: int | None = None, method: str | None = None, param: float | None = None,
                precision: str | None = None, base: str | os.PathLike | None = None) -> ResizeReport:
    """base: the model the file was trained on; needed for DoRA modules, optional for LoHa/LoKr (layer shapes)."""
    out = check_output(out, src)
    if rank is None and method is None:
        raise ValueError("give --rank R, or --dynamic METHOD --param P (with --rank as the cap)")
    if method and param is None:
        raise ValueError(f"--dynamic {method} needs --param")
    modules, metadata = read_modules(src)
    modules, norms = split_norm_deltas(modules)  # train_norm's deltas have no rank: carried over unchanged
    cap = rank if rank is not None else 1 << 30
    conv_cap = conv_rank if conv_rank is not None else cap
    source = LayerSource(base, file_family(metadata, modules))
    tensors, report = {}, ResizeReport(path=str(out))
    for name, parsed in modules.items():
        new, retained, shape, old_rank, dtype = _resize_module(str(src), parsed, source, cap, conv_cap, method, param)
        tensors.update(new.tensors(dtype))
        report.add(name, _label(parsed), shape, old_rank, new, retained)
    tensors.update(norm_tensors([(norms, 1.0)]))
    metadata = dict(metadata)
    dynamic = method is not None
    metadata["ss_network_dim"] = "Dynamic" if dynamic else str(rank)
    metadata["ss_network_alpha"] = "Dynamic" if dynamic else str(float(rank))
    action = {"tool": "resize", "source": os.path.basename(str(src)), "rank": rank, "conv_rank": conv_rank,
              "dynamic": method, "param": param,
              "min_retained": min((m["retained"] for m in report.modules), default=1.0)}
    write_result(out, tensors, metadata, action, DTYPES.get(precision) if precision else None)
    return report


def _resize_module(src: str, parsed, source: LayerSource, cap: int, conv_cap: int, method, param):
    """Plain LoRA: the SVD from its factors (no dense ΔW); Tucker cores, LoHa, LoKr and DoRA: of the exact ΔW."""
    if is_plain_lora(parsed):
        module = from_parsed(parsed, src)
        shape, old_rank, dtype = module.weight_shape, module.rank, module.down.dtype
        delta = module.delta() if module.mid is not None else None
    else:
        delta, old_rank = exact_delta(src, parsed, source)
        shape, dtype = tuple(delta.shape), next(iter(parsed.weights.values())).dtype
    cap_here = conv_cap if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else cap
    if delta is None:
        new, retained = factorize_factors(parsed.name, *module.factors(), shape, cap_here, method, param)
    else:
        new, retained = factorize(parsed.name, delta, cap_here, method, param)
    return new, retained, shape, old_rank, dtype


def _label(parsed) -> str:
    return parsed.algo.name + ("+dora" if parsed.dora_axis is not None else "")
