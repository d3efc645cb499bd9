"""Learning is real: on the embedded tiny model and a sepia style it has never seen, the training loss
falls and samples (fixed prompts and seeds) carry measurably more of the style with the LoRA applied,
for an attention-only LoRA and for a LoCon."""
import numpy as np
import pytest
import torch

from lorakit.models import styles
from lorakit.models.checkpoint import load_base_model
from lorakit.training.config import build_config
from lorakit.training.trainer import Trainer


def style_of_samples(pipe, prompts, seeds=(0, 1)) -> float:
    scores = []
    for prompt in prompts:
        for seed in seeds:
            image = pipe(prompt, num_inference_steps=12, guidance_scale=5.0, height=64, width=64,
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            scores.append(styles.sepia_score((image * 255).round().astype(np.uint8)))
    return float(np.mean(scores))


@pytest.mark.parametrize("conv_dim", [0, 8])
def test_loss_falls_and_samples_move_towards_the_style(tmp_path, conv_dim):
    data = styles.write_style_dataset(tmp_path / "data", count=8, repeats=5, seed=0, style="sepia")
    cfg = build_config(dict(train_data_dir=str(data), resolution=64, train_batch_size=4, max_train_epochs=6,
                            network_dim=8, network_alpha=8, conv_dim=conv_dim, conv_alpha=8 if conv_dim else None,
                            learning_rate=3e-3, network_train_unet_only=True, seed=0,
                            output_dir=str(tmp_path / "out")))
    trainer = Trainer(cfg)  # no base model given: the embedded tiny model
    prompts = styles.style_prompts(3)
    pipe = trainer.base.pipeline
    trainer.network.set_multiplier(0.0)
    before = style_of_samples(pipe, prompts)
    trainer.network.set_multiplier(1.0)
    vae, text_encoder = pipe.vae, pipe.text_encoder  # the run releases them after caching; kept here to render
    result = trainer.run()
    pipe.vae, pipe.text_encoder = vae, text_encoder
    losses = np.array(result.losses)
    assert len(losses) == 60
    assert losses[-15:].mean() < 0.8 * losses[:15].mean(), losses
    after = style_of_samples(pipe, prompts)
    assert after > before + 0.1, (before, after)

    # the same file, loaded fresh on the base model, reproduces the effect
    fresh = load_base_model().pipeline
    fresh.set_progress_bar_config(disable=True)
    from lorakit.formats.files import load_network_file

    load_network_file(result.files[-1], fresh.unet, [fresh.text_encoder])
    assert style_of_samples(fresh, prompts) == pytest.approx(after, abs=0.02)  # saved as fp16
