"""ΔW against float64 closed forms, bypass = merged, step 0 = base, merge/unmerge, only adapters train."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional import lokr as F_lokr
from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules.base import Dropouts
from lorakit.adapters.modules.loha import LoHaOptions
from lorakit.adapters.modules.lokr import LoKrOptions
from lorakit.adapters.modules import lora as lora_module
from lorakit.adapters.modules.lora import LoRAOptions
from lorakit.adapters.registry import get_algorithm

LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv1x1": lambda: nn.Conv2d(24, 40, 1),
    "conv3x3_s1": lambda: nn.Conv2d(24, 40, 3, padding=1),
    "conv3x3_s2": lambda: nn.Conv2d(24, 40, 3, stride=2, padding=1),
}
VARIANTS = {
    "lora": LoRAOptions(), "lora_tucker": LoRAOptions(use_tucker=True),
    "loha": LoHaOptions(), "loha_tucker": LoHaOptions(use_tucker=True),
    "lokr": LoKrOptions(factor=4), "lokr_both": LoKrOptions(factor=8, decompose_both=True),
    "lokr_tucker": LoKrOptions(factor=4, use_tucker=True), "lokr_full": LoKrOptions(factor=4, full_matrix=True),
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
RANK, ALPHA = 4, 3.0


def make(layer_name, variant, dtype, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[layer_name]().to(dtype).requires_grad_(False)
    algo = get_algorithm(variant.split("_")[0])
    adapter = algo.module.create(LayerSpec.of(layer), RANK, ALPHA, VARIANTS[variant], dtype=dtype)
    return layer, adapter


def randomize_(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def inputs(layer, dtype, batch=3):
    g = torch.Generator().manual_seed(2)
    shape = (batch, 7, 24) if isinstance(layer, nn.Linear) else (batch, 24, 9, 9)
    return torch.randn(shape, generator=g).to(dtype)


def closed_form(adapter) -> torch.Tensor:
    """ΔW from the published formulas, in float64, written independently of lorakit's functional code."""
    w = {k: v.detach().double() for k, v in adapter.weights().items()}
    shape, alpha = adapter.spec.weight_shape, float(adapter.alpha)
    out_ch = shape[0]
    if adapter.algo == "lora":
        r = w["down"].shape[0]
        if "mid" in w:  # Σ_ab up[o,a] mid[a,b,h,w] down[b,i]
            up, mid, down = w["up"][:, :, 0, 0], w["mid"], w["down"][:, :, 0, 0]
            dw = torch.zeros(shape, dtype=torch.float64)
            for a, b in itertools.product(range(r), range(r)):
                dw += up[:, a, None, None, None] * mid[a, b][None, None] * down[b][None, :, None, None]
        else:
            dw = (w["up"].reshape(out_ch, r) @ w["down"].reshape(r, -1)).reshape(shape)
        return dw * alpha / r
    if adapter.algo == "loha":
        r = w["w1b"].shape[0]
        if "t1" in w:
            def half(t, a, b):
                return torch.einsum("ijhw,io,jn->onhw", t, a, b)
            dw = half(w["t1"], w["w1a"], w["w1b"]) * half(w["t2"], w["w2a"], w["w2b"])
        else:
            dw = ((w["w1a"] @ w["w1b"]) * (w["w2a"] @ w["w2b"])).reshape(shape)
        return dw * alpha / r
    w1 = w["w1"] if "w1" in w else w["w1a"] @ w["w1b"]
    a, c = w1.shape
    b, d = out_ch // a, shape[1] // c
    if "w2" in w:
        w2 = w["w2"]
    elif "t2" in w:
        w2 = torch.einsum("ijhw,ip,jq->pqhw", w["t2"], w["w2a"], w["w2b"])
    else:
        w2 = (w["w2a"] @ w["w2b"]).reshape(b, d, *shape[2:])
    dw = torch.zeros(shape, dtype=torch.float64)
    for i, j in itertools.product(range(a), range(c)):  # ΔW[i·b+p, j·d+q] = W1[i,j]·W2[p,q]
        dw[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j] * w2
    factorised = "w1b" in w or "w2b" in w
    rank = (w["w1b"] if "w1b" in w else w["w2b"]).shape[0] if factorised else None
    return dw * (alpha / rank if factorised else 1.0)


