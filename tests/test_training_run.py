"""A run's life: interrupt and resume with identical losses, sample images, TensorBoard, a full disk."""
import errno
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.formats.safetensors_io import read_safetensors
from lorakit.training.config import ConfigError
from lorakit.training.state import ResumeError
from lorakit.training.trainer import Trainer, TrainingInterrupted, TrainingStopped

from conftest import train_config


def interrupt_at(trainer, micro_index, signum=signal.SIGINT):
    """Send a real signal to this process while micro-batch `micro_index` runs."""
    real = trainer.micro_batch

    def micro_batch(cache, batch, micro):
        if micro == micro_index:
            os.kill(os.getpid(), signum)
        return real(cache, batch, micro)

    trainer.micro_batch = micro_batch


@pytest.mark.parametrize("signum,accumulate", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_interrupted_then_resumed_run_equals_an_unbroken_run(tiny_folder, images, tmp_path, signum, accumulate):
    settings = dict(max_train_steps=None, max_train_epochs=2, conv_dim=4, conv_alpha=2, network_dropout=0.1,
                    gradient_accumulation_steps=accumulate, lr_scheduler="cosine", lr_warmup_steps=1)
    shuffled = images / "3_red shape"
    for txt in shuffled.glob("*.txt"):  # caption shuffling must replay too
        txt.write_text(txt.read_text().replace(" on a ", ", on a "))
    unbroken = Trainer(train_config(tiny_folder, images, tmp_path / "a", **settings)).run()

    trainer = Trainer(train_config(tiny_folder, images, tmp_path / "b", **settings))
    interrupt_at(trainer, micro_index=4 * accumulate // 2 + 1)
    with pytest.raises(TrainingInterrupted, match="--resume") as stopped:
        trainer.run()
    assert stopped.value.lora.is_file() and (stopped.value.state_dir / "state.pt").is_file()
    done = int(read_safetensors(stopped.value.lora)[1]["ss_steps"])
    assert stopped.value.lora.name == f"t-step{done:08d}.safetensors" and done == (4 if accumulate == 1 else 3)
    resumed = Trainer(train_config(tiny_folder, images, tmp_path / "b", resume=str(stopped.value.state_dir),
                                   **settings)).run()
    assert resumed.steps == unbroken.steps
    assert resumed.losses == unbroken.losses  # bit-identical, not approximately equal
    a, _ = read_safetensors(unbroken.files[-1])
    b, _ = read_safetensors(resumed.files[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_network_settings(tiny_folder, images, tmp_path):
    trainer = Trainer(train_config(tiny_folder, images, tmp_path))
    interrupt_at(trainer, micro_index=1)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.run()
    with pytest.raises(ResumeError, match=r"network_dim \(4 -> 8\)"):
        Trainer(train_config(tiny_folder, images, tmp_path, network_dim=8,
                             resume=str(stopped.value.state_dir))).run()
    with pytest.raises(ConfigError, match="no state.pt"):  # found before anything loads
        Trainer(train_config(tiny_folder, images, tmp_path, resume=str(tmp_path)))


def test_samples_every_epoch_with_kohya_prompt_options(tiny_folder, images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red circle --d 7 --s 3 --l 4\na blue square --w 32 --h 48 --s 2\n")
    cfg = train_config(tiny_folder, images, tmp_path, max_train_steps=None, max_train_epochs=2,
                       sample_every_n_epochs=1, sample_prompts=str(prompts))
    result = Trainer(cfg).run()
    names = sorted(p.name for p in result.samples)
    assert names == ["t_e000001_00_7.png", "t_e000001_01_1.png", "t_e000002_00_7.png", "t_e000002_01_1.png"]
    assert Image.open(result.samples[1]).size == (32, 48) and Image.open(result.samples[0]).size == (64, 64)
    first, last = (np.asarray(Image.open(p)).astype(int) for p in (result.samples[0], result.samples[2]))
    assert np.abs(first - last).max() > 0  # the LoRA changed between epochs and the samples show it


def test_bad_sample_prompts_fail_before_the_model_loads(tiny_folder, images, tmp_path, monkeypatch):
    import lorakit.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "prepare_base", lambda cfg: pytest.fail("base model loaded"))
    bad = tmp_path / "p.txt"
    bad.write_text("a cat --x 3\n")
    with pytest.raises(ConfigError, match=r"p.txt: prompt option --x is not supported"):
        Trainer(train_config(tiny_folder, images, tmp_path, sample_prompts=str(bad)))
    with pytest.raises(ConfigError, match="sample_prompts is not"):
        Trainer(train_config(tiny_folder, images, tmp_path, sample_every_n_epochs=1))


def test_tensorboard_logs_loss_lr_and_block_norms_split_by_kind(tiny_folder, images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config(tiny_folder, images, tmp_path, conv_dim=4, conv_alpha=2, max_train_steps=None,
                       max_train_epochs=2, logging_dir=str(tmp_path / "tb"))
    result = Trainer(cfg).run()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("loss/current")] == pytest.approx(result.losses)
    assert "lr/unet" in tags and "lr/text_encoder" in tags
    assert {"dW_attention/IN01", "dW_conv/IN01", "dW_conv/OUT11", "dW_attention/TE00", "dW_attention/TE01"} <= set(tags)
    assert "dW_conv/IN01" in tags and not any(t.startswith("dW_conv/TE") for t in tags)
    norms = [e.value for e in events.Scalars("dW_conv/IN01")]
    assert len(norms) == 2 and 0 < norms[0] < norms[1]  # LoCon up starts at zero and grows


def test_a_full_disk_during_a_save_keeps_the_previous_file(tiny_folder, images, tmp_path, monkeypatch):
    import lorakit.formats.atomic as atomic

    cfg = train_config(tiny_folder, images, tmp_path, max_train_steps=None, max_train_epochs=2,
                       save_every_n_epochs=1, output_name="same")
    trainer = Trainer(cfg)
    real_save = trainer.save
    saved = {}

    def save_then_fill_disk(stem, progress):
        if saved:  # the second save hits a full disk, after writing part of the data
            def no_space(fd):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(atomic.os, "fsync", no_space)
            return real_save("same", progress)
        saved["bytes"] = real_save("same", progress).read_bytes()
        return tmp_path / "out" / "same.safetensors"

    trainer.save = save_then_fill_disk
    with pytest.raises(TrainingStopped, match="No space left on device.*intact"):
        trainer.run()
    assert (tmp_path / "out" / "same.safetensors").read_bytes() == saved["bytes"]
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []


def test_two_processes_with_accelerate_launch_share_the_epoch_and_stay_in_sync(tiny_folder, images, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): half the steps each, gradients averaged, one file."""
    import subprocess
    import sys
    from pathlib import Path

    toml = tmp_path / "c.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{tiny_folder}"\ntrain_data_dir = "{images}"\n'
                    f'resolution = 64\ntrain_batch_size = 2\nmax_train_epochs = 2\nnetwork_dim = 4\n'
                    f'conv_dim = 4\noutput_dir = "{tmp_path / "out"}"\n')
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(bin_dir / "lorakit"), "train", str(toml)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # 6 batches per epoch (4 images x 3 repeats / 2), split between 2 processes: 3 steps per epoch, printed once;
    # the run ends with a cross-process check that the adapter weights are identical (it raises otherwise)
    assert run.stdout.count("trained 6 steps") == 1
    _, meta = read_safetensors(tmp_path / "out" / "lora.safetensors")
    assert meta["ss_num_processes"] == "2" and meta["ss_steps"] == "6"


def test_disk_latent_cache_is_reused_and_invalidated_by_image_or_vae_changes(tiny_folder, images, tmp_path,
                                                                              monkeypatch):
    from lorakit.training import data

    cfg = train_config(tiny_folder, images, tmp_path, cache_latents_to_disk=True, max_train_steps=1)
    trainer = Trainer(cfg)
    first = data.LatentCache.build(trainer.report.items, trainer.vae, disk=tmp_path / "cache")
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 4

    def no_encoding(*a, **k):
        raise AssertionError("encoded although cached")

    monkeypatch.setattr(trainer.vae, "encode", no_encoding)
    again = data.LatentCache.build(trainer.report.items, trainer.vae, disk=tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(first.latents, again.latents))
    monkeypatch.undo()
    changed = trainer.report.items[0].path
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(changed)  # a changed image gets a new latent
    with torch.no_grad():
        data.LatentCache.build(trainer.report.items, trainer.vae, disk=tmp_path / "cache")
        assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 5
        next(trainer.vae.parameters()).add_(0.01)  # a changed VAE gets a new folder
        data.LatentCache.build(trainer.report.items, trainer.vae, disk=tmp_path / "cache")
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    assert Trainer(cfg).run().steps == 1
