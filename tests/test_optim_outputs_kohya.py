"""kohya's optimisation, saving, sampling and logging keys: LR curves against their closed forms, optimizer_args,
max_grad_norm, scale_weight_norms, step/epoch file rotation, metadata, samples, log_prefix and v2."""
import inspect
import io
import json
import math
import shutil

import pytest
import torch

import lorakit.training.sampling as sampling
import lorakit.training.trainer as trainer_module
from lorakit.formats.files import load_network_file
from lorakit.formats.kohya import SS_METADATA_MINIMUM_KEYS
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.models.checkpoint import load_base_model
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.network import create_network
from lorakit.training.captions import parse_prompt_line
from lorakit.training.config import ConfigError, build_config
from lorakit.training.monitor import Monitor
from lorakit.training.optim import (apply_max_norm, make_optimizer, make_scheduler, max_norm_ratio,
                                    optimization_checks, resolve_warmup)
from lorakit.training.outputs import removed_epoch, removed_step
from lorakit.training.prepare import prepare_base
from lorakit.training.sampling import SamplePromptError, sampler_scheduler
from lorakit.training.schema import SAMPLERS
from lorakit.training.trainer import Trainer

from conftest import randomize, train_config

CPU = torch.device("cpu")
LR, T = 1e-3, 20  # base learning rate and run length of the schedule tests


# ---- LR schedules: kohya's get_scheduler_fix arguments, transformers' formulas, in float64 -----------------------
def warm(k, w):
    return k / max(1, w)


def decayed(k, w, total):  # progress through the part after warmup
    return (k - w) / max(1, total - w)


def cosine(p, cycles=0.5):
    return 0.5 * (1 + math.cos(math.pi * cycles * 2 * p))


def wsd(k, w, decay, cycles):
    stable = T - w - decay
    if k < w:
        return warm(k, w)
    if k < w + stable:
        return 1.0
    return cosine((k - w - stable) / decay, cycles / 2) if k < T else 0.0


SCHEDULES = {  # name -> (lr_warmup_steps, make_scheduler options, closed form of LR / base LR at step k)
    "constant": (0, {}, lambda k, w: 1.0),
    "constant_with_warmup": (4, {}, lambda k, w: warm(k, w) if k < w else 1.0),
    "linear": (4, {}, lambda k, w: warm(k, w) if k < w else max(0.0, (T - k) / (T - w))),
    "cosine": (0.25, {}, lambda k, w: warm(k, w) if k < w else cosine(decayed(k, w, T))),
    "cosine_with_restarts": (4, {"num_cycles": 3}, lambda k, w: warm(k, w) if k < w else (
        0.0 if decayed(k, w, T) >= 1 else 0.5 * (1 + math.cos(math.pi * ((3 * decayed(k, w, T)) % 1.0))))),
    "polynomial": (4, {"power": 2.0}, lambda k, w: warm(k, w) if k < w else (
        (LR - 1e-7) * (1 - decayed(k, w, T)) ** 2 + 1e-7) / LR),
    "inverse_sqrt": (4, {}, lambda k, w: warm(k, w) if k < w else 1 / math.sqrt(k / w)),  # timescale = warmup
    "piecewise_constant": (0, {"scheduler_args": ["step_rules='1:3,0.1:9,0.01'"]},
                           lambda k, w: 1.0 if k < 3 else 0.1 if k < 9 else 0.01),
    "cosine_with_min_lr": (4, {"num_cycles": 2, "scheduler_args": ["min_lr_rate=0.1"]},
                           lambda k, w: warm(k, w) if k < w else cosine(decayed(k, w, T), 1.0) * 0.9 + 0.1),
    "warmup_stable_decay": (4, {"num_cycles": 1, "scheduler_args": ["num_decay_steps=6"]},
                            lambda k, w: wsd(k, w, 6, 1)),
    "torch CosineAnnealingLR": (0, {"scheduler_type": "CosineAnnealingLR", "scheduler_args": [f"T_max={T}",
                                                                                               "eta_min=1e-4"]},
                                lambda k, w: (1e-4 + (LR - 1e-4) * (1 + math.cos(math.pi * k / T)) / 2) / LR),
}


