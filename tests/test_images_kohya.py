"""kohya's image keys: buckets (top level = dataset TOML, bucket_no_upscale), color_aug / random_crop encoded
per micro-batch from its generator, reg images cycled to the train count and weighted by prior_loss_weight,
and alpha masks that zero the loss where alpha is 0."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.models import objectives as obj
from lorakit.models.styles import write_style_dataset
from lorakit.training import augment, data
from lorakit.training import dataset as ds
from lorakit.training.buckets import bucket_resolutions, no_upscale_bucket
from lorakit.training.config import ConfigError, build_config
from lorakit.training.prepare import prepare_dataset
from lorakit.training.state import Progress
from lorakit.training.trainer import RunState, Trainer, TrainResult, derived_seed

from conftest import train_config


def save(path, size, color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def noisy_image(path, size, seed=0):
    """Random pixels, so that any crop offset or recolouring shows in the tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path)
    return path


# ---- buckets ----------------------------------------------------------------------------------------------------
def test_bucket_set_is_kohyas_make_bucket_resolutions():
    # A = 128², s = 64: the square floor(128/64)·64 = 128; w = 64 -> h = min(256, 256); 128 -> 128;
    # 192 -> floor(85/64)·64 = 64; 256 -> 64
    assert bucket_resolutions((128, 128), 64, 256, 64) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]


def test_top_level_bucket_keys_equal_the_dataset_toml_ones(tmp_path):
    for name, size in [("wide.png", (120, 60)), ("tall.png", (50, 110)), ("square.png", (90, 90))]:
        save(tmp_path / "train" / "2_thing" / name, size)
    keys = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=256, bucket_reso_steps=32)
    top = build_config(dict(train_data_dir=str(tmp_path / "train"), resolution=96, **keys))
    (spec_top,), report_top = prepare_dataset(top)
    toml = tmp_path / "data.toml"
    toml.write_text(f'''[[datasets]]
resolution = 96
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 256
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'train' / '2_thing'}"
  num_repeats = 2
''')
    (spec_toml,), report_toml = prepare_dataset(build_config(dict(dataset_config=str(toml))))
    # and the top-level keys are the defaults beneath a TOML that does not set them
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{tmp_path / "train" / "2_thing"}"\n')
    (spec_bare,), report_bare = prepare_dataset(build_config(dict(dataset_config=str(bare), resolution=96, **keys)))
    buckets = ds.make_buckets(spec_top)
    assert buckets == ds.make_buckets(spec_toml) == ds.make_buckets(spec_bare)
    assert buckets == bucket_resolutions((96, 96), 32, 256, 32)
    per_image = [{i.path.name: i.bucket for i in r.items} for r in (report_top, report_toml, report_bare)]
    assert per_image[0] == per_image[1] == per_image[2]
    assert per_image[0] == {"wide.png": (128, 64), "tall.png": (64, 128), "square.png": (96, 96)}


def test_bucket_no_upscale_keeps_small_images_and_scales_large_ones_to_the_area(tmp_path):
    # 200x150 at 512: not larger than 512², so unscaled; its bucket is its size rounded down to 64
    assert no_upscale_bucket((200, 150), (512, 512), 64) == ((192, 128), (200, 150))
    # 1024x768 (r = 4/3) at 512: √(512²·4/3) = 591.2 -> 576, 576/r = 432 -> 384 (aspect 1.5); the other side
    # 443.4 -> 384, 384·r = 512 (aspect 4/3, exact): resized (512, 384), bucket (512, 384)
    assert no_upscale_bucket((1024, 768), (512, 512), 64) == ((512, 384), (512, 384))
    small = noisy_image(tmp_path / "1_x" / "small.png", (200, 150))
    save(tmp_path / "1_x" / "tiny.png", (40, 300))  # narrower than one step: no bucket
    config = build_config(dict(train_data_dir=str(tmp_path), enable_bucket=True, bucket_no_upscale=True,
                               resolution=512))
    _, report = prepare_dataset(config)
    (item,) = report.items
    assert (item.bucket, item.resized) == ((192, 128), (200, 150))
    assert any("tiny.png" in p and "no bucket" in p for p in report.problems)
    pixels, _ = data.item_pixels(item)  # a centre crop of the unscaled image: left (200-192)//2, top (150-128)//2
    expected = np.asarray(Image.open(small), dtype=np.float32)[11:139, 4:196].transpose(2, 0, 1) / 127.5 - 1.0
    assert torch.equal(pixels, torch.from_numpy(expected))


