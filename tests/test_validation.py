"""Held-out validation (kohya's validation_split & co.) and the native-resolution default, on tiny models."""
import json
import random

import pytest
import torch

from lorakit.models import styles
from lorakit.models.checkpoint import load_base_model, native_resolution, save_single_file
from lorakit.models.tiny import build_components
from lorakit.training.config import build_config, coerce
from lorakit.training.dataset import load_specs, scan
from lorakit.training.trainer import Trainer, TrainingInterrupted
from lorakit.training.validation import KINDS, split_datasets, split_items, timestep_grid

from test_training_run import interrupt_at


@pytest.fixture(scope="module")
def sepia(tmp_path_factory):
    """8 sepia images (the demo's style) x 2 repeats: something the embedded model can learn in a few steps."""
    return styles.write_style_dataset(tmp_path_factory.mktemp("sepia"), count=8, repeats=2, seed=0, style="sepia")


def make(data, out, **kw) -> Trainer:
    """The embedded tiny model (resolution unset: its native 64 px); 2 of 8 images held out, so an epoch is
    6 images x 2 repeats = 3 steps of batch 4."""
    values = dict(train_data_dir=str(data), train_batch_size=4, max_train_epochs=2, network_dim=8,
                  network_alpha=8.0, learning_rate=3e-3, network_train_unet_only=True, seed=0,
                  output_dir=str(out), output_name="v", validation_split=0.25)
    base = kw.pop("base", None)
    values.update(kw)
    return Trainer(build_config({k: v for k, v in values.items() if v is not None}), base=base)


def run(data, out, **kw):
    trainer = make(data, out, **kw)
    return trainer, trainer.run()


def history(out) -> dict:
    return json.loads((out / "v-history.json").read_text())


def test_timestep_grid_is_the_midpoints_of_equal_bins():
    assert timestep_grid(0, 1000) == [100, 300, 500, 700, 900]
    assert timestep_grid(200, 700) == [250, 350, 450, 550, 650]
    assert timestep_grid(0, 3) == [0, 1, 2]  # fewer timesteps than points: each once


def test_split_is_seeded_and_never_holds_out_regularization_images(sepia):
    report = scan(load_specs(sepia, resolution=64)[0])
    paths = lambda held: sorted(i.path.name for i in held.items)  # noqa: E731
    kept, held = split_items(report, 0.25, seed=7)
    again = split_items(scan(load_specs(sepia, resolution=64)[0]), 0.25, seed=7)[1]
    expected = sorted(f"{n:03d}.png" for n in random.Random(7).sample(range(8), 2))
    assert held.kind == "split" and paths(held) == paths(again) == expected
    assert {i.path.name for i in kept}.isdisjoint(paths(held)) and len(kept) == 6
    assert held.captions == [i.caption for i in held.items]  # the captions as trained (no prefix here)
    assert split_items(report, 0.0, 7) == (report.items, None)


def test_a_dataset_toml_sets_validation_split_per_dataset_as_kohya(sepia, tmp_path):
    """sd-scripts' dataset schema takes validation_split / validation_seed in [general] and [[datasets]]: each
    dataset draws from its own images; the training config fills in what the TOML leaves unset."""
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]
validation_seed = 7
resolution = 64

[[datasets]]
validation_split = 0.25
  [[datasets.subsets]]
  image_dir = "{sepia / '2_sepia'}"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{sepia / '2_sepia'}"
  num_repeats = 1
