"""LoRA/LoCon modules as file tensors, their ΔW, and SVD re-factorisation to a chosen rank.

A module's ΔW = scale · up · down with scale = alpha / rank (down (r, in[, kh, kw]), up (out, r[, 1, 1]),
optional Tucker core `lora_mid` (r, r, kh, kw)). Re-factorising ΔW (flattened to (out, in·kh·kw)) with
an SVD gives the best rank-r approximation in Frobenius norm (Eckart-Young); writing alpha = rank makes
scale 1, so the new file's strength equals the old one's by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorakit.adapters.functional import lora as lora_math
from lorakit.adapters.functional.layer import effective_alpha, scale_of
from lorakit.formats.kohya import ModuleTensors


class ToolError(ValueError):
    """A file tool cannot do what was asked; the message names the file/module and what to do instead."""


@dataclass
class ResizeReport:
    """What resize or merge-into-one-LoRA wrote: per module its algorithm, kind, ranks and kept ‖ΔW‖² share."""
    modules: list[dict] = field(default_factory=list)  # name, algo, kind, old rank, new rank, retained energy
    path: str = ""

    def add(self, name: str, algo: str, shape: tuple, old_rank, new: "LowRank", retained: float) -> None:
        kind = "conv" if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else "linear"
        self.modules.append({"name": name, "algo": algo, "kind": kind, "old_rank": old_rank,
                             "new_rank": new.rank, "retained": retained})

    def lines(self) -> list[str]:
        out = [f"{'module':<72}{'algo':>10}{'kind':>7}{'rank':>11}{'kept ‖ΔW‖²':>12}"]
        for m in self.modules:
            out.append(f"{m['name']:<72}{m['algo']:>10}{m['kind']:>7}{str(m['old_rank']):>6} -> {m['new_rank']:<3}"
                       f"{m['retained']:>11.2%}")
        return out


@dataclass
class LowRank:
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank)

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple:
        """The adapted layer's weight shape: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:]) if self.mid is None else \
            (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale·up (out, r), down (r, in·kh·kw)) in float64; not for Tucker modules."""
        return (self.up.double().reshape(self.up.shape[0], -1) * self.scale,
                self.down.double().reshape(self.rank, -1))

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW in the layer's weight layout: (out, in) or (out, in, kh, kw)."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        mid = self.mid.to(dtype) if self.mid is not None else None
        if not self.is_conv and up.dim() == 4:  # 1x1 saved 4-D on a Linear (SD2 proj_in)
            up = up[:, :, 0, 0]
        if self.is_conv and up.dim() == 2:
            up = up[:, :, None, None]
        return lora_math.delta_weight(down, up, self.scale, mid)

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid
        out = {f"{self.name}.{k}": (v.to(dtype) if dtype else v).contiguous() for k, v in out.items()}
        out[f"{self.name}.alpha"] = torch.tensor(effective_alpha(self.alpha, self.rank), dtype=torch.float32)
        return out


def dora_needs_base(path: str, parsed: ModuleTensors) -> ToolError:
    return ToolError(f"{path}: module {parsed.name} is DoRA ({parsed.dora_axis} axis); its effective change "
                     "W' − W needs the base model's weight (W' = m ⊙ (W + ΔW) / ‖W + ΔW‖): pass the base model "
                     "with --base/-m, or bake it into a checkpoint with `lorakit merge --checkpoint BASE`")


def from_parsed(parsed: ModuleTensors, path: str) -> LowRank:
    if parsed.algo.name != "lora":
        raise ToolError(f"{path}: module {parsed.name} is {parsed.algo.name}; this tool works on LoRA/LoCon "
                        "modules (make it one with `lorakit resize`, which re-factorises LoHa/LoKr exactly)")
    if parsed.dora_axis is not None:  # W' − W depends on the base weight, which a LoRA file does not hold
        raise dora_needs_base(path, parsed)
    w = parsed.weights
    return LowRank(parsed.name, w["down"], w["up"], parsed.alpha, w.get("mid"))


def choose_rank(s: torch.Tensor, rank: int, method: str | None = None, param: float | None = None) -> int:
    """Rank to keep from singular values s (descending). method None: `rank`; else a dynamic rule capped
    at `rank`: sv_ratio keeps s >= s_max/param; sv_fro keeps `param` of the Frobenius norm; sv_cumulative
    keeps `param` of the sum of singular values."""
    s = s.double()
    if method is None:
        keep = rank
    elif float(s[0]) == 0.0:
        keep = 1
    elif method == "sv_ratio":
        keep = int((s >= s[0] / param).sum())
    elif method == "sv_fro":
        energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        keep = int((energy < param ** 2 - 1e-12).sum()) + 1
    elif method == "sv_cumulative":
        share = torch.cumsum(s, 0) / s.sum()
        keep = int((share < param - 1e-12).sum()) + 1
    else:
        raise ToolError(f"unknown dynamic method {method!r}; use sv_ratio, sv_fro or sv_cumulative")
    return max(1, min(keep, rank, s.numel()))


def factorize(name: str, delta: torch.Tensor, rank: int | None, method: str | None = None,
              param: float | None = None) -> tuple[LowRank, float]:
    """Best rank-r LoRA of a dense ΔW (alpha = rank, so scale 1) and the share of ‖ΔW‖² it keeps; rank None:
    the numerical rank (exact)."""
    u, s, vh = torch.linalg.svd(delta.double().reshape(delta.shape[0], -1), full_matrices=False)
    return _truncate(name, u, s, vh, delta.shape, rank, method, param)


def factorize_factors(name: str, up: torch.Tensor, down: torch.Tensor, shape: tuple, rank: int,
                      method: str | None = None, param: float | None = None) -> tuple[LowRank, float]:
    """The same for ΔW = up (out, R) @ down (R, in·kh·kw) given as factors (scale folded into up): the SVD
    comes from the factors, so resizing or merging big LoRAs never builds a dense (out, in·kh·kw) matrix."""
    u, s, vh = lora_math.svd_of_product(up.double(), down.double())
    return _truncate(name, u, s, vh, shape, rank, method, param)


def numerical_rank(s: torch.Tensor, shape: tuple) -> int:
    """Singular values above float64 round-off of the largest (numpy's matrix_rank rule): keeping these is exact."""
    tol = float(s[0]) * max(shape[0], math.prod(shape[1:])) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    return max(1, int((s > tol).sum()))


def _truncate(name, u, s, vh, shape, rank, method, param) -> tuple[LowRank, float]:
    keep = choose_rank(s, numerical_rank(s, shape) if rank is None else rank, method, param)
    root = s[:keep].sqrt()
    up, down = u[:, :keep] * root, root[:, None] * vh[:keep]  # balanced: both factors carry sqrt(S)
    total = float((s ** 2).sum())
    retained = float((s[:keep] ** 2).sum()) / total if total > 0 else 1.0
    if len(shape) == 4:
        down = down.reshape(keep, shape[1], shape[2], shape[3])
        up = up[:, :, None, None]
    return LowRank(name, down, up, float(keep)), retained  # float64: callers pick the file dtype in tensors()
