"""DoRA: float64 closed forms, step 0 = base, bypass = merged = merge, modules on every algorithm."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.adapters.functional import dora as F_dora

# (weight shape, stride): Linear, conv 1x1, conv 3x3 at stride 1 and 2
LAYERS = {"linear": ((6, 5), None), "conv1x1": ((6, 5, 1, 1), 1), "conv3x3": ((6, 5, 3, 3), 1),
          "conv3x3_s2": ((6, 5, 3, 3), 2)}


def closed_form_weight(w: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, axis: str) -> torch.Tensor:
    """Column by column in float64: each output row (or input column) of W + ΔW rescaled to length m.
    Built with torch ops so the norm stays in the autograd graph."""
    v = w.double() + dw.double()
    m = m.double().reshape(-1)
    cols = v if axis == "output" else v.transpose(0, 1)
    scaled = [col * (m[c] / (col * col).sum().sqrt()) for c, col in enumerate(cols)]
    out = torch.stack(scaled)
    return out if axis == "output" else out.transpose(0, 1)


def apply(x, w, stride):
    return F.linear(x, w) if stride is None else F.conv2d(x, w, None, stride, 1 if w.shape[-1] == 3 else 0)


def case(layer, dtype, seed=0):
    shape, stride = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    dw = (torch.randn(shape, generator=g) * 0.3).to(dtype)
    x = torch.randn((3, 5) if stride is None else (2, 5, 7, 7), generator=g).to(dtype)
    return w, dw, x, stride


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("axis", F_dora.AXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_weight_and_output_match_float64_closed_form(layer, axis, dtype):
    w, dw, x, stride = case(layer, dtype)
    m = (F_dora.init_magnitude(w, axis) * 1.3).to(dtype)  # a trained magnitude: not the step-0 value
    assert m.shape == F_dora.magnitude_shape(w.shape, axis)
    ours = F_dora.dora_weight(w, dw, m, axis)
    expected = closed_form_weight(w, dw, m, axis)
    assert ours.dtype == torch.float32  # bf16 inputs are computed in float32
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=1e-5)
    y = apply(x.double(), ours.double(), stride)
    y_expected = apply(x.double(), expected, stride)
    assert torch.allclose(y, y_expected, atol=1e-4, rtol=1e-5)
    # the rows/columns of W' have exactly the length m
    assert torch.allclose(F_dora.weight_norm(expected, axis), m.double(), rtol=1e-12)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_axis_layouts(layer, axis):
    shape = LAYERS[layer][0]
    m_shape = F_dora.magnitude_shape(shape, axis)
    expect = (shape[0], 1) if axis == "output" else (1, shape[1])
    assert m_shape == expect + (1,) * (len(shape) - 2)
    assert F_dora.axis_of(m_shape, shape) == axis
    assert F_dora.axis_of((7,), shape) is None


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("axis", F_dora.AXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_zero_is_the_base_weight_exactly(layer, axis, dtype):
    w, _, _, _ = case(layer, dtype)
    m = F_dora.init_magnitude(w, axis)
    out = F_dora.dora_weight(w, torch.zeros_like(w), m, axis).to(dtype)
    assert torch.equal(out, w)


@pytest.mark.parametrize("axis", F_dora.AXES)
def test_multiplier_blends_as_a1111_and_comfyui(axis):
    w, dw, _, _ = case("conv3x3", torch.float64)
    m = F_dora.init_magnitude(w, axis) * 0.8
    full = closed_form_weight(w, dw, m, axis)
    for mu in (0.0, 0.5, 1.0, -0.7):
        ours = F_dora.dora_weight(w, dw, m, axis, multiplier=mu)
        assert torch.allclose(ours, w + mu * (full - w), atol=1e-12)
    assert torch.allclose(F_dora.dora_delta(w, dw, m, axis, 0.5), 0.5 * (full - w), atol=1e-12)


@pytest.mark.parametrize("axis", F_dora.AXES)
def test_norm_gradient_flows_by_default(axis):
    """LyCORIS keeps the norm in the graph; detach_norm (the DoRA paper, PEFT) gives another gradient."""
    w, dw, _, _ = case("linear", torch.float64)
    m = F_dora.init_magnitude(w, axis) * 1.1
    grads = []
    for detach in (False, True):
        d = dw.clone().requires_grad_(True)
        (F_dora.dora_weight(w, d, m, axis, detach_norm=detach) ** 3).sum().backward()
        grads.append(d.grad)
    d = dw.clone().requires_grad_(True)
    expected = torch.autograd.grad((closed_form_weight(w, d, m, axis) ** 3).sum(), d)[0]
    assert torch.allclose(grads[0], expected, atol=1e-10)
    assert not torch.allclose(grads[0], grads[1], atol=1e-3)


def test_peft_layouts_map_to_the_output_axis():
    lin, conv = torch.arange(6.0), torch.arange(6.0).reshape(1, 6, 1, 1)
    assert F_dora.peft_to_internal(lin, 2).shape == (6, 1)
    assert torch.equal(F_dora.peft_to_internal(conv, 4).reshape(-1), torch.arange(6.0))
    assert F_dora.peft_to_internal(conv, 4).shape == (6, 1, 1, 1)
    assert torch.equal(F_dora.internal_to_peft(F_dora.peft_to_internal(conv, 4)), conv)
    assert torch.equal(F_dora.internal_to_peft(F_dora.peft_to_internal(lin, 2)), lin)


# ---- modules: DoRA on LoRA/LoCon, LoHa, LoKr ---------------------------------------------------
from lorakit.adapters.functional.layer import LayerSpec  # noqa: E402
from lorakit.adapters.modules.loha import LoHaModule, LoHaOptions  # noqa: E402
from lorakit.adapters.modules.lokr import LoKrModule, LoKrOptions  # noqa: E402
from lorakit.adapters.modules.lora import LoRAModule, LoRAOptions  # noqa: E402

ALGOS = {"lora": (LoRAModule, LoRAOptions, {}), "locon_tucker": (LoRAModule, LoRAOptions, {"use_tucker": True}),
         "loha": (LoHaModule, LoHaOptions, {}), "lokr": (LoKrModule, LoKrOptions, {"factor": 2})}
MODULE_LAYERS = {"linear": lambda: torch.nn.Linear(8, 6), "conv1x1": lambda: torch.nn.Conv2d(8, 6, 1),
                 "conv3x3_s2": lambda: torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)}


def dora_module(algo, layer_name, axis, dtype=torch.float64, seed=0, mode="auto"):
    torch.manual_seed(seed)
    layer = MODULE_LAYERS[layer_name]().to(dtype)
    cls, opts, extra = ALGOS[algo]
    options = opts(dora_wd=True, wd_on_output=axis == "output", **extra)
    module = cls.create(LayerSpec.of(layer), 2, 1.0, options, forward_mode=mode, dtype=dtype)
    module.attach(layer)
    x = torch.randn((4, 8) if layer_name == "linear" else (2, 8, 7, 7), dtype=dtype)
    return module, layer, x


def perturb(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in module.param_names:
            p = getattr(module, name)
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.2 if name == "magnitude" else 0.3))


def layer_output(layer, x, weight):
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


MODULE_CASES = [(a, n) for a in ALGOS for n in MODULE_LAYERS if a != "locon_tucker" or n == "conv3x3_s2"]


@pytest.mark.parametrize("algo,layer_name", MODULE_CASES)
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_module_step_zero_closed_form_bypass_and_merge(algo, layer_name, axis):
    module, layer, x = dora_module(algo, layer_name, axis)
    w0 = layer.weight.detach().clone()
    assert module.dora_axis == axis and "magnitude" in dict(module.named_parameters())
    assert torch.equal(module(x), layer_output(layer, x, w0))  # step 0 = base, bit for bit
    perturb(module)
    expected = layer_output(layer, x, closed_form_weight(w0, module.delta_weight().detach(), module.magnitude, axis))
    merged_path = module(x)
    assert torch.allclose(merged_path, expected, atol=1e-10)
    if module.bypass_flops(1) is not None:
        module.forward_mode = "bypass"
        assert torch.allclose(module(x), merged_path, atol=1e-10)
        module.multiplier = 0.4
        bypass_half = module(x)
        module.forward_mode = "merged"
        assert torch.allclose(module(x), bypass_half, atol=1e-10)
        module.multiplier = 1.0
    module.merge()
    assert torch.allclose(layer(x), merged_path, atol=1e-10)
    module.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("layer_name", list(MODULE_LAYERS))
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_lowrank_norm_over_a_frozen_layer_is_the_closed_form(layer_name, axis):
    """A frozen layer's LoRA DoRA takes the norm from ‖W‖² + 2s⟨W, UD⟩ + s²‖UD‖² (no ΔW built):
    step 0 is the base bit for bit, and value and every gradient match the float64 closed form."""
    module, layer, x = dora_module("lora", layer_name, axis, mode="bypass")
    layer.requires_grad_(False)
    w0 = layer.weight.detach().clone()
    assert torch.equal(module(x), layer_output(layer, x, w0))  # the low-rank path itself, at step 0
    perturb(module)
    weight = module.layer.weight
    up, down, scale = module.lowrank_factors()
    norm = F_dora.lowrank_norm_sq(F_dora.weight_sq(weight, axis), weight, up, down, scale, axis).sqrt()
    assert torch.allclose(norm, F_dora.weight_norm(weight + module.delta_weight(), axis), atol=1e-12)
    params = [getattr(module, n) for n in module.param_names]
    module(x).square().sum().backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    exact = closed_form_weight(w0, module.delta_weight(), module.magnitude, axis)
    layer_output(layer, x, exact).square().sum().backward()
    for name, g, p in zip(module.param_names, got, params):
        assert torch.allclose(g, p.grad, atol=1e-10), name


@pytest.mark.parametrize("mode", ["bypass", "merged"])
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_an_exactly_zero_row_or_column_gives_finite_gradients(axis, mode):
    """‖W + ΔW‖ = 0 at step 0 for a zero row (output axis) or column (input axis): the norm's gradient there
    is 0, as vector_norm's, not 0/0; the other rows still train."""
    module, layer, x = dora_module("lora", "linear", axis, mode=mode)
    layer.requires_grad_(False)
    with torch.no_grad():
        (layer.weight[2] if axis == "output" else layer.weight[:, 2]).zero_()
        module.magnitude.copy_(F_dora.init_magnitude(layer.weight, axis, module.magnitude.dtype))
    module(x).square().sum().backward()  # step 0: up = 0, so that row/column of W + ΔW is exactly zero
    for name in module.param_names:
        assert torch.isfinite(getattr(module, name).grad).all(), name
    assert module.up.grad.abs().sum() > 0 and module.magnitude.grad.abs().sum() > 0


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8 dtype")
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_dora_over_float8_weights_computes_in_float32(axis):
    """fp8_base stores frozen weights in float8_e4m3fn: DoRA attaches, starts at the base output and equals the
    closed form over the dequantized weight (float8 cannot be promoted: it computes in float32)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6).requires_grad_(False)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    options = LoRAOptions(dora_wd=True, wd_on_output=axis == "output")
    module = LoRAModule.create(LayerSpec.of(layer), 2, 1.0, options)
    module.attach(layer)
    x = torch.randn(4, 8)
    w = layer.weight.float()
    assert torch.allclose(module(x), F.linear(x, w, layer.bias), atol=1e-6)
    perturb(module)
    expected = F.linear(x.double(), closed_form_weight(w, module.delta_weight().detach(), module.magnitude, axis),
                        layer.bias.double())
    assert torch.allclose(module(x).double(), expected, atol=1e-5)


def test_the_cached_weight_norm_follows_a_replaced_weight():
    """A new weight tensor (even at a reused address, version 0) is another object: the ‖W‖² cache is rebuilt."""
    module, layer, x = dora_module("lora", "linear", "output", mode="bypass")
    layer.requires_grad_(False)
    perturb(module)
    for k in range(4):
        layer.weight = torch.nn.Parameter(torch.randn(6, 8, dtype=torch.float64) * (k + 1), requires_grad=False)
        expected = layer_output(layer, x, closed_form_weight(layer.weight, module.delta_weight().detach(),
                                                             module.magnitude, "output"))
        assert torch.allclose(module(x), expected, atol=1e-10), k


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_module_bf16_layer_and_magnitude_trains(algo, axis):
    module, layer, x = dora_module(algo, "conv3x3_s2", axis, dtype=torch.float32)
    layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(module(xb), layer_output(layer, xb, layer.weight))  # step 0 = base in bf16 too
    perturb(module)
    w64 = layer.weight.double()
    expected = layer_output(layer.double(), x.to(torch.bfloat16).double(),
                            closed_form_weight(w64, module.delta_weight().detach(), module.magnitude, axis))
    layer.to(torch.bfloat16)
    out = module(xb)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), expected, atol=0.05, rtol=0.02)
    out.float().square().mean().backward()
    assert module.magnitude.grad is not None and float(module.magnitude.grad.abs().sum()) > 0


# ---- networks and files --------------------------------------------------------------------------
import json  # noqa: E402

from conftest import unet_inputs  # noqa: E402
from lorakit.formats.files import load_network_file, save_network  # noqa: E402
from lorakit.formats.safetensors_io import read_safetensors, write_safetensors  # noqa: E402
from lorakit.models.configs import build_unet  # noqa: E402
from lorakit.surgery.config import NetworkConfig  # noqa: E402
from lorakit.surgery.network import create_network  # noqa: E402


def randomize_dora(network, seed=0):
    """Non-zero factors and magnitudes 0.7x-1.3x the step-0 value (a trained DoRA, not a degenerate one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("magnitude"):
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def unet_out(unet, inputs):
    x, t, ctx, _ = inputs
    with torch.no_grad():
        return unet(x, t, ctx).sample


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("wd_on_output", [False, True])
def test_network_step_zero_save_load_and_args(tmp_path, algo, wd_on_output):
    unet = build_unet("tiny-sd1")
    inputs = unet_inputs(unet)
    base = unet_out(unet, inputs)
    config = NetworkConfig(algo=algo, network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, dora_wd=True,
                           wd_on_output=wd_on_output, **({"factor": 4} if algo == "lokr" else {}))
    net = create_network(unet, [], config, seed=0)
    assert torch.equal(unet_out(unet, inputs), base)  # step 0 = base exactly
    randomize_dora(net)
    ours = unet_out(unet, inputs)
    assert not torch.allclose(ours, base, atol=1e-3)
    path = save_network(net, tmp_path / "dora.safetensors")
    tensors, meta = read_safetensors(path)
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == len(net.adapters)
    for key, m in scales.items():
        assert (m.shape[0] != 1 or m.shape[1] == 1) if wd_on_output else m.shape[0] == 1
    args = json.loads(meta["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == str(wd_on_output)
    assert meta["ss_network_module"] == "lycoris.kohya"
    net.restore()
    assert torch.equal(unet_out(unet, inputs), base)
    loaded, _ = load_network_file(path, unet)
    assert all(a.dora_axis == ("output" if wd_on_output else "input") for a in loaded.adapters.values())
    assert torch.allclose(unet_out(unet, inputs), ours, atol=1e-5)
    loaded.merge()
    assert torch.allclose(unet_out(unet, inputs), ours, atol=1e-4)


def test_peft_and_ai_toolkit_magnitudes_load_as_the_output_axis(tmp_path):
    """The same trained output-axis DoRA written with PEFT's and ai-toolkit's magnitude keys and shapes."""
    unet = build_unet("tiny-sd1")
    inputs = unet_inputs(unet)
    net = create_network(unet, [], NetworkConfig(network_dim=4, network_alpha=4, conv_dim=4, conv_alpha=4,
                                                 dora_wd=True, wd_on_output=True), seed=0)
    randomize_dora(net)
    ours = unet_out(unet, inputs)
    path = save_network(net, tmp_path / "lycoris.safetensors")
    net.restore()
    tensors, _ = read_safetensors(path)
    for writer, key in (("peft", "lora_magnitude_vector"), ("diffusers", "lora_magnitude_vector.weight"),
                        ("ai-toolkit", "magnitude")):
        renamed = {}
        for k, v in tensors.items():
            if k.endswith(".dora_scale"):
                peft = v.reshape(-1) if v.dim() == 2 or writer == "ai-toolkit" else v.reshape(1, -1, 1, 1)
                renamed[k.replace("dora_scale", key)] = peft
            else:
                renamed[k] = v
        other = tmp_path / f"{writer}.safetensors"
        write_safetensors(other, renamed, {})
        loaded, _ = load_network_file(other, unet)
        assert all(a.dora_axis == "output" for a in loaded.adapters.values())
        assert torch.allclose(unet_out(unet, inputs), ours, atol=1e-5), writer
        loaded.restore()


def test_inspect_names_the_dora_layout_and_warns_for_the_output_axis(tmp_path):
    from lorakit.inspect_file import format_report, inspect_file

    unet = build_unet("tiny-sd1")
    reports = {}
    for wd_on_output in (False, True):
        net = create_network(unet, [], NetworkConfig(network_dim=4, conv_dim=4, dora_wd=True,
                                                     wd_on_output=wd_on_output), seed=0)
        path = save_network(net, tmp_path / f"dora_{wd_on_output}.safetensors")
        net.restore()
        reports[wd_on_output] = inspect_file(path)
    n = reports[False]["num_modules"]
    assert reports[False]["algorithm_labels"] == {"LoRA+DoRA (input axis)": n}
    assert reports[False]["warnings"] == []
    assert reports[True]["algorithm_labels"] == {"LoRA+DoRA (output axis)": n}
    text = format_report(reports[True])
    assert "LoRA+DoRA (output axis)" in text
    warning = next(line for line in text.splitlines() if line.startswith("WARNING"))
    assert "A1111" in warning and "ComfyUI" in warning and "‖W‖ instead of ‖W + ΔW‖" in warning


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 3, 3), (256, 4, 3, 3)])  # 256 rows: blocked weight products
@pytest.mark.parametrize("axis", F_dora.AXES)
def test_lowrank_ratio_node_gradients_pass_gradcheck(shape, axis):
    """The one-node ratio m/‖W + s·U D‖ (closed-form backward) against finite differences, float64."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=g, dtype=torch.float64)
    up = torch.randn((shape[0], 3, *[1] * (len(shape) - 2)), generator=g, dtype=torch.float64).requires_grad_()
    down = torch.randn((3, *shape[1:]), generator=g, dtype=torch.float64).requires_grad_()
    magnitude = (F_dora.init_magnitude(weight, axis) * 1.1).requires_grad_()
    w_sq = F_dora.weight_sq(weight, axis)

    def ratio(up, down, magnitude):
        return F_dora.lowrank_ratio(w_sq, weight, up, down, 0.4, magnitude, axis)

    assert torch.autograd.gradcheck(ratio, (up, down, magnitude))


def test_blocked_weight_products_equal_the_plain_products():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(384, 50, generator=g, dtype=torch.float64)  # 3 blocks of 128 rows, 12 of 32
    assert F_dora._row_blocks(w, F_dora.WEIGHT_ROW_BLOCK) == 3
    assert F_dora._row_blocks(w, F_dora.WEIGHT_TIMES_ROW_BLOCK) == 12
    a, b = torch.randn(3, 384, generator=g, dtype=torch.float64), torch.randn(3, 50, generator=g, dtype=torch.float64)
    assert torch.allclose(F_dora.times_weight(a, w), a @ w, atol=1e-12)
    assert torch.allclose(F_dora.weight_times(w, b), w @ b.T, atol=1e-12)
    odd = w[:300]  # not a whole number of blocks: the plain product
    assert torch.equal(F_dora.times_weight(a[:, :300], odd), a[:, :300] @ odd)
    assert F_dora._row_blocks(odd, F_dora.WEIGHT_TIMES_ROW_BLOCK) == 1
    assert torch.allclose(F_dora.weight_times(odd, b), odd @ b.T, atol=1e-12)


@pytest.mark.parametrize("shape", [(50, 6), (256, 6), (300, 6), (1000, 9), (2, 5, 3, 4), (1, 6, 2, 2)])
def test_channel_sum_is_the_sum_over_every_dim_but_the_channel(shape):
    """The ratio gradient's reduction in blocks of rows (see REDUCE_ROW_BLOCK): below two blocks, a whole number of
    blocks, blocks plus leftover rows, and NCHW maps all give the plain sum."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = t.sum(0) if t.dim() == 2 else t.sum((0, 2, 3))
    torch.testing.assert_close(F_dora.channel_sum(t), plain, rtol=1e-12, atol=1e-12)
    if t.dim() == 2:  # an incoming gradient may be a transposed view
        transposed = t.T.contiguous().T
        torch.testing.assert_close(F_dora.channel_sum(transposed), plain, rtol=1e-12, atol=1e-12)
