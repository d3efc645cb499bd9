"""DoRA against lycoris-lora 4.1.3: it loads our output-axis files and computes our outputs; we load files its
`dora_wd` writes (both axes) and compute its outputs. Helpers as in test_oracles.py."""
import json
import logging

import pytest
import torch

from lorakit.formats.files import load_network_file, save_network
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.inspect_file import inspect_file
from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network

from conftest import randomize, unet_inputs
from test_oracles import UNET_CLASSES, lycoris_kohya, lycoris_preset, outputs, te_root

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
ALGO_EXTRA = {"locon": {}, "loha": {}, "lokr": {"factor": "4"}}


def models():
    unet, (te,) = build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")
    x, t, _, _ = unet_inputs(unet)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    return unet, te, (ids, x, t)


def trained_magnitudes(network, seed=0):
    """Move each magnitude 0.7x-1.3x off ‖W‖ (randomize() would draw near-zero magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("magnitude"):
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_loads_our_output_axis_dora_file_and_matches(tmp_path, algo):
    unet, te, (ids, x, t) = models()
    config = NetworkConfig(algo=algo, network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=3, dora_wd=True,
                           wd_on_output=True, **({"factor": 4} if algo == "lokr" else {}))
    net = create_network(unet, [te], config, seed=0)
    base, _ = outputs(unet, te, ids, x, t)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("magnitude"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    trained_magnitudes(net)
    ours, ours_ctx = outputs(unet, te, ids, x, t)
    assert not torch.allclose(ours, base, atol=1e-3)
    path = save_network(net, tmp_path / "ours.safetensors")
    net.restore()
    with lycoris_preset():
        theirs_net, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, te_root(te), unet,
                                                                  for_inference=True)
        theirs_net.apply_to(te_root(te), unet, True, True)
    loras = theirs_net.unet_loras + theirs_net.text_encoder_loras
    assert len(loras) == len(net.adapters) and all(m.wd and m.wd_on_out for m in loras)
    theirs, theirs_ctx = outputs(unet, te, ids, x, t)
    theirs_net.restore()
    torch.testing.assert_close(theirs_ctx, ours_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("wd_on_output", [True, False])
def test_we_load_lycoris_dora_files_and_match_lycoris(tmp_path, algo, wd_on_output):
    unet, te, (ids, x, t) = models()
    torch.manual_seed(0)
    preset = tmp_path / "kohya_targets.toml"
    preset.write_text(f"unet_target_module = {UNET_CLASSES}\nunet_target_name = []\n")
    with lycoris_preset():
        theirs_net = lycoris_kohya.create_network(1.0, 4, 2.0, None, te_root(te), unet, algo=algo,
                                                  preset=str(preset), conv_dim="4", conv_alpha="1",
                                                  dora_wd="True", wd_on_output=str(wd_on_output),
                                                  **ALGO_EXTRA[algo])
        theirs_net.apply_to(te_root(te), unet, True, True)
        scales = {n: p.detach().clone() for n, p in theirs_net.named_parameters() if n.endswith("dora_scale")}
        randomize(theirs_net, std=0.1)
        with torch.no_grad():  # a trained magnitude near ‖W‖, not randomize()'s near-zero one
            for n, p in theirs_net.named_parameters():
                if n in scales:
                    p.copy_(scales[n] * (0.7 + 0.6 * torch.rand(p.shape)))
        theirs, _ = outputs(unet, te, ids, x, t)
        path = tmp_path / f"lycoris_{algo}.safetensors"
        theirs_net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        theirs_net.restore()
    tensors, _ = read_safetensors(path)
    assert any(k.endswith(".dora_scale") for k in tensors)
    ours_net, report = load_network_file(path, unet, [te])
    axis = "output" if wd_on_output else "input"
    assert report.loaded == len(scales) and all(a.dora_axis == axis for a in ours_net.adapters.values())
    ours, _ = outputs(unet, te, ids, x, t)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    labels = inspect_file(path)["algorithm_labels"]
    name = {"locon": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[algo]
    assert labels == {f"{name}+DoRA ({axis} axis)": len(scales)}


def test_our_input_axis_file_records_the_axis_for_lycoris(tmp_path):
    """LyCORIS reads a missing wd_on_output as True; our input-axis default says False explicitly."""
    unet, te, _ = models()
    net = create_network(unet, [te], NetworkConfig(network_dim=4, dora_wd=True), seed=0)
    meta = read_safetensors(save_network(net, tmp_path / "in.safetensors"))[1]
    args = json.loads(meta["ss_network_args"])
    assert (args["dora_wd"], args["wd_on_output"]) == ("True", "False")


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_loads_our_input_axis_dora_file_with_its_network_args_and_matches(tmp_path, algo):
    """Our default (input-axis) file. LyCORIS 4.1.3's create_network_from_weights always builds output-axis
    modules, so its loader needs the file's ss_network_args (wd_on_output = False), as sd-scripts passes them
    when it loads network_weights: create_network with them, then load_weights gives our outputs."""
    unet, te, (ids, x, t) = models()
    config = NetworkConfig(algo=algo, network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=3, dora_wd=True,
                           **({"factor": 4} if algo == "lokr" else {}))
    net = create_network(unet, [te], config, seed=0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("magnitude"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    trained_magnitudes(net)
    ours, ours_ctx = outputs(unet, te, ids, x, t)
    path = save_network(net, tmp_path / "ours.safetensors")
    net.restore()
    tensors, meta = read_safetensors(path)
    args = json.loads(meta["ss_network_args"])
    assert args["wd_on_output"] == "False" and all(v.shape[0] == 1 for k, v in tensors.items()
                                                      if k.endswith(".dora_scale"))
    with lycoris_preset():
        preset = tmp_path / "kohya_targets.toml"  # LyCORIS's own "full" preset crashes on diffusers U-Nets
        preset.write_text(f"unet_target_module = {UNET_CLASSES}\nunet_target_name = []\n")
        theirs_net = lycoris_kohya.create_network(1.0, 4, 2.0, None, te_root(te), unet,
                                                  **dict(args, preset=str(preset)))
        theirs_net.apply_to(te_root(te), unet, True, True)
    assert set(tensors) <= set(theirs_net.state_dict())  # every tensor of our file has a home in theirs
    theirs_net.load_weights(str(path))
    loras = theirs_net.unet_loras + theirs_net.text_encoder_loras
    assert all(m.wd and not m.wd_on_out for m in loras)
    theirs, theirs_ctx = outputs(unet, te, ids, x, t)
    theirs_net.restore()
    torch.testing.assert_close(theirs_ctx, ours_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
