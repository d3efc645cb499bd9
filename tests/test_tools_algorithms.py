"""resize and merge into one LoRA on LoHa, LoKr and DoRA modules: the SVD of the exact ΔW (DoRA: W' − W).

The reference ΔW is the loader's: the file attached to the tiny model by load_network_file in float64. The
optimum below full rank is torch.linalg.svdvals of that ΔW (Eckart-Young: the Frobenius error of the best
rank-k approximation is the root of the sum of the dropped singular values squared).
"""
import pytest
import torch

from lorakit.adapters.functional import dora as F_dora
from lorakit.adapters.functional import loha as F_loha
from lorakit.adapters.functional.layer import LayerSpec
from lorakit.formats.files import load_network_file, save_network
from lorakit.formats.safetensors_io import read_safetensors, write_safetensors
from lorakit.models.checkpoint import load_base_model
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.tools.lowrank import ToolError
from lorakit.tools.merge import merge_loras
from lorakit.tools.resize import resize_file

from conftest import randomize
from test_dora import randomize_dora
from test_tools import deltas, probe

CONFIGS = {  # every one adapts the tiny U-Net's 3x3 convs too (conv_dim)
    "loha": dict(algo="loha", network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1),
    "loha_tucker": dict(algo="loha", network_dim=4, network_alpha=2, conv_dim=3, conv_alpha=1, use_tucker=True),
    "lokr": dict(algo="lokr", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, factor=4),
    "lokr_tucker": dict(algo="lokr", network_dim=2, network_alpha=1, conv_dim=2, conv_alpha=1, factor=8,
                        use_tucker=True),
}


# a few layers of every kind keep the SVDs fast: Linear (square, wide, tall), 1x1 convs, 3x3 convs (stride 1
# and 2, in != out), a text-encoder projection
KEEP = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_v",
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_2_attentions_0_proj_in", "lora_unet_down_blocks_2_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_2_downsamplers_0_conv",
        "lora_unet_up_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj")


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    return load_base_model(str(tiny_folder)).pipeline


def adapter_file(pipe, path, config: dict, seed=0, dora=False):
    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(**config), seed=seed)
    randomize_dora(net, seed) if dora else randomize(net, std=0.1, seed=seed)
    save_network(net, path, dtype=torch.float64)  # float64 files: full-rank checks at round-off
    net.restore()
    tensors, meta = read_safetensors(path)
    kept = {k: v for k, v in tensors.items() if k.split(".")[0] in KEEP}
    assert len({k.split(".")[0] for k in kept}) >= 5
    write_safetensors(path, kept, meta)
    return path


@torch.no_grad()
def loader_deltas(pipe, path) -> dict[str, torch.Tensor]:
    """name -> the change the loader applies at strength 1: ΔW, or W' − W for DoRA (float64)."""
    net, _ = load_network_file(path, pipe.unet, [pipe.text_encoder], apply=False, dtype=torch.float64)
    out = {}
    for name, adapter in net.adapters.items():
        delta = adapter.delta_weight()
        if adapter.dora_axis is not None:
            weight = net.layer(name).weight.double()
            delta = F_dora.dora_weight(weight, delta, adapter.magnitude, adapter.dora_axis) - weight
        out[name] = delta
    return out


def assert_lossless(got: dict, exact: dict):
    assert got.keys() == exact.keys()
    for name, d in exact.items():
        torch.testing.assert_close(got[name].reshape_as(d), d, atol=1e-10, rtol=1e-9)


def assert_eckart_young(report, reduced: dict, exact: dict, rank: int, conv_rank: int):
    for m in report.modules:
        d = exact[m["name"]]
        flat = d.reshape(d.shape[0], -1)
        s = torch.linalg.svdvals(flat)
        keep = min(conv_rank if m["kind"] == "conv" else rank, s.numel())
        assert m["new_rank"] == keep
        error = float((reduced[m["name"]].reshape_as(flat) - flat).norm())
        assert error == pytest.approx(float(s[keep:].pow(2).sum().sqrt()), rel=1e-6, abs=1e-9)
        assert m["retained"] == pytest.approx(float(s[:keep].pow(2).sum() / s.pow(2).sum()), rel=1e-9)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_resize_loha_lokr_is_lossless_at_full_rank_and_the_svd_optimum_below(kind, pipe, tiny_folder, tmp_path):
    src = adapter_file(pipe, tmp_path / f"{kind}.safetensors", CONFIGS[kind])
    exact = loader_deltas(pipe, src)
    assert any(d.dim() == 4 and d.shape[2:] == (3, 3) for d in exact.values())  # 3x3 convs are in
    full = resize_file(src, tmp_path / "full.safetensors", rank=4096, base=str(tiny_folder))
    assert {m["algo"] for m in full.modules} == {CONFIGS[kind]["algo"]}
    assert min(m["retained"] for m in full.modules) > 1 - 1e-9
    assert_lossless(deltas(tmp_path / "full.safetensors"), exact)
    report = resize_file(src, tmp_path / "low.safetensors", rank=2, conv_rank=3, base=str(tiny_folder))
    assert {m["kind"] for m in report.modules} == {"conv", "linear"}
    assert_eckart_young(report, deltas(tmp_path / "low.safetensors"), exact, 2, 3)


