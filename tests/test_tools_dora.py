"""File tools on DoRA files: merge into a checkpoint equals applying the adapter at the same strength."""
import torch

from lorakit.formats.files import load_network_file, save_network
from lorakit.models.checkpoint import load_base_model, load_single_file
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.tools.merge import merge_into_checkpoint, parse_inputs

from test_dora import randomize_dora
from test_tools import probe


def test_merge_dora_into_checkpoint_equals_applying_it(tiny_folder, tmp_path):
    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(network_dim=4, network_alpha=2, conv_dim=4,
                                                                       conv_alpha=2, dora_wd=True), seed=0)
    randomize_dora(net)
    path = save_network(net, tmp_path / "dora.safetensors")
    net.restore()
    base = probe(pipe)
    applied_net, _ = load_network_file(path, pipe.unet, [pipe.text_encoder], multiplier=0.6)
    applied = probe(pipe)
    assert not torch.allclose(applied, base, atol=1e-4)
    applied_net.restore()
    out = merge_into_checkpoint(str(tiny_folder), parse_inputs([f"{path}:0.6"]), tmp_path / "m.safetensors",
                                precision="float")
    merged = load_single_file(out, config_dir=tiny_folder).pipeline
    torch.testing.assert_close(probe(merged), applied, atol=2e-5, rtol=1e-4)


def test_resize_merge_and_convert_refuse_dora_without_a_base(tiny_folder, tmp_path):
    """A DoRA module's change W' − W needs the base weight: never silently dropped to its plain LoRA part."""
    import pytest

    from lorakit.tools.convert import convert_file
    from lorakit.tools.lowrank import ToolError
    from lorakit.tools.merge import merge_loras
    from lorakit.tools.resize import resize_file

    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [], NetworkConfig(network_dim=4, dora_wd=True), seed=0)
    path = save_network(net, tmp_path / "dora.safetensors")
    for run in (lambda: resize_file(path, tmp_path / "r.safetensors", rank=2),
                lambda: merge_loras([(str(path), 1.0)], tmp_path / "m.safetensors"),
                lambda: convert_file(path, tmp_path / "c.safetensors", to="diffusers", family="sd1")):
        with pytest.raises(ToolError, match="DoRA .*needs the base model's weight"):
            run()


def test_blocks_keeps_or_removes_dora_modules_and_refuses_other_weights(tiny_folder, tmp_path):
    import pytest

    from lorakit.formats.safetensors_io import read_safetensors
    from lorakit.tools.blocks import apply_block_weights
    from lorakit.tools.lowrank import ToolError

    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [], NetworkConfig(network_dim=4, dora_wd=True), seed=0)
    path = save_network(net, tmp_path / "dora.safetensors")
    out, counts = apply_block_weights(path, tmp_path / "all.safetensors", "ALL")
    assert counts["scaled"] == 0 and read_safetensors(out)[0].keys() == read_safetensors(path)[0].keys()
    with pytest.raises(ToolError, match="DoRA; its effect does not scale"):
        apply_block_weights(path, tmp_path / "half.safetensors", "ALL0.5")
