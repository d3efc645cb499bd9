"""AdapterModule: parameters + dropouts + bypass/merged forward + merge/unmerge, shared by all algorithms.

An adapter is attached to a frozen Linear/Conv2d by replacing that layer's instance `forward`, so the
base model's state_dict keeps its own keys (a merged model saves like the original) and the adapter's
parameters live only in the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional.layer import LayerSpec, effective_alpha, scale_of
from lorakit.adapters.modules import dora

FORWARD_MODES = ("auto", "bypass", "merged")
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def compute_dtype(weight: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    """The dtype the adapted layer computes in: its weight's, unless that is a float8 storage dtype, which
    computes in autocast's dtype (or the input's). fp32 adapter weights are cast to it, never the reverse."""
    if weight.dtype not in FLOAT8:
        return weight.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass(frozen=True)
class Dropouts:
    """Training-only regularisers (kohya semantics).

    dropout: F.dropout on the rank activations (LoRA/LoCon only).
    rank_dropout: per-sample keep-mask over the rank, rescaled by 1/(1-p).
    module_dropout: skip the whole adapter for a call with probability p.
    rank_dropout_scale: LyCORIS's rescale instead: the keep-mask divided by its own mean.
    """

    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False

    def rescaled(self, keep: torch.Tensor) -> torch.Tensor:
        """A 0/1 keep-mask of rank_dropout, rescaled: by 1/(1-p) (kohya), or by 1/mean(mask) with
        rank_dropout_scale (LyCORIS; an all-zero mask stays zero)."""
        if self.rank_dropout_scale:
            return keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
        return keep / (1.0 - self.rank_dropout)

    def __post_init__(self):
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")


class AdapterModule(nn.Module):
    algo: str = ""
    # where dropout/rank_dropout are defined: LoRA masks rank activations (bypass path); LoHa/LoKr mask
    # output rows of ΔW (merged path)
    dropout_path: str = "merged"

    def __init__(self, spec: LayerSpec, weights: dict[str, torch.Tensor], alpha: float | None,
                 dropouts: Dropouts = Dropouts(), forward_mode: str = "auto"):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        self.spec = spec
        for name, tensor in weights.items():
            self.register_parameter(name, nn.Parameter(tensor))
        self.param_names = tuple(weights)
        self.dora_axis = dora.axis_of(spec, weights)  # 'output' / 'input' with a DoRA magnitude, else None
        self._magnitude_pending = False  # a created (not loaded) magnitude becomes ‖W‖ on attach
        self.dora_detach_norm = False  # see dora.configure
        if self.dora_axis is not None:
            self.dropout_path = "merged"  # the norm needs the whole ΔW: masks act on its output rows
        rank = self.rank
        alpha = effective_alpha(alpha, rank)  # stored as kohya does: alpha unset or 0 becomes the rank
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self._alpha_key: tuple[int, int] | None = None  # see alpha_value
        self._alpha_float = float(alpha)
        self.multiplier = 1.0
        self.dropouts = dropouts
        self.forward_mode = forward_mode
        self._layer: list[nn.Module] = []  # hidden from named_parameters(): the base layer is not ours
        self._merged = False
        self._backup: torch.Tensor | None = None
        self._chosen: dict[tuple, str] = {}
        if forward_mode == "bypass" and self.bypass_flops(1) is None:
            raise ValueError(f"{self.algo} has no bypass path; use forward_mode 'merged' or 'auto'")

    # ---- per-algorithm math, implemented by subclasses -------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def alpha_value(self) -> float:
        """The alpha buffer as a Python float, read again only after it changed (new tensor or in-place write,
        such as load_state_dict): on a GPU each read is a device-to-host copy that waits for the queue, and
        the scale is wanted at every forward of every adapter."""
        if torch.compiler.is_compiling():  # a traced graph takes it as a constant, read in eager before
            return self._alpha_float  # (a guard on the float alone: adapters with equal alphas share code)
        key = (id(self.alpha), self.alpha._version)
        if self._alpha_key != key:
            self._alpha_key, self._alpha_float = key, float(self.alpha)
        return self._alpha_float

    @property
    def scale(self) -> float:
        return scale_of(self.alpha_value, self.rank)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (without the multiplier), shaped like the base weight."""
        raise NotImplementedError

    def delta_sq_norm(self) -> torch.Tensor:
        """‖ΔW‖²_F (without the multiplier) as a float64 scalar. Where ΔW = s·U·D (lowrank_factors) it comes
        from two (r, r) Grams and no weight-sized tensor is built: the per-epoch norm log and kohya's max-norm
        (every step) would otherwise build every module's ΔW in turn, up to 118 MB each on SDXL (a
        1280x2560x3x3 conv), and the freed blocks stay in the process (glibc keeps them), raising its peak."""
        factors = self.lowrank_factors()
        if factors is not None:
            return F_lora.product_sq_norm(*factors)
        return torch.linalg.vector_norm(self.delta_weight(), dtype=torch.float64) ** 2

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """ΔW·x without building ΔW, or None when the algorithm has no cheaper path."""
        return None

    def bypass_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora_axis is not None:
            return dora.bypass_forward(self, x)
        delta = self.bypass_delta(x)
        y = self._base(x)
        return y + delta if self.multiplier == 1.0 else y + delta * self.multiplier

    def undecomposed_bypass(self, x: torch.Tensor) -> torch.Tensor:
        """Wx + b + ΔWx at multiplier 1 (DoRA's bypass scales this, or its input, per channel)."""
        return self._base(x) + self.bypass_delta(x)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up (out, r[, 1, 1]), down (r, in[, kh, kw]), scale) when ΔW = scale · up @ down, else None."""
        return None

    def bypass_flops(self, positions: int) -> int | None:
        return None

    def folds(self, x: torch.Tensor) -> bool:
        """Whether the bypass runs with the rank-r product folded into the weight (LoRA/LoCon: lora.py)."""
        return False

    def runs_dora_gemm(self, x: torch.Tensor) -> bool:
        """Whether the bypass runs as one GEMM with DoRA's norm products (LoRA/LoCon: lora.py)."""
        return False

    def bypass_cost(self, positions: int) -> float | None:
        """bypass_flops weighted by how fast those kernels run relative to the base GEMM/conv (default 1)."""
        return self.bypass_flops(positions)

    def build_flops(self) -> int:
        """Multiply-adds to build ΔW (default: one rank-r product of the weight's size)."""
        return math.prod(self.spec.weight_shape) * self.rank

    def training_flops(self, x: torch.Tensor, mode: str | None = None) -> int:
        """Multiply-adds of forward + backward through the adapted layer for input x (input needs grad).

        frozen layer alone: 2F (forward, grad-input). bypass: 2F + 3A (adapter forward, grad-input,
        grad-weight), folded 2F + 2A + 2B. merged: 3F (the weight gradient is now needed) + 3B (building ΔW and
        its backward).
        """
        positions = self._output_positions(x)
        base = positions * math.prod(self.spec.weight_shape)
        mode = mode or self._choose_mode(x)
        if mode == "bypass":
            norm = self._dora_norm_flops()
            # folded: W' built twice (forward, grad-input), the rank-r path twice (the two weight gradients)
            adapter = (2 * self.bypass_flops(positions) + 2 * self.build_flops() if self.folds(x)
                       else 3 * self.bypass_flops(positions))
            return 2 * base + adapter + norm
        return 3 * base + 3 * self.build_flops()

    def _dora_norm_flops(self) -> int:
        """What DoRA's bypass pays for ‖W + ΔW‖: ΔW built and its backward (3B), or for LoRA W·Dᵀ and its
        gradient (2B); a detached norm has no backward (1B)."""
        if self.dora_axis is None:
            return 0
        if self.dora_detach_norm:
            return self.build_flops()
        return (2 if self.lowrank_factors() is not None else 3) * self.build_flops()

    def recompute_flops(self, x: torch.Tensor, mode: str | None = None) -> int:
        """Multiply-adds the adapter adds each time its layer's forward runs again (gradient checkpointing
        recomputes it in backward): its own forward beyond the frozen layer's. bypass: A (and a DoRA norm,
        about one ΔW-sized product); merged: building ΔW."""
        mode = mode or self._choose_mode(x)
        if mode == "bypass":
            adapter = self.build_flops() if self.folds(x) else self.bypass_flops(self._output_positions(x))
            return adapter + (self.build_flops() if self.dora_axis else 0)
        return self.build_flops()

    # the factor LyCORIS folds its use_scalar scalar into (lora_up, hada_w1_a, lokr_w1 / lokr_w1_a)
    scalar_targets: tuple[str, ...] = ()

    def weights(self) -> dict[str, torch.Tensor]:
        """The factors as files hold them: with use_scalar, one factor carries the scalar (LyCORIS folds it
        at save), so ΔW, merging and saving all see scalar · ΔW."""
        weights = {n: getattr(self, n) for n in self.param_names}
        scalar = getattr(self, "scalar", None)
        if scalar is not None:
            target = next(n for n in self.scalar_targets if n in weights)
            weights[target] = weights[target] * scalar
        return weights

    def add_scalar(self) -> None:
        """LyCORIS use_scalar: a trained scalar starting at 0 multiplies ΔW (so step 0 is the base model
        even though every factor starts random)."""
        ref = getattr(self, self.param_names[0])
        self.scalar = nn.Parameter(torch.zeros((), dtype=ref.dtype, device=ref.device))

    # ---- attaching to a frozen layer ---------------------------------------------------------
    @property
    def layer(self) -> nn.Module:
        if not self._layer:
            raise RuntimeError("adapter is not attached to a layer")
        return self._layer[0]

    def attach(self, layer: nn.Module) -> None:
        if LayerSpec.of(layer).weight_shape != self.spec.weight_shape:
            raise ValueError(f"adapter expects weight {self.spec.weight_shape}, layer has {tuple(layer.weight.shape)}")
        patched = layer.__dict__.get("forward")
        if patched is not None and getattr(patched, "__func__", None) is not type(layer).forward:
            owner = type(getattr(patched, "__self__", None)).__name__
            raise RuntimeError(f"{type(layer).__name__} layer already has its forward replaced (by {owner}); "
                               "restore that adapter first")
        self._layer = [layer]
        if self._magnitude_pending:
            dora.init_from_layer(self, layer.weight)
            self._magnitude_pending = False
        layer.forward = self.forward

    def detach(self) -> None:
        if self._merged:
            self.unmerge()
        if self._layer:
            self.layer.__dict__.pop("forward", None)
            self._layer = []

    # ---- forward -----------------------------------------------------------------------------
    def _base(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        layer = self.layer
        weight = layer.weight if weight is None else weight
        if weight.dtype in FLOAT8:  # storage only (fp8_base): no kernel takes it, compute upcast
            weight = weight.to(compute_dtype(weight, x))
        return self.spec.apply(x, weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged or self.multiplier == 0.0:
            return self._base(x)
        if self.training and self.dropouts.module_dropout > 0.0:
            if torch.rand((), device="cpu").item() < self.dropouts.module_dropout:
                return self._base(x)
        if self._mode_for(x) == "bypass":
            return self.bypass_forward(x)
        weight = self.layer.weight
        dtype = compute_dtype(weight, x)  # fp8 weights cannot be added to: both upcast
        if self.dora_axis is not None:  # W' built once per call from the weight, never per token
            return self._base(x, dora.applied_weight(self, weight, self.training_delta_weight(),
                                                     self.multiplier).to(dtype))
        dw = self.training_delta_weight().to(dtype)
        return self._base(x, weight.to(dtype) + dw * self.multiplier)

    def training_delta_weight(self) -> torch.Tensor:
        """ΔW with rank_dropout applied (LoHa/LoKr: a mask over output rows, rescaled by 1/(1-p))."""
        dw = self.delta_weight()
        p = self.dropouts.rank_dropout
        if self.training and p > 0.0:
            keep = self.dropouts.rescaled((torch.rand(dw.shape[0], device=dw.device) >= p).to(dw.dtype))
            dw = dw * keep.view(-1, *([1] * (dw.dim() - 1)))
        return dw

    def _mode_for(self, x: torch.Tensor) -> str:
        # dropouts are defined on one path; in training they take precedence over a forced forward_mode
        if self.training and (self.dropouts.dropout > 0.0 or self.dropouts.rank_dropout > 0.0):
            return self.dropout_path
        if self.forward_mode != "auto":
            return self.forward_mode
        key = (tuple(x.shape), torch.is_grad_enabled())
        mode = self._chosen.get(key)
        if mode is None:
            mode = self._choose_mode(x)
            self._chosen[key] = mode
        return mode

    def _choose_mode(self, x: torch.Tensor) -> str:
        """Pick the cheaper exact path from multiply-add counts.

        bypass: base conv (fwd + grad-input) + adapter path (3x its forward: fwd, grad-input, grad-weight)
        merged: base conv with W+ΔW (fwd + grad-input + grad-weight for ΔW) + building ΔW (3x in training)
        """
        positions = self._output_positions(x)
        adapter = self.bypass_cost(positions)
        if adapter is None:
            return "merged"
        base = positions * math.prod(self.spec.weight_shape)
        if self.dora_axis is not None:  # both paths pay for the norm; bypass saves W's weight gradient
            return "bypass" if torch.is_grad_enabled() and 3 * adapter < base else "merged"
        build = self.build_flops()
        if torch.is_grad_enabled():
            return "bypass" if 3 * adapter < base + 3 * build else "merged"
        return "bypass" if adapter < build else "merged"

    def _output_positions(self, x: torch.Tensor) -> int:
        if not self.spec.is_conv:
            return x.numel() // x.shape[-1]
        kh, kw = self.spec.kernel
        (sh, sw), (dh, dw) = self.spec.stride, self.spec.dilation
        pad = self.spec.padding
        ph, pw = (kh // 2 * dh, kw // 2 * dw) if isinstance(pad, str) else pad
        h = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x.shape[0] * h * w

    # ---- merge / unmerge ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W += multiplier · ΔW in place (computed in float32). unmerge() restores W exactly."""
        if self._merged:
            return
        weight = self.layer.weight
        if weight.dtype not in (torch.float32, torch.float64) or self.dora_axis is not None:
            self._backup = weight.detach().clone()  # DoRA: W' depends on W, so W is not recoverable from W'  # low precision: W + ΔW - ΔW would not round-trip
        dw = self.delta_weight().to(torch.float32 if weight.dtype != torch.float64 else weight.dtype)
        if self.dora_axis is not None:
            weight.copy_(dora.applied_weight(self, weight, dw, self.multiplier).to(weight.dtype))
        else:
            weight.copy_((weight.to(dw.dtype) + dw * self.multiplier).to(weight.dtype))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        weight = self.layer.weight
        if self._backup is not None:
            weight.copy_(self._backup)
            self._backup = None
        else:
            weight.sub_((self.delta_weight() * self.multiplier).to(weight.dtype))
        self._merged = False

    @property
    def merged(self) -> bool:
        return self._merged

    def extra_repr(self) -> str:
        return f"{self.spec.kind} {self.spec.weight_shape}, rank={self.rank}, alpha={float(self.alpha):g}"
