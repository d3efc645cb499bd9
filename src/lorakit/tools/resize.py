"""`lorakit resize IN OUT --rank R [--conv-rank R] | --dynamic METHOD --param P`: SVD rank reduction.

Each module's ΔW (scale included) is re-factorised to the best rank-r approximation and written with
alpha = r, so the strength is kept exactly at full rank and optimally below it. Unlike kohya's script,
1x1 convs count as linear layers (they are attention projections in SD1/SD2) and only 3x3 kernels use
--conv-rank; a rank above a layer's size is capped instead of failing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lorakit.tools.lora_files import DTYPES, check_output, norm_tensors, read_modules, split_norm_deltas, write_result
from lorakit.tools.lowrank import factorize, factorize_factors, from_parsed


@dataclass
class ResizeReport:
    modules: list[dict] = field(default_factory=list)  # name, kind, old rank, new rank, retained energy
    path: str = ""

    def lines(self) -> list[str]:
        out = [f"{'module':<72}{'kind':>6}{'rank':>10}{'kept ‖ΔW‖²':>12}"]
        for m in self.modules:
            out.append(f"{m['name']:<72}{m['kind']:>6}{m['old_rank']:>5} -> {m['new_rank']:<3}{m['retained']:>11.2%}")
        return out


def resize_file(src: str | os.PathLike, out: str | os.PathLike, rank: int | None = None,
                conv_rank: int | None = None, method: str | None = None, param: float | None = None,
                precision: str | None = None) -> ResizeReport:
    out = check_output(out, src)
    if rank is None and method is None:
        raise ValueError("give --rank R, or --dynamic METHOD --param P (with --rank as the cap)")
    if method and param is None:
        raise ValueError(f"--dynamic {method} needs --param")
    modules, metadata = read_modules(src)
    modules, norms = split_norm_deltas(modules)  # train_norm's deltas have no rank: carried over unchanged
    cap = rank if rank is not None else 1 << 30
    conv_cap = conv_rank if conv_rank is not None else cap
    tensors, report = {}, ResizeReport(path=str(out))
    for name, parsed in modules.items():
        module = from_parsed(parsed, str(src))
        is_3x3 = (module.is_conv and tuple(module.down.shape[2:]) != (1, 1)) or module.mid is not None
        cap_here = conv_cap if is_3x3 else cap
        if module.mid is None:
            new, retained = factorize_factors(name, *module.factors(), module.weight_shape, cap_here, method, param)
        else:  # Tucker core: rebuild ΔW, then factorise it as plain LoCon
            new, retained = factorize(name, module.delta(), cap_here, method, param)
        tensors.update(new.tensors(module.down.dtype))
        report.modules.append({"name": name, "kind": "conv" if is_3x3 else "linear", "old_rank": module.rank,
                               "new_rank": new.rank, "retained": retained})
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