def test_tucker_files_hold_their_cores(pipe, tmp_path):
    """The Tucker cases above really exercise hada_t1/t2 and lokr_t2 (not silently a plain layout)."""
    for kind, core in (("loha_tucker", ".hada_t1"), ("lokr_tucker", ".lokr_t2")):
        path = adapter_file(pipe, tmp_path / f"{kind}.safetensors", CONFIGS[kind])
        assert any(core in k for k in read_safetensors(path)[0])


def test_resize_without_base_takes_layer_shapes_from_the_family(tmp_path):
    """A full-size SD1 LoHa on a 3x3 conv (factors flattened to (r, in·9)) resizes to a 4-D LoCon without a
    base model: the kernel comes from the SD1 architecture on the meta device."""
    spec = LayerSpec((320, 320, 3, 3), padding=(1, 1))
    weights = F_loha.init_weights(spec, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights["w2a"].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    keys = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"}
    tensors = {f"{name}.{keys[k]}": v for k, v in weights.items()}
    tensors[f"{name}.alpha"] = torch.tensor(1.0)
    src = tmp_path / "sd1_loha.safetensors"
    write_safetensors(src, tensors, {"ss_base_model_version": "sd_v1"})
    report = resize_file(src, tmp_path / "r.safetensors", rank=4)  # rank-2 LoHa: ΔW of rank <= 4
    exact = F_loha.delta_weight(weights, 0.5, spec.weight_shape)
    got = deltas(tmp_path / "r.safetensors")[name]
    assert got.shape == (320, 320, 3, 3) and report.modules[0]["kind"] == "conv"
    torch.testing.assert_close(got, exact, atol=1e-10, rtol=1e-9)


def test_resize_refuses_a_file_for_another_model_size_without_base(pipe, tmp_path):
    src = adapter_file(pipe, tmp_path / "loha.safetensors", CONFIGS["loha"])
    with pytest.raises(ToolError, match="pass the base model the file was trained on with --base"):
        resize_file(src, tmp_path / "r.safetensors", rank=2)


@pytest.mark.parametrize("config", [dict(algo="lora", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2),
                                    dict(algo="lora", network_dim=4, network_alpha=2, wd_on_output=True),
                                    dict(CONFIGS["loha"])], ids=["lora-input", "lora-output", "loha-input"])
def test_resize_dora_reproduces_w_prime_minus_w(config, pipe, tiny_folder, tmp_path):
    src = adapter_file(pipe, tmp_path / "dora.safetensors", dict(config, dora_wd=True), dora=True)
    exact = loader_deltas(pipe, src)
    full = resize_file(src, tmp_path / "full.safetensors", rank=4096, base=str(tiny_folder))
    assert {m["algo"] for m in full.modules} == {config["algo"] + "+dora"}
    assert_lossless(deltas(tmp_path / "full.safetensors"), exact)
    net, _ = load_network_file(src, pipe.unet, [pipe.text_encoder])
    applied = probe(pipe)
    net.restore()
    net, _ = load_network_file(tmp_path / "full.safetensors", pipe.unet, [pipe.text_encoder])
    resized = probe(pipe)
    net.restore()
    torch.testing.assert_close(resized, applied, atol=1e-5, rtol=1e-5)
    report = resize_file(src, tmp_path / "low.safetensors", rank=3, conv_rank=5, base=str(tiny_folder))
    assert_eckart_young(report, deltas(tmp_path / "low.safetensors"), exact, 3, 5)


def test_merge_lora_and_loha_into_one_lora_is_their_sum(pipe, tiny_folder, tmp_path):
    lora = adapter_file(pipe, tmp_path / "a.safetensors", dict(network_dim=4, network_alpha=2, conv_dim=4,
                                                                      conv_alpha=1), seed=1)
    loha = adapter_file(pipe, tmp_path / "b.safetensors", CONFIGS["loha_tucker"], seed=2)
    dora = adapter_file(pipe, tmp_path / "c.safetensors", dict(network_dim=2, dora_wd=True), seed=3, dora=True)
    da, db, dc = (loader_deltas(pipe, p) for p in (lora, loha, dora))
    inputs = [(str(lora), 0.5), (str(loha), -1.5), (str(dora), 0.8)]
    with pytest.raises(ToolError, match="DoRA .*needs the base model's weight"):
        merge_loras(inputs[2:], tmp_path / "m.safetensors")
    report = merge_loras(inputs, tmp_path / "m.safetensors", base=str(tiny_folder))
    expected = {name: 0.5 * da.get(name, 0) - 1.5 * db.get(name, 0) + 0.8 * dc.get(name, 0)
                for name in da.keys() | db.keys() | dc.keys()}
    assert min(m["retained"] for m in report.modules) > 1 - 1e-9
    assert_lossless(deltas(report.path), expected)
    svd = merge_loras(inputs, tmp_path / "svd.safetensors", mode="svd", rank=3, conv_rank=5, base=str(tiny_folder))
    assert_eckart_young(svd, deltas(svd.path), expected, 3, 5)
    assert {m["algo"] for m in svd.modules} >= {"loha,lora", "loha,lora,lora+dora"}
