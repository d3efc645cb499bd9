"""Bad dataset TOMLs, folders, images and model folders through `lorakit train` / `check-dataset` (issue 14).

Like test_bad_inputs.py: one clear message naming the file and key, no traceback, nothing lost. The
train runs that should succeed check that every skipped file is named and that strict_dataset refuses them.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from lorakit.cli import main
from lorakit.models import shapes


def good_images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        scene = rng.choice(shapes.all_scenes())
        Image.fromarray(shapes.render(scene, rng)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(scene.caption)
    return folder


def dataset_toml(tmp: Path, body: str) -> list[str]:
    good_images(tmp / "imgs")
    (tmp / "ds.toml").write_text(body.replace("IMGS", str(tmp / "imgs")))
    (tmp / "t.toml").write_text(f'dataset_config = "{tmp / "ds.toml"}"\nresolution = 64\nmax_train_steps = 1\n'
                                f'output_dir = "{tmp / "out"}"\n')
    return ["train", str(tmp / "t.toml")]


def subset(extra: str = "", dataset: str = "") -> str:
    return f'[[datasets]]\n{dataset}\n[[datasets.subsets]]\nimage_dir = "IMGS"\n{extra}\n'


TOML_CASES = [
    ("bucket steps 0", subset(dataset="bucket_reso_steps = 0"), ["bucket_reso_steps = 0 is outside"]),
    ("batch 0", subset(dataset="batch_size = 0"), ["batch_size = 0 is outside"]),
    ("resolution big", subset(dataset='resolution = "big"'), ["resolution = 'big'"]),
    ("repeats ten", subset('num_repeats = "ten"'), ["num_repeats = 'ten' is not a valid int"]),
    ("repeats 0", subset("num_repeats = 0"), ["num_repeats = 0 is outside"]),
    ("unknown subset key", subset("num_repeat = 2"), ["unknown key 'num_repeat'", "did you mean 'num_repeats'"]),
    ("no image_dir", "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 1\n", ["needs image_dir"]),
    ("no datasets", "[general]\nshuffle_caption = true\n", ["no [[datasets]]"]),
    ("buckets crossed", subset(dataset="enable_bucket = true\nmin_bucket_reso = 512\nmax_bucket_reso = 128"),
     ["min_bucket_reso"]),
    ("bad syntax", "[[datasets]\n", ["cannot read dataset TOML"]),
    ("tag dropout 2", subset("caption_tag_dropout_rate = 2.0"), ["caption_tag_dropout_rate = 2.0 is outside"]),
    ("several at once", subset('num_repeats = 0\nflip_aug = "maybe"', "batch_size = -1"),
     ["3 problem(s)", "num_repeats = 0", "flip_aug = 'maybe'", "batch_size = -1"]),
]


@pytest.mark.parametrize("name,body,expect", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_dataset_toml(name, body, expect, tmp_path, capsys):
    rc = main(dataset_toml(tmp_path, body))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    for part in expect:
        assert part in err, (part, err)
    assert "ds.toml" in err


def folder_run(tmp: Path, extra: str = "") -> list[str]:
    resolution = "" if "resolution" in extra else "resolution = 64\n"
    (tmp / "t.toml").write_text(f'train_data_dir = "{tmp / "data"}"\n{resolution}max_train_steps = 1\n'
                                f'train_batch_size = 2\noutput_dir = "{tmp / "out"}"\n{extra}')
    return ["train", str(tmp / "t.toml")]


def broken_files(folder: Path) -> list[str]:
    (folder / "empty.png").write_bytes(b"")
    full = (folder / "0.png").read_bytes()
    (folder / "cut.png").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("not an image")
    Image.new("L", (9000, 9000)).save(folder / "bomb.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    return ["empty.png", "cut.png", "text.png", "bomb.png", "dangling.png"]


def test_train_names_every_file_it_skips_and_strict_dataset_refuses_them(tmp_path, capsys):
    folder = good_images(tmp_path / "data" / "1_shape", 3)
    (folder / "2.txt").unlink()  # a missing caption is named too
    names = broken_files(folder)
    assert main(folder_run(tmp_path)) == 0
    err = capsys.readouterr().err
    for name in names:
        assert f"skipped: {folder / name}" in err, (name, err)
    assert "2.png" in err and "caption" in err
    assert main(folder_run(tmp_path, "strict_dataset = true\n")) == 2
    err = capsys.readouterr().err
    assert "strict_dataset = true and 5 file(s) cannot be used" in err and all(n in err for n in names)


def test_check_dataset_survives_a_dangling_symlink(tmp_path, capsys):
    folder = good_images(tmp_path / "data" / "1_shape")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    assert main(["check-dataset", str(tmp_path / "data")]) == 0
    assert "dangling.png: cannot be read" in capsys.readouterr().out


@pytest.mark.parametrize("folder_name,expect", [("0_shape", "0 repeats"), ("shape", "no `<repeats>_<class tokens>`")])
def test_folder_names_that_would_give_no_batches(folder_name, expect, tmp_path, capsys):
    good_images(tmp_path / "data" / folder_name)
    assert main(folder_run(tmp_path)) == 2
    assert expect in capsys.readouterr().err


@pytest.mark.parametrize("extra,expect", [
    ("clip_skip = 5\n", "clip_skip = 5, but the text encoder has 2 layers"),
    ("resolution = 100\n", "resolution 100 is not a multiple of 64"),
    ('resolution = "64,72"\n', "resolution 72 is not a multiple of 64"),
])
def test_settings_the_model_cannot_take(extra, expect, tmp_path, capsys):
    good_images(tmp_path / "data" / "1_shape")
    assert main(folder_run(tmp_path, extra)) == 2
    assert expect in capsys.readouterr().err


def model_folder(tmp: Path, index: dict | str) -> str:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("index,expect", [
    ("{not json", "is not valid JSON"),
    ({"_class_name": "KandinskyPipeline"}, "_class_name 'KandinskyPipeline' is not a Stable Diffusion pipeline"),
    ({"_class_name": "StableDiffusionPipeline", "unet": ["my_pipeline", "MyUNet"]}, "custom pipeline"),
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
     "cannot be loaded as a diffusers folder"),
])
def test_bad_diffusers_folders(index, expect, tmp_path, capsys):
    good_images(tmp_path / "data" / "1_shape")
    argv = folder_run(tmp_path, f'pretrained_model_name_or_path = "{model_folder(tmp_path, index)}"\n')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err


def test_a_bin_component_is_refused_not_unpickled(tiny_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # diffusers would torch.load a .bin
    good_images(tmp_path / "data" / "1_shape")
    assert main(folder_run(tmp_path, f'pretrained_model_name_or_path = "{folder}"\n')) == 2
    assert "never loads .bin pickles" in capsys.readouterr().err


def test_flags_without_a_config_file(tmp_path, capsys):
    good_images(tmp_path / "data" / "1_shape")
    rc = main(["train", "--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--max_train_steps",
               "1", "--output_dir", str(tmp_path / "out"), "--flip_aug"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "lora.safetensors").is_file()


@pytest.mark.parametrize("line,expect", [("a red circle --w 0", "--w 0 is below 8"),
                                         ("a red circle --h -8", "--h -8 is below 8"),
                                         ("a red circle --l nan", "--l needs a finite number"),
                                         ("a red circle --q 3", "--q is not supported")])
def test_bad_sample_prompts_are_named_before_training(line, expect, tmp_path, capsys):
    good_images(tmp_path / "data" / "1_shape")
    (tmp_path / "p.txt").write_text(line + "\n")
    argv = folder_run(tmp_path, f'sample_prompts = "{tmp_path / "p.txt"}"\nsample_every_n_epochs = 1\n')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "p.txt" in err, err


def test_paths_and_sample_prompts_are_reported_together(tmp_path, capsys):
    """One error before any model loads: a missing regularization folder and a bad prompt file at once."""
    good_images(tmp_path / "data" / "1_shape")
    (tmp_path / "p.txt").write_text("a red circle --w 0\n")
    argv = folder_run(tmp_path, f'reg_data_dir = "{tmp_path / "noreg"}"\nsample_prompts = "{tmp_path / "p.txt"}"\n'
                                "sample_every_n_epochs = 1\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 problem(s) found before training" in err and "noreg" in err and "--w 0" in err, err


def test_a_single_file_whose_text_encoder_cannot_be_built_is_one_line(tmp_path, capsys):
    """An SD-looking file with a damaged text encoder (one attention weight of the wrong width)."""
    from safetensors.torch import load_file, save_file

    from lorakit.models.tiny import build_components
    from lorakit.models.checkpoint import save_single_file

    unet, vae, text_encoder = build_components(0)
    path = save_single_file(tmp_path / "m.safetensors", "sd1", unet, vae, [text_encoder])
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()  # 32 -> 31 inputs: no CLIP config fits
    save_file(tensors, str(path))
    good_images(tmp_path / "data" / "1_shape")
    assert main(folder_run(tmp_path, f'pretrained_model_name_or_path = "{path}"\n')) == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("lorakit train: error:"))
    assert "m.safetensors: could not be loaded as SD1.x" in line and "q_proj.weight" in line, line
