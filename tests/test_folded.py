"""The folded LoRA/DoRA node (functional.folded): outputs and every gradient against a float64 closed form
written here with plain autograd, step 0 bit for bit, and when modules choose it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.functional import folded as F_folded
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules import lora as lora_module
from lorakit.adapters.modules.base import Dropouts
from lorakit.adapters.modules.lora import LoRAModule, LoRAOptions

LAYERS = {
    "linear": (lambda: nn.Linear(12, 20), (2, 5, 12)),
    "linear_nobias": (lambda: nn.Linear(12, 20, bias=False), (5, 12)),
    "conv1x1": (lambda: nn.Conv2d(12, 20, 1), (2, 12, 6, 5)),
    "conv1x1_batch1": (lambda: nn.Conv2d(12, 20, 1), (1, 12, 6, 5)),  # the rank products take plain GEMMs
    "conv3x3_s1": (lambda: nn.Conv2d(12, 20, 3, padding=1), (2, 12, 6, 5)),
    "conv3x3_s2": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=False), (2, 12, 7, 6)),
    "conv3x3_dil": (lambda: nn.Conv2d(12, 20, 3, padding=2, dilation=2), (1, 12, 8, 8)),
}
DORA = {"lora": None, "dora_output": "output", "dora_input": "input"}


def build(layer_name, variant, dtype=torch.float64, seed=0):
    factory, x_shape = LAYERS[layer_name]
    torch.manual_seed(seed)
    layer = factory().to(dtype).requires_grad_(False)
    axis = DORA[variant]
    options = LoRAOptions(dora_wd=axis is not None, wd_on_output=axis == "output")
    module = LoRAModule.create(LayerSpec.of(layer), 4, 3.0, options, dtype=dtype, forward_mode="bypass")
    module.attach(layer)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    return layer, module, x


def closed_form(layer, module, x):
    """W'' = m ⊙ (W + s·U D)/‖W + s·U D‖ (DoRA) or W + s·U D, then the layer's op: plain autograd, float64."""
    w = layer.weight.double()
    up, down = module.up.double(), module.down.double()
    out, rank = up.shape[0], down.shape[0]
    merged = w + module.scale * (up.reshape(out, rank) @ down.reshape(rank, -1)).reshape(w.shape)
    if module.dora_axis is not None:
        dims = [d for d in range(w.dim()) if d != (0 if module.dora_axis == "output" else 1)]
        merged = module.magnitude.double() * merged / merged.square().sum(dims, keepdim=True).sqrt()
    bias = None if layer.bias is None else layer.bias.double()
    if w.dim() == 2:
        return F.linear(x, merged, bias)
    return F.conv2d(x, merged, bias, layer.stride, layer.padding, layer.dilation)


def randomize_(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("variant", DORA)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_folded_node_matches_the_float64_closed_form(layer_name, variant, monkeypatch):
    monkeypatch.setattr(lora_module, "FOLD_ACTIVATIONS_PER_WEIGHT", {"gemm": 0.0, "kxk": 0.0})
    layer, module, x = build(layer_name, variant)
    randomize_(module)
    assert module.folds(x)
    calls = []
    real = F_folded.FoldedLoRA.apply
    monkeypatch.setattr(F_folded.FoldedLoRA, "apply", lambda *a: calls.append(1) or real(*a))
    y = layer(x)
    assert calls, "the folded node did not run"
    params = [x, *module.parameters()]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    expected_y = closed_form(layer, module, x)
    want = torch.autograd.grad(expected_y, params, g)
    torch.testing.assert_close(y, expected_y, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(["x", *dict(module.named_parameters())], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")
    for (name, p), a in zip(module.named_parameters(), got[1:]):  # else AccumulateGrad copies it once more
        assert a.stride() == p.stride(), f"gradient of {name} in another layout than the parameter"


@pytest.mark.parametrize("variant", DORA)
@pytest.mark.parametrize("layer_name", ["linear", "conv1x1", "conv1x1_batch1", "conv3x3_s1", "conv3x3_s2"])
def test_folded_step_zero_is_the_frozen_layer_bit_for_bit(layer_name, variant, monkeypatch):
    monkeypatch.setattr(lora_module, "FOLD_ACTIVATIONS_PER_WEIGHT", {"gemm": 0.0, "kxk": 0.0})
    layer, module, x = build(layer_name, variant, torch.float32)
    assert module.folds(x)
    g = torch.randn_like(layer(x))
    y = layer(x)
    (grad_x,) = torch.autograd.grad(y, x, g)
    module.detach()
    y0 = layer(x)
    (grad_x0,) = torch.autograd.grad(y0, x, g)
    assert torch.equal(y, y0) and torch.equal(grad_x, grad_x0)


def test_a_zero_dora_ratio_takes_the_bypass_path(monkeypatch):
    monkeypatch.setattr(lora_module, "FOLD_ACTIVATIONS_PER_WEIGHT", {"gemm": 0.0, "kxk": 0.0})
    layer, module, x = build("conv3x3_s1", "dora_output")
    randomize_(module)
    with torch.no_grad():
        module.magnitude[3] = 0.0
    monkeypatch.setattr(F_folded.FoldedLoRA, "apply", lambda *a: pytest.fail("folded with a zero ratio"))
    y = layer(x)
    torch.testing.assert_close(y, closed_form(layer, module, x), rtol=1e-10, atol=1e-10)


def test_modules_fold_only_in_full_precision_over_large_activations():
    linear = nn.Linear(320, 320).requires_grad_(False)
    module = LoRAModule.create(LayerSpec.of(linear), 8, 4.0)
    module.attach(linear)
    many, few = torch.randn(1, 4096, 320), torch.randn(1, 64, 320)
    assert module.folds(many) and not module.folds(few)
    with torch.autocast("cpu", torch.bfloat16):
        assert not module.folds(many)  # a bf16 W' would round s·U D away
    assert not module.folds(many.bfloat16())
    module.dropouts = Dropouts(rank_dropout=0.1)
    assert not module.folds(many)  # masks act on rank activations the folded forward does not form
    module.eval()
    assert module.folds(many)

    conv = nn.Conv2d(320, 320, 3, padding=1).requires_grad_(False)
    tucker = LoRAModule.create(LayerSpec.of(conv), 8, 4.0, LoRAOptions(use_tucker=True))
    plain = LoRAModule.create(LayerSpec.of(conv), 8, 4.0)
    big, small = torch.randn(1, 320, 64, 64), torch.randn(1, 320, 16, 16)
    plain.attach(conv)
    assert plain.folds(big) and not plain.folds(small)
    plain.detach()
    tucker.attach(conv)
    assert not tucker.folds(big)


def test_folded_training_flops_count_the_build_twice_and_the_rank_path_twice():
    conv = nn.Conv2d(12, 20, 3, padding=1).requires_grad_(False)
    module = LoRAModule.create(LayerSpec.of(conv), 4, 2.0)
    module.attach(conv)
    x = torch.randn(2, 12, 32, 32)
    assert module.folds(x)
    positions, weight = 2 * 32 * 32, 20 * 12 * 9
    rank_path, build = positions * 4 * (12 * 9 + 20), weight * 4
    assert module.training_flops(x) == 2 * positions * weight + 2 * rank_path + 2 * build
    assert module.recompute_flops(x) == build
