"""A corpus of bad inputs run through the CLI as a new user meets them (issue 14).

Each case builds its inputs in a temp folder, runs `lorakit ...` in-process, and asserts the exit code, a
one-line message naming the file or key (and the fix where there is one), that no traceback was printed
and that no file already there was lost or changed. Classes: configs, LoRA files, CLI flags, state folders,
checkpoints; dataset TOMLs and images are in test_bad_datasets.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # builds inputs under tmp, returns argv
    expect: list[str]  # substrings of stderr (paths may use {tmp})
    rc: int = 2


def toml(tmp: Path, text: str, name: str = "train.toml") -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def lora(tmp: Path, name: str = "l.safetensors", **override) -> str:
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    for key, value in override.items():
        tensors[f"lora_unet_down_blocks_0_attentions_0_proj_in.{key.replace('__', '.')}"] = value
    save_file(tensors, str(tmp / name))
    return str(tmp / name)


def train(tmp: Path, text: str) -> list[str]:
    return ["train", toml(tmp, text)]


NAN = torch.full((32, 4), float("nan"))
CONFIG_CASES = [
    Case("unknown key", lambda t: train(t, "netwrok_dim = 8\n"), ["unknown key 'netwrok_dim'", "did you mean 'network_dim'"]),
    Case("dim inf", lambda t: train(t, "network_dim = inf\n"), ["network_dim = inf", "finite"]),
    Case("alpha inf", lambda t: train(t, "network_alpha = inf\n"), ["network_alpha = inf", "finite"]),
    Case("lr nan", lambda t: train(t, "learning_rate = nan\n"), ["learning_rate = nan", "finite"]),
    Case("all lr 0", lambda t: train(t, "learning_rate = 0\n"), ["every learning rate at 0", "set learning_rate"]),
    Case("unet-only and te-only", lambda t: train(t, "network_train_unet_only = true\nnetwork_train_text_encoder_only = true\n"),
         ["both set: nothing would train"]),
    Case("dim as text", lambda t: train(t, 'network_dim = "eight"\n'), ["network_dim = 'eight' is not a valid int"]),
    Case("dim fraction", lambda t: train(t, "network_dim = 2.5\n"), ["whole number"]),
    Case("dim 0", lambda t: train(t, "network_dim = 0\n"), ["network_dim = 0 is outside"]),
    Case("negative conv_dim", lambda t: train(t, "conv_dim = -1\n"), ["conv_dim = -1 is outside"]),
    Case("resolution big", lambda t: train(t, 'resolution = "big"\n'), ["resolution = 'big'"]),
    Case("resolution 3 values", lambda t: train(t, 'resolution = "512,512,512"\n'), ["resolution", "\"W,H\""]),
    Case("buckets min > max", lambda t: train(t, "min_bucket_reso = 1024\nmax_bucket_reso = 256\n"), ["swap them"]),
    Case("bucket steps 0", lambda t: train(t, "bucket_reso_steps = 0\n"), ["bucket_reso_steps = 0 is outside"]),
    Case("batch 0", lambda t: train(t, "train_batch_size = 0\n"), ["train_batch_size = 0 is outside"]),
    Case("scheduler typo", lambda t: train(t, 'lr_scheduler = "cosin"\n'), ["did you mean 'cosine'"]),
    Case("optimizer unknown", lambda t: train(t, 'optimizer_type = "DAdaptAdam"\n'), ["optimizer_type = 'DAdaptAdam' is not one of"]),
    Case("pickle output", lambda t: train(t, 'save_model_as = "ckpt"\n'), ["save_model_as = 'ckpt'", "pickles"]),
    Case("deepspeed refused", lambda t: train(t, "deepspeed = true\n"), ["deepspeed is not supported"]),
    Case("network_args not k=v", lambda t: train(t, 'network_args = ["conv_dim"]\n'), ["not key=value"]),
    Case("network_args typo", lambda t: train(t, 'network_args = ["conv_dimm=4"]\n'), ["did you mean 'conv_dim'"]),
    Case("network_args dora dropout", lambda t: train(t, 'network_args = ["dora_wd=True", "dropout=0.1"]\n'),
         ["DoRA's forward"]),
    Case("network_module dylora", lambda t: train(t, 'network_module = "networks.dylora"\n'), ["network_module = 'networks.dylora'"]),
    Case("timesteps crossed", lambda t: train(t, "min_timestep = 500\nmax_timestep = 100\n"), ["must be below max_timestep"]),
    Case("dim_from_weights alone", lambda t: train(t, "dim_from_weights = true\n"), ["dim_from_weights needs network_weights"]),
    Case("bad TOML", lambda t: train(t, "network_dim = = 3\n"), ["cannot read TOML"]),
    Case("missing config file", lambda t: ["train", str(t / "nope.toml")], ["nope.toml", "cannot read TOML"]),
    Case("preset unknown", lambda t: train(t, 'preset = "anime"\n'), ["preset = 'anime' is unknown"]),
    Case("five at once", lambda t: train(t, 'netwrok_dim = 1\nnetwork_alpha = inf\nsave_model_as = "pt"\n'
                                            'min_bucket_reso = 900\nmax_bucket_reso = 512\nlearning_rate = nan\n'),
         ["5 problems", "netwrok_dim", "network_alpha = inf", "save_model_as", "swap them", "learning_rate = nan"]),
    Case("flag needs value", lambda t: ["train", "--network_dim"], ["--network_dim needs a value"]),
    Case("flag bad value", lambda t: ["train", "--network_dim", "x"], ["network_dim = 'x'"]),
]
LORA_CASES = [
    Case("inspect truncated", lambda t: ["inspect", _truncated(t)], ["cut.safetensors"]),
    Case("inspect not safetensors", lambda t: ["inspect", _text_file(t, "x.safetensors", "hello")], ["x.safetensors"]),
    Case("inspect missing", lambda t: ["inspect", str(t / "none.safetensors")], ["none.safetensors"]),
    Case("inspect empty header", lambda t: ["inspect", _empty(t)], ["holds no LoRA modules"]),
    Case("inspect rank clash", lambda t: ["inspect", lora(t, lora_up__weight=torch.randn(32, 3))],
         ["up has rank 3 but down has 4"]),
    Case("resize nan", lambda t: ["resize", lora(t, lora_up__weight=NAN), str(t / "o.safetensors"), "--rank", "2"],
         ["non-finite", "proj_in"]),
    Case("resize rank clash", lambda t: ["resize", lora(t, lora_up__weight=torch.randn(32, 3)), str(t / "o.safetensors"),
                                         "--rank", "2"], ["up has rank 3 but down has 4"]),
    Case("resize empty", lambda t: ["resize", _empty(t), str(t / "o.safetensors"), "--rank", "2"], ["no LoRA modules"]),
    Case("resize negative rank", lambda t: ["resize", lora(t), str(t / "o.safetensors"), "--rank", "-3"],
         ["--rank", "-3 is below 1"]),
    Case("resize over input", lambda t: ["resize", lora(t), lora(t), "--rank", "2"], ["overwrite an input"]),
    Case("merge nan into one", lambda t: ["merge", lora(t, lora_up__weight=NAN), "-o", str(t / "m.safetensors")],
         ["non-finite"]),
    Case("merge nan into checkpoint", lambda t: ["merge", lora(t, alpha=torch.tensor(float("inf"))), "--checkpoint",
                                                 str(t / "base.safetensors"), "-o", str(t / "m.safetensors")],
         ["alpha is not finite"]),
    Case("merge bad ratio", lambda t: ["merge", lora(t) + ":abc", "-o", str(t / "m.safetensors")], ["abc"]),
    Case("convert nan", lambda t: ["convert", lora(t, lora_up__weight=NAN), str(t / "c.safetensors"), "--to",
                                   "diffusers"], ["non-finite"]),
    Case("convert pickle", lambda t: ["convert", _text_file(t, "p.ckpt", "x"), str(t / "c.safetensors")], ["p.ckpt"]),
    Case("blocks bad weights", lambda t: ["blocks", lora(t), str(t / "b.safetensors"), "--weights", "1,2"], ["weights"]),
    Case("output is a folder", lambda t: ["resize", lora(t), str(_folder(t, "o.safetensors")), "--rank", "2"],
         ["o.safetensors"]),
]
STATE_CASES = [
    Case("resume missing folder", lambda t: train(t, f'resume = "{t}/nostate"\n'), ["nostate", "no state.pt"]),
    Case("resume hostile pickle", lambda t: train(t, f'resume = "{_hostile_state(t)}"\n'),
         ["weights-only loader", "none of its code ran"]),
    Case("resume truncated state", lambda t: train(t, f'resume = "{_cut_state(t)}"\n'), ["is damaged"]),
]
PATH_CASES = [
    Case("output_dir is a file", lambda t: train(t, f'output_dir = "{_text_file(t, "out", "x")}"\n'),
         ["output_dir", "is a file"]),
    Case("logging_dir is a file", lambda t: train(t, f'logging_dir = "{_text_file(t, "logs", "x")}"\n'),
         ["logging_dir", "is a file"]),
    Case("train_data_dir missing", lambda t: train(t, f'train_data_dir = "{t}/nodata"\n'), ["nodata", "does not exist"]),
    Case("train_data_dir is a file", lambda t: train(t, f'train_data_dir = "{_text_file(t, "d.txt", "x")}"\n'),
         ["is a file; it must be a folder"]),
    Case("model missing", lambda t: train(t, f'pretrained_model_name_or_path = "{t}/m.safetensors"\n'),
         ["m.safetensors", "no such file"]),
    Case("all path problems at once", lambda t: train(t, f'train_data_dir = "{t}/a"\nreg_data_dir = "{t}/b"\n'
                                                         f'network_weights = "{t}/c.safetensors"\n'),
         ["3 problem(s)", "train_data_dir", "reg_data_dir", "network_weights"]),
]


def _truncated(t: Path) -> str:
    full = Path(lora(t, "full.safetensors")).read_bytes()
    (t / "cut.safetensors").write_bytes(full[: len(full) // 2])
    return str(t / "cut.safetensors")


def _text_file(t: Path, name: str, text: str) -> str:
    (t / name).write_text(text)
    return str(t / name)


def _empty(t: Path) -> str:
    save_file({}, str(t / "empty.safetensors"), metadata={"ss_network_dim": "4"})
    return str(t / "empty.safetensors")


def _folder(t: Path, name: str) -> Path:
    (t / name).mkdir()
    return t / name


class Boom:
    def __reduce__(self):
        return (print, ("PICKLE CODE RAN",))


def _cut_state(t: Path) -> Path:
    folder = t / "cut-state"
    folder.mkdir()
    torch.save({"network": {"w": torch.zeros(100)}}, folder / "state.pt")
    data = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(data[: len(data) // 2])
    return folder


def _hostile_state(t: Path) -> Path:
    folder = t / "lora-state"
    folder.mkdir()
    torch.save({"x": Boom()}, folder / "state.pt")
    return folder


def snapshot(tmp: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tmp.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CONFIG_CASES + LORA_CASES + STATE_CASES + PATH_CASES, ids=lambda c: c.name)
def test_bad_input_gets_one_clear_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.setup(tmp_path)
    before = snapshot(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == case.rc, err
    assert "Traceback" not in err and "PICKLE CODE RAN" not in err
    for part in case.expect:
        assert part in err, (part, err)
    after = snapshot(tmp_path)
    assert all(after.get(k) == v for k, v in before.items()), "a file that was there changed or was lost"


def test_grid_output_folder_that_is_a_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import lorakit.evaluation.grid as grid

    (tmp_path / "g").write_text("keep")
    monkeypatch.setattr(grid, "load_base_model", lambda *a: pytest.fail("the model loaded first"))
    assert main(["grid", "--prompt", "a red circle", "--x", "seed=1,2", "--out", str(tmp_path / "g")]) == 2
    assert "the grid's output folder is a file" in capsys.readouterr().err
    assert (tmp_path / "g").read_text() == "keep"


def test_no_cli_command_prints_a_traceback_on_bad_input(tmp_path):
    """Every subcommand's error path, in a real process: one `lorakit <cmd>: error:` line, never a traceback."""
    import subprocess
    import sys

    missing, text = tmp_path / "missing.safetensors", _text_file(tmp_path, "x.json", "{broken")
    commands = [
        ["inspect", missing], ["train", _text_file(tmp_path, "t.toml", "netwrok_dim = 3\n")],
        ["check-dataset", tmp_path / "nodata"], ["grid", "--prompt", "p", "--x", "seed=1", "--out", text],
        ["sweep", "--axis", "nokey=1,2", "--prompt", "p"],
        ["report", tmp_path / "norun", "--prompt", "p", "--data", tmp_path / "nodata"],
        ["resize", missing, tmp_path / "o.safetensors", "--rank", "2"],
        ["extract", missing, missing, tmp_path / "e.safetensors"],
        ["merge", missing, "-o", tmp_path / "m.safetensors"], ["blocks", missing, tmp_path / "b.safetensors",
                                                               "--weights", "ALL"],
        ["convert", missing, tmp_path / "c.safetensors"], ["import-config", text, "-o", tmp_path / "i.toml"],
        ["demo", "--output", text],
    ]
    script = ("import sys\nfrom lorakit.cli import main\nfor argv in sys.argv[1].split('\\x1f'):\n"
              "    rc = main(argv.split('\\x1e'))\n    print('rc', rc, flush=True)\n    assert rc != 0, argv\n")
    joined = "\x1f".join("\x1e".join(map(str, c)) for c in commands)
    done = subprocess.run([sys.executable, "-c", script, joined], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error:" in line]
    assert len(errors) == len(commands), done.stderr
    assert all(line.startswith(f"lorakit {c[0]}: error:") for line, c in zip(errors, commands)), errors
