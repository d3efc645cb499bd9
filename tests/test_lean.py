"""Memory-lean training (models/lean.py): the same outputs and gradients as the plain U-Net, bit for bit, with
fewer bytes kept for backward."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import lorakit.models.lean as lean
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network

from conftest import randomize, unet_inputs


@pytest.fixture
def one_thread():
    """CPU reductions split over threads may round differently from run to run; one thread makes the
    plain run itself repeatable, so 'bit for bit' can be asserted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_geglu_product_gives_the_plain_expressions_gradients(dtype):
    proj = torch.randn(3, 5, 14, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, 7, dtype=dtype)
    hidden, gate = proj.chunk(2, dim=-1)
    plain = hidden * F.gelu(gate)
    (expected,) = torch.autograd.grad(plain, proj, grad)
    ours = lean.GEGLUProduct.apply(proj, "none")
    (got,) = torch.autograd.grad(ours, proj, grad)
    assert torch.equal(ours, plain) and torch.equal(got, expected)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda p: lean.GEGLUProduct.apply(p, "none"), (proj,))


def saved_bytes(step, params: set) -> tuple[int, int, int]:
    """(bytes of activations autograd keeps, recipes, bytes of the storages saved as recipes) during step();
    lean's own hooks, when active, are the innermost ones, so its _pack is counted through."""
    seen, recipes, recipe_bytes = {}, [0], {}
    real_pack = lean._pack

    def counted(t):
        packed = real_pack(t)
        if isinstance(packed, lean._Recipe):
            recipes[0] += 1
            recipe_bytes[id(packed.entry)] = t.untyped_storage().nbytes()
        elif t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return packed

    lean._pack = counted
    try:
        with torch.autograd.graph.saved_tensors_hooks(counted, lambda t: t):
            step()
    finally:
        lean._pack = real_pack
    return sum(seen.values()), recipes[0], sum(recipe_bytes.values())


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_recompute_gives_the_same_outputs_and_gradients_and_keeps_less(tiny_sd1, one_thread, amp):
    """fp32 runs the fused Linear LoRA (which keeps a reshaped view of its input); bf16 autocast the plain
    bypass: both keep a LayerNorm output or the GEGLU product for their adapters."""
    unet, _ = tiny_sd1
    net = create_network(unet, [], NetworkConfig(network_dim=4, conv_dim=4))
    randomize(net, std=0.05)
    unet.train()
    x, t, ctx, _ = unet_inputs(unet)
    params = {p.untyped_storage().data_ptr() for p in (*unet.parameters(), *net.parameters())}

    def run(lean_ctx):
        out = {}

        def step():
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None), lean_ctx():
                out["y"] = unet(x, t, ctx).sample
            out["y"].float().square().mean().backward()

        kept = saved_bytes(step, params)
        grads = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        return out["y"].detach(), grads, kept

    plain_y, plain_grads, (plain_kept, _, _) = run(contextlib.nullcontext)
    counts = lean.make_lean(unet)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and counts == {"geglu": len(blocks), "layernorm": 3 * len(blocks)}
    geglu_y, geglu_grads, (geglu_kept, _, _) = run(contextlib.nullcontext)
    stats = {}
    lean_y, lean_grads, (lean_kept, recipes, recipe_bytes) = run(lambda: lean.recompute_cheap_inputs(stats))
    assert stats["bytes"] == recipe_bytes > 0  # what Recompute weighs against the peak
    assert torch.equal(plain_y, geglu_y) and torch.equal(plain_y, lean_y)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, geglu_grads))
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, lean_grads))
    assert recipes > 0 and lean_kept < geglu_kept < plain_kept
    assert not lean._RECIPES  # nothing outlives the forward


def test_an_input_changed_in_place_is_an_error_not_a_wrong_gradient():
    norm = torch.nn.LayerNorm(6)
    lean.make_lean(norm)
    x = torch.randn(4, 6)
    w = torch.randn(6, 3, requires_grad=True)
    with lean.recompute_cheap_inputs():
        y = norm(x)
        loss = (y @ w).sum()  # the matmul keeps y for w's gradient: saved as a recipe
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_outside_the_context_nothing_is_recorded():
    norm = torch.nn.LayerNorm(6)
    lean.make_lean(norm)
    lean.make_lean(norm)  # idempotent: one hook
    assert len(norm._forward_hooks) == 1
    norm(torch.randn(2, 6))
    assert not lean._RECIPES


