"""LyCORIS `train_norm`: GroupNorm/LayerNorm deltas (w_norm, b_norm). Closed form in float64, step 0 = base,
bypass = merged, save -> load, files both ways with lycoris-lora 4.1.3, a short training run, kohya configs."""
import json
import logging

import pytest
import torch

from lorakit.adapters.modules.norm import NormModule
from lorakit.formats.files import load_network_file, save_network
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.inspect_file import format_report, inspect_file
from lorakit.models.configs import build_text_encoders, build_unet
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.training.config import build_config
from lorakit.training.trainer import Trainer

from conftest import randomize, train_config, unet_inputs
from test_oracles import UNET_CLASSES, lycoris_kohya, lycoris_preset, outputs, te_root

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def by_hand(x, layer, w, b):
    """GroupNorm/LayerNorm written out: (x - mean) / sqrt(var + eps) per group (or trailing dim), then w, b."""
    if isinstance(layer, torch.nn.GroupNorm):
        g = x.reshape(x.shape[0], layer.num_groups, -1)
        normed = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                              + layer.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return normed * w.reshape(shape) + b.reshape(shape)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + layer.eps)
    return normed * w + b


@pytest.mark.parametrize("layer,shape", [(torch.nn.GroupNorm(4, 8, eps=1e-3), (2, 8, 3, 5)),
                                         (torch.nn.LayerNorm(8), (2, 7, 8))])