CASES = list(itertools.product(LAYERS, VARIANTS, [torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("layer_name,variant,dtype", CASES)
def test_delta_weight_matches_float64_closed_form(layer_name, variant, dtype):
    layer, adapter = make(layer_name, variant, dtype)
    randomize_(adapter)
    expected = closed_form(adapter)
    got = adapter.delta_weight().double()
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(got / scale, expected / scale, **TOL[dtype])


@pytest.mark.parametrize("layer_name,variant", list(itertools.product(LAYERS, VARIANTS)))
def test_delta_sq_norm_matches_the_float64_closed_form_without_building_delta(layer_name, variant, monkeypatch):
    """‖ΔW‖² from the factors (the norm log, max-norm) equals the closed form's; where the algorithm has a
    factor identity (LoRA/LoCon, LoHa, LoKr without Tucker cores), ΔW is never built."""
    _, adapter = make(layer_name, variant, torch.float32)
    randomize_(adapter)
    expected = closed_form(adapter).pow(2).sum()
    if "tucker" not in variant:
        def refuse():
            raise AssertionError("delta_weight() was built")
        monkeypatch.setattr(adapter, "delta_weight", refuse)
    got = adapter.delta_sq_norm()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layer_name,variant,dtype", CASES)
def test_bypass_equals_merged_and_merge_roundtrip(layer_name, variant, dtype):
    layer, adapter = make(layer_name, variant, dtype)
    randomize_(adapter)
    x = inputs(layer, dtype)
    original = layer.weight.detach().clone()
    adapter.attach(layer)
    outputs = {}
    for mode in ("merged", "bypass") if adapter.bypass_flops(1) is not None else ("merged",):
        adapter.forward_mode = mode
        outputs[mode] = layer(x).double()
    adapter.merge()
    outputs["merged_weight"] = layer(x).double()
    reference = LayerSpec.of(layer).apply(x.double(), original.double() + closed_form(adapter),
                                          layer.bias.double())
    adapter.unmerge()
    norm = reference.abs().max().item()
    for mode, y in outputs.items():
        torch.testing.assert_close(y / norm, reference / norm, **TOL[dtype], msg=f"{mode} path")
    if dtype == torch.float32:
        torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)
    else:
        assert torch.equal(layer.weight, original)  # low precision restores from a backup, bit-exact
    adapter.detach()
    assert "forward" not in layer.__dict__
    assert torch.equal(layer(x), LayerSpec.of(layer).apply(x, layer.weight, layer.bias))


@pytest.mark.parametrize("layer_name,variant,dtype", CASES)
def test_step_zero_output_equals_base(layer_name, variant, dtype):
    layer, adapter = make(layer_name, variant, dtype)
    x = inputs(layer, dtype)
    base = layer(x)
    adapter.attach(layer)
    for mode in ("merged", "bypass") if adapter.bypass_flops(1) is not None else ("merged",):
        adapter.forward_mode = mode
        assert torch.equal(layer(x), base), mode


@pytest.mark.parametrize("layer_name,variant", list(itertools.product(LAYERS, VARIANTS)))
def test_only_adapter_parameters_change(layer_name, variant):
    layer, adapter = make(layer_name, variant, torch.float32)
    layer.bias.requires_grad_(False)
    frozen = {k: v.clone() for k, v in layer.state_dict().items()}
    before = {k: v.detach().clone() for k, v in adapter.named_parameters()}
    adapter.attach(layer)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    x = inputs(layer, torch.float32)
    target = torch.randn_like(layer(x))
    for _ in range(3):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen {k} changed"
    changed = [k for k, v in adapter.named_parameters() if not torch.equal(v, before[k])]
    assert changed == list(before), f"adapter parameters that did not train: {set(before) - set(changed)}"
    assert float(adapter.delta_weight().detach().abs().max()) > 0


def test_loha_custom_backward_matches_autograd_gradcheck():
    from lorakit.adapters.functional.loha import _HadamardProduct

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(6, 3), (3, 5), (6, 3), (3, 5)]]
    assert torch.autograd.gradcheck(lambda *a: _HadamardProduct.apply(*a, 0.7), args)