def fresh(name, warmup, options):
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = make_optimizer("AdamW", [{"params": [p], "lr": LR}], LR, CPU)
    return p, optimizer, make_scheduler("constant" if "scheduler_type" in options else name, optimizer, warmup, T,
                                        **options)


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_schedule_follows_its_closed_form_and_resumes_from_its_state(name):
    ratio_or_steps, options, closed = SCHEDULES[name]
    warmup = resolve_warmup(ratio_or_steps, T)
    assert warmup == (5 if ratio_or_steps == 0.25 else ratio_or_steps)  # a ratio < 1 is floor(ratio * steps)
    p, optimizer, scheduler = fresh(name, warmup, options)
    seen = []
    for k in range(T):
        seen.append(optimizer.param_groups[0]["lr"])  # the LR optimizer step k + 1 uses
        if k == 11:  # --resume: the state goes through torch.save / weights-only load, as state.py does
            buffer = io.BytesIO()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            p, optimizer, scheduler = fresh(name, warmup, options)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            assert optimizer.param_groups[0]["lr"] == seen[-1]
        p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    expected = [LR * closed(k, warmup) for k in range(T)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert len(set(round(v, 12) for v in seen)) > 1 or name == "constant"


def test_adafactor_with_relative_step_runs_its_own_step_size_as_kohya():
    p = torch.nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(0)) * 0.3)
    optimizer = make_optimizer("Adafactor", [{"params": [p], "lr": LR, "name": "unet"}], LR, CPU)
    assert optimizer.defaults["relative_step"] and optimizer.defaults["lr"] is None  # kohya's default
    scheduler = make_scheduler("constant", optimizer, 0, T, initial_lr=LR)  # replaced by the adafactor schedule
    assert type(scheduler).__name__ == "AdafactorSchedule" and optimizer.param_groups[0]["lr"] == LR
    for step in range(1, 4):
        rms = float(p.detach().norm() / math.sqrt(p.numel()))  # Adafactor scales by RMS(p) before the update
        p.grad = torch.randn(16, generator=torch.Generator().manual_seed(step))
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(min(1e-2, step ** -0.5) * max(1e-3, rms), rel=1e-6)
    fixed = make_optimizer("Adafactor", [{"params": [p], "lr": LR}], LR, CPU,
                           ["scale_parameter=False", "relative_step=False", "warmup_init=False"])
    assert fixed.param_groups[0]["lr"] == LR and not fixed.defaults["relative_step"]


