"""Single-file checkpoints in the original layout: write tiny SD1/SD2/SDXL models as the files users have,
load them back through the user path offline, and compare with the in-memory models."""
import pytest
import torch

from lorakit.models.checkpoint import (CheckpointError, detect_family, load_base_model, load_single_file,
                                       read_checkpoint, save_single_file)
from lorakit.models.configs import FAMILIES, build_text_encoders, build_unet, write_config_folder
from lorakit.models.ldm_layout import to_original_layout
from lorakit.models.tiny import TINY_VAE

from conftest import unet_inputs


def tiny_parts(family):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    unet, encoders = build_unet(f"tiny-{family}"), build_text_encoders(f"tiny-{family}")
    vae = AutoencoderKL(**TINY_VAE).eval()
    return unet, vae, encoders


def config_dir(tmp_path, family, unet, vae, encoders):
    return write_config_folder(tmp_path / "config", family, dict(unet.config), dict(vae.config),
                               [e.config.to_dict() for e in encoders])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_roundtrip_reproduces_outputs(tmp_path, family):
    unet, vae, encoders = tiny_parts(family)
    path = save_single_file(tmp_path / "model.safetensors", family, unet, vae, encoders)
    keys = read_checkpoint(path)
    assert detect_family(keys) == family
    base = load_single_file(path, config_dir=config_dir(tmp_path, family, unet, vae, encoders))
    assert base.family == family and base.prediction_type == "epsilon" and "detected" in base.notes[0]
    pipe = base.pipeline
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in unet.state_dict().items())  # the key conversion is exact
    x, t, ctx, extra = unet_inputs(unet)
    with torch.no_grad():
        # equal weights need not give bit-equal outputs: CPU kernels may pick another path for memory that
        # lies elsewhere (seen: 7e-7 apart in one venv build), so compare at float32 noise
        torch.testing.assert_close(pipe.unet(x, t, ctx, **extra).sample, unet(x, t, ctx, **extra).sample,
                                   atol=1e-6, rtol=1e-6)
        image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        ours = vae.decode(vae.encode(image).latent_dist.mean).sample
        theirs = pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(2))
        for ours_te, theirs_te in zip(encoders, base.text_encoders):
            torch.testing.assert_close(theirs_te(ids)[0], ours_te(ids)[0], atol=1e-5, rtol=1e-5)
    # the written file has the original layout: the keys A1111 / ComfyUI look for
    prefix = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model.transformer.resblocks.",
              "sdxl": "conditioner.embedders.1.model.transformer.resblocks."}[family]
    assert any(k.startswith(prefix) for k in keys)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.conv_out.weight" in keys


def test_full_size_sd15_key_conversion_on_meta():
    """Every full-size SD1.5 tensor gets a unique original-layout key of the right shape (no weights needed)."""
    unet, encoders = build_unet("sd1", "meta"), build_text_encoders("sd1", "meta")
    state = to_original_layout("sd1", unet, None, encoders)
    assert len(state) == len(unet.state_dict()) + len([k for k in encoders[0].state_dict() if "position_ids" not in k])
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert state["model.diffusion_model.output_blocks.11.0.skip_connection.weight"].shape == (320, 640, 1, 1)
    assert state["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 768)
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in state
    assert FAMILIES["sd1"][0]["block_out_channels"] == (320, 640, 1280, 1280)


def test_ckpt_is_read_weights_only_and_code_is_refused(tmp_path):
    unet, vae, encoders = tiny_parts("sd1")
    state = to_original_layout("sd1", unet, vae, encoders)
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "m.ckpt")
    base = load_single_file(tmp_path / "m.ckpt", config_dir=config_dir(tmp_path, "sd1", unet, vae, encoders))
    assert base.family == "sd1"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": state, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(tmp_path / "evil.ckpt")


def test_clear_errors_for_bad_checkpoints(tmp_path):
    unet, vae, encoders = tiny_parts("sd1")
    full = to_original_layout("sd1", unet, vae, encoders)
    path = save_single_file(tmp_path / "m.safetensors", "sd1", unet, vae, encoders)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_single_file(tmp_path / "cut.safetensors")
    no_vae = {k: v for k, v in full.items() if not k.startswith("first_stage_model.")}
    save_single_file(tmp_path / "novae.safetensors", "sd1", None, None, (), passthrough=no_vae)
    with pytest.raises(CheckpointError, match="no VAE .*--vae"):
        load_single_file(tmp_path / "novae.safetensors")
    no_te = {k: v for k, v in full.items() if not k.startswith("cond_stage_model.")}
    save_single_file(tmp_path / "note.safetensors", "sd1", None, None, (), passthrough=no_te)
    with pytest.raises(CheckpointError, match="no text encoder"):
        load_single_file(tmp_path / "note.safetensors")
    save_single_file(tmp_path / "lora.safetensors", "sd1", None, None, (), passthrough={"x.lora_up.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_single_file(tmp_path / "lora.safetensors")
    (tmp_path / "m.bin").write_bytes(b"123")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        load_base_model(tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match="never downloaded"):
        load_base_model("runwayml/stable-diffusion-v1-5")


def test_inspect_reads_a_checkpoint_from_its_header(tmp_path, capsys):
    from lorakit.cli import main

    unet, vae, encoders = tiny_parts("sdxl")
    path = save_single_file(tmp_path / "xl.safetensors", "sdxl", unet, None, encoders, dtype=torch.float16)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "SDXL single file" in text and "missing     vae" in text and "text_encoder_2" in text


def test_full_size_sd15_keys_map_back_through_diffusers_converter():
    """diffusers' own LDM -> diffusers converter turns our full-size SD1.5 U-Net keys back into exactly the
    diffusers U-Net's keys and shapes (on the meta device: no weights are allocated)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build_unet("sd1", "meta")
    ldm = to_original_layout("sd1", unet)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    ours = unet.state_dict()
    assert set(back) == set(ours)
    assert all(tuple(back[k].shape) == tuple(ours[k].shape) for k in ours)