def test_loha_backward_saves_only_the_factors():
    from lorakit.adapters.functional.loha import _HadamardProduct

    factors = [torch.randn(s, requires_grad=True) for s in [(64, 2), (2, 96), (64, 2), (2, 96)]]
    out = _HadamardProduct.apply(*factors, 1.0)
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == sum(f.numel() for f in factors)


@pytest.mark.parametrize("dim,factor", [(128, -1), (360, -1), (360, 4), (1024, -1), (1024, 8), (13, -1),
                                        (320, -1), (1280, -1), (2560, 8), (768, 16), (640, 3)])
def test_lokr_factorization_matches_lycoris(dim, factor):
    lycoris_lokr = pytest.importorskip("lycoris.modules.lokr")
    assert F_lokr.factorization(dim, factor) == tuple(lycoris_lokr.factorization(dim, factor))


def test_lokr_full_matrix_uses_scale_one_whatever_alpha():
    layer, adapter = make("linear", "lokr_full", torch.float32)
    assert set(adapter.param_names) == {"w1", "w2"}
    assert adapter.scale == 1.0 and float(adapter.alpha) == RANK  # alpha stored = dim, as LyCORIS writes


def test_alpha_zero_or_missing_means_alpha_equals_rank():
    spec = LayerSpec.of(nn.Linear(8, 8))
    for alpha in (None, 0, 0.0):
        m = get_algorithm("lora").module.create(spec, 4, alpha)
        assert float(m.alpha) == 4 and m.scale == 1.0


def test_lora_init_is_kaiming_down_zero_up():
    layer, adapter = make("conv3x3_s1", "lora", torch.float32)
    bound = 1 / (24 * 9) ** 0.5
    assert adapter.down.abs().max() <= bound and adapter.down.abs().max() > bound * 0.9
    assert torch.count_nonzero(adapter.up) == 0


def test_module_dropout_skips_the_adapter_only_in_training():
    layer, adapter = make("linear", "lora", torch.float32)
    randomize_(adapter)
    adapter.dropouts = Dropouts(module_dropout=0.5)
    adapter.attach(layer)
    x = inputs(layer, torch.float32)
    base = LayerSpec.of(layer).apply(x, layer.weight, layer.bias)
    torch.manual_seed(0)
    adapter.train()
    skipped = sum(torch.equal(layer(x), base) for _ in range(200))
    assert 60 < skipped < 140
    adapter.eval()
    assert not any(torch.equal(layer(x), base) for _ in range(20))


def test_rank_dropout_masks_per_sample_and_rescales():
    layer, adapter = make("linear", "lora", torch.float32)
    randomize_(adapter)
    adapter.dropouts = Dropouts(rank_dropout=0.5)
    adapter.attach(layer)
    x = inputs(layer, torch.float32, batch=1)[:, :1].expand(2000, 1, 24)  # one input, many samples
    base = LayerSpec.of(layer).apply(x, layer.weight, layer.bias)
    torch.manual_seed(0)
    adapter.train()
    delta_train = (layer(x) - base).detach()
    adapter.eval()
    delta_eval = (layer(x) - base).detach()
    assert torch.allclose(delta_eval, delta_eval[:1].expand_as(delta_eval))
    assert not torch.allclose(delta_train[0], delta_train[1])  # each sample draws its own rank mask
    # masks are rescaled by 1/(1-p): on average the delta is the unmasked one
    err = (delta_train.mean(0) - delta_eval[0]).abs().max() / delta_eval.abs().max()
    assert err < 0.1


def test_dropout_rejected_for_loha_and_lokr():
    spec = LayerSpec.of(nn.Linear(8, 8))
    for algo in ("loha", "lokr"):
        with pytest.raises(ValueError, match="rank_dropout"):
            get_algorithm(algo).module.create(spec, 2, 1.0, dropouts=Dropouts(dropout=0.1))


