"""Metrics on images where the answer is known, verdicts, grid layout and JSON, sweeps that resume."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from lorakit.evaluation import diagnose, metrics
from lorakit.evaluation.grid import (Axis, Cell, GridError, GridSpec, Renderer, compose, label_font, layout, page_title,
                                     render_grid, with_baseline, wrap)
from lorakit.evaluation.runs import EvalPlan, epoch_files
from lorakit.evaluation.sweep import Variant, parse_axis, run_sweep, variants
from lorakit.models import shapes, styles
from lorakit.training.config import ConfigError


def scene_images(n=6, seed=0):
    rng = random.Random(seed)
    return [shapes.render(rng.choice(shapes.all_scenes()), rng) for _ in range(n)]


def test_saturation_is_higher_for_saturated_images():
    grey = np.full((16, 16, 3), 128, np.uint8)
    pale = np.zeros((16, 16, 3), np.uint8) + np.array([200, 150, 150], np.uint8)
    vivid = np.zeros((16, 16, 3), np.uint8) + np.array([250, 10, 10], np.uint8)
    assert metrics.saturation([grey]) == 0.0
    assert metrics.saturation([grey]) < metrics.saturation([pale]) < metrics.saturation([vivid])
    assert metrics.saturation([vivid]) == pytest.approx(240 / 250)


def test_added_noise_raises_the_artefact_score():
    clean = scene_images(4)
    rng = np.random.default_rng(0)
    noisy = [np.clip(i + rng.normal(0, 40, i.shape), 0, 255).astype(np.uint8) for i in clean]
    assert metrics.artefacts(clean) < 0.05 < metrics.artefacts(noisy)
    assert metrics.artefacts(noisy) > 5 * metrics.artefacts(clean)


def test_identical_seeds_give_zero_diversity_and_different_images_more():
    image = scene_images(1)[0]
    assert metrics.diversity([image, image.copy(), image.copy()]) == 0.0
    assert metrics.diversity(scene_images(3)) > 0.1


def test_fidelity_is_zero_on_the_data_and_grows_with_a_different_style():
    data = scene_images(8, seed=0)
    same_kind = scene_images(8, seed=1)
    striped = [styles.striped(i) for i in scene_images(8, seed=1)]
    assert metrics.fidelity(data, data) == 0.0
    assert metrics.fidelity(same_kind, data) < metrics.fidelity(striped, data)
    assert metrics.fidelity(striped, [styles.striped(i) for i in data]) < metrics.fidelity(same_kind,
                                                                                             [styles.striped(i) for i in data])


def test_drift_is_zero_for_unchanged_images_and_needs_pairs():
    images = scene_images(3)
    assert metrics.drift(images, [i.copy() for i in images]) == 0.0
    assert metrics.drift(images, [255 - i for i in images]) > 0.3
    with pytest.raises(ValueError, match="paired"):
        metrics.drift(images, images[:2])


def test_verdicts_name_the_brief_remedies_with_numbers():
    base = {"saturation": 0.5, "artefacts": 0.01, "diversity": 0.3, "fidelity": 1.0}
    data = {"saturation": 0.55, "artefacts": 0.01}
    good = {"saturation": 0.52, "artefacts": 0.012, "diversity": 0.28, "fidelity": 0.4, "drift": 0.02}
    burnt = {**good, "saturation": 0.8, "artefacts": 0.05}
    weak = {**good, "fidelity": 0.9}
    baked = {**good, "drift": 0.2}
    assert [v.kind for v in diagnose.diagnose(good, base, data, conv_dim=8)] == ["good"]
    over = diagnose.diagnose(burnt, base, data)[0]
    assert over.kind == "overfit" and "lower the learning rate" in over.remedy and "0.800 > 0.600" in over.line()
    assert diagnose.diagnose(weak, base, data)[0].kind == "underfit"
    style = diagnose.diagnose(baked, base, data, conv_dim=8)[0]
    assert style.kind == "style baked in" and "lower conv_alpha only" in style.remedy
    assert "network_alpha" in diagnose.diagnose(baked, base, data, conv_dim=0)[0].remedy
    epoch, why = diagnose.best_epoch({1: weak, 2: good, 3: burnt}, base, data)
    assert epoch == 2 and "without overfitting" in why


def test_axes_parse_and_refuse_unknown_names():
    assert Axis.parse("multiplier=0,0.5,1").values == [0.0, 0.5, 1.0]
    assert Axis.parse("prompt=a red circle, top left|a blue square").values == ["a red circle, top left",
                                                                                "a blue square"]
    with pytest.raises(GridError, match="unknown grid axis 'multiplyer'"):
        Axis.parse("multiplyer=1")
    assert with_baseline(Axis("lora", ["a.safetensors"])).values == ["none", "a.safetensors"]


def test_grid_layout_cells_labels_and_json(tiny_folder, tmp_path):
    spec = GridSpec(Cell(prompt="a red circle on a blue background, center", steps=2),
                    x=Axis("seed", [1, 2, 3]), y=Axis("cfg", [1.0, 4.0]))
    meta = render_grid(Renderer(str(tiny_folder)), spec, tmp_path)
    assert len(meta["cells"]) == 6 and meta["pages"] == ["grid.png"]
    assert {(c["x"], c["y"]) for c in meta["cells"]} == {(i, j) for i in range(3) for j in range(2)}
    cell = next(c for c in meta["cells"] if c["x"] == 2 and c["y"] == 1)
    assert cell["seed"] == 3 and cell["cfg"] == 4.0 and (tmp_path / cell["file"]).is_file()
    sheet = Image.open(tmp_path / "grid.png")
    plan = layout((64, 64), 3, [spec.x.label(v) for v in spec.x.values], [spec.y.label(v) for v in spec.y.values],
                  spec.cell.prompt)
    assert plan.scale == 3 and plan.cell == (192, 192) and sheet.size == plan.size  # 64 px cells enlarged x3
    tile = Image.open(tmp_path / cell["file"]).resize((192, 192), Image.NEAREST)
    x, y = plan.origin(2, 1)
    assert np.array_equal(np.asarray(sheet.crop((x, y, x + 192, y + 192))), np.asarray(tile))
    assert json.loads((tmp_path / "grid.json").read_text())["axes"]["x"] == {"name": "seed", "values": [1, 2, 3]}
    # a cell is the same image as generated alone
    alone = Renderer(str(tiny_folder)).image(Cell(prompt=spec.cell.prompt, steps=2, seed=3, cfg=4.0))
    assert np.array_equal(np.asarray(Image.open(tmp_path / cell["file"])), alone)


def test_grid_labels_wrap_whole_and_a_prompt_axis_gets_no_title_row():
    font = label_font()
    name = "conv_dim-8_conv_alpha-4_network_dim-16_network_alpha-8"
    lines = wrap(name, font, 120)
    assert len(lines) > 1 and "".join(lines) == name  # broken after _ or -, never cut
    assert all(font.getlength(line) <= 120 for line in lines)
    prompt = "a red circle on a blue background, center"
    assert " ".join(wrap(prompt, font, 100)) == prompt
    assert "".join(wrap("x" * 50, font, 60)) == "x" * 50  # one long word: broken inside, nothing lost
    cell = Cell(prompt=prompt)
    assert page_title(GridSpec(cell, x=Axis("lora", ["none"]), y=Axis("prompt", [prompt, "a cat"])), 0) == ""
    assert page_title(GridSpec(cell, x=Axis("seed", [1, 2])), 0) == prompt


def test_grid_sheet_enlarges_small_cells_and_sizes_the_prompt_column_to_them():
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]
    prompts = ["a red circle on a blue background, center, with a long tail of words", "a cat"]
    x_labels = ["no LoRA", "conv_dim-8_conv_alpha-4_network_dim-16"]
    sheet = compose(images, x_labels, prompts)
    plan = layout((64, 64), 2, x_labels, prompts)
    assert sheet.size == plan.size and plan.cell == (192, 192) and plan.title == []
    assert plan.left <= 192 + 16  # the prompt column is no wider than a cell
    assert plan.x_lines[1] == ["conv_dim-8_conv_alpha-4_", "network_dim-16"]
    assert " ".join(plan.y_lines[0]) == prompts[0]
    for j, row in enumerate(images):
        for i, image in enumerate(row):
            x, y = plan.origin(i, j)
            enlarged = np.asarray(Image.fromarray(image).resize((192, 192), Image.NEAREST))
            assert np.array_equal(np.asarray(sheet.crop((x, y, x + 192, y + 192))), enlarged)
    big = layout((512, 512), 1, ["a"], None)
    assert big.scale == 1 and big.cell == (512, 512)  # full-size images are not enlarged


def test_sweep_variants_resolve_relative_alphas_and_drop_conv_settings_without_conv():
    chosen = variants({"network_dim": 8}, [parse_axis("conv_dim=0,8"), parse_axis("conv_alpha=1,half,equal")])
    assert [v.settings for v in chosen] == [{"conv_dim": "0"}, {"conv_dim": "8", "conv_alpha": "1"},
                                            {"conv_dim": "8", "conv_alpha": 4.0}, {"conv_dim": "8", "conv_alpha": 8.0}]
    with pytest.raises(ConfigError, match="did you mean 'conv_dim'"):
        parse_axis("conv_dims=1,2")


def test_sweep_trains_every_variant_once_and_resumes(tiny_folder, images, tmp_path, monkeypatch):
    import lorakit.evaluation.sweep as sweep_module

    base = dict(pretrained_model_name_or_path=str(tiny_folder), train_data_dir=str(images), resolution=64,
                train_batch_size=2, max_train_epochs=2, network_dim=4, network_alpha=2, learning_rate=1e-3, seed=1)
    plan = EvalPlan(prompts=["a red circle on a blue background, center"], unrelated=["a green square"],
                    seeds=[0], steps=2)
    axes = [parse_axis("conv_dim=0,4")]
    # the first variant finishes; the second is interrupted after its first epoch (state saved)
    sweep_module.train_variant(base, Variant("conv_dim-0", {"conv_dim": "0"}), tmp_path)
    trained = []
    real_trainer = sweep_module.Trainer

    class CountingTrainer(real_trainer):
        def run(self):
            trained.append((self.config.output_name, self.config.resume is not None))
            return super().run()

    monkeypatch.setattr(sweep_module, "Trainer", CountingTrainer)
    second = variants(base, axes)[1]
    state_source = run_partially(base, second, tmp_path)
    summary = run_sweep(base, axes, tmp_path, plan)
    assert trained == [("conv_dim-4", True)]  # resumed from its epoch-1 state
    assert not state_source.exists()  # a finished variant drops its resume state
    assert sorted(epoch_files(tmp_path / "conv_dim-4", "conv_dim-4")) == [1, 2]
    assert [e["name"] for e in summary["evaluations"]] == ["conv_dim-0", "conv_dim-4"]
    report = (tmp_path / "report.html").read_text()
    assert "conv_dim-4" in report and "data:image/png;base64," in report and "<svg" in report
    assert run_sweep(base, axes, tmp_path, plan) and len(trained) == 1  # all done: nothing retrained


def run_partially(base, variant, root):
    """Train a variant for one epoch with the sweep's settings, leaving its epoch-1 state behind."""
    from lorakit.training.config import build_config
    from lorakit.training.trainer import Trainer

    folder = root / variant.name
    values = {**base, **variant.settings, "output_dir": str(folder), "output_name": variant.name,
              "save_state": True, "save_every_n_epochs": 1, "max_train_epochs": 2}
    trainer = Trainer(build_config(values))
    real = trainer.end_of_epoch

    def stop_after_first(progress, total):
        real(progress, total)
        raise KeyboardInterrupt

    trainer.end_of_epoch = stop_after_first
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return folder / f"{variant.name}-state"