def test_a_norm_with_a_replaced_forward_is_kept_as_it_is():
    """A train_norm adapter replaces the LayerNorm's forward, and its module_dropout draws at random: such an
    output could differ when rebuilt, so it is saved as usual."""
    norm = torch.nn.LayerNorm(6)
    lean.make_lean(norm)
    norm.forward = lambda x: F.layer_norm(x, (6,), norm.weight, norm.bias) * 2
    with lean.recompute_cheap_inputs():
        norm(torch.randn(2, 6))
        assert not lean._RECIPES
        del norm.forward
        norm(torch.randn(2, 6))
        assert len(lean._RECIPES) == 1


def test_a_norm_output_saved_for_several_adapters_is_rebuilt_once_and_gelu_once(tiny_sd1, monkeypatch):
    """norm1's output feeds to_q, to_k and to_v, each adapter saving it: one rebuild serves all three. The
    GEGLU product's rebuild (for ff.net.2's adapter) hands its gelu(g) to GEGLUProduct's backward."""
    unet, _ = tiny_sd1
    unet.requires_grad_(False)  # frozen, as in training: only the adapters save norm1's output
    net = create_network(unet, [], NetworkConfig(network_dim=4, conv_dim=4))
    randomize(net, std=0.05)
    unet.train()
    lean.make_lean(unet)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    x, t, ctx, _ = unet_inputs(unet)
    with lean.recompute_cheap_inputs():
        loss = unet(x, t, ctx).sample.square().mean()
    norm_calls, gelu_calls = [0], [0]
    for block in blocks:
        for norm in (block.norm1, block.norm2, block.norm3):
            norm.register_forward_hook(lambda *_: norm_calls.__setitem__(0, norm_calls[0] + 1))
    real_gelu = F.gelu

    def counted_gelu(*args, **kwargs):
        gelu_calls[0] += 1
        return real_gelu(*args, **kwargs)

    monkeypatch.setattr(F, "gelu", counted_gelu)
    loss.backward()
    assert norm_calls[0] == 3 * len(blocks)  # not 5: to_q, to_k, to_v share norm1's
    assert gelu_calls[0] == len(blocks)  # not 2 a block


def test_recompute_stays_on_only_where_it_keeps_enough_out_of_the_peak():
    """Recompute measures the first training forward at each new largest input size: it turns off (and says so)
    where what it keeps out of the graph is under RECOMPUTE_MIN_PEAK_SHARE of the peak, stays on where it is
    more or the peak is unknown, measures again at a larger size, and never measures a no_grad forward."""
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))  # the Linear keeps the norm's output
    lean.make_lean(model)
    told = []

    def forward(policy, tokens):
        with policy.context(tokens * 16):  # the forward only, as in the trainer
            active = lean._ACTIVE[0]
            loss = model(torch.randn(tokens, 16)).sum()
        loss.backward()
        return active

    kept = 8 * 16 * 4  # bytes of the norm's float32 output at 8 tokens
    share = lean.RECOMPUTE_MIN_PEAK_SHARE
    for peak, stays_on in [(None, True), (int(kept / share), True), (int(kept / share) + 64, False)]:
        told.clear()
        policy = lean.Recompute(lambda: peak, told.extend)
        with torch.no_grad(), policy.context(8 * 16):
            model(torch.randn(8, 16))
        assert policy.measured_size == 0 and policy.on
        assert forward(policy, 8) and policy.on == stays_on  # the measured forward itself runs with it
        assert forward(policy, 8) == stays_on and forward(policy, 4) == stays_on
        assert len(told) == (0 if stays_on else 1) and all("recompute off" in line for line in told)
    assert forward(policy, 16) and policy.on and len(told) == 1  # a larger size, measured again: enough there
    assert forward(policy, 8) and forward(policy, 16)
    with policy.context(64 * 16, hooks=False):  # a compiled U-Net: never with hooks, nothing measured
        assert not lean._ACTIVE[0]
    assert policy.measured_size == 16 * 16