def test_bucket_settings_are_checked_as_kohya(tmp_path):
    save(tmp_path / "1_x" / "a.png", (64, 64))
    with pytest.raises(ConfigError, match="bucket_reso_steps = 12 must be a multiple of 8"):
        build_config(dict(train_data_dir=str(tmp_path), enable_bucket=True, bucket_reso_steps=12))
    with pytest.raises(ConfigError, match="min_bucket_reso = 256 is above the resolution's shorter side 64"):
        prepare_dataset(build_config(dict(train_data_dir=str(tmp_path), enable_bucket=True, resolution=64)))
    config = build_config(dict(train_data_dir=str(tmp_path), enable_bucket=True, resolution=64, min_bucket_reso=40,
                               max_bucket_reso=100, bucket_reso_steps=32))
    (spec,), report = prepare_dataset(config)
    assert (spec.min_bucket_reso, spec.max_bucket_reso) == (32, 128)  # kohya: min down, max up to the steps
    assert any("min_bucket_reso 40 -> 32" in n for n in report.notes)


# ---- random_crop and color_aug ------------------------------------------------------------------------------------
def test_random_crop_and_color_aug_draws_come_from_the_micro_batch_generator(tmp_path):
    noisy_image(tmp_path / "1_x" / "wide.png", (96, 64))
    config = build_config(dict(train_data_dir=str(tmp_path), resolution=64, random_crop=True, color_aug=True))
    _, report = prepare_dataset(config)
    (item,) = report.items
    assert item.bucket == (64, 64) and data.is_live(item)
    draws = [data.item_pixels(item, random.Random(derived_seed(1, "micro", m, 0)))[0] for m in range(12)]
    again = data.item_pixels(item, random.Random(derived_seed(1, "micro", 3, 0)))[0]
    assert torch.equal(draws[3], again)  # deterministic given the generator
    assert len({d.numpy().tobytes() for d in draws}) > 6  # and different across micro-batches
    source = np.asarray(Image.open(item.path), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    crops = [torch.from_numpy(source[:, :, x:x + 64].copy()) for x in range(33)]
    offsets = {next((x for x, c in enumerate(crops) if torch.equal(c, d)), None) for d in draws}
    assert len(offsets - {None}) > 3  # the unrecoloured draws are crops at several offsets in [0, 32]
    centre = data.item_pixels(item)[0]  # no generator: kohya's centre crop, no colour change
    assert torch.equal(centre, crops[16])


def test_color_aug_formulas():
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(augment.hue_shift(red, 120.0), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=1e-6)
    assert torch.allclose(augment.hue_shift(red, -120.0), torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), atol=1e-6)
    x = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(augment.hue_shift(x, 0.0), x)
    assert torch.allclose(augment.hue_shift(augment.hue_shift(x, 13.0), -13.0), x)
    hsv_value = x.max(dim=0).values  # a hue rotation keeps V and C
    assert torch.allclose(augment.hue_shift(x, 40.0).max(dim=0).values, hsv_value)
    v = torch.tensor([0.0, 10.0, 200.0, 255.0])
    assert torch.equal(augment.gamma_curve(v, 1.05), torch.tensor([0.0, math.floor(10 ** 1.05), 255.0, 255.0]))
    # kohya's draws: u <= 0.33 augments; then u > 0.5 hue in ±16°, else gamma in [0.95, 1.05]
    drawn = [augment.draw_color_aug(random.Random(s)) for s in range(300)]
    share = sum(d is not None for d in drawn) / len(drawn)
    assert 0.25 < share < 0.41
    assert all(abs(a) <= 16 for k, a in filter(None, drawn) if k == "hue")
    assert all(0.95 <= a <= 1.05 for k, a in filter(None, drawn) if k == "gamma")
    assert {k for k, _ in filter(None, drawn)} == {"hue", "gamma"}