@pytest.mark.parametrize("raw,message", [
    (dict(lr_warmup_steps=10.5), "lr_warmup_steps = 10.5: give whole steps"),
    (dict(lr_scheduler="piecewise_constant"), "needs lr_scheduler_args"),
    (dict(lr_scheduler="cosine_with_min_lr"), "needs its floor"),
    (dict(lr_scheduler="adafactor"), "needs optimizer_type Adafactor"),
    (dict(optimizer_type="Adafactor", lr_warmup_steps=10), "set lr_warmup_steps = 0"),
    (dict(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=9"], lr_warmup_steps=3),
     "lr_scheduler_type CosineAnnealingLR has no warmup"),
    (dict(lr_scheduler_type="torch.optim.lr_scheduler.NoSuchLR"), "no such class"),
    (dict(lr_scheduler="polynomial", lr_scheduler_args=["lr_edn=0"]), "'lr_edn' is not an argument of the "
                                                                       "polynomial schedule.*did you mean 'lr_end'"),
    (dict(lr_scheduler="polynomial", lr_scheduler_args=["power=3"]), "power: set by lr_scheduler_power"),
    (dict(optimizer_args=["weight_dekay=0.1"]), "'weight_dekay' is not an argument of AdamW.*did you mean "
                                                "'weight_decay'"),
    (dict(optimizer_type="SGDNesterov", optimizer_args=["nesterov=False"]), "always uses nesterov=True"),
    (dict(optimizer_args=["lr=1"]), "lr: set by learning_rate"),
    (dict(optimizer_args=["relative_step=false"]), "not a Python literal"),
])
def test_bad_optimizer_and_schedule_settings_are_named_when_the_config_is_read(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_optimizer_args_reach_the_optimizer_param_groups():
    p = torch.nn.Parameter(torch.zeros(3))
    adamw = make_optimizer("AdamW", [{"params": [p], "lr": LR}], LR, CPU,
                           ["weight_decay=0.1", "betas=(0.8,0.9)", "eps=1e-6", "amsgrad=True"])
    group = adamw.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"], group["amsgrad"]) == (0.1, (0.8, 0.9), 1e-6, True)
    sgd = make_optimizer("sgdnesterov", [{"params": [p], "lr": LR}], LR, CPU)  # case-insensitive as kohya
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    sgd = make_optimizer("SGDNesterov", [{"params": [p], "lr": LR}], LR, CPU, ["momentum=0.5", "weight_decay=0.01"])
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.5, 0.01)
    # a command-line string is split at commas by the config loader; the pieces join back into one value
    config = build_config({"optimizer_args": "betas=0.7,0.77", "lr_scheduler": "constant"})
    assert make_optimizer("AdamW", [{"params": [p]}], LR, CPU, config.optimizer_args).defaults["betas"] == (0.7, 0.77)
    assert optimization_checks(build_config({"lr_scheduler": "constant", "lr_warmup_steps": 0.1}))[1] == [
        "lr_scheduler constant with lr_warmup_steps runs as constant_with_warmup (kohya refuses the pair)"]


# ---- max-norm (scale_weight_norms) ---------------------------------------------------------------------------
def test_max_norm_ratio_is_kohyas_formula():
    norms = torch.tensor([0.0, 0.2, 0.5, 1.0, 1.5, 4.0], dtype=torch.float64)
    assert max_norm_ratio(norms, 1.0).tolist() == [1.0, 1.0, 1.0, 1.0, 1 / 1.5, 0.25]


@torch.no_grad()
def delta_norms(network) -> dict[str, float]:
    return {name: float(adapter.delta_weight().double().norm()) for name, adapter in network.adapters.items()}


@pytest.mark.parametrize("network_config", [
    NetworkConfig(network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=1),
    NetworkConfig(algo="loha", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, use_tucker=True),
    NetworkConfig(algo="lokr", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, decompose_both=True),
])
def test_max_norm_caps_every_module_of_every_algorithm(tiny_sd1, network_config):
    unet, text_encoders = tiny_sd1
    network = create_network(unet, text_encoders, network_config, seed=0)
    randomize(network, std=0.3)
    before = delta_norms(network)
    ordered = sorted(before.values())
    cap = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # about half the modules are above it
    stats = apply_max_norm(network.adapters.values(), cap)
    after = delta_norms(network)
    for name, norm in before.items():
        assert after[name] == pytest.approx(min(norm, cap), rel=2e-5)
    assert stats.keys_scaled == sum(norm > cap for norm in before.values())
    assert stats.max_norm == pytest.approx(cap, rel=2e-5)
    assert stats.mean_norm == pytest.approx(sum(after.values()) / len(after), rel=1e-4)


# ---- trainer runs: tiny model, resolution 64, a few steps ------------------------------------------------------
def record_grad_norms(monkeypatch) -> list[float]:
    """The global gradient norm each optimizer step sees (after any clipping)."""
    norms, real = [], trainer_module.make_optimizer

    def make(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, kw: norms.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.double().norm() for g in opt.param_groups for p in g["params"]
                         if p.grad is not None])))))
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", make)
    return norms


