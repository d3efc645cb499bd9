"""Trained files, every algorithm, conv on and off: `lorakit inspect` reads them, lycoris-lora (and, for
LoRA/LoCon, diffusers) load them and compute the same outputs as lorakit; block dims give exactly the
modules asked for."""
import numpy as np
import pytest
import torch

from lorakit.formats.files import load_network_file
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.inspect_file import inspect_file
from lorakit.models.checkpoint import load_base_model
from lorakit.training.trainer import Trainer

from conftest import train_config
from test_oracles import lycoris_kohya, lycoris_preset, outputs, te_root


def probe(unet):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (1, 6), generator=g)
    return ids, torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("conv_dim", [0, 4])
def test_trained_file_loads_in_lycoris_with_the_same_outputs(tiny_folder, images, tmp_path, algo, conv_dim):
    cfg = train_config(tiny_folder, images, tmp_path, algo=algo, conv_dim=conv_dim, max_train_steps=3,
                       conv_alpha=2 if conv_dim else None, learning_rate=1e-2, save_precision="float")
    result = Trainer(cfg).run()
    path = result.files[-1]
    report = inspect_file(path)
    expected = {"lora": "lora", "loha": "loha", "lokr": "lokr"}[algo]
    assert set(report["algorithms"]) == {expected}
    assert any(b["conv"] for b in report["blocks"].values()) == bool(conv_dim)

    pipe = load_base_model(str(tiny_folder)).pipeline
    unet, te = pipe.unet, pipe.text_encoder
    ids, x, t = probe(unet)
    base, _ = outputs(unet, te, ids, x, t)
    ours_net, _ = load_network_file(path, unet, [te])
    ours, ours_ctx = outputs(unet, te, ids, x, t)
    assert (ours - base).abs().max() > 1e-4  # training moved the adapters away from the no-op start
    ours_net.restore()
    with lycoris_preset():
        theirs_net, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, te_root(te), unet,
                                                                  for_inference=True)
        theirs_net.apply_to(te_root(te), unet, True, True)
    theirs, theirs_ctx = outputs(unet, te, ids, x, t)
    torch.testing.assert_close(theirs_ctx, ours_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv_dim", [0, 4])
def test_trained_lora_and_locon_load_in_diffusers(tiny_folder, images, tmp_path, conv_dim):
    pytest.importorskip("peft")
    cfg = train_config(tiny_folder, images, tmp_path, conv_dim=conv_dim, conv_alpha=2 if conv_dim else None,
                       max_train_steps=3, learning_rate=1e-2, save_precision="float")
    path = Trainer(cfg).run().files[-1]
    ours_pipe, theirs_pipe = (load_base_model(str(tiny_folder)).pipeline for _ in range(2))
    ids, x, t = probe(ours_pipe.unet)
    load_network_file(path, ours_pipe.unet, [ours_pipe.text_encoder])
    theirs_pipe.load_lora_weights(str(path), adapter_name="trained")
    ours, ours_ctx = outputs(ours_pipe.unet, ours_pipe.text_encoder, ids, x, t)
    theirs, theirs_ctx = outputs(theirs_pipe.unet, theirs_pipe.text_encoder, ids, x, t)
    torch.testing.assert_close(theirs_ctx, ours_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_block_dims_train_exactly_the_blocks_asked_for(tiny_folder, images, tmp_path):
    dims = [0] * 25
    dims[4], dims[12], dims[20] = 4, 2, 8  # IN04, M00, OUT07 (blocks: IN00..IN11, M00, OUT00..OUT11)
    cfg = train_config(tiny_folder, images, tmp_path, block_dims=dims, block_alphas=[1.0] * 25,
                       conv_block_dims=[0] * 12 + [4] + [0] * 12, network_train_unet_only=True, max_train_steps=2)
    tensors, _ = read_safetensors(Trainer(cfg).run().files[-1])
    report = inspect_file(cfg.output_dir + "/t.safetensors")
    blocks = {b: v for b, v in report["blocks"].items() if v["linear"] or v["conv"]}
    assert set(blocks) == {"IN04", "M00", "OUT07"} and blocks["M00"]["conv"] > 0
    assert blocks["IN04"]["conv"] == 0 and blocks["OUT07"]["conv"] == 0
    ranks = {k.split(".")[0]: v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")}
    assert {r for k, r in ranks.items() if "down_blocks_1_attentions_0" in k} == {4}
    assert {r for k, r in ranks.items() if "up_blocks_2_attentions_1" in k} == {8}
    assert not any(k.startswith("lora_te") for k in tensors)


def test_sdxl_training_writes_sgm_names_for_both_text_encoders(images, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline

    from lorakit.models.configs import build_text_encoders, build_unet
    from lorakit.models.tiny import SCHEDULER, TINY_VAE
    from lorakit.models.tokenizer import clip_tokenizer

    te1, te2 = build_text_encoders("tiny-sdxl")
    pipe = StableDiffusionXLPipeline(vae=AutoencoderKL(**TINY_VAE), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
                                     unet=build_unet("tiny-sdxl"), scheduler=DDIMScheduler(**SCHEDULER))
    pipe.save_pretrained(tmp_path / "xl")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --s 2\n")
    cfg = train_config(tmp_path / "xl", images, tmp_path, conv_dim=4, conv_alpha=2, max_train_steps=None,
                       max_train_epochs=1, sample_every_n_epochs=1, sample_prompts=str(prompts))
    result = Trainer(cfg).run()
    tensors, meta = read_safetensors(result.files[-1])
    assert meta["ss_base_model_version"].startswith("sdxl")
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    assert result.samples and np.isfinite(result.losses).all()
    loaded = load_base_model(str(tmp_path / "xl")).pipeline
    network, report = load_network_file(result.files[-1], loaded.unet, [loaded.text_encoder, loaded.text_encoder_2])
    assert report.loaded == len(network.adapters) > 0
