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


def test_resize_merge_refuse_dora_without_a_base_and_convert_refuses_the_input_axis(tiny_folder, tmp_path):
    """A DoRA module's change W' − W needs the base weight: never silently dropped to its plain LoRA part. PEFT
    normalises per output row, so an input-axis file has no exact PEFT form."""
    import pytest

    from lorakit.tools.convert import convert_file
    from lorakit.tools.lowrank import ToolError
    from lorakit.tools.merge import merge_loras
    from lorakit.tools.resize import resize_file

    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [], NetworkConfig(network_dim=4, dora_wd=True), seed=0)
    path = save_network(net, tmp_path / "dora.safetensors")
    for run in (lambda: resize_file(path, tmp_path / "r.safetensors", rank=2),
                lambda: merge_loras([(str(path), 1.0)], tmp_path / "m.safetensors")):
        with pytest.raises(ToolError, match="DoRA .*needs the base model's weight.*--base"):
            run()
    with pytest.raises(ToolError, match="DoRA on the input axis.*no PEFT file equals an input-axis DoRA"):
        convert_file(path, tmp_path / "c.safetensors", to="diffusers", family="sd1")


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


def test_convert_output_axis_dora_to_diffusers_loads_with_peft_and_gives_our_outputs(tiny_folder, tmp_path):
    """diffusers' load_lora_weights builds PEFT use_dora layers from `lora_magnitude_vector` (LoRA and LoCon 3x3)."""
    from lorakit.formats.safetensors_io import read_safetensors
    from lorakit.tools.convert import convert_file

    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(
        network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=1, dora_wd=True, wd_on_output=True), seed=0)
    randomize_dora(net)
    ours = probe(pipe)
    path = save_network(net, tmp_path / "dora.safetensors")
    net.restore()
    assert not torch.allclose(ours, probe(pipe), atol=1e-3)
    diffusers_file = convert_file(path, tmp_path / "d.safetensors", to="diffusers")
    keys = read_safetensors(diffusers_file)[0]
    assert sum(k.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")) for k in keys) == len(net.adapters)
    theirs = load_base_model(str(tiny_folder)).pipeline
    theirs.load_lora_weights(str(diffusers_file), adapter_name="dora")
    assert any(getattr(m, "use_dora", {}).get("dora") for m in theirs.unet.modules())
    torch.testing.assert_close(probe(theirs), ours, atol=2e-5, rtol=1e-4)
    back = convert_file(diffusers_file, tmp_path / "k.safetensors", to="kohya", family="sd1")
    again, _ = load_network_file(back, pipe.unet, [pipe.text_encoder])
    assert all(a.dora_axis == "output" for a in again.adapters.values())
    torch.testing.assert_close(probe(pipe), ours, atol=2e-5, rtol=1e-4)


def test_peft_use_dora_file_saved_by_diffusers_loads_in_ours_with_the_writers_outputs(tiny_folder, tmp_path):
    """A real PEFT `use_dora` LoRA (Linear and conv 1x1/3x3) saved with diffusers' save_lora_weights, converted to
    kohya keys, gives the writer's outputs in lorakit."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lorakit.inspect_file import inspect_file
    from lorakit.tools.convert import convert_file

    theirs = load_base_model(str(tiny_folder)).pipeline
    theirs.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: lora_B off zero, magnitudes off ‖W‖
        for name, p in theirs.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expected = probe(theirs)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(theirs.unet),
                                              safe_serialization=True)
    converted = convert_file(tmp_path / "peft" / "pytorch_lora_weights.safetensors", tmp_path / "k.safetensors",
                             to="kohya", family="sd1")
    ours = load_base_model(str(tiny_folder)).pipeline
    assert not torch.allclose(probe(ours), expected, atol=1e-3)
    net, _ = load_network_file(converted, ours.unet, [ours.text_encoder])
    assert net.adapters and all(a.dora_axis == "output" for a in net.adapters.values())
    assert any(len(a.spec.kernel) == 2 and a.spec.kernel != (1, 1) for a in net.adapters.values())  # 3x3 convs
    torch.testing.assert_close(probe(ours), expected, atol=2e-5, rtol=1e-4)
    assert set(inspect_file(converted)["algorithm_labels"]) == {"LoRA+DoRA (output axis)"}
