"""Output-axis DoRA on convs with few positions (functional.dora_gemm): float64 closed form for the value and
every gradient, the module takes the path only where it is meant to, and it equals the ordinary bypass."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional import dora_gemm as F_dora_gemm
from lorakit.adapters.functional.folded import Geometry
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules import lora as lora_module
from lorakit.adapters.modules.lora import LoRAModule, LoRAOptions

from test_dora import closed_form_weight, perturb

# (in, out, kernel, stride, padding, dilation, input N x H x W, bias)
GEOMETRIES = {"3x3": (6, 5, 3, 1, 1, 1, (2, 5, 5), True), "3x3_s2": (4, 7, 3, 2, 1, 1, (3, 7, 6), False),
              "1x1": (5, 4, 1, 1, 0, 1, (2, 4, 4), True), "3x3_dilated": (3, 4, 3, 1, 2, 2, (1, 6, 6), True)}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_node_value_and_gradients_are_the_float64_closed_form(name):
    cin, cout, k, stride, pad, dil, (n, h, w), has_bias = GEOMETRIES[name]
    g = torch.Generator().manual_seed(0)

    def randn(*shape, s=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * s).requires_grad_()

    weight, bias = randn(cout, cin, k, k).detach(), randn(cout).detach() if has_bias else None
    down, up, x = randn(8, cin, k, k, s=0.3), randn(cout, 8, 1, 1, s=0.3), randn(n, cin, h, w)
    magnitude = (F_dora.weight_norm(weight, "output") * 1.2).requires_grad_()  # a trained, not step-0, value
    scale, geometry = 0.7, Geometry((stride, stride), (pad, pad), (dil, dil))

    def ours(x, down, up, magnitude):
        return F_dora_gemm.conv_dora_gemm(x, weight, bias, down, up, magnitude, F_dora.weight_sq(weight, "output"),
                                          scale, geometry)

    def closed_form(x, down, up, magnitude):
        delta = scale * (up.reshape(cout, 8) @ down.reshape(8, -1)).view(weight.shape)
        return F.conv2d(x, closed_form_weight(weight, delta, magnitude, "output"), bias, stride, pad, dil)

    inputs = (x, down, up, magnitude)
    y, expected = ours(*inputs), closed_form(*inputs)
    assert y.shape == expected.shape and y.is_contiguous()
    assert torch.allclose(y, expected, atol=1e-12)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for got, want, what in zip(torch.autograd.grad(y, inputs, grad_out),
                               torch.autograd.grad(expected, inputs, grad_out), ("x", "down", "up", "magnitude")):
        assert torch.allclose(got, want, atol=1e-11), what
    assert torch.autograd.gradcheck(ours, inputs)


def big_conv_module(kernel=3, dtype=torch.float64, axis="output", seed=0):
    """A conv with few positions against its weight: 64 channels 3x3 over 2x2 (activations 4 x 128 against
    36,864 weights), or 256 channels 1x1 over 1x1 (512 against 65,536)."""
    torch.manual_seed(seed)
    channels, size = (64, 2) if kernel == 3 else (256, 1)
    layer = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2).to(dtype).requires_grad_(False)
    module = LoRAModule.create(LayerSpec.of(layer), 4, 2.0, LoRAOptions(dora_wd=True, wd_on_output=axis == "output"),
                               dtype=dtype)
    module.attach(layer)
    return module, layer, torch.randn(1, channels, size, size, dtype=dtype)


@pytest.mark.parametrize("kernel", [3, 1])
def test_module_takes_the_gemm_path_and_equals_the_ordinary_bypass(kernel, monkeypatch):
    module, layer, x = big_conv_module(kernel)
    assert module.runs_dora_gemm(x)
    # step 0: the frozen conv as a GEMM, the adapter's share exactly zero
    assert torch.allclose(module(x), layer(x), atol=1e-12)
    perturb(module)
    params = [getattr(module, n) for n in module.param_names]

    def value_and_grads():
        xx = x.clone().requires_grad_()
        y = module(xx)
        grads = torch.autograd.grad((y * y.detach().cos()).sum(), [xx, *params])
        return y.detach(), grads

    y, grads = value_and_grads()
    monkeypatch.setattr(lora_module, "DORA_GEMM_MAX_ACTIVATIONS_PER_WEIGHT", 0.0)  # the ordinary bypass
    assert not module.runs_dora_gemm(x)
    y_ref, grads_ref = value_and_grads()
    assert torch.allclose(y, y_ref, atol=1e-12)
    for name, got, want in zip(("x", *module.param_names), grads, grads_ref):
        assert torch.allclose(got, want, atol=1e-10), name


def test_float32_step_zero_matches_the_layer_to_rounding():
    module, layer, x = big_conv_module(dtype=torch.float32)
    assert module.runs_dora_gemm(x)
    y, base = module(x), layer(x)
    assert torch.allclose(y, base, rtol=1e-5, atol=1e-5 * base.abs().max().item())


def test_the_path_is_taken_only_where_it_applies():
    module, layer, x = big_conv_module()
    assert module.runs_dora_gemm(x)
    assert not module.runs_dora_gemm(torch.randn(2, 64, 8, 8, dtype=x.dtype))  # activations large against W
    assert not module.runs_dora_gemm(x.to(torch.bfloat16))
    module.multiplier = 0.5
    assert not module.runs_dora_gemm(x)
    module.multiplier = 1.0
    layer.weight.requires_grad_(True)  # the node gives the frozen weight no gradient
    assert not module.runs_dora_gemm(x)
    layer.weight.requires_grad_(False)
    input_axis, _, x_in = big_conv_module(axis="input")
    assert not input_axis.runs_dora_gemm(x_in)  # the input axis's norm needs Uᵀ W: no shared GEMM


def test_gradient_checkpointing_recomputes_the_node_to_the_same_gradients():
    """torch.utils.checkpoint runs the layer's forward again in backward: the GEMM node gives the same
    gradients as without checkpointing."""
    module, layer, x = big_conv_module()
    perturb(module)
    params = [getattr(module, n) for n in module.param_names]

    def grads(checkpointed: bool):
        xx = x.clone().requires_grad_()
        y = torch.utils.checkpoint.checkpoint(layer, xx, use_reentrant=False) if checkpointed else layer(xx)
        return torch.autograd.grad(y.square().sum(), [xx, *params])

    assert module.runs_dora_gemm(x)
    for name, a, b in zip(("x", *module.param_names), grads(True), grads(False)):
        assert torch.equal(a, b), name


def test_float32_node_with_many_columns_runs_onednn_and_matches_float64(monkeypatch):
    """From ONEDNN_MIN_COLUMNS columns (positions + rank) W's two products run as oneDNN 1x1 convs in float32:
    value and gradients still match the float64 node."""
    g = torch.Generator().manual_seed(1)
    cin, cout, rank, batch, size = 6, 5, 8, 2, 5  # 2 x 5 x 5 positions + 8 = 58 columns
    assert batch * size * size + rank >= F_dora_gemm.ONEDNN_MIN_COLUMNS
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    params = [torch.randn(batch, cin, size, size, generator=g, dtype=torch.float64),
              torch.randn(rank, cin, 3, 3, generator=g, dtype=torch.float64) * 0.3,
              torch.randn(cout, rank, 1, 1, generator=g, dtype=torch.float64) * 0.3,
              F_dora.weight_norm(weight, "output") * 1.2]
    grad_out = torch.randn(batch, cout, size, size, generator=g, dtype=torch.float64)
    calls = []
    for name in ("conv2d", "conv_transpose2d"):
        original = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))

    def run(dtype):
        inputs = [p.to(dtype).requires_grad_() for p in params]
        w = weight.to(dtype)
        y = F_dora_gemm.conv_dora_gemm(inputs[0], w, bias.to(dtype), *inputs[1:], F_dora.weight_sq(w, "output"),
                                       0.7, Geometry((1, 1), (1, 1), (1, 1)))
        return [y, *torch.autograd.grad(y, inputs, grad_out.to(dtype))]

    want = run(torch.float64)
    assert calls == []  # float64 stays on the GEMM
    got = run(torch.float32)
    assert calls == ["conv2d", "conv_transpose2d"]
    for a, b, what in zip(got, want, ("y", "x", "down", "up", "magnitude")):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), what
