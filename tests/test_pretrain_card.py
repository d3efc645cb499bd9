"""The pretraining script's measurement and model card, with a stand-in generator: no model is trained here."""
import random
import shlex
import types

import numpy as np

from lorakit.models import pretrain, shapes


class RenderingPipe:
    """Stands in for the diffusion pipeline: draws each prompt's scene (or a wrong one) with the renderer."""

    def __init__(self, wrong_colour: bool = False, blur: bool = False):
        self.wrong_colour, self.blur = wrong_colour, blur

    def __call__(self, prompts, **kwargs):
        images = []
        for index, prompt in enumerate(prompts):  # the same image for the same (prompt, index) on every call
            scene = shapes.Scene.parse(prompt)
            if self.wrong_colour:
                others = [c for c in shapes.PALETTE if c not in (scene.colour, scene.background)]
                scene = shapes.Scene(others[0], scene.shape, scene.background, scene.position, scene.size)
            image = shapes.render(scene, random.Random(f"{prompt} {index}")).astype(np.float32)
            if self.blur:  # a smeared outline: still the nearest template, no longer a clean one
                image = (image + np.roll(image, 3, 0) + np.roll(image, 3, 1) + np.roll(image, -3, 1)) / 4
            images.append(image / 255)
        return types.SimpleNamespace(images=np.stack(images))


def test_evaluate_scores_right_wrong_and_smeared_images():
    prompts = pretrain.held_out_prompts(0)[:4]
    right = pretrain.evaluate(RenderingPipe(), prompts, seeds=2)
    assert right["accuracy"] == right["strict_accuracy"] == 1.0 and right["images"] == 8
    assert set(right["per_prompt"].values()) == {1.0}
    wrong = pretrain.evaluate(RenderingPipe(wrong_colour=True), prompts, seeds=2)
    assert wrong["accuracy"] == wrong["colour_accuracy"] == 0.0 and wrong["shape_accuracy"] == 1.0
    smeared = pretrain.evaluate(RenderingPipe(blur=True), prompts, seeds=2)
    images = np.concatenate([RenderingPipe(blur=True)([p] * 2).images for p in prompts])
    pixels = [(im * 255).round().astype(np.uint8) for im in images]
    plain = [shapes.judge(px) for px in pixels]  # the evaluator must agree with judge(), plain and strict
    strict = [shapes.judge(px, shapes.STRICT_IOU) for px in pixels]
    wanted = [(s.colour, s.shape) for s in map(shapes.Scene.parse, prompts) for _ in range(2)]
    assert smeared["accuracy"] == np.mean([p == w for p, w in zip(plain, wanted)])
    assert smeared["strict_accuracy"] == np.mean([p == s == w for p, s, w in zip(plain, strict, wanted)])
    assert smeared["strict_accuracy"] < smeared["accuracy"]


def test_model_card_rebuild_command_reproduces_the_arguments(tmp_path):
    argv = ["--out", "src/lorakit/data/tiny-sd", "--vae-steps", "30", "--vae-textured-share", "0.1",
            "--vae-sepia-share", "0.3", "--steps", "40", "--batch", "8", "--seed", "2", "--threads", "1"]
    args = pretrain.build_parser().parse_args(argv)
    result = pretrain.evaluate(RenderingPipe(), pretrain.held_out_prompts(0)[:3], seeds=2)
    result["all_positions_sizes"] = pretrain.evaluate(RenderingPipe(), pretrain.held_out_prompts(0)[:2], seeds=2)
    vae_eval = {"roundtrip_accuracy": 0.8, "stripe_kept": 0.0, "images": 200}
    pretrain.write_model_card(tmp_path, args, 0.03, 0.02, 95.0, result, vae_eval)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    command = card.split("**Rebuild**: `")[1].split("`")[0]
    assert command.startswith("python -m lorakit.models.pretrain ")
    assert pretrain.build_parser().parse_args(shlex.split(command)[3:]) == args
    assert "of the 3 held-out prompts, 3 are right for every seed, 0 for none" in card
    assert "from scratch in 95 minutes of 1-thread" in card and "30%" in card


def test_percent_prints_a_near_zero_share_as_zero_and_keeps_real_negatives():
    assert pretrain.percent(-8e-5) == "0%" and pretrain.percent(0.004) == "0%"
    assert pretrain.percent(-0.2) == "-20%" and pretrain.percent(0.93) == "93%"
