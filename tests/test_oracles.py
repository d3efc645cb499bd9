"""Independent implementations: lycoris-lora and diffusers load our files and compute the same outputs;
we load LyCORIS-written files and compute the same outputs as LyCORIS."""
import contextlib
import logging

import pytest
import torch

from lorakit.formats.files import load_network_file, save_network
from lorakit.inspect_file import inspect_file
from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network

from conftest import randomize, unet_inputs

lycoris_kohya = pytest.importorskip("lycoris.kohya")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
UNET_CLASSES = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


@contextlib.contextmanager
def lycoris_preset():
    """LyCORIS 4.1.3's default preset crashes on diffusers U-Nets (duplicated time_embedding name); its
    presets are class globals, so set kohya's targets and put everything back afterwards."""
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME")}
    cls.apply_preset({"unet_target_module": UNET_CLASSES, "unet_target_name": []})
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)


def te_root(text_encoder):
    """transformers 5 dropped `text_model.` from module paths; LyCORIS names modules from paths."""
    root = torch.nn.Module()
    root.text_model = text_encoder
    return root


def outputs(unet, te, ids, x, t):
    with torch.no_grad():
        ctx = te(ids).last_hidden_state
        return unet(x, t, ctx).sample, ctx


@pytest.mark.parametrize("algo,extra", [("lora", {}), ("lora", {"use_tucker": True}), ("loha", {}),
                                        ("loha", {"use_tucker": True}), ("lokr", {"factor": 4}),
                                        ("lokr", {"factor": 8, "decompose_both": True})])
def test_lycoris_loads_our_file_and_matches_our_forward(tmp_path, algo, extra):
    unet, (te,) = build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")
    x, t, _, _ = unet_inputs(unet)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    base, _ = outputs(unet, te, ids, x, t)
    net = create_network(unet, [te], NetworkConfig(algo=algo, network_dim=4, network_alpha=2, conv_dim=4,
                                                   conv_alpha=3, **extra), seed=0)
    randomize(net, std=0.1)
    ours, ours_ctx = outputs(unet, te, ids, x, t)
    assert not torch.allclose(ours, base)
    path = save_network(net, tmp_path / "ours.safetensors")
    net.restore()
    with lycoris_preset():
        theirs_net, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, te_root(te), unet,
                                                                  for_inference=True)
        theirs_net.apply_to(te_root(te), unet, True, True)
    assert len(theirs_net.unet_loras) + len(theirs_net.text_encoder_loras) == len(net.adapters)
    theirs, theirs_ctx = outputs(unet, te, ids, x, t)
    torch.testing.assert_close(theirs_ctx, ours_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_we_load_lycoris_written_files_and_match_lycoris(tmp_path, algo):
    unet, (te,) = build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")
    x, t, _, _ = unet_inputs(unet)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    preset = tmp_path / "kohya_targets.toml"
    preset.write_text(f"unet_target_module = {UNET_CLASSES}\nunet_target_name = []\n")
    with lycoris_preset():
        theirs_net = lycoris_kohya.create_network(1.0, 4, 2.0, None, te_root(te), unet, algo=algo, preset=str(preset),
                                                  conv_dim="4", conv_alpha="1", factor="4")
        theirs_net.apply_to(te_root(te), unet, True, True)
        randomize(theirs_net, std=0.1)
        theirs, _ = outputs(unet, te, ids, x, t)
        path = tmp_path / f"lycoris_{algo}.safetensors"
        theirs_net.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya"})
        theirs_fp16 = {k: v.half().float() for k, v in theirs_net.state_dict().items()}
        theirs_net.load_state_dict(theirs_fp16, strict=False)  # compare at the precision the file holds
        theirs, _ = outputs(unet, te, ids, x, t)
        theirs_net.restore()
    ours_net, report = load_network_file(path, unet, [te])
    assert report.loaded == len(theirs_net.unet_loras) + len(theirs_net.text_encoder_loras)
    ours, _ = outputs(unet, te, ids, x, t)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    report = inspect_file(path)
    assert set(report["algorithms"]) == {"lokr" if algo == "lokr" else ("loha" if algo == "loha" else "lora")}
    assert report["blocks"]["IN01"]["conv"] > 0 and report["blocks"]["IN01"]["linear"] > 0


@pytest.mark.parametrize("conv_dim", [0, 4])
def test_diffusers_pipeline_load_lora_weights_matches_our_outputs(tmp_path, conv_dim):
    """A tiny StableDiffusionPipeline loads our kohya-format file with `load_lora_weights` (PEFT backend)."""
    pytest.importorskip("peft")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from lorakit.models.tiny import SCHEDULER, TINY_VAE
    from lorakit.models.tokenizer import clip_tokenizer

    unet, (te,) = build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**TINY_VAE), text_encoder=te, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    x, t, _, _ = unet_inputs(unet)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    base, base_ctx = outputs(unet, te, ids, x, t)
    net = create_network(unet, [te], NetworkConfig(network_dim=4, network_alpha=2, conv_dim=conv_dim,
                                                   conv_alpha=1.0 if conv_dim else None), seed=0)
    randomize(net, std=0.1)
    ours, ours_ctx = outputs(unet, te, ids, x, t)
    path = save_network(net, tmp_path / "ours.safetensors")
    net.restore()
    pipe.load_lora_weights(str(path), adapter_name="ours")
    theirs, theirs_ctx = outputs(pipe.unet, pipe.text_encoder, ids, x, t)
    assert not torch.allclose(ours_ctx, base_ctx) and not torch.allclose(ours, base)
    torch.testing.assert_close(theirs_ctx, ours_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
