"""Memory-lean training of a frozen U-Net: the same outputs and gradients, fewer saved activations.

An adapter on a frozen Linear keeps that layer's input for its own weight gradient; the frozen layer alone
never did. Those inputs are mostly cheap to recompute from tensors the U-Net keeps anyway: a LayerNorm's
output from its input (which LayerNorm's backward keeps), the GEGLU product from the projection it is taken
from. Inside `recompute_cheap_inputs()`, such tensors are saved as a recipe and rebuilt, bit for bit, when
backward needs them (one norm or one elementwise pass). SDXL at 512 px, bf16, LoCon 8/8: saved activations
1708 -> 1158 MiB with GEGLUProduct below (tokens, so also these, grow 4x at 1024 px). Nothing here changes a
module's state_dict.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Entry:
    """One rebuildable tensor: a weak ref to it and its version, rebuild() and its inputs with their versions,
    the autocast state at creation. `pending` counts the saved copies not yet unpacked: a LayerNorm's output
    feeding to_q, to_k and to_v is saved three times and rebuilt once, kept from the first unpack to the last."""

    __slots__ = ("ref", "version", "rebuild", "inputs", "versions", "autocast", "pending", "rebuilt", "nbytes",
                 "counted")

    def __init__(self, out: torch.Tensor, rebuild, inputs: tuple):
        self.ref, self.version, self.rebuild, self.inputs = weakref.ref(out), out._version, rebuild, inputs
        self.nbytes, self.counted = out.untyped_storage().nbytes(), False
        self.versions = tuple(t._version for t in inputs)
        self.autocast = _autocast_state(out.device.type)
        self.pending, self.rebuilt = 0, None

    def base(self, device_type: str) -> torch.Tensor:
        if tuple(t._version for t in self.inputs) != self.versions:
            raise RuntimeError("lorakit: an input of a recomputed activation was modified in place; "
                               "train without recompute_cheap_inputs (a lorakit bug: please report it)")
        base = self.rebuilt
        if base is None:
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                base = self.rebuild()
        self.pending -= 1  # below zero only when a retained graph is run again: then rebuilt every time
        self.rebuilt = base if self.pending > 0 else None
        return base


# storage address -> _Entry, while recompute_cheap_inputs() is active; bytes saved as recipes in that time
_RECIPES: dict[int, _Entry] = {}
_ACTIVE = [False]
_KEPT_OUT = [0]


def _register(out: torch.Tensor, rebuild, inputs: tuple) -> None:
    """Record that `out` can be rebuilt by rebuild() from `inputs` (kept alive by their own users)."""
    if not _ACTIVE[0] or not isinstance(out, torch.Tensor) or out.device.type == "meta":
        return
    _RECIPES[out.untyped_storage().data_ptr()] = _Entry(out, rebuild, inputs)


class _Recipe:
    """A saved tensor kept as how to rebuild it: the rebuilt base, then the same view of it."""

    __slots__ = ("entry", "device_type", "view")

    def __init__(self, entry: _Entry, saved: torch.Tensor):
        entry.pending += 1
        if not entry.counted:  # counted now: a freed recipe's storage address may be registered again later
            entry.counted = True
            _KEPT_OUT[0] += entry.nbytes
        self.entry, self.device_type = entry, saved.device.type
        self.view = (saved.size(), saved.stride(), saved.storage_offset())

    def unpack(self) -> torch.Tensor:
        return self.entry.base(self.device_type).as_strided(*self.view)


def _pack(saved: torch.Tensor):
    entry = _RECIPES.get(saved.untyped_storage().data_ptr()) if saved.device.type != "meta" else None
    if entry is not None:
        base = entry.ref()
        same_storage = base is not None and base.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()
        if same_storage and base._version == entry.version == saved._version and base.dtype == saved.dtype:
            return _Recipe(entry, saved)
    return saved


def _unpack(packed):
    return packed.unpack() if isinstance(packed, _Recipe) else packed


@contextlib.contextmanager
def recompute_cheap_inputs(stats: dict | None = None):
    """Within: outputs of hooked LayerNorms and of GEGLUProduct that autograd would save are saved as recipes
    (see the module docstring). Wrap the forward only; backward rebuilds them outside. stats, if given, gets
    "bytes": the storage kept out of the graph (every tensor saved at least once as a recipe)."""
    _ACTIVE[0], _KEPT_OUT[0] = True, 0
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        if stats is not None:
            stats["bytes"] = _KEPT_OUT[0]
        _ACTIVE[0] = False
        _RECIPES.clear()


# Recompute.context(): the least share of the run's peak memory the recompute must keep out of the graph to stay
# on. It costs time: 1.0-1.7% of a step of the SD1.5 U-Net at 256 px fp32 (2-core AMD EPYC, in-process rotation,
# 28-47 ms of 2.7-3.0 s; benchmarks/train_step.py 2.94-2.95 s against 2.99-3.02 s without and with it). What it
# keeps out, against the peak RSS when the first forward ends (benchmarks/train_step.py, 2026-12-05): SD1.5 fp32
# 77 MiB of 4.56 GiB at 256 px (1.7%; the run's peak is 4.56-4.57 GiB either way), 308 MiB of 5.49 GiB at 512 px
# (5.5%; peak 5.70 against 5.80 GiB without); SDXL 512 px bf16 350 MiB of 7.29 GiB (4.7%; 7.60 against 7.76 GiB).
# Memory is worth the time where it can save about twice the share the time costs.
RECOMPUTE_MIN_PEAK_SHARE = 1 / 32


class Recompute:
    """recompute_cheap_inputs() for a training run, kept where it can matter. The first training forward at each
    input size larger than any before runs with it and measures the bytes it keeps out of the graph; under
    RECOMPUTE_MIN_PEAK_SHARE of the run's peak memory so far (peak_bytes(); None: unknown, kept on), later
    forwards at that size or smaller run without it. tell() gets one line for each decision that turns it off."""

    def __init__(self, peak_bytes, tell=lambda lines: None):
        self.peak_bytes, self.tell = peak_bytes, tell
        self.measured_size, self.on = 0, True

    def context(self, size: int, hooks: bool = True):
        """The context for one forward over an input of `size` elements; hooks False (a torch.compile'd model,
        which traces no saved-tensor hooks) runs it without."""
        if not hooks or not torch.is_grad_enabled():  # nothing is saved: nothing to measure
            return contextlib.nullcontext()
        if size > self.measured_size:
            return self._measure(size)
        return recompute_cheap_inputs() if self.on else contextlib.nullcontext()

    @contextlib.contextmanager
    def _measure(self, size: int):
        stats = {}
        with recompute_cheap_inputs(stats):
            yield
        peak = self.peak_bytes()
        self.measured_size, self.on = size, not peak or stats["bytes"] >= peak * RECOMPUTE_MIN_PEAK_SHARE
        if not self.on:
            kept, share = stats["bytes"] / 2 ** 20, round(1 / RECOMPUTE_MIN_PEAK_SHARE)
            self.tell([f"note: activation recompute off: it would keep {kept:.1f} MiB out of a {peak / 2 ** 30:.2f} "
                       f"GiB peak (under 1/{share}); steps run about 1% faster without it"])


def _norm_hook(module: torch.nn.Module, args: tuple, out) -> None:
    # a replaced forward (a train_norm adapter, whose module_dropout draws at random) might not give the same
    # output twice: only the plain LayerNorm is rebuilt
    if "forward" not in module.__dict__ and len(args) == 1 and isinstance(args[0], torch.Tensor):
        _register(out, lambda: module(args[0]), (args[0],))


class GEGLUProduct(torch.autograd.Function):
    """h ⊙ gelu(g) for p = [h | g], the GEGLU projection's output (..., 2·d), saving p alone.

    Autograd over the plain expression also keeps gelu(g) (..., d): as large as the output, in every
    transformer block (SDXL at 512 px: ~225 MiB in bf16). Backward recomputes it, one elementwise pass, with
    the kernels autograd would use (grad ⊙ gelu(g); gelu_backward(grad ⊙ h, g)): the same gradients, bit for bit.
    `slot`, a list, may hand backward a gelu(g) already rebuilt: the product's recipe (below) computes it just
    before, when the next Linear's adapter needs the product.
    """

    @staticmethod
    def forward(ctx, proj: torch.Tensor, approximate: str, slot: list | None = None):
        ctx.save_for_backward(proj)
        ctx.approximate, ctx.slot = approximate, slot
        return _geglu(proj, approximate)

    @staticmethod
    def backward(ctx, grad):
        (proj,) = ctx.saved_tensors
        hidden, gate = proj.chunk(2, dim=-1)
        activation = ctx.slot.pop() if ctx.slot else None
        if activation is None or activation.dtype != gate.dtype:
            activation = F.gelu(gate, approximate=ctx.approximate)
        grad_proj = torch.empty(proj.shape, dtype=grad.dtype, device=grad.device)
        grad_hidden, grad_gate = grad_proj.chunk(2, dim=-1)  # written in place: no cat of the halves
        torch.mul(grad, activation, out=grad_hidden)
        torch.ops.aten.gelu_backward.grad_input(grad * hidden, gate, approximate=ctx.approximate,
                                                grad_input=grad_gate)
        return grad_proj, None, None


def _geglu(proj: torch.Tensor, approximate: str, slot: list | None = None) -> torch.Tensor:
    hidden, gate = proj.chunk(2, dim=-1)
    activation = F.gelu(gate, approximate=approximate)
    if slot is not None:
        slot[:] = [activation]
    return hidden * activation


def _lean_geglu_forward(module: torch.nn.Module):
    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = module.proj(hidden_states)  # through an adapter on `proj`, if one is attached
        if torch.compiler.is_compiling():  # a compiled graph chooses what to keep by itself
            return _geglu(proj, "none")
        slot = []
        out = GEGLUProduct.apply(proj, "none", slot)  # diffusers' GEGLU: exact gelu
        _register(out, lambda: _geglu(proj, "none", slot), (proj,))  # the next Linear's adapter keeps `out`
        return out
    forward.lorakit_lean = True
    return forward


def make_lean(model: torch.nn.Module) -> dict[str, int]:
    """Install the lean paths on `model` (idempotent): every diffusers GEGLU computes through GEGLUProduct,
    every LayerNorm's output becomes rebuildable inside recompute_cheap_inputs(). Returns the counts."""
    from diffusers.models.activations import GEGLU

    counts = {"geglu": 0, "layernorm": 0}
    for module in model.modules():
        if type(module) is GEGLU:
            if not getattr(module.forward, "lorakit_lean", False):
                module.forward = _lean_geglu_forward(module)
            counts["geglu"] += 1
        elif isinstance(module, torch.nn.LayerNorm):
            if not getattr(module, "_lorakit_lean_hook", None):
                module._lorakit_lean_hook = module.register_forward_hook(_norm_hook)
            counts["layernorm"] += 1
    return counts