def test_blocks_axis_parses_presets_and_vectors_and_zero_blocks_equal_the_base(tiny_folder, tmp_path):
    from lorakit.formats.files import save_network
    from lorakit.models.checkpoint import load_base_model
    from lorakit.surgery.config import NetworkConfig
    from lorakit.surgery.network import create_network

    from conftest import randomize

    assert Axis.parse("blocks=OUTS,INS").values == ["OUTS", "INS"]
    vector = ",".join(["1"] * 26)
    assert Axis.parse(f"blocks={vector}").values == [vector]
    pipe = load_base_model(str(tiny_folder)).pipeline
    net = create_network(pipe.unet, [pipe.text_encoder], NetworkConfig(network_dim=4, conv_dim=4, conv_alpha=1))
    randomize(net, std=0.2)
    path = save_network(net, tmp_path / "l.safetensors")
    net.restore()
    renderer = Renderer(pipeline=pipe)
    cell = Cell(prompt="a red circle", steps=2, seed=1)
    base = renderer.image(cell)
    full = renderer.image(Cell(**{**cell.__dict__, "lora": str(path)}))
    none = renderer.image(Cell(**{**cell.__dict__, "lora": str(path), "blocks": "NONE"}))
    assert not np.array_equal(base, full) and np.array_equal(base, none)


