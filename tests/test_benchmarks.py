"""benchmarks/train_step.py: the trainer's own step on an in-process random-weight model, measured per run."""
import argparse
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_locon_run_trains_the_in_process_model_in_its_dtype_and_counts_its_parameters(tmp_path):
    from lorakit.models.configs import build_unet
    from lorakit.surgery.network import create_network

    bench = load_script("train_step")
    args = argparse.Namespace(tiny=True, steps=2, warmup=1, threads=1)
    run = next(r for r in bench.RUNS if r.name == "sd1-256-bf16")
    out = bench.run_locon(run, 64, args, tmp_path)
    assert out["weight_bytes"] == 2  # the frozen U-Net was built and trained in bf16
    assert len(out["losses"]) == 3 and all(math.isfinite(v) for v in out["losses"])
    # an independent count: the same LoCon surgery on a fresh tiny U-Net
    unet = build_unet("tiny-sd1")
    net = create_network(unet, [], bench.bench_config(run, 64, tmp_path / "again", 1).network_config())
    assert out["trainable"] == net.trainable_parameters() > 0
    assert out["total"] == sum(p.numel() for p in unet.parameters())
    assert 0 < out["share"] < 1 and out["step"] > 0 and out["floor"] > 0
    assert len(out["pairs"]) == 2 and all(p > 0 for p in out["pairs"])  # each measured step over its floor
    assert out["peak"] > 2 * out["total"]  # at least the bf16 weights were resident


def test_the_ratio_cell_shows_the_per_step_range_beside_the_ratio_of_medians():
    bench = load_script("train_step")
    r = dict(step=3.0, floor=2.5, share=0.02, pairs=[1.1, 1.3, 1.2])
    assert bench.ratio_cell(r) == "1.18 [1.08-1.27]"  # 3.0 / (2.5 x 1.02); 1.1 / 1.02 and 1.3 / 1.02
    assert bench.ratio_cell(dict(r, pairs=[1.1])) == "1.18"  # one step: no range


def test_the_command_prints_the_table_on_stdout_and_progress_on_stderr():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--tiny", "--steps", "1", "--warmup", "1",
           "--threads", "1", "--only", "sd1-256-fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| sd1-256-fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    step, floor, peak = float(cells[1]), float(cells[3]), float(cells[6])
    assert step > 0 and floor > 0 and cells[7].endswith("(est.)")
    trainable, total = (int(n.replace(",", "")) for n in re.match(r"([\d,]+) / ([\d,]+)", cells[9]).groups())
    # no full fine-tune ran: its estimate is this run's peak + 12 bytes per fp32 U-Net parameter
    assert abs(float(cells[7].split()[0]) - (peak + 12 * total / 2 ** 30)) <= 0.011
    assert 0 < trainable < total
    assert "## SD1.5-architecture U-Net" in proc.stdout and "SDXL" not in proc.stdout
    assert "starting" in proc.stderr and "starting" not in proc.stdout  # progress on stderr only


# eight tiny trainer runs, torch.compile rows included: 48 s on the quiet 2-core machine, so CI runs it
def test_gpu_script_tiny_runs_every_row_on_the_cpu_and_says_why_cuda_rows_are_skipped():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--steps", "1", "--warmup", "1"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout
    for model in ("## sd1 64 px", "## sdxl 64 px"):
        table = proc.stdout.split(model)[1].split("\n\n")[1]
        rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
        assert len(rows) == 8
        for label in ("bf16, AdamW", "bf16, AdamW, grad ckpt", "bf16, AdamW, torch_compile"):
            assert float(rows[label].split("|")[2]) > 0  # it/s measured through the trainer
        assert "skipped: CUDA only (bitsandbytes)" in rows["bf16, AdamW8bit"]
        assert "skipped: CUDA only (float8 weights)" in rows["bf16, AdamW, fp8_base"]
        assert "skipped: CUDA only (CUDA graphs)" in rows["bf16, AdamW, torch_compile reduce-overhead"]
        assert "skipped:" in rows["fp16, AdamW"]


