"""kill -9 at a random step, then `--resume` from the last saved state: the same losses and the same final
file, bit for bit, as a run that was never broken (issue 14). Real processes, a real SIGKILL."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorakit.formats.safetensors_io import read_safetensors

STEPS = 8


def write_config(tmp: Path, tiny_folder, images, name: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f'pretrained_model_name_or_path = "{tiny_folder}"\ntrain_data_dir = "{images}"\n'
                    f'output_dir = "{tmp / name}"\noutput_name = "k"\nresolution = 64\ntrain_batch_size = 2\n'
                    f"max_train_steps = {STEPS}\nnetwork_dim = 4\nconv_dim = 4\nlearning_rate = 1e-3\nseed = 3\n"
                    'lr_scheduler = "cosine"\nsave_every_n_steps = 1\nsave_state = true\nshuffle_caption = true\n')
    return path


def lorakit(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def losses(folder: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in json.loads((folder / "k-history.json").read_text())["steps"]}


def test_kill_9_at_a_random_step_then_resume_equals_an_unbroken_run(tiny_folder, images, tmp_path):
    unbroken = lorakit(write_config(tmp_path, tiny_folder, images, "a"))
    assert unbroken.wait(600) == 0, unbroken.stdout.read()

    kill_after = random.Random(os.getpid()).randint(2, STEPS - 2)  # a different step on different runs
    victim = lorakit(write_config(tmp_path, tiny_folder, images, "b"))
    step_file = tmp_path / "b" / f"k-step{kill_after:08d}.safetensors"
    deadline = time.time() + 600
    while not step_file.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    assert victim.returncode == -signal.SIGKILL, f"the run ended before step {kill_after}"
    assert not (tmp_path / "b" / "k.safetensors").exists()  # it really was cut short

    resumed = lorakit(write_config(tmp_path, tiny_folder, images, "b"), "--resume", tmp_path / "b" / "k-state")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert not list((tmp_path / "b").glob(".*.tmp")) and not list((tmp_path / "b" / "k-state").glob(".*.tmp"))
    # the killed process's in-memory history is lost with it; every step the resumed run logged is bit-identical
    resumed_losses, unbroken_losses = losses(tmp_path / "b"), losses(tmp_path / "a")
    assert max(resumed_losses) == STEPS and min(resumed_losses) <= kill_after + 1
    assert resumed_losses == {step: unbroken_losses[step] for step in resumed_losses}
    a, _ = read_safetensors(tmp_path / "a" / "k.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "k.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