def test_sweep_spreads_variants_over_several_devices(tiny_folder, images, tmp_path):
    """Two 'devices' (both the CPU here): one spawned worker each, every variant trained exactly once."""
    from lorakit.evaluation.sweep import train_spread

    base = dict(pretrained_model_name_or_path=str(tiny_folder), train_data_dir=str(images), resolution=64,
                train_batch_size=2, max_train_steps=2, network_dim=4, network_alpha=2, seed=1)
    chosen = variants(base, [parse_axis("network_dim=2,4,8")])
    train_spread(base, chosen, tmp_path, ["cpu", "cpu"])
    for variant in chosen:
        done = json.loads((tmp_path / variant.name / "done.json").read_text())
        assert done["steps"] == 2 and done["settings"] == variant.settings


def test_report_command_for_one_finished_run(tiny_folder, images, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.training.trainer import Trainer

    from conftest import train_config

    Trainer(train_config(tiny_folder, images, tmp_path, max_train_steps=None, max_train_epochs=2,
                         save_every_n_epochs=1)).run()
    out = tmp_path / "out"
    assert main(["report", str(out), "--name", "t", "--prompt", "a red circle", "--unrelated", "a blue square",
                 "--data", str(images), "--base", str(tiny_folder), "--seeds", "1", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "best epoch" in printed and (out / "report.html").is_file()
    page = (out / "report.html").read_text()
    assert "lorakit run: t" in page and "train (smoothed)" in page and "‖ΔW‖ per block" in page