@pytest.mark.parametrize("mode", ["bypass", "merged"])
def test_norm_delta_closed_form_float64(layer, shape, mode):
    g = torch.Generator().manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    base = layer(x)
    torch.testing.assert_close(base, by_hand(x, layer, layer.weight, layer.bias), atol=1e-12, rtol=1e-12)
    module = NormModule.create(layer, forward_mode=mode, dtype=torch.float64)
    module.attach(layer)
    assert torch.equal(layer(x), base)  # zero deltas: the base layer exactly
    dw, db = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        module.w_norm.copy_(dw)
        module.b_norm.copy_(db)
    module.multiplier = 0.7
    expected = by_hand(x, layer, layer.weight + 0.7 * dw, layer.bias + 0.7 * db)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    w0 = layer.weight.detach().clone()
    module.merge()
    torch.testing.assert_close(layer.weight.detach(), w0 + 0.7 * dw, atol=1e-15, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    module.unmerge()
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    module.detach()
    assert torch.equal(layer(x), base)


def tiny():
    unet, (te,) = build_unet("tiny-sd1"), build_text_encoders("tiny-sd1")
    x, t, _, _ = unet_inputs(unet)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    return unet, te, (ids, x, t)


def test_step0_is_base_bypass_equals_merged_and_save_load_identity(tmp_path):
    unet, te, (ids, x, t) = tiny()
    base, _ = outputs(unet, te, ids, x, t)
    net = create_network(unet, [te], NetworkConfig(network_dim=4, conv_dim=4, train_norm=True), seed=0)
    norms = {n: a for n, a in net.adapters.items() if a.algo == "norm"}
    # kohya's classes with conv: Transformer2DModel (norm, norm1-3), ResnetBlock2D (norm1, norm2); CLIP's
    # attention/MLP modules hold no norm
    assert norms and all(a.layer.__class__.__name__ in ("GroupNorm", "LayerNorm") for a in norms.values())
    assert not any(net.info[n].component != "unet" for n in norms)
    assert torch.equal(outputs(unet, te, ids, x, t)[0], base)  # step 0: the base model exactly
    randomize(net, std=0.1)
    merged, _ = outputs(unet, te, ids, x, t)
    assert (merged - base).abs().max() > 1e-3
    for a in norms.values():
        a.forward_mode = "bypass"
    torch.testing.assert_close(outputs(unet, te, ids, x, t)[0], merged, atol=1e-5, rtol=1e-5)
    net.merge()
    torch.testing.assert_close(outputs(unet, te, ids, x, t)[0], merged, atol=1e-5, rtol=1e-5)
    net.unmerge()
    path = save_network(net, tmp_path / "norm.safetensors")
    tensors, meta = read_safetensors(path)
    name = next(iter(norms))
    assert f"{name}.w_norm" in tensors and f"{name}.b_norm" in tensors and f"{name}.alpha" not in tensors
    assert json.loads(meta["ss_network_args"])["train_norm"] == "True"
    assert meta["ss_network_module"] == "lycoris.kohya"
    net.restore()
    loaded, report = load_network_file(path, unet, [te])
    assert report.loaded == len(net.adapters)
    for n, a in norms.items():
        assert torch.equal(loaded.adapters[n].w_norm, a.w_norm) and torch.equal(loaded.adapters[n].b_norm, a.b_norm)
    torch.testing.assert_close(outputs(unet, te, ids, x, t)[0], merged, atol=1e-5, rtol=1e-5)
    report = inspect_file(path)
    assert report["algorithms"]["norm"] == len(norms) and report["kinds"]["norm"] == len(norms)
    assert sum(report["norm_deltas"].values()) == len(norms)
    assert f"norm deltas {len(norms)} GroupNorm/LayerNorm layers" in format_report(report)


def lycoris_network(unet, te, preset_file, **kw):
    return lycoris_kohya.create_network(1.0, 4, 2.0, None, te_root(te), unet, algo="locon", preset=str(preset_file),
                                        conv_dim="4", conv_alpha="1", train_norm="True", **kw)


def test_we_load_a_lycoris_train_norm_file_and_match_lycoris(tmp_path):
    unet, te, (ids, x, t) = tiny()
    base, _ = outputs(unet, te, ids, x, t)
    preset = tmp_path / "targets.toml"
    preset.write_text(f"unet_target_module = {UNET_CLASSES}\nunet_target_name = []\n")
    torch.manual_seed(0)
    with lycoris_preset():
        theirs_net = lycoris_network(unet, te, preset)
        theirs_net.apply_to(te_root(te), unet, True, True)
        randomize(theirs_net, std=0.1)
        theirs, _ = outputs(unet, te, ids, x, t)
        path = tmp_path / "lycoris_norm.safetensors"
        theirs_net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        theirs_net.restore()
    their_norms = {m.lora_name for m in theirs_net.unet_loras + theirs_net.text_encoder_loras
                   if type(m).__name__ == "NormModule"}
    assert their_norms and (theirs - base).abs().max() > 1e-3
    ours_fresh = create_network(unet, [te], NetworkConfig(network_dim=4, conv_dim=4, train_norm=True), apply=False)
    assert {n for n, a in ours_fresh.adapters.items() if a.algo == "norm"} == their_norms  # LyCORIS's targets
    net, report = load_network_file(path, unet, [te])
    assert {n for n, a in net.adapters.items() if a.algo == "norm"} == their_norms
    torch.testing.assert_close(outputs(unet, te, ids, x, t)[0], theirs, atol=1e-5, rtol=1e-5)


def test_lycoris_loads_our_train_norm_file_with_a_multiplier(tmp_path):
    unet, te, (ids, x, t) = tiny()
    net = create_network(unet, [te], NetworkConfig(network_dim=4, conv_dim=4, train_norm=True), seed=0)
    randomize(net, std=0.1)
    net.set_multiplier(0.6)
    ours, _ = outputs(unet, te, ids, x, t)
    path = save_network(net, tmp_path / "ours.safetensors")
    net.restore()
    base, _ = outputs(unet, te, ids, x, t)
    with lycoris_preset():
        theirs_net, _ = lycoris_kohya.create_network_from_weights(0.6, str(path), None, te_root(te), unet,
                                                                  for_inference=True)
        theirs_net.apply_to(te_root(te), unet, True, True)
    names = [m.lora_name for m in theirs_net.unet_loras if type(m).__name__ == "NormModule"]
    assert len(names) == sum(a.algo == "norm" for a in net.adapters.values())
    theirs, _ = outputs(unet, te, ids, x, t)
    theirs_net.restore()
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_kohya_config_with_train_norm_network_arg_is_accepted():
    cfg = build_config({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "train_norm=True",
                                                                           "preset=full-lin"]})
    assert cfg.train_norm and cfg.network_config().train_norm
    assert not any("train_norm" in n for n in cfg.notes)
    noted = build_config({"network_module": "lycoris.kohya", "network_args": ["train_norm=True",
                                                                             "rank_dropout=0.1"]})
    assert any("norm deltas" in n for n in noted.notes)