def test_step_saves_rotate_samples_follow_the_steps_and_a_killed_run_resumes(tiny_folder, images, tmp_path,
                                                                           monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 7 --s 2\na red square --s 2 --ss k_euler_a\n")
    grads = record_grad_norms(monkeypatch)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped at 0"))
    settings = dict(max_train_steps=4, save_every_n_steps=1, save_last_n_steps=2, save_state=True, max_grad_norm=0,
                    optimizer_type="SGDNesterov", optimizer_args=["weight_decay=0.1"], learning_rate=1e-2,
                    training_comment="kohya comment")
    trainer = Trainer(train_config(tiny_folder, images, tmp_path / "a", sample_prompts=str(prompts),
                                   sample_at_first=True, sample_every_n_steps=2, sample_sampler="dpmsolver++",
                                   **settings))
    used, real_scheduler = [], sampling.sampler_scheduler
    monkeypatch.setattr(sampling, "sampler_scheduler", lambda name, config: used.append(name) or
                        real_scheduler(name, config))
    unbroken = trainer.run()
    out = tmp_path / "a" / "out"
    # saved at steps 1-4; saving step s deletes step s - 3 (kohya's get_remove_step_no): steps 2-4 remain
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "t-step00000002.safetensors", "t-step00000003.safetensors", "t-step00000004.safetensors", "t.safetensors"]
    assert [p.name for p in unbroken.files] == [p.name for p in sorted(out.glob("t-step*"))] + ["t.safetensors"]
    group = trainer.run_state.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 0.1, True)
    meta = read_safetensors(out / "t-step00000003.safetensors")[1]
    assert (meta["ss_steps"], meta["ss_training_comment"]) == ("3", "kohya comment")
    assert meta["ss_optimizer"] == "torch.optim.sgd.SGD(momentum=0.9,weight_decay=0.1)"
    assert meta["ss_max_grad_norm"] == "0.0"
    # samples before step 1 (epoch 0 in kohya's names), at step 2, and the final ones (step 4 is the final)
    assert sorted(p.name for p in unbroken.samples) == [
        "t_000002_00_7.png", "t_000002_01_1.png", "t_e000000_00_7.png", "t_e000000_01_1.png",
        "t_e000001_00_7.png", "t_e000001_01_1.png"]
    assert used == ["dpmsolver++", "k_euler_a"] * 3
    assert len(grads) == 4 and max(grads) > 0

    # kill -9 after step 3: nothing is saved at the kill, the state of the step-3 save is what remains
    killed = Trainer(train_config(tiny_folder, images, tmp_path / "b", **settings))
    real_micro = killed.micro_batch

    def die_at_the_fourth(cache, batch, micro):
        if micro == 3:
            raise KeyboardInterrupt("kill -9")
        return real_micro(cache, batch, micro)

    killed.micro_batch = die_at_the_fourth
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    state = tmp_path / "b" / "out" / "t-state"
    resumed = Trainer(train_config(tiny_folder, images, tmp_path / "b", resume=str(state), **settings)).run()
    assert resumed.losses == unbroken.losses  # bit-identical
    a, b = read_safetensors(out / "t.safetensors")[0], read_safetensors(resumed.files[-1])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_grad_norm_clips_the_global_norm_to_exactly_its_value(tiny_folder, images, tmp_path, monkeypatch):
    grads = record_grad_norms(monkeypatch)
    Trainer(train_config(tiny_folder, images, tmp_path / "a", max_train_steps=2, max_grad_norm=0)).run()
    raw = list(grads)
    cap = 0.5 * raw[0]  # the tiny model's raw norm (about 0.1) is below kohya's usual 0.5 or 1.0
    grads.clear()
    Trainer(train_config(tiny_folder, images, tmp_path / "b", max_train_steps=2, max_grad_norm=cap)).run()
    assert grads[0] == pytest.approx(cap, rel=1e-5)  # step 1 sees the same raw gradients, clipped to the cap
    assert all(g <= cap * (1 + 1e-5) for g in grads)