def test_auto_mode_picks_bypass_for_big_spatial_and_merged_for_loha():
    layer, adapter = make("conv3x3_s1", "lora", torch.float32)
    x = torch.randn(2, 24, 64, 64)
    assert adapter._choose_mode(x) == "bypass"
    layer, loha = make("conv3x3_s1", "loha", torch.float32)
    assert loha._choose_mode(x) == "merged"


def test_svd_of_product_equals_the_dense_svd_in_float64():
    from lorakit.adapters.functional.lora import svd_of_product

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(6, 90, generator=g, dtype=torch.float64)
    u, s, vh = svd_of_product(up, down)
    dense = torch.linalg.svdvals(up @ down)
    torch.testing.assert_close(s, dense[:6])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, up @ down)


def check_fused_lora_node(node, frozen_op, g, x_shape, weight_shape, out_shape, bias: bool):
    """node(x, W, b, D, U, s) against frozen_op(x, W, b) + s·frozen_op(frozen_op(x, D), U): a zero U gives the
    frozen layer's output and input gradient bit for bit (float32 and float64); with a random U the output and
    every gradient equal plain autograd in float64. Returns the float64 x."""
    r, (out_ch, in_ch) = 4, weight_shape[:2]
    kernel = weight_shape[2:]
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(x_shape, dtype=dtype, generator=g, requires_grad=True)
        weight = torch.randn(weight_shape, dtype=dtype, generator=g)
        b = torch.randn(out_ch, dtype=dtype, generator=g) if bias else None
        down = torch.randn(r, in_ch, *kernel, dtype=dtype, generator=g, requires_grad=True)
        up = torch.zeros(out_ch, r, *kernel, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(out_shape, dtype=dtype, generator=g)
        at_zero, frozen = node(x, weight, b, down, up, 0.7), frozen_op(x, weight, b)
        assert torch.equal(at_zero, frozen)
        assert torch.equal(torch.autograd.grad(at_zero, x, grad_out)[0], torch.autograd.grad(frozen, x, grad_out)[0])
    with torch.no_grad():
        up.normal_(generator=g)
    got = node(x, weight, b, down, up, 0.7)
    grads = torch.autograd.grad(got, (x, down, up), grad_out)
    plain = frozen_op(x, weight, b) + 0.7 * frozen_op(frozen_op(x, down, None), up, None)
    expected = torch.autograd.grad(plain, (x, down, up), grad_out)
    assert torch.allclose(got, plain, atol=1e-12)
    for a, b_ in zip(grads, expected):
        assert torch.allclose(a, b_, atol=1e-12)
    for param, grad in ((down, grads[1]), (up, grads[2])):  # else AccumulateGrad copies it once more
        assert grad.stride() == param.stride()
    return x


@pytest.mark.parametrize("tokens", [3, 100])
def test_fused_linear_lora_equals_the_unfused_layer(tokens):
    """The fused Linear node: see check_fused_lora_node."""
    check_fused_lora_node(F_lora.fused_linear, F.linear, torch.Generator().manual_seed(0), (2, tokens, 12),
                          (10, 12), (2, tokens, 10), bias=True)


def test_fused_linear_lora_records_one_node_and_returns_no_view():
    """Over [B, T, in] the node flattens the tokens itself: no view nodes are recorded around it (each costs
    dispatch and an autograd node per adapter per step), and its output is no view, so a caller may modify it in
    place (autograd refuses that on a view made inside a custom Function)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight, bias = torch.randn(10, 12, dtype=torch.float64, generator=g), torch.randn(10, dtype=torch.float64)
    down = torch.randn(4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(10, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = F_lora.fused_linear(x, weight, bias, down, up, 0.7)
    assert not y._is_view() and type(y.grad_fn).__name__ == "FusedLinearLoRABackward"
    assert y.grad_fn.next_functions[0][0].variable is x  # straight to x's AccumulateGrad
    y.mul_(3.0)
    plain = 3.0 * (F.linear(x, weight, bias) + 0.7 * F.linear(F.linear(x, down), up))
    torch.testing.assert_close(y, plain)
    for a, b in zip(torch.autograd.grad(y.sum(), (x, down, up)), torch.autograd.grad(plain.sum(), (x, down, up))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch, with_bias", [(1, True), (3, False)])
def test_fused_conv1x1_lora_equals_the_unfused_layer(batch, with_bias, monkeypatch):
    """The 1x1 conv node (adapter as GEMMs over the pixels, accumulated into the frozen conv) against two plain
    convs (see check_fused_lora_node). A LoRA module on a 1x1 conv takes this node and trains through it where
    the folded node (tests/test_folded.py) does not apply."""
    monkeypatch.setattr(lora_module, "FOLD_ACTIVATIONS_PER_WEIGHT", {"gemm": float("inf"), "kxk": float("inf")})
    x = check_fused_lora_node(F_lora.fused_conv1x1, F.conv2d, torch.Generator().manual_seed(2), (batch, 12, 5, 7),
                              (10, 12, 1, 1), (batch, 10, 5, 7), bias=with_bias)

    layer = torch.nn.Conv2d(12, 10, 1).double().requires_grad_(False)
    module = get_algorithm("lora").module.create(LayerSpec.of(layer), 4, 2.0, forward_mode="bypass",
                                                 dtype=torch.float64)
    module.attach(layer)
    calls = []
    real = F_lora.FusedConv1x1LoRA.apply
    try:
        F_lora.FusedConv1x1LoRA.apply = lambda *a: calls.append(1) or real(*a)
        layer(x).square().sum().backward()
    finally:
        F_lora.FusedConv1x1LoRA.apply = real
    assert calls and module.down.grad is not None and module.up.grad.abs().sum() > 0


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("axis", ["output", "input"])
def test_fused_linear_dora_equals_plain_autograd(axis, with_bias):
    """The folded-ratio DoRA node: forward and the gradients of x, D, U and r equal plain autograd over
    r ⊙ (Wx + sUDx) (output axis) or (W + sUD)(r ⊙ x) (input axis) in float64, including where r has an exact
    zero (the unfused path); r = 1 with U = 0 gives the frozen Linear's output and input gradient bit for bit."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(10, 12, dtype=torch.float64, generator=g)
    bias = torch.randn(10, dtype=torch.float64, generator=g) if with_bias else None
    down = torch.randn(4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.zeros(10, 4, dtype=torch.float64, requires_grad=True)
    n = 10 if axis == "output" else 12
    ones = torch.ones(n, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 50, 10, dtype=torch.float64, generator=g)
    at_zero, frozen = F_dora.fused_linear_dora(x, weight, bias, down, up, 0.7, ones, axis), F.linear(x, weight, bias)
    assert torch.equal(at_zero, frozen)
    assert torch.equal(torch.autograd.grad(at_zero, x, grad_out)[0], torch.autograd.grad(frozen, x, grad_out)[0])
    with torch.no_grad():
        up.normal_(generator=g)
    for r in (torch.rand(n, dtype=torch.float64, generator=g) + 0.5, torch.arange(n, dtype=torch.float64) / n):
        r.requires_grad_(True)  # the second r is exactly 0 at index 0
        got = F_dora.fused_linear_dora(x, weight, bias, down, up, 0.7, r, axis)
        grads = torch.autograd.grad(got, (x, down, up, r), grad_out)
        xr = x * r if axis == "input" else x
        plain = F.linear(xr, weight) + 0.7 * F.linear(F.linear(xr, down), up)
        plain = (plain * r if axis == "output" else plain) + (0 if bias is None else bias)
        expected = torch.autograd.grad(plain, (x, down, up, r), grad_out)
        assert torch.allclose(got, plain, atol=1e-12)
        for name, a, b in zip(("x", "down", "up", "r"), grads, expected):
            assert torch.allclose(a, b, atol=1e-10), name
        assert grads[1].stride() == down.stride() and grads[2].stride() == up.stride()
