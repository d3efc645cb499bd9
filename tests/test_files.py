"""Save/load identity, hashes, metadata, files written by others, and every way a file can be bad."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorakit.formats.files import load_network_file, network_tensors, save_network
from lorakit.formats.safetensors_io import LoraFileError, file_data_hash, read_safetensors, write_safetensors
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network

from conftest import randomize, unet_inputs


def trained(unet, tes, **cfg):
    net = create_network(unet, tes, NetworkConfig(**cfg), seed=0)
    randomize(net, std=0.05)
    return net


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_save_load_roundtrip_is_identical(tiny_sd1, tmp_path, algo):
    unet, tes = tiny_sd1
    net = trained(unet, tes, algo=algo, network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=1)
    x, t, ctx, _ = unet_inputs(unet)
    with torch.no_grad():
        before = unet(x, t, ctx).sample
    path = save_network(net, tmp_path / "a.safetensors", metadata={"ss_training_comment": "hello"})
    expected = network_tensors(net)
    net.restore()
    tensors, meta = read_safetensors(path)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert meta["sshs_model_hash"] == file_data_hash(path) and meta["ss_training_comment"] == "hello"
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == algo and args["conv_dim"] == "4" and args["conv_alpha"] == "1"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    loaded, report = load_network_file(path, unet, tes)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, before)
    assert report.loaded == len(net.adapters) and not report.unmatched
    again = network_tensors(loaded)
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_file_layout_checklist(tiny_sd1, tmp_path):
    unet, tes = tiny_sd1
    net = trained(unet, tes, network_dim=4, conv_dim=2)
    path = save_network(net, tmp_path / "a.safetensors", dtype=torch.float16)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:10] == b'{"'  # A1111 asserts this
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    assert "lora_adapter_metadata" not in meta and all(isinstance(v, str) for v in meta.values())
    modules = {k.split(".")[0] for k in header}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in modules)
    for m in modules:
        assert header[f"{m}.alpha"]["shape"] == [] and header[f"{m}.alpha"]["dtype"] == "F32"
        assert header[f"{m}.lora_down.weight"]["dtype"] == "F16"
    assert header["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]["shape"] == [4, 32, 1, 1]
    assert header["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]["shape"] == [32, 2, 1, 1]
    assert len(header["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]["shape"]) == 2
    assert not any(k.endswith((".weight", ".scale")) and ".lora_" not in k for k in header)


def test_kohya_style_file_loads_mixed_ranks_missing_alpha_fp16_and_4d_linear(tiny_sd2_models, tmp_path):
    """Layout quirks of files in the wild: fp16/bf16, int64 alpha, no alpha, mixed ranks, SD2 proj_in as 1x1 conv."""
    unet, tes = tiny_sd2_models
    g = torch.Generator().manual_seed(0)
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"  # Linear in diffusers SD2, 1x1 conv in kohya's files
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        f"{proj}.lora_down.weight": torch.randn(4, 32, 1, 1, generator=g).half(),
        f"{proj}.lora_up.weight": torch.randn(32, 4, 1, 1, generator=g).half(),
        f"{proj}.alpha": torch.tensor(4),  # int64, as kohya writes when alpha was substituted
        f"{q}.lora_down.weight": torch.randn(8, 32, generator=g).bfloat16(),
        f"{q}.lora_up.weight": torch.randn(32, 8, generator=g).bfloat16(),  # no alpha: scale 1
        f"{conv}.lora_down.weight": torch.randn(2, 32, 3, 3, generator=g),
        f"{conv}.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
        f"{conv}.alpha": torch.tensor(1.0).half(),
    }
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.lora", "ss_v2": "True"})
    net, report = load_network_file(path, unet, tes)
    assert report.loaded == 3
    a = net.adapters
    assert (a[proj].rank, a[q].rank, a[conv].rank) == (4, 8, 2)
    assert (a[proj].scale, a[q].scale, a[conv].scale) == (1.0, 1.0, 0.5)
    expected = (tensors[f"{proj}.lora_up.weight"][:, :, 0, 0].double() @ tensors[f"{proj}.lora_down.weight"][:, :, 0, 0].double())
    torch.testing.assert_close(a[proj].delta_weight().double(), expected)


@pytest.fixture
def tiny_sd2_models():
    from lorakit.models.configs import build_text_encoders, build_unet

    return build_unet("tiny-sd2"), build_text_encoders("tiny-sd2")


def test_truncated_file_is_one_clear_error(tiny_sd1, tmp_path):
    unet, tes = tiny_sd1
    path = save_network(trained(unet, tes, network_dim=4), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match="truncated"):
        load_network_file(tmp_path / "cut.safetensors", unet, tes)
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(LoraFileError, match="too short"):
        read_safetensors(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("header,match", [
    (b"\xff\xfe not json", "not valid JSON"),
    (b'{"a.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}}', "outside"),
    (b'{"a.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}', "do not hold"),
    (b'{"a.lora_down.weight": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}', "unsupported dtype"),
    (b'{"__metadata__": {"k": 1}}', "strings to strings"),
])
def test_malformed_headers_are_rejected_before_loading(tmp_path, header, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(LoraFileError, match=match) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_oversized_header_and_pickles_are_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(LoraFileError, match="exceeds"):
        read_safetensors(path)
    ckpt = tmp_path / "old.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(LoraFileError, match="pickle"):
        read_safetensors(ckpt)


def test_wrong_shapes_name_the_module(tiny_sd1, tmp_path):
    unet, tes = tiny_sd1
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 31), f"{name}.lora_up.weight": torch.zeros(32, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(LoraFileError, match=name):
        load_network_file(tmp_path / "s.safetensors", unet, tes)


def test_unknown_keys_and_unmatched_modules(tiny_sd1, tmp_path):
    unet, tes = tiny_sd1
    save_file({"lora_unet_foo.weird_key": torch.zeros(2)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(LoraFileError, match=r"lora_unet_foo\.weird_key.*match no supported algorithm"):
        load_network_file(tmp_path / "u.safetensors", unet, tes)
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{good}.lora_down.weight": torch.zeros(2, 32), f"{good}.lora_up.weight": torch.zeros(32, 2),
               "lora_unet_nowhere_conv.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere_conv.lora_up.weight": torch.zeros(4, 2)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(LoraFileError, match="lora_unet_nowhere_conv"):
        load_network_file(tmp_path / "m.safetensors", unet, tes)
    assert "forward" not in unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.__dict__
    net, report = load_network_file(tmp_path / "m.safetensors", unet, tes, partial=True)
    assert report.unmatched == ["lora_unet_nowhere_conv"] and report.loaded == 1


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    write_safetensors(path, {"a": torch.ones(3)}, {"v": "1"})
    original = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lorakit.formats.safetensors_io.os.fsync", disk_full)
    with pytest.raises(OSError):
        write_safetensors(path, {"a": torch.zeros(3)}, {"v": "2"})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]  # no temp file left behind