def test_scale_weight_norms_caps_every_module_and_is_logged_like_kohya(tiny_folder, images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cap = 2e-3
    cfg = train_config(tiny_folder, images, tmp_path, max_train_steps=2, conv_dim=4, conv_alpha=2, learning_rate=5e-2,
                       scale_weight_norms=cap, logging_dir=str(tmp_path / "tb"), log_prefix="style-",
                       no_metadata=True)
    trainer = Trainer(cfg)
    result = trainer.run()
    norms = list(delta_norms(trainer.network).values())
    assert max(norms) == pytest.approx(cap, rel=2e-5) and all(n <= cap * (1 + 2e-5) for n in norms)
    folder, = (tmp_path / "tb").iterdir()  # kohya's <log_prefix><YYYYmmddHHMMSS>
    assert folder.name.startswith("style-") and folder.name[6:].isdigit() and len(folder.name) == 6 + 14
    events = EventAccumulator(str(folder)).Reload()
    scaled = [e.value for e in events.Scalars("max_norm/keys_scaled")]
    assert len(scaled) == 2 and scaled[-1] > 0
    assert events.Scalars("max_norm/max_key_norm")[-1].value == pytest.approx(cap, rel=1e-4)
    assert "norm/avg_key_norm" in events.Tags()["scalars"]
    # no_metadata: only what kohya keeps (+ modelspec and hashes), and lorakit's loader still loads the file
    tensors, meta = read_safetensors(result.files[-1])
    ss_keys = {k for k in meta if k.startswith("ss_")}
    assert ss_keys == set(SS_METADATA_MINIMUM_KEYS) and "sshs_model_hash" in meta
    assert "ss_training_comment" not in meta and "ss_tag_frequency" not in meta
    base = load_base_model(str(tiny_folder))
    network, report = load_network_file(result.files[-1], base.pipeline.unet, base.text_encoders)
    assert report.loaded == len(trainer.network.adapters) and not report.unmatched


def test_save_last_n_epochs_keeps_the_last_epoch_files(tiny_folder, images, tmp_path):
    small = tmp_path / "small" / "1_red shape"  # 2 images, batch 2: one step per epoch
    small.mkdir(parents=True)
    for path in sorted((images / "3_red shape").iterdir())[:4]:
        shutil.copy(path, small / path.name)
    cfg = train_config(tiny_folder, small.parent, tmp_path, max_train_steps=None, max_train_epochs=4,
                       save_every_n_epochs=1, save_last_n_epochs=2, training_comment="epochs")
    result = Trainer(cfg).run()
    assert result.steps == 4
    # epochs 1-3 saved (the last epoch is the final file); saving epoch 3 deleted epoch 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [
        "t-000002.safetensors", "t-000003.safetensors", "t.safetensors"]
    assert [p.name for p in result.files] == ["t-000002.safetensors", "t-000003.safetensors", "t.safetensors"]
    assert read_safetensors(result.files[-1])[1]["ss_training_comment"] == "epochs"


@pytest.mark.parametrize("every,last_n", [(1, 2), (10, 30), (3, 5), (4, 4), (5, 2)])
def test_step_rotation_keeps_exactly_the_saves_of_the_last_n_steps(every, last_n):
    kept = set()
    for step in range(every, 200, every):
        kept.add(step)
        kept.discard(removed_step(step, every, last_n))
        assert kept == {s for s in range(every, step + 1, every) if s >= step - last_n}
    assert removed_step(50, 10, None) is None


def test_epoch_rotation_keeps_the_last_n_saved_epochs():
    for every, last_n in [(1, 1), (1, 3), (2, 2), (3, 1)]:
        kept = set()
        for epoch in range(every, 40, every):
            kept.add(epoch)
            kept.discard(removed_epoch(epoch, every, last_n))
            assert kept == set(range(every, epoch + 1, every)[-last_n:])