""")
    specs, _ = load_specs(toml)
    assert [(s.validation_split, s.validation_seed) for s in specs] == [(0.25, 7), (None, 7)]
    report = scan(specs)
    kept, held = split_datasets(report, specs, split=0.0, seed=0)  # the config: no split of its own
    first = {id(sub) for sub in specs[0].subsets}
    assert held.kind == "split" and len(held.items) == 2 and all(id(i.subset) in first for i in held.items)
    drawn = sorted(f"{n:03d}.png" for n in random.Random(7).sample(range(8), 2))
    assert sorted(i.path.name for i in held.items) == drawn
    assert len(kept) == 14 and any("[[datasets]] #1: validation: 2 of 8" in n for n in report.notes)
    # one value everywhere ([general] or the config alike): one draw over all images, as split_items
    same = scan(specs)
    assert split_datasets(same, specs, split=0.25, seed=7)[1].items == split_items(scan(specs), 0.25, 7)[1].items
    # the dataset that asks for a split is too small to split: everything trains, and the caption-only check
    # covers that dataset's images only
    two = styles.write_style_dataset(tmp_path / "two", count=2, repeats=1, seed=1, style="sepia")
    toml.write_text(toml.read_text().replace(str(sepia / "2_sepia"), str(two / "1_sepia"), 1))
    specs, _ = load_specs(toml)
    kept, held = split_datasets(scan(specs), specs, split=0.0, seed=0)
    assert held.kind == "caption_only" and len(kept) == 10
    assert {i.path.parent for i in held.items} == {two / "1_sepia"} and len(held.items) == 2


def test_validation_loss_identical_for_identical_weights_and_lower_after_fitting(sepia, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # the optimizer does nothing: the weights never move, though every
        patch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)  # step draws dropout masks
        frozen, _ = run(sepia, tmp_path / "frozen", network_dropout=0.3, validate_every_n_steps=1)
    losses = [r["loss"] for r in frozen.validation.records]
    assert frozen.config.resolution == [64, 64]  # unset: the embedded model's native size
    assert len(losses) == 7 and len(set(losses)) == 1  # steps 0..6 (the epoch ends, 3 and 6, among them)
    fitted, result = run(sepia, tmp_path / "fitted")
    records = history(tmp_path / "fitted")["validation"]
    assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (3, 1), (6, 2)] and result.steps == 6
    assert records[0]["loss"] == losses[0]  # same held-out set, grid and noise: the base model's value
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    held = {i.path for i in fitted.held_out.items}
    assert len(held) == 2 and held.isdisjoint(i.path for i in fitted.report.items)
    for r in records:
        assert set(r) == {"step", "epoch", "loss", "kind", "images", "timesteps"}
        assert r["kind"] == "split" and r["images"] == 2 and r["timesteps"] == timestep_grid(0, 1000)


def test_validation_is_bit_identical_across_interrupt_and_resume(sepia, tmp_path):
    settings = dict(max_train_epochs=3, validate_every_n_steps=2, network_dropout=0.2, save_state=True)
    _, unbroken = run(sepia, tmp_path / "a", **settings)
    trainer = make(sepia, tmp_path / "b", **settings)
    interrupt_at(trainer, 2)  # during step 3, the last of epoch 1: its epoch-end validation runs after resuming
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.run()
    _, resumed = run(sepia, tmp_path / "b", resume=str(stopped.value.state_dir), **settings)
    assert resumed.losses == unbroken.losses
    assert history(tmp_path / "b")["validation"] == history(tmp_path / "a")["validation"]
    steps = [r["step"] for r in history(tmp_path / "a")["validation"]]
    assert steps == [0, 2, 3, 4, 6, 8, 9]  # every 2 steps, every epoch end (3, 6, 9), never twice at one step


def test_caption_only_check_when_too_few_images_leaves_training_untouched(tmp_path):
    """3 images: too few to split. Every image trains, the check is said once, and the run's losses are
    bit-identical to the same run without validation (the check draws nothing from the run's streams)."""
    data = styles.write_style_dataset(tmp_path / "d3", count=3, repeats=2, seed=0, style="sepia")
    checked, with_check = run(data, tmp_path / "a", max_train_epochs=1, train_batch_size=2, validation_split=0.5)
    _, without = run(data, tmp_path / "b", max_train_epochs=1, train_batch_size=2, validation_split=None)
    assert with_check.losses == without.losses and len(checked.report.items) == 3
    said = [n for n in checked.report.notes if "caption-only" in n]
    assert len(said) == 1 and "3 training image(s) are too few" in said[0]
    records = history(tmp_path / "a")["validation"]
    assert [r["kind"] for r in records] == ["caption_only"] * 2 and records[0]["images"] == 3
    assert checked.held_out.captions[0] not in {i.caption for i in checked.report.items}
    assert set(KINDS) == {"split", "caption_only"}
    assert history(tmp_path / "b")["validation"] == []  # validation_split 0: none


def test_resolution_unset_is_the_models_native_size(tiny_folder, tmp_path):
    assert build_config({}).resolution is None
    assert coerce("resolution", "96,64") == [96, 64] and coerce("resolution", 512) == [512, 512]  # kohya's forms
    assert native_resolution() == 64 and native_resolution(tiny_folder) == 64  # latent 8 x the VAE's 8x
    unet, vae, text_encoder = build_components(0)
    unet.register_to_config(sample_size=16)  # a model made for 128 px: read from the file, not assumed
    save_single_file(tmp_path / "m.safetensors", "sd1", unet, vae, [text_encoder])
    assert native_resolution(tmp_path / "m.safetensors") == 128


def test_a_model_passed_to_the_trainer_gives_the_native_size(sepia, tmp_path):
    """Trainer(config, base=...) (benchmarks, the Python API) takes the size from the model it was given, not
    from the config's (unset: embedded 64 px) model path."""
    base = load_base_model(None)
    base.pipeline.unet.register_to_config(sample_size=16)  # made for 128 px
    assert base.native_resolution == 128
    trainer = make(sepia, tmp_path, base=base)
    assert trainer.config.resolution == [128, 128]
    assert "resolution unset: the base model's native size, 128x128" in trainer.report.notes
