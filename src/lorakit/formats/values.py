"""Checks on the VALUES of a LoRA file's modules, after their keys parsed: finite numbers, agreeing ranks.

A NaN/inf tensor (a run that diverged, a broken converter) would otherwise surface as an SVD LinAlgError in
`resize`, silently poison a checkpoint in `merge`, or black images in a UI; a module whose down and up
ranks disagree would surface as a matmul RuntimeError. Both are named here, per module, with the tensor.
"""
from __future__ import annotations

import torch

from lorakit.formats.kohya import ModuleTensors

# internal weight names whose inner dimensions must agree: (left, its axis, right, its axis), per algorithm
RANK_PAIRS = {
    "lora": (("up", 1, "down", 0), ("up", 1, "mid", 0), ("mid", 1, "down", 0)),
    "loha": (("w1a", 1, "w1b", 0), ("w2a", 1, "w2b", 0), ("t1", 0, "w1b", 0), ("t2", 0, "w2b", 0)),
    "lokr": (("w1a", 1, "w1b", 0), ("w2a", 1, "w2b", 0), ("t2", 0, "w2b", 0)),
}
# with a Tucker core the factors are (r, out) and (r, in): the core's axes 0 and 1 meet their axis 0
TUCKER_PAIRS = {
    "loha": (("t1", 0, "w1a", 0), ("t1", 1, "w1b", 0), ("t2", 0, "w2a", 0), ("t2", 1, "w2b", 0)),
    "lokr": (("w1a", 1, "w1b", 0), ("t2", 0, "w2a", 0), ("t2", 1, "w2b", 0)),
}


def nonfinite_tensors(parsed: ModuleTensors) -> list[str]:
    """Names of the module's tensors that hold NaN or inf (alpha included)."""
    bad = [name for name, t in parsed.weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if parsed.alpha is not None and not torch.isfinite(torch.tensor(float(parsed.alpha))):
        bad.append("alpha")
    return bad


def rank_mismatches(parsed: ModuleTensors) -> list[str]:
    """'up has rank 8 but down has 4'-style lines for inner dimensions that disagree."""
    out = []
    tucker = "t1" in parsed.weights or "t2" in parsed.weights
    for left, i, right, j in (TUCKER_PAIRS if tucker else RANK_PAIRS).get(parsed.algo.name, ()):
        a, b = parsed.weights.get(left), parsed.weights.get(right)
        if a is not None and b is not None and a.dim() > i and b.dim() > j and a.shape[i] != b.shape[j]:
            out.append(f"{left} has rank {a.shape[i]} but {right} has {b.shape[j]}")
    return out


def value_problem(parsed: ModuleTensors) -> str | None:
    """One line describing why this module's numbers cannot be used, or None."""
    problems = [f"non-finite values (NaN/inf) in {', '.join(bad)}" for bad in [nonfinite_tensors(parsed)] if bad]
    problems += rank_mismatches(parsed)
    return "; ".join(problems) or None
