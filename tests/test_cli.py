"""`lorakit inspect` and `lorakit demo` through the real entry point."""
import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.formats.files import save_network
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network

from conftest import randomize


def test_inspect_reports_algorithms_ranks_blocks_and_hash(tiny_sd1, tmp_path, capsys):
    unet, tes = tiny_sd1
    net = create_network(unet, tes, NetworkConfig(network_dim=8, network_alpha=4, conv_dim=4, conv_alpha=2))
    randomize(net)
    path = save_network(net, tmp_path / "style.safetensors", dtype=torch.bfloat16)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["algorithms"] == {"lora": len(net.adapters)}
    assert report["hash"]["matches"] is True and report["dtypes"]["bfloat16"] == 2 * len(net.adapters)
    assert report["blocks"]["IN00"] == {"linear": 0, "conv": 0, "norm_linear": 0.0, "norm_conv": 0.0}
    in03 = report["blocks"]["IN03"]  # the downsampler: one conv module with a non-zero ΔW
    assert (in03["linear"], in03["conv"], in03["norm_linear"]) == (0, 1, 0.0) and in03["norm_conv"] > 0
    assert report["blocks"]["TE00"]["linear"] == 6
    conv = [m for m in report["modules"] if m["kind"] == "conv3x3"]
    assert conv and all(m["rank"] == 4 and m["scale"] == 0.5 for m in conv)
    assert report["metadata"]["ss_network_args"]["conv_dim"] == "4"
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "matches the tensor bytes" in text and "conv3x3 rank 4 alpha 2.0" in text and "OUT11" in text


def test_inspect_flags_a_wrong_hash_and_reads_kohya_files_without_metadata(tmp_path, capsys):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # an SDXL (SGM) name
    tensors = {f"{name}.lora_down.weight": torch.ones(4, 64).half(), f"{name}.lora_up.weight": torch.ones(64, 4).half()}
    path = tmp_path / "k.safetensors"
    save_file(tensors, str(path), {"sshs_model_hash": "e3b0c44298fc1c149afbf4c8996fb924"})
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sdxl" and report["modules"][0]["block"] == "IN04"
    assert report["modules"][0]["alpha"] is None and report["modules"][0]["scale"] == 1.0
    assert report["hash"]["matches"] is False


def test_inspect_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "not valid JSON" in err


def test_demo_runs_end_to_end_in_a_subprocess(tmp_path):
    """`lorakit demo` on a shortened schedule: both variants trained, grids, report, and the summary."""
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "demo", "--output", str(tmp_path), "--epochs", "1",
                           "--seeds", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert (sweep / "conv_dim-0" / "conv_dim-0.safetensors").is_file()
    assert (sweep / "conv_dim-8_conv_alpha-4" / "conv_dim-8_conv_alpha-4.safetensors").is_file()
    assert (sweep / "grid_variants" / "grid.png").is_file() and (sweep / "grid_variants" / "grid.json").is_file()
    report = (sweep / "report.html").read_text()
    assert "Verdicts" in report and "conv_dim-8_conv_alpha-4" in report and "<svg" in report
    assert "embedded tiny SD model" in proc.stdout  # no base model given: it says which one it used
    assert "report:" in proc.stdout and "sepia" in proc.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert "none" in summary["style_score"] and len(summary["evaluations"]) == 2
    # it says in plain words what the comparison found, the brief's claim and the embedded model's limit
    assert "What the comparison found" in proc.stdout and "conv layers carry style" in summary["findings"]
    assert "cannot draw fine texture" in summary["findings"] and "What the comparison found" in report
    with open(tmp_path / "data" / "5_sepia" / "000.txt") as caption:
        assert "sepia" not in caption.read()  # the base model's own caption grammar: the LoRA carries the style


def test_grid_command_writes_png_cells_and_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["grid", "--prompt", "a red circle", "--base", str(tiny_folder), "--x", "seed=1,2",
                 "--y", "cfg=1,3", "--steps", "2", "--out", str(out)]) == 0
    meta = json.loads((out / "grid.json").read_text())
    assert len(meta["cells"]) == 4 and (out / "grid.png").is_file()
    assert main(["grid", "--prompt", "x", "--base", str(tiny_folder), "--x", "sed=1"]) == 2
    assert "unknown grid axis 'sed'" in capsys.readouterr().err
