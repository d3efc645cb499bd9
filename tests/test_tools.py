"""File tools on the tiny model: merge = apply, resize exact at full rank and optimal below it, extract
recovers a known low-rank difference, block weights, convert round trips, inputs never modified."""
import pytest
import torch

from lorakit.formats.files import load_network_file, save_network
from lorakit.formats.safetensors_io import read_safetensors, tensor_data_hash
from lorakit.models.checkpoint import load_base_model, load_single_file
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.tools.blocks import apply_block_weights, lbw_block, parse_weights
from lorakit.tools.convert import convert_file
from lorakit.tools.extract import extract_lora
from lorakit.tools.lora_files import read_modules
from lorakit.tools.lowrank import ToolError, from_parsed
from lorakit.tools.merge import merge_into_checkpoint, merge_loras, parse_inputs
from lorakit.tools.resize import resize_file

from conftest import randomize


def probe(pipe):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (1, 6), generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ctx = pipe.text_encoder(ids).last_hidden_state
        return pipe.unet(x, torch.tensor([400]), ctx).sample


def lora_file(tiny_folder, path, seed=0, conv_dim=4, rank=4, std=0.05):
    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(
        network_dim=rank, network_alpha=rank / 2, conv_dim=conv_dim, conv_alpha=1.0 if conv_dim else None), seed=seed)
    randomize(net, std=std, seed=seed)
    return save_network(net, path)


def deltas(path):
    modules, _ = read_modules(path)
    return {name: from_parsed(m, str(path)).delta() for name, m in modules.items()}


def test_merge_into_checkpoint_equals_applying_the_loras(tiny_folder, tmp_path):
    a = lora_file(tiny_folder, tmp_path / "a.safetensors", seed=1)
    b = lora_file(tiny_folder, tmp_path / "b.safetensors", seed=2, conv_dim=0)
    # reference: the two LoRAs as one concatenated file, applied through the adapters' forward (not merged)
    both = merge_loras([(str(a), 0.7), (str(b), -0.4)], tmp_path / "ab.safetensors").path
    pipe = load_base_model(str(tiny_folder)).pipeline
    load_network_file(both, pipe.unet, [pipe.text_encoder])
    applied = probe(pipe)
    before = tensor_data_hash(read_safetensors(a)[0])
    out = merge_into_checkpoint(str(tiny_folder), parse_inputs([f"{a}:0.7", f"{b}:-0.4"]), tmp_path / "m.safetensors",
                                precision="float")
    merged = load_single_file(out, config_dir=tiny_folder).pipeline
    torch.testing.assert_close(probe(merged), applied, atol=2e-5, rtol=1e-4)
    assert tensor_data_hash(read_safetensors(a)[0]) == before  # inputs untouched


def test_merge_loras_concat_is_the_exact_ratio_weighted_sum(tiny_folder, tmp_path):
    a = lora_file(tiny_folder, tmp_path / "a.safetensors", seed=1)
    b = lora_file(tiny_folder, tmp_path / "b.safetensors", seed=2, rank=2)
    out = merge_loras([(str(a), 0.5), (str(b), 2.0)], tmp_path / "ab.safetensors").path
    da, db, dm = deltas(a), deltas(b), deltas(out)
    assert dm.keys() == da.keys() | db.keys()
    for name in dm:
        torch.testing.assert_close(dm[name], 0.5 * da[name] + 2.0 * db[name], atol=1e-6, rtol=1e-5)
    svd = merge_loras([(str(a), 0.5), (str(b), 2.0)], tmp_path / "svd.safetensors", mode="svd", rank=6,
                      conv_rank=8).path
    for name, d in deltas(svd).items():  # ranks 4+2 (conv 4+4) hold the sum exactly
        torch.testing.assert_close(d, dm[name], atol=1e-5, rtol=1e-4)
    with pytest.raises(ToolError, match="overwrite an input"):
        merge_loras([(str(a), 1.0)], a)


def test_resize_is_lossless_at_full_rank_and_optimal_below(tiny_folder, tmp_path):
    src = lora_file(tiny_folder, tmp_path / "a.safetensors", rank=8, conv_dim=8)
    full = resize_file(src, tmp_path / "full.safetensors", rank=8, conv_rank=8)
    assert min(m["retained"] for m in full.modules) > 1 - 1e-9
    original = deltas(src)
    for name, d in deltas(tmp_path / "full.safetensors").items():
        torch.testing.assert_close(d, original[name], atol=1e-6, rtol=1e-5)
    report = resize_file(src, tmp_path / "r2.safetensors", rank=2, conv_rank=3)
    reduced = deltas(tmp_path / "r2.safetensors")
    for m in report.modules:
        d = original[m["name"]].reshape(original[m["name"]].shape[0], -1)
        s = torch.linalg.svdvals(d)
        keep = 3 if m["kind"] == "conv" else 2
        best_error = float(s[keep:].pow(2).sum().sqrt())  # Eckart-Young
        error = float((reduced[m["name"]].reshape_as(d) - d).norm())
        assert error == pytest.approx(best_error, rel=1e-3, abs=1e-6)
        assert m["new_rank"] == keep
    tensors, meta = read_safetensors(tmp_path / "r2.safetensors")
    assert meta["ss_network_dim"] == "2" and meta["sshs_model_hash"] == tensor_data_hash(tensors)
    dynamic = resize_file(src, tmp_path / "dyn.safetensors", rank=8, method="sv_fro", param=0.9)
    assert all(m["retained"] >= 0.81 - 1e-9 for m in dynamic.modules)
    assert read_safetensors(tmp_path / "dyn.safetensors")[1]["ss_network_dim"] == "Dynamic"


