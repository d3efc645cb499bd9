"""Real-world-shaped sd-scripts configs run unchanged on the embedded model, with only paths swapped.

tests/kohya_configs/ holds six configs modelled on the sd-scripts docs and common Colab / kohya_ss setups
(SD1.5 LoRA, SD1.5 LoCon, LyCORIS LoHa with a preset, LyCORIS LoKr, SDXL LoRA, a two-subset dataset TOML).
Each is read as sd-scripts would read it; only the model path (-> the embedded tiny model) and the data and
output folders are swapped. The fast test caps the run at 2 steps and resolution 64 for CI; the slow one
trains each config's own schedule and resolution.
"""
import random
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from lorakit.formats.files import load_network_file
from lorakit.models import shapes
from lorakit.models.checkpoint import load_base_model
from lorakit.training.config import build_config, read_config_values
from lorakit.training.trainer import train

CONFIGS = Path(__file__).parent / "kohya_configs"
RUN_CONFIGS = ["sd15_lora", "sd15_locon", "lycoris_loha_preset", "lycoris_lokr", "sdxl_lora", "two_subsets"]
PATH_KEYS = ("train_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(count):
        scene = rng.choice(shapes.all_scenes())
        Image.fromarray(shapes.render(scene, rng)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"sks, {scene.caption}")


def swapped(name: str, tmp_path: Path) -> dict:
    """The config's raw keys, with the model path removed (embedded model) and folders moved to tmp_path."""
    raw = read_config_values(CONFIGS / f"{name}.toml")
    raw.pop("pretrained_model_name_or_path")
    for key in PATH_KEYS:
        if key in raw:
            raw[key] = str(tmp_path / key)
    if "train_data_dir" in raw:
        write_images(tmp_path / "train_data_dir" / "2_sks shape", 3, 0)
    if "reg_data_dir" in raw:
        write_images(tmp_path / "reg_data_dir" / "1_shape", 2, 1)
    if "sample_prompts" in raw:  # kohya's prompt syntax, sized for the embedded 64 px model
        raw["sample_prompts"] = str(tmp_path / "prompts.txt")
        (tmp_path / "prompts.txt").write_text("sks, a red circle --n blurry --w 64 --h 64 --d 1 --l 5 --s 2\n")
    if "dataset_config" in raw:
        dataset = tomllib.loads((CONFIGS / raw["dataset_config"]).read_text())
        text = (CONFIGS / raw["dataset_config"]).read_text()
        for n, subset in enumerate(dataset["datasets"][0]["subsets"]):
            folder = tmp_path / f"subset{n}"
            write_images(folder, 3, n)
            text = text.replace(subset["image_dir"], str(folder))
        (tmp_path / "dataset.toml").write_text(text)
        raw["dataset_config"] = str(tmp_path / "dataset.toml")
    return raw


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_config_is_accepted_as_sd_scripts_reads_it(name, tmp_path):
    config = build_config(swapped(name, tmp_path), name)
    assert config.pretrained_model_name_or_path is None
    for note in config.notes:  # every kohya key without effect is said, with why
        assert ": accepted, no effect: " in note or "has no effect" in note


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_config_trains_on_the_embedded_model(name, tmp_path):
    raw = swapped(name, tmp_path)
    raw.pop("max_train_epochs", None)
    raw.update(max_train_steps=2, resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    if "dataset_config" in raw:
        text = Path(raw["dataset_config"]).read_text().replace("resolution = 512", "resolution = 64")
        text = text.replace("min_bucket_reso = 256", "min_bucket_reso = 64").replace(
            "max_bucket_reso = 1024", "max_bucket_reso = 128")
        Path(raw["dataset_config"]).write_text(text)
    result = train(build_config(raw, name))
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    base = load_base_model(None)
    _, report = load_network_file(result.files[-1], base.pipeline.unet, base.text_encoders, apply=False)
    assert report.loaded > 0 and not report.unmatched


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_config_trains_unchanged_on_the_embedded_model(name, tmp_path):
    result = train(build_config(swapped(name, tmp_path), name))
    assert result.steps > 0 and all(loss == loss for loss in result.losses)