# ---- samplers --------------------------------------------------------------------------------------------------
KOHYA_SAMPLERS = {  # train_util.get_my_scheduler
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "euler":
    "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler"}


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_name_builds_kohyas_diffusers_scheduler(name):
    import diffusers
    from diffusers.utils import is_scipy_available

    base = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction").config
    plain = name[2:] if name.startswith("k_") else name
    if plain == "lms" and not is_scipy_available():
        with pytest.raises(SamplePromptError, match="scipy"):
            sampler_scheduler(name, base)
        return
    scheduler = sampler_scheduler(name, base)
    assert type(scheduler).__name__ == KOHYA_SAMPLERS[plain]
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_end == 0.012
    if plain.startswith("dpmsolver"):
        assert scheduler.config.algorithm_type == plain
    scheduler.set_timesteps(10)  # PNDM's Runge-Kutta warm-up needs more than 3
    sample = torch.ones(1, 4, 8, 8)
    random = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(
        scheduler.step).parameters else {}
    out = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample, **random)
    assert torch.isfinite(out.prev_sample).all()


def test_prompt_ss_option_and_sample_settings_without_prompts():
    assert parse_prompt_line("a cat --ss K_Euler_A --s 3").sampler == "k_euler_a"
    assert parse_prompt_line("a cat --s 3").sampler is None
    with pytest.raises(ValueError, match="--ss needs a sampler name \\(ddim, pndm"):
        parse_prompt_line("a cat --ss fastest")
    from lorakit.training.prepare import prepare_samples

    for key in ("sample_every_n_steps", "sample_at_first", "sample_every_n_epochs"):
        with pytest.raises(ConfigError, match=f"{key} is set but sample_prompts is not"):
            prepare_samples(build_config({key: 1 if key != "sample_at_first" else True}))


# ---- log_prefix and v2 -----------------------------------------------------------------------------------------
def test_log_prefix_gives_a_run_folder_that_a_resumed_run_keeps(tmp_path):
    history = tmp_path / "h.json"
    first = Monitor(history, tmp_path / "logs", log_prefix="char-")
    first.step(1, 1, 0.5, {"unet": 1e-4})
    first.close()
    assert first.log_dir.parent == tmp_path / "logs" and first.log_dir.name[5:].isdigit()
    assert json.loads(history.read_text())["log_dir"] == str(first.log_dir)
    resumed = Monitor(history, tmp_path / "logs", resume_step=1, log_prefix="char-")
    resumed.close()
    assert resumed.log_dir == first.log_dir and len(list((tmp_path / "logs").iterdir())) == 1
    assert Monitor(tmp_path / "g.json", tmp_path / "plain").log_dir == tmp_path / "plain"


def test_v2_is_checked_against_the_family_of_the_file(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="v2 = true, but .* is SD1.x, not SD2.x"):
        prepare_base(build_config({"pretrained_model_name_or_path": str(tiny_folder), "v2": True}))
    from lorakit.models.configs import build_text_encoders, build_unet
    from lorakit.models.tiny import build_components, save_folder

    sd2 = save_folder(tmp_path / "sd2", build_unet("tiny-sd2"), build_components(0)[1],
                      build_text_encoders("tiny-sd2")[0], dtype=torch.float32)
    base = prepare_base(build_config({"pretrained_model_name_or_path": str(sd2), "v2": True}))
    assert base.family == "sd2" and any("v2 = true agrees" in n for n in base.notes)


def test_adam_on_the_cpu_runs_fused_with_the_same_update():
    """Adam/AdamW on the CPU get torch's fused kernel unless optimizer_args pick an implementation; its steps
    match the per-tensor loop's to rounding (float64 here). Other optimizers and CUDA keep torch's default."""
    def trained(args):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in
                  ((8, 3), (5,), (2, 2, 3, 3))]
        optimizer = make_optimizer("AdamW", [{"params": params, "lr": LR}], LR, CPU, args)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            optimizer.step()
        return optimizer, params

    fused, got = trained(None)
    loop, expected = trained(["foreach=False"])
    assert fused.defaults["fused"] is True and not loop.defaults.get("fused")
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(got, expected))
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert not make_optimizer("AdamW", [{"params": p}], LR, torch.device("cuda")).defaults.get("fused")
    assert not make_optimizer("SGDNesterov", [{"params": p}], LR, CPU).defaults.get("fused")
