"""Training precision: the frozen model held in the training dtype with fp32 adapter masters, fp16 loss scaling,
the VAE and text encoders released once cached, and a bit-identical bf16 resume."""
import gc
import os
import platform
import weakref
from pathlib import Path

import pytest
import torch

from lorakit.formats.safetensors_io import read_safetensors
from lorakit.training.config import ConfigError
from lorakit.training.data import LatentCache
from lorakit.training.precision import peak_memory, return_freed_memory
from lorakit.training.trainer import Trainer, TrainingInterrupted

from conftest import train_config
from test_training_run import interrupt_at


def dtypes(module) -> set:
    return {p.dtype for p in module.parameters()}


def test_frozen_model_is_read_in_the_training_dtype_and_adapters_stay_fp32(tiny_folder, images, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    half = Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16"))
    assert all(dtypes(m) == {torch.bfloat16} for m in (half.unet, half.vae, *half.text_encoders))
    assert dtypes(half.network) == {torch.float32}
    ref = UNet2DConditionModel.from_pretrained(tiny_folder / "unet")  # the fp32 file, rounded once
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(ref.state_dict().values(),
                                                                     half.unet.state_dict().values()))
    # no_half_vae: the VAE is read in fp32 itself, not rounded to bf16 and back
    kept = Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16", no_half_vae=True))
    assert dtypes(kept.vae) == {torch.float32} and dtypes(kept.unet) == {torch.bfloat16}
    vae = AutoencoderKL.from_pretrained(tiny_folder / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), kept.vae.state_dict().values()))
    # full_bf16: the adapters themselves in bf16 (alpha buffers stay exact)
    full = Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16", full_bf16=True))
    assert dtypes(full.network) == {torch.bfloat16}
    assert all(a.alpha.dtype == torch.float32 for a in full.network.adapters.values())
    plain = Trainer(train_config(tiny_folder, images, tmp_path))
    assert all(dtypes(m) == {torch.float32} for m in (plain.unet, plain.vae, plain.network))


def fixed_loss(trainer, cache) -> float:
    """The loss on every cached image over 6 fixed noise draws: the same question before and after training."""
    latents = torch.stack(cache.latents)
    captions = [item.caption for item in trainer.report.items]
    with torch.no_grad():
        return sum(float(trainer.loss(latents, captions, torch.Generator().manual_seed(s))) for s in range(6)) / 6


def test_bf16_training_changes_only_the_adapters_and_its_loss_falls(tiny_folder, images, tmp_path):
    trainer = Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16", max_train_steps=20,
                                   learning_rate=1e-2, network_train_unet_only=True))
    frozen = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    start = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    cache = LatentCache.build(trainer.report.items, trainer.vae)
    before = fixed_loss(trainer, cache)
    trainer.run()
    after = fixed_loss(trainer, cache)
    assert all(torch.equal(frozen[k], v) for k, v in trainer.unet.state_dict().items())
    assert dtypes(trainer.network) == {torch.float32}
    changed = [k for k, v in trainer.network.state_dict().items() if not torch.equal(start[k], v)]
    assert changed and all(k.endswith((".down", ".up")) for k in changed)
    assert after < 0.95 * before, (before, after)


def test_fp16_grad_scaler_skips_a_step_with_inf_gradients_and_keeps_weights_finite(tiny_folder, images, tmp_path,
                                                                                 capsys):
    trainer = Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="fp16", max_train_steps=3,
                                   network_train_unet_only=True))
    assert trainer.scaler is not None and trainer.scaler.get_scale() == 65536.0
    params = list(trainer.network.parameters())
    poison = {"on": False}
    params[0].register_hook(lambda g: g * float("inf") if poison["on"] else g)
    snapshots, real_step = [], trainer._optimizer_step

    def optimizer_step(*args):
        poison["on"] = False
        real_step(*args)
        snapshots.append([p.detach().clone() for p in params])
        poison["on"] = len(snapshots) == 1  # the second step's backward overflows

    trainer._optimizer_step = optimizer_step
    trainer.run()
    assert len(snapshots) == 3
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 skipped
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3 trained
    assert all(torch.isfinite(p).all() for p in params)
    assert trainer.scaler.get_scale() == 32768.0
    assert "step 2: fp16 gradients overflowed; step skipped" in capsys.readouterr().err


def test_vae_and_text_encoders_are_released_after_caching(tiny_folder, images, tmp_path, capsys, monkeypatch):
    import lorakit.training.trainer as trainer_module

    trainer = Trainer(train_config(tiny_folder, images, tmp_path, max_train_steps=2, network_train_unet_only=True))
    gone = [weakref.ref(m) for m in (trainer.vae, *trainer.text_encoders)]
    alive_at_trim = []

    def trim():  # the memory goes back to the system only if nothing holds the models by then
        gc.collect()
        alive_at_trim.append([ref() is not None for ref in gone])

    monkeypatch.setattr(trainer_module, "return_freed_memory", trim)
    released = trainer.run()
    assert alive_at_trim == [[False] * len(gone)]
    gc.collect()
    assert all(ref() is None for ref in gone)  # really freed, not just unnamed
    assert trainer.base.pipeline.vae is None and trainer.base.pipeline.text_encoder is None
    err = capsys.readouterr().err
    assert "VAE released after caching" in err and "text encoders released after caching" in err
    # the same run with samples keeps both and encodes captions lazily: the same losses
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --s 1\n")
    kept = Trainer(train_config(tiny_folder, images, tmp_path / "k", max_train_steps=2, network_train_unet_only=True,
                                sample_prompts=str(prompts)))
    result = kept.run()
    assert kept.vae is not None and kept.text_encoder is not None and len(result.samples) == 1
    assert "VAE kept: samples decode with it" in capsys.readouterr().err
    assert result.losses == pytest.approx(released.losses, rel=1e-6)


def rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="RSS from /proc and malloc_trim are Linux/glibc facts")
def test_freed_models_leave_the_process_memory():
    """Weights freed below glibc's (raised) mmap threshold stay in RSS until trimmed, as the released text
    encoders and VAE did; return_freed_memory (called by the release) hands them back."""
    big = torch.empty(16 << 20, dtype=torch.uint8)
    del big  # freeing a 16 MiB mapping raises glibc's mmap threshold to 16 MiB, as loading a model does
    blocks = [torch.ones(256, 1024) for _ in range(1200)]  # 1200 x 1 MiB from the heap
    pin = torch.ones(256, 1024)  # a live block above them (the model that stays): no automatic trim at the top
    before = rss()
    del blocks
    gc.collect()
    kept = rss()
    return_freed_memory()
    assert kept - rss() > 0.5 * (1200 << 20) and before - kept < 0.5 * (1200 << 20)
    del pin


_CONV_BACKWARD_FAULTS = """
import resource, sys, torch
from lorakit.training.precision import keep_large_buffers
torch.set_num_threads(1)
if sys.argv[1] == "on":
    assert keep_large_buffers(torch.device("cpu"))
conv = torch.nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)  # SD1.5's 8x8 level: a 56 MiB weight
x = torch.randn(1, 1280, 8, 8, requires_grad=True)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv(x).sum().backward()  # oneDNN reorders the weight into a fresh buffer in backward
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[3:]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="page faults from getrusage and mallopt are Linux/glibc facts")
def test_cpu_training_keeps_large_buffers_instead_of_faulting_them_in_each_step():
    """keep_large_buffers (the trainer calls it on CPU): a frozen conv's backward at SD1.5's 1280-channel
    shape reuses its weight-sized oneDNN buffers instead of mapping them afresh (about 28,800 page faults a call).
    Run in fresh interpreters: the setting is process-wide."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_",
                                                             "MALLOC_TRIM_THRESHOLD_")}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _CONV_BACKWARD_FAULTS, mode], env=env, check=True,
                                       capture_output=True, text=True).stdout) for mode in ("off", "on")}
    assert faults["off"] > 3 * 10_000 and faults["on"] < 1_000, faults


def test_text_encoders_stay_when_they_train(tiny_folder, images, tmp_path, capsys):
    trainer = Trainer(train_config(tiny_folder, images, tmp_path, max_train_steps=1))
    assert trainer.train_text
    trainer.run()
    assert trainer.text_encoder is not None and trainer.vae is None
    assert "text encoders kept: they train" in capsys.readouterr().err


def test_resumed_bf16_run_equals_an_unbroken_one(tiny_folder, images, tmp_path):
    settings = dict(max_train_steps=None, max_train_epochs=2, conv_dim=4, conv_alpha=2, mixed_precision="bf16",
                    network_train_unet_only=True)
    unbroken = Trainer(train_config(tiny_folder, images, tmp_path / "a", **settings)).run()
    trainer = Trainer(train_config(tiny_folder, images, tmp_path / "b", **settings))
    interrupt_at(trainer, micro_index=3)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.run()
    resumed = Trainer(train_config(tiny_folder, images, tmp_path / "b", resume=str(stopped.value.state_dir),
                                   **settings)).run()
    assert resumed.losses == unbroken.losses  # bit-identical
    a, _ = read_safetensors(unbroken.files[-1])
    b, _ = read_safetensors(resumed.files[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precision_switches_that_cannot_run_here_are_refused_before_loading(tiny_folder, images, tmp_path,
                                                                           monkeypatch):
    import lorakit.training.prepare as prepare

    monkeypatch.setattr(prepare, "load_base_model", lambda *a, **k: pytest.fail("base model loaded"))
    with pytest.raises(ConfigError, match=r"fp8_base = true: float8 weights are for CUDA GPUs; this run is on cpu"):
        Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16", fp8_base=True), device="cpu")
    with pytest.raises(ConfigError, match=r"fp8_base_unet = true: float8 weights need mixed_precision"):
        Trainer(train_config(tiny_folder, images, tmp_path, fp8_base_unet=True), device="cpu")
    with pytest.raises(ConfigError, match=r"full_bf16 = true needs mixed_precision = \"bf16\""):
        Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="fp16", full_bf16=True), device="cpu")


def test_half_precision_on_a_cpu_without_native_bf16_is_said_before_training(tiny_folder, images, tmp_path,
                                                                            monkeypatch, capsys):
    """On an AVX2-only CPU bf16 convs fall back to slow kernels (a 3x3 conv measured ~70x fp32): the run says so."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16"))
    assert "on a CPU without native bf16/fp16" in capsys.readouterr().err
    Trainer(train_config(tiny_folder, images, tmp_path))  # fp32: nothing to say
    assert "native bf16" not in capsys.readouterr().err
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    Trainer(train_config(tiny_folder, images, tmp_path, mixed_precision="bf16"))
    assert "native bf16" not in capsys.readouterr().err


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_peak_memory_is_the_process_peak_rss_on_the_cpu():
    """What Recompute (models/lean.py) weighs its savings against: never below the RSS now, and it holds a
    buffer touched and freed before it was read; None on a device it cannot read."""
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, written
    del block
    peak = peak_memory(torch.device("cpu"))
    assert peak >= rss and peak >= 64 * 2 ** 20
    assert peak_memory(torch.device("meta")) is None