# ---- regularization images ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("train,reg_count,reg_repeats,expected", [
    (6, 4, 1, [2, 2, 1, 1]),  # one pass gives 4 < 6: a second pass adds one each to the first two
    (6, 5, 2, [2, 2, 2, 0, 0]),  # 2 + 2 + 2 reaches 6: the last two are not used
    (3, 1, 1, [3]),
])
def test_reg_images_cycle_to_the_train_count(tmp_path, train, reg_count, reg_repeats, expected):
    for i in range(train // 3):
        save(tmp_path / "train" / "3_dog" / f"{i}.png", (64, 64))
    for i in range(reg_count):
        save(tmp_path / "reg" / f"{reg_repeats}_dog" / f"{i}.png", (64, 64), color=(i, i, i))
    config = build_config(dict(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                               resolution=64, train_batch_size=2))
    _, report = prepare_dataset(config)
    reg = sorted((i for i in report.items if i.subset.is_reg), key=lambda i: i.path.name)
    assert [i.repeats for i in reg] == [r for r in expected if r]
    assert report.num_train_images == train and report.num_reg_images == train
    assert data.batches_per_epoch(report.items, 2) == train  # (train + reg) / 2: the epoch counts both
    plan = data.epoch_batches(report.items, 2, random.Random(0))
    assert sum(report.items[j].subset.is_reg for b in plan for j in b) == train
    if 0 in expected:
        assert any("not used" in n for n in report.notes)


# ---- alpha masks and the loss -------------------------------------------------------------------------------------
def half_transparent(path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (64, 64, 3))
    rgba[:, 32:, 3] = 255  # left half alpha 0, right half opaque
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_masked_loss_without_a_mask_source_is_refused(tmp_path):
    save(tmp_path / "1_x" / "a.png", (64, 64))
    with pytest.raises(ConfigError, match="masked_loss = true has no mask source: set alpha_mask = true"):
        prepare_dataset(build_config(dict(train_data_dir=str(tmp_path), resolution=64, masked_loss=True)))


def trainer_at_step_0(config):
    trainer = Trainer(config)
    trainer.run_state = RunState(None, None, Progress(), None, TrainResult())
    return trainer


def test_reg_weight_and_alpha_mask_reach_the_loss(tiny_folder, images, tmp_path):
    half_transparent(tmp_path / "masked" / "1_cut" / "half.png")
    clear = np.zeros((64, 64, 4), np.uint8)
    Image.fromarray(clear, "RGBA").save(tmp_path / "masked" / "1_cut" / "clear.png")
    write_style_dataset(tmp_path / "reg", count=2, repeats=1)
    trainer = trainer_at_step_0(train_config(tiny_folder, images, tmp_path, reg_data_dir=str(tmp_path / "reg"),
                                             prior_loss_weight=0.25, network_dropout=0.1))
    cache = data.LatentCache.build(trainer.report.items, trainer.vae)
    reg = [j for j, i in enumerate(trainer.report.items) if i.subset.is_reg]
    weighted = trainer.micro_batch(cache, reg, micro=5)
    trainer.config.prior_loss_weight = 1.0
    plain = trainer.micro_batch(cache, reg, micro=5)
    assert weighted.item() == 0.25 * plain.item() and plain.item() > 0  # 0.25 = 2^-2: exact in float

    masked = trainer_at_step_0(train_config(tiny_folder, tmp_path / "masked", tmp_path / "m", alpha_mask=True))
    items = masked.report.items
    cache = data.LatentCache.build(items, masked.vae)
    half, clear = (next(j for j, i in enumerate(items) if i.path.name == n) for n in ("half.png", "clear.png"))
    expected = torch.cat([torch.zeros(1, 8, 4), torch.ones(1, 8, 4)], dim=-1)  # 8x8 blocks of alpha 0 | 1
    assert torch.equal(cache.masks[half], expected) and torch.equal(cache.masks[clear], torch.zeros(1, 8, 8))
    latents, masks = cache.batch([half, clear], random.Random(0))
    assert masks.shape == (2, 1, 8, 8) and torch.equal(masks[0], expected)
    assert masked.micro_batch(cache, [clear, clear], micro=0).item() == 0.0  # alpha 0 everywhere: no loss
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    moved = pred.clone()
    moved[..., :4] += 10.0  # only where alpha is 0
    loss = obj.masked(obj.elementwise_loss(pred, target), masks)
    assert torch.equal(loss, obj.masked(obj.elementwise_loss(moved, target), masks))
    assert torch.equal(loss[0, :, :, :4], torch.zeros(4, 8, 4)) and (loss[0, :, :, 4:] > 0).all()


# ---- a training run with all of them ------------------------------------------------------------------------------
def test_two_steps_with_buckets_augmentation_and_reg_images(tiny_folder, images, tmp_path, capsys):
    wide = next((images / "3_red shape").glob("*.png"))
    Image.open(wide).resize((80, 64)).save(wide)  # room for random_crop to move
    write_style_dataset(tmp_path / "reg", count=3, repeats=1)
    config = train_config(tiny_folder, images, tmp_path, max_train_steps=2, enable_bucket=True, min_bucket_reso=32,
                          max_bucket_reso=128, bucket_reso_steps=32, flip_aug=True, color_aug=True,
                          random_crop=True, reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.5)
    trainer = Trainer(config)
    assert trainer.report.num_train_images == 12 and trainer.report.num_reg_images == 12
    cache = data.LatentCache.build(trainer.report.items, trainer.vae)
    assert all(z is None for z in cache.latents)  # every subset has color_aug/random_crop: nothing cached
    batch = [j for j, i in enumerate(trainer.report.items) if i.path == wide] * 2
    first = cache.batch(batch, random.Random(derived_seed(1, "micro", 0, 0)))[0]
    again = cache.batch(batch, random.Random(derived_seed(1, "micro", 0, 0)))[0]
    other = cache.batch(batch, random.Random(derived_seed(1, "micro", 1, 0)))[0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    result = trainer.run()
    assert result.steps == 2 and all(math.isfinite(v) for v in result.losses)
    assert capsys.readouterr().err.count("latent caching is off for") == 1