def test_gpu_script_runs_only_the_selected_settings_and_models():
    """--only/--models: a second call for the rows a first call's budget cut (torch_compile on the H200). The
    two settings chosen here are CUDA-only, so the CPU check selects without training anything."""
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--steps", "1", "--warmup", "1",
           "--only", "reduce-overhead,fp16", "--models", "sd1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "## sdxl" not in proc.stdout
    table = proc.stdout.split("## sd1 64 px")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"fp16, AdamW", "bf16, AdamW, torch_compile reduce-overhead"}
    assert all("CUDA only" in line and "skipped" in line for line in rows.values())
    bad = subprocess.run(cmd[:-4] + ["--only", "no such setting"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nothing selected" in bad.stderr


def test_gpu_script_runs_the_adapter_benchmark_with_its_references():
    """`gpu.sh --adapters`: benchmarks/adapters.py on the lent GPU (with --tiny, on the CPU), lycoris-lora and peft
    installed beside it as references, so one call on a GPU measures the adapter rows there."""
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--adapters", "--tiny", "--quick", "--threads", "1",
           "--shapes", "linear", "--algos", "dora,dora_detached"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CPU, 1 threads" in proc.stdout
    rows = {line.split("|")[3].strip(): line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| linear")}
    assert set(rows) == {"dora", "dora_detached"}
    assert float(rows["dora"][7]) > 0 and float(rows["dora_detached"][8]) > 0  # lycoris rebuild; peft


def test_gpu_profile_tiny_times_the_adapted_and_bare_unet_and_lists_ops():
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--profile", "--tiny", "--models", "sd1", "--rows", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("## sd1 64 px: ")[1]
    assert int(table.split(" adapters")[0]) > 100
    step, adapted, bare = (float(c) for c in table.split("|---|---|---|---|---|---|\n| ")[1].split(" | ")[:3])
    assert step > 0 and adapted > bare > 0  # the adapters cost something on top of the frozen U-Net
    assert table.count("aten::") >= 3  # the ops with the most host time


def test_norms_benchmark_prints_one_row_per_unet():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "norms.py"), "--tiny", "--reps", "1", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith("| sd")}
    assert set(rows) == {"sd1", "sdxl"}
    for cells in rows.values():
        assert int(cells[1]) > 100 and float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0


def test_adapter_benchmark_rows_name_the_path_and_leave_out_references_that_skip_dora():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "adapters.py"), "--quick", "--threads", "1",
           "--shapes", "linear", "--algos", "lora,dora,dora_detached"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "allocator: keep_large_buffers" in proc.stdout  # the trainer's CPU setting (glibc)
    rows = {cells[2]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in proc.stdout.splitlines() if line.startswith("| linear"))}
    assert set(rows) == {"lora", "dora", "dora_detached"}
    for cells in rows.values():  # 4096 tokens against a 320x320 weight: the folded node
        assert cells[4].endswith("(folded)") and float(cells[3]) > 0 and float(cells[8]) > 0
        assert 1.0 < float(cells[10]) < 1.2  # FLOP ratio of the folded path: 2A + 2B over 2F
    assert rows["dora"][5] == "not DoRA"  # lycoris-lora 4.1.3's bypass leaves weight_decompose out
    assert rows["dora_detached"][5:7] == ["n/a", "n/a"] and float(rows["dora_detached"][7]) > 0  # peft alone
    for cells in rows.values():  # frozen/best: the frozen layer over the best reference, below ours/best
        assert 0 < float(cells[12]) < float(cells[8])


def test_adapter_benchmark_runs_large_output_axis_dora_convs_at_few_positions_as_one_gemm():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "adapters.py"), "--quick", "--threads", "1",
           "--shapes", "1280", "--algos", "dora"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| conv3x3 1280")]
    assert len(rows) == 1 and rows[0][4].endswith("(gemm)")  # batch 1 at 8x8: functional.dora_gemm


def test_unet_layers_benchmark_covers_every_adapter_once_and_sorts_by_extra():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "unet_layers.py"), "--tiny", "--rounds", "1", "--reps", "1",
           "--threads", "1", "--top", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapters, shapes = map(int, re.search(r"(\d+) adapters in (\d+) shapes", proc.stdout).groups())
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| linear") or line.startswith("| conv")]
    assert len(rows) == shapes and sum(int(r[4]) for r in rows) == adapters  # every adapted layer, once
    assert {r[10] for r in rows} <= {"bypass", "merged", "fused", "folded", "gemm"}
    extras = [float(r[7]) for r in rows]
    assert extras == sorted(extras, reverse=True)
    total = float(re.search(r"extra (-?\d+) ms", proc.stdout).group(1))
    assert abs(sum(extras) - total) <= 1 + 0.05 * len(rows)  # the header's sum is the rows' (each rounded)
