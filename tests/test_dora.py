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