def test_extract_recovers_a_known_low_rank_difference(tiny_folder, tmp_path):
    base = load_base_model(str(tiny_folder)).pipeline
    tuned_unet = base.unet
    g = torch.Generator().manual_seed(0)
    changed = {}
    with torch.no_grad():
        for path in ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                     "up_blocks.1.resnets.0.conv1"):
            layer = tuned_unet.get_submodule(path)
            out_f, in_f = layer.weight.shape[0], layer.weight[0].numel()
            dw = (torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g) * 0.01).reshape(layer.weight.shape)
            layer.weight += dw
            changed[path] = dw
    tuned = tmp_path / "tuned"
    base.save_pretrained(tuned)
    out, stats = extract_lora(str(tiny_folder), str(tuned), tmp_path / "x.safetensors", dim=4, conv_dim=4,
                              precision="float")
    assert stats["extracted"] == 2 and stats["min_retained"] > 1 - 1e-9
    found = deltas(out)
    assert set(found) == {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                          "lora_unet_up_blocks_1_resnets_0_conv1"}
    torch.testing.assert_close(found["lora_unet_up_blocks_1_resnets_0_conv1"],
                               changed["up_blocks.1.resnets.0.conv1"].double(), atol=1e-6, rtol=1e-4)


def test_block_weights_ones_identity_zeros_remove_exactly_those_blocks(tiny_folder, tmp_path):
    src = lora_file(tiny_folder, tmp_path / "a.safetensors")
    same, counts = apply_block_weights(src, tmp_path / "ones.safetensors", ",".join(["1"] * 26))
    a, b = read_safetensors(src)[0], read_safetensors(same)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and counts["removed"] == 0
    weights = [1.0] * 26
    weights[0] = 0.0  # BASE: the text encoder
    weights[1 + 4] = 0.0  # IN04
    weights[1 + 12 + 1 + 7] = 0.5  # OUT07
    out, counts = apply_block_weights(src, tmp_path / "w.safetensors", ",".join(map(str, weights)))
    before, after = deltas(src), deltas(out)
    for name, d in before.items():
        block = lbw_block(name, "sd1")
        if block in ("BASE", "IN04"):
            assert name not in after
        elif block == "OUT07":
            torch.testing.assert_close(after[name], 0.5 * d)
        else:
            assert torch.equal(after[name], d)
    assert counts["removed"] > 0 and counts["scaled"] > 0
    assert parse_weights("OUTS", "sd1")["OUT07"] == 1 and parse_weights("OUTS", "sd1")["IN00"] == 0
    with pytest.raises(ToolError, match="takes 17 or 26"):
        parse_weights("1,1,1", "sd1")
    with pytest.raises(ToolError, match="12 or 20"):
        parse_weights("ALL", "sdxl")


def test_convert_round_trips_and_diffusers_loads_the_converted_file(tiny_folder, tmp_path):
    pytest.importorskip("peft")
    src = lora_file(tiny_folder, tmp_path / "a.safetensors")
    diffusers_file = convert_file(src, tmp_path / "d.safetensors", to="diffusers")
    keys = read_safetensors(diffusers_file)[0]
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
    back = convert_file(diffusers_file, tmp_path / "k.safetensors", to="kohya", family="sd1")
    original, again = deltas(src), deltas(back)
    assert original.keys() == again.keys()
    for name, d in original.items():
        torch.testing.assert_close(again[name], d, atol=1e-7, rtol=1e-5)
    half = convert_file(src, tmp_path / "h.safetensors", precision="bf16")
    assert {t.dtype for k, t in read_safetensors(half)[0].items() if not k.endswith("alpha")} == {torch.bfloat16}
    ours = load_base_model(str(tiny_folder)).pipeline
    load_network_file(src, ours.unet, [ours.text_encoder])
    theirs = load_base_model(str(tiny_folder)).pipeline
    theirs.load_lora_weights(str(diffusers_file), adapter_name="converted")
    torch.testing.assert_close(probe(theirs), probe(ours), atol=1e-5, rtol=1e-5)


def test_inspect_reports_per_module_and_per_block_norms_and_effective_rank(tiny_folder, tmp_path):
    from lorakit.inspect_file import format_report, inspect_file

    src = lora_file(tiny_folder, tmp_path / "a.safetensors", rank=8)
    truth = deltas(src)
    report = inspect_file(src)
    for m in report["modules"]:
        assert m["norm"] == pytest.approx(float(truth[m["name"]].norm()), rel=1e-6)
        s = torch.linalg.svdvals(truth[m["name"]].reshape(truth[m["name"]].shape[0], -1))
        energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert m["effective_rank"] == int((energy < 0.99).sum()) + 1 <= 8
    in01 = [m for m in report["modules"] if m["block"] == "IN01" and m["kind"] == "conv3x3"]
    expected = float(torch.tensor([m["norm"] for m in in01]).pow(2).sum().sqrt())
    assert report["blocks"]["IN01"]["norm_conv"] == pytest.approx(expected)
    assert "‖ΔW‖ attention" in format_report(report)


def test_tool_commands_print_results_and_report_errors(tiny_folder, tmp_path, capsys):
    from lorakit.cli import main

    src = lora_file(tiny_folder, tmp_path / "a.safetensors")
    assert main(["resize", str(src), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    assert "resized" in capsys.readouterr().out
    assert main(["blocks", str(src), str(tmp_path / "b.safetensors"), "--weights", "OUTS"]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["merge", f"{src}:0.5", str(tmp_path / "r.safetensors"), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["blocks", str(src), str(tmp_path / "x.safetensors"), "--weights", "1,2"]) == 2
    assert "takes 17 or 26" in capsys.readouterr().err
    assert main(["resize", str(src), str(src), "--rank", "2"]) == 2
    assert "never modify their inputs" in capsys.readouterr().err
