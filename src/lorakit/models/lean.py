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

# storage address -> (weak ref to the tensor, its version, rebuild(), rebuild's inputs and their versions,
# autocast state at creation)
_RECIPES: dict[int, tuple] = {}
_ACTIVE = [False]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _register(out: torch.Tensor, rebuild, inputs: tuple) -> None:
    """Record that `out` can be rebuilt by rebuild() from `inputs` (kept alive by their own users)."""
    if not _ACTIVE[0] or not isinstance(out, torch.Tensor) or out.device.type == "meta":
        return
    versions = tuple(t._version for t in inputs)
    _RECIPES[out.untyped_storage().data_ptr()] = (weakref.ref(out), out._version, rebuild, inputs, versions,
                                                  _autocast_state(out.device.type))


class _Recipe:
    """A saved tensor kept as how to rebuild it: the rebuilt base, then the same view of it."""

    def __init__(self, entry: tuple, saved: torch.Tensor):
        _, _, self.rebuild, self.inputs, self.versions, self.autocast = entry
        self.device_type = saved.device.type
        self.view = (saved.size(), saved.stride(), saved.storage_offset())

    def unpack(self) -> torch.Tensor:
        if tuple(t._version for t in self.inputs) != self.versions:
            raise RuntimeError("lorakit: an input of a recomputed activation was modified in place; "
                               "train without recompute_cheap_inputs (a lorakit bug: please report it)")
        enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
            base = self.rebuild()
        return base.as_strided(*self.view)


def _pack(saved: torch.Tensor):
    entry = _RECIPES.get(saved.untyped_storage().data_ptr()) if saved.device.type != "meta" else None
    if entry is not None:
        base = entry[0]()
        same_storage = base is not None and base.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()
        if same_storage and base._version == entry[1] == saved._version and base.dtype == saved.dtype:
            return _Recipe(entry, saved)
    return saved


def _unpack(packed):
    return packed.unpack() if isinstance(packed, _Recipe) else packed


@contextlib.contextmanager
def recompute_cheap_inputs():
    """Within: outputs of hooked LayerNorms and of GEGLUProduct that autograd would save are saved as recipes
    (see the module docstring). Wrap the forward only; backward rebuilds them outside."""
    _ACTIVE[0] = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _ACTIVE[0] = False
        _RECIPES.clear()


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
    """

    @staticmethod
    def forward(ctx, proj: torch.Tensor, approximate: str):
        ctx.save_for_backward(proj)
        ctx.approximate = approximate
        return _geglu(proj, approximate)

    @staticmethod
    def backward(ctx, grad):
        (proj,) = ctx.saved_tensors
        hidden, gate = proj.chunk(2, dim=-1)
        grad_hidden = grad * F.gelu(gate, approximate=ctx.approximate)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate, approximate=ctx.approximate)
        return torch.cat([grad_hidden, grad_gate], dim=-1), None


def _geglu(proj: torch.Tensor, approximate: str) -> torch.Tensor:
    hidden, gate = proj.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def _lean_geglu_forward(module: torch.nn.Module):
    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = module.proj(hidden_states)  # through an adapter on `proj`, if one is attached
        out = GEGLUProduct.apply(proj, "none")  # diffusers' GEGLU: exact gelu
        _register(out, lambda: _geglu(proj, "none"), (proj,))  # the next Linear's adapter keeps `out`
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
