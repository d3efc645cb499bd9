"""`lorakit train` with dora_wd on the embedded tiny model: the loss falls, and the saved file, loaded fresh,
gives the trained network's outputs (input axis, the default, and the output axis)."""
import json

import numpy as np
import pytest
import torch

from lorakit.formats.files import load_network_file
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.inspect_file import inspect_file
from lorakit.models import styles
from lorakit.models.checkpoint import load_base_model
from lorakit.training.config import build_config
from lorakit.training.trainer import Trainer

from conftest import train_config, unet_inputs


def unet_output(unet, inputs):
    x, t, ctx, _ = inputs
    with torch.no_grad():
        return unet(x, t, ctx).sample


def check_reload(trainer, path, axis, name):
    """The saved file on a freshly loaded base model gives the trained network's U-Net output."""
    unet = trainer.base.pipeline.unet
    inputs = unet_inputs(unet)
    trained = unet_output(unet, inputs)
    fresh = load_base_model(trainer.config.pretrained_model_name_or_path or None).pipeline.unet
    base = unet_output(fresh, inputs)
    load_network_file(path, fresh)
    reloaded = unet_output(fresh, inputs)
    assert (reloaded - base).abs().max() > 1e-5  # training moved the adapters off the no-op start
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    assert set(inspect_file(path)["algorithm_labels"]) == {f"{name}+DoRA ({axis} axis)"}


@pytest.mark.parametrize("algo,wd_on_output,detach", [("lora", False, False), ("lokr", True, False),
                                                      ("lora", True, True)])
def test_short_dora_run_saves_a_file_that_reloads(tiny_folder, images, tmp_path, algo, wd_on_output, detach):
    cfg = train_config(tiny_folder, images, tmp_path, algo=algo, conv_dim=4, conv_alpha=2, max_train_steps=3,
                       network_module="lycoris.kohya", dora_wd=True, wd_on_output=wd_on_output,
                       dora_detach_norm=detach, network_train_unet_only=True, learning_rate=1e-2,
                       save_precision="float")
    trainer = Trainer(cfg)
    assert {a.dora_detach_norm for a in trainer.network.adapters.values()} == {detach}
    path = trainer.run().files[-1]
    args = json.loads(read_safetensors(path)[1]["ss_network_args"])
    assert args.get("dora_detach_norm") == ("True" if detach else None)
    check_reload(trainer, path, "output" if wd_on_output else "input", {"lora": "LoRA", "lokr": "LoKr"}[algo])


@pytest.mark.parametrize("algo,wd_on_output", [("lora", False), ("loha", True)])  # 16 s each on 2 quiet cores
def test_dora_training_loss_falls_and_the_file_reloads(tmp_path, algo, wd_on_output):
    data = styles.write_style_dataset(tmp_path / "data", count=8, repeats=5, seed=0, style="sepia")
    cfg = build_config(dict(train_data_dir=str(data), resolution=64, train_batch_size=4, max_train_epochs=4,
                            network_dim=8, network_alpha=8, conv_dim=4, conv_alpha=4, learning_rate=3e-3,
                            network_module="lycoris.kohya", algo=algo, dora_wd=True, wd_on_output=wd_on_output,
                            network_train_unet_only=True, seed=0, save_precision="float",
                            output_dir=str(tmp_path / "out")))
    trainer = Trainer(cfg)
    magnitudes = {n: p.detach().clone() for n, p in trainer.network.named_parameters() if n.endswith("magnitude")}
    assert magnitudes and all(p.requires_grad for n, p in trainer.network.named_parameters() if n in magnitudes)
    result = trainer.run()
    losses = np.array(result.losses)
    assert len(losses) == 40
    assert losses[-10:].mean() < 0.85 * losses[:10].mean(), losses
    moved = [float((p.detach() - magnitudes[n]).abs().max()) for n, p in trainer.network.named_parameters()
             if n in magnitudes]
    assert max(moved) > 1e-4  # the magnitude trains, not only the direction
    check_reload(trainer, result.files[-1], "output" if wd_on_output else "input",
                 {"lora": "LoRA", "loha": "LoHa"}[algo])
