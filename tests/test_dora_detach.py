"""DoRA with a detached norm (dora_detach_norm: the DoRA paper's sec. 4.3, PEFT, OneTrainer): on every path of
every algorithm, the value is DoRA's and the gradients are those of m ⊙ (W + ΔW) / sg(‖W + ΔW‖) in float64."""
import pytest
import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.adapters.modules import lora as lora_module
from lorakit.adapters.modules.lora import LoRAModule, LoRAOptions
from lorakit.surgery.config import NetworkConfig
from test_dora import ALGOS, MODULE_CASES, MODULE_LAYERS, layer_output, perturb

NEVER, ALWAYS = {"gemm": float("inf"), "kxk": float("inf")}, {"gemm": 0.0, "kxk": 0.0}


def detached_closed_form(w: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, axis: str) -> torch.Tensor:
    """m ⊙ V / ‖V‖ with V = W + ΔW and the norm a constant (stop-gradient), in the magnitude's layout."""
    v = w.double() + dw.double()
    dims = tuple(d for d in range(v.dim()) if d != (0 if axis == "output" else 1))
    return m.double() * v / v.detach().square().sum(dims, keepdim=True).sqrt()


def detached_module(algo, layer_name, axis, mode):
    """test_dora's module, made with dora_detach_norm in its options."""
    torch.manual_seed(0)
    layer = MODULE_LAYERS[layer_name]().double()
    cls, opts, extra = ALGOS[algo]
    options = opts(dora_wd=True, wd_on_output=axis == "output", dora_detach_norm=True, **extra)
    module = cls.create(LayerSpec.of(layer), 2, 1.0, options, forward_mode=mode, dtype=torch.float64)
    module.attach(layer)
    x = torch.randn((4, 8) if layer_name == "linear" else (2, 8, 7, 7), dtype=torch.float64)
    return module, layer, x


def grads_against_closed_form(module, layer, x, axis):
    w0 = layer.weight.detach().clone()
    params = [getattr(module, n) for n in module.param_names]
    y = module(x)
    y.square().sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected = layer_output(layer, x, detached_closed_form(w0, module.delta_weight(), module.magnitude, axis))
    assert torch.allclose(y, expected, atol=1e-10)
    expected.square().sum().backward()
    for name, g, p in zip(module.param_names, got, params):
        assert torch.allclose(g, p.grad, atol=1e-10), name
    return got


def lora_paths(algo, layer_name, axis, mode):
    """(fold threshold, one-GEMM threshold) per LoRA bypass path this layer can take: plain bypass or fused,
    folded, and for output-axis convs the one-GEMM node."""
    if algo != "lora" or mode != "bypass":
        return [(NEVER, 0.0)]
    paths = [(NEVER, 0.0), (ALWAYS, 0.0)]
    return paths + [(NEVER, float("inf"))] if axis == "output" and layer_name != "linear" else paths


@pytest.mark.parametrize("algo,layer_name", MODULE_CASES)
@pytest.mark.parametrize("axis", F_dora.AXES)
@pytest.mark.parametrize("mode", ["merged", "bypass"])
def test_detached_norm_matches_the_closed_form_on_every_path(algo, layer_name, axis, mode, monkeypatch):
    for fold, gemm in lora_paths(algo, layer_name, axis, mode):
        monkeypatch.setattr(lora_module, "FOLD_ACTIVATIONS_PER_WEIGHT", fold)
        monkeypatch.setattr(lora_module, "DORA_GEMM_MAX_ACTIVATIONS_PER_WEIGHT", gemm)
        module, layer, x = detached_module(algo, layer_name, axis, mode)
        if module.bypass_flops(1) is None and mode == "bypass":
            pytest.skip(f"{algo} with this layer has no bypass path")
        layer.requires_grad_(False)  # a frozen base: LoRA takes the norm from its factors, no ΔW built
        base = layer_output(layer, x, layer.weight)
        step0 = module(x)
        assert torch.equal(step0, base) or gemm and torch.allclose(step0, base, atol=1e-12)  # GEMM, not conv
        perturb(module)
        assert module.folds(x) is (fold is ALWAYS) and module.runs_dora_gemm(x) is bool(gemm)
        detached = grads_against_closed_form(module, layer, x, axis)
        module.dora_detach_norm = False  # the default (LyCORIS) gradient differs: the flag took effect
        for p in module.parameters():
            p.grad = None
        module(x).square().sum().backward()
        assert not all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(detached, module.parameters()))


def test_options_set_the_flag_and_the_flop_model_drops_the_norms_backward():
    layer = torch.nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 64, 2, 2)
    flops = {}
    for detach in (False, True):
        options = LoRAOptions(dora_wd=True, wd_on_output=True, dora_detach_norm=detach)
        module = LoRAModule.create(LayerSpec.of(layer), 4, 2.0, options)
        module.attach(layer)
        assert module.dora_detach_norm is detach
        flops[detach] = module.training_flops(x, "bypass")
        module.detach()
    assert flops[True] < flops[False]  # no backward through the norm
    plain = LoRAModule.create(LayerSpec.of(layer), 4, 2.0, LoRAOptions(dora_detach_norm=True))
    assert plain.dora_axis is None and not plain.dora_detach_norm  # without dora_wd it sets nothing


def test_config_records_the_detached_norm_and_notes_it_without_dora():
    config = NetworkConfig(algo="locon", conv_dim=4, dora_wd=True, dora_detach_norm=True)
    assert config.algo_options().dora_detach_norm
    args = config.network_args()
    assert args["dora_wd"] == "True" and args["dora_detach_norm"] == "True"
    assert "dora_detach_norm" not in NetworkConfig(dora_wd=True).network_args()
    notes = NetworkConfig(dora_detach_norm=True).notes()
    assert any("dora_detach_norm has no effect without dora_wd" in n for n in notes)


def test_network_args_spelling_sets_the_field():
    from lorakit.training.config import build_config

    config = build_config({"network_module": "lycoris.kohya", "network_dim": 4,
                           "network_args": ["algo=lora", "dora_wd=True", "dora_detach_norm=True"]}, "test")
    assert config.network.dora_wd and config.network.dora_detach_norm