def test_short_run_trains_the_norm_deltas_and_nothing_of_the_base(tiny_folder, images, tmp_path):
    cfg = train_config(tiny_folder, images, tmp_path, max_train_steps=3, network_module="lycoris.kohya",
                       network_args=["train_norm=True"], network_train_unet_only=True, learning_rate=1e-2,
                       save_precision="float")
    trainer = Trainer(cfg)
    unet = trainer.base.pipeline.unet
    base_before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    norms = {n: a for n, a in trainer.network.adapters.items() if a.algo == "norm"}
    assert norms and all(torch.count_nonzero(a.w_norm) == 0 for a in norms.values())
    path = trainer.run().files[-1]
    assert all(torch.equal(p, base_before[n]) for n, p in unet.named_parameters())
    moved = [n for n, a in norms.items() if a.w_norm.abs().max() > 0 and a.b_norm.abs().max() > 0]
    assert len(moved) == len(norms)
    tensors, _ = read_safetensors(path)
    assert all(torch.equal(tensors[f"{n}.w_norm"], a.w_norm.detach().cpu()) for n, a in norms.items())


def test_file_tools_merge_resize_and_convert_handle_norm_deltas(tiny_folder, tmp_path):
    """merge into a checkpoint bakes w_norm/b_norm in at the ratio; extract counts the norm layers it leaves out;
    resize carries them over bit for bit; merging LoRAs sums them; blocks scales both; convert --to diffusers
    refuses them by name."""
    from lorakit.models.checkpoint import load_base_model, load_single_file
    from lorakit.tools.blocks import apply_block_weights
    from lorakit.tools.convert import convert_file
    from lorakit.tools.extract import extract_lora
    from lorakit.tools.lowrank import ToolError
    from lorakit.tools.merge import merge_into_checkpoint, merge_loras, parse_inputs
    from lorakit.tools.resize import resize_file

    from test_tools import probe

    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(network_dim=4, conv_dim=4, train_norm=True),
                         seed=0)
    randomize(net, std=0.1)
    path = save_network(net, tmp_path / "norm.safetensors")
    net.restore()
    applied_net, _ = load_network_file(path, pipe.unet, [pipe.text_encoder], multiplier=0.6)
    applied = probe(pipe)
    applied_net.restore()
    out = merge_into_checkpoint(str(tiny_folder), parse_inputs([f"{path}:0.6"]), tmp_path / "m.safetensors",
                                precision="float")
    merged = load_single_file(out, config_dir=tiny_folder).pipeline
    torch.testing.assert_close(probe(merged), applied, atol=2e-5, rtol=1e-4)
    source, _ = read_safetensors(path)
    n_norms = sum(k.endswith(".w_norm") for k in source)
    _, stats = extract_lora(str(tiny_folder), str(out), tmp_path / "e.safetensors", dim=4, conv_dim=4)
    assert stats["norms_not_extracted"] == n_norms  # said, not silently dropped
    norm_keys = [k for k in source if k.endswith((".w_norm", ".b_norm"))]
    resize_file(path, tmp_path / "r.safetensors", rank=2)
    resized, _ = read_safetensors(tmp_path / "r.safetensors")
    assert norm_keys and all(torch.equal(resized[k], source[k]) for k in norm_keys)
    merge_loras([(str(path), 0.5), (str(path), 0.25)], tmp_path / "s.safetensors")
    summed, _ = read_safetensors(tmp_path / "s.safetensors")
    assert all(torch.allclose(summed[k], source[k] * 0.75, atol=1e-7) for k in norm_keys)
    halved, _ = read_safetensors(apply_block_weights(path, tmp_path / "b.safetensors", "ALL0.5")[0])
    kept = [k for k in norm_keys if k in halved]  # the 17-value list leaves IN00, IN03, ... at 0: removed
    assert kept and all(torch.equal(halved[k], source[k] * 0.5) for k in kept)
    assert not any(k.endswith(".alpha") and k.replace(".alpha", ".w_norm") in source for k in halved)
    with pytest.raises(ToolError, match="train_norm norm delta"):
        convert_file(path, tmp_path / "d.safetensors", to="diffusers")
