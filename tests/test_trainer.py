"""`lorakit train` end to end on a tiny model folder: files, metadata, conv keys, NaN stop."""
import json

import numpy as np
import pytest

from lorakit.cli import main
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.training.trainer import Trainer, TrainingStopped

from conftest import train_config as config


@pytest.mark.parametrize("conv_dim", [0, 4])
def test_train_writes_loadable_files_with_metadata(tiny_folder, images, tmp_path, conv_dim):
    cfg = config(tiny_folder, images, tmp_path, conv_dim=conv_dim, conv_alpha=1 if conv_dim else None,
                 max_train_steps=None, max_train_epochs=2, save_every_n_epochs=1)
    result = Trainer(cfg).run()
    assert result.steps == 12  # 4 images x 3 repeats / batch 2 = 6 steps per epoch
    assert [p.name for p in result.files] == ["t-000001.safetensors", "t.safetensors"]
    tensors, meta = read_safetensors(result.files[-1])
    has_conv = any("resnets" in k and k.endswith("lora_down.weight") and tensors[k].dim() == 4
                   and tensors[k].shape[-1] == 3 for k in tensors)
    assert has_conv == bool(conv_dim)
    assert meta["ss_steps"] == "12" and meta["ss_num_train_images"] == "12"
    assert json.loads(meta["ss_tag_frequency"])["3_red shape"]
    assert all(np.isfinite(result.losses))


def test_nan_loss_stops_with_a_clear_message_and_keeps_earlier_files(tiny_folder, images, tmp_path, monkeypatch):
    cfg = config(tiny_folder, images, tmp_path, max_train_steps=None, max_train_epochs=3, save_every_n_epochs=1)
    trainer = Trainer(cfg)
    real_loss, calls = trainer.loss, {"n": 0}

    def loss_then_nan(*args, **kwargs):
        calls["n"] += 1
        value = real_loss(*args, **kwargs)
        return value * float("nan") if calls["n"] > 8 else value

    monkeypatch.setattr(trainer, "loss", loss_then_nan)
    with pytest.raises(TrainingStopped, match="loss became nan at step 9"):
        trainer.run()
    assert (tmp_path / "out" / "t-000001.safetensors").is_file()
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_train_cli_checks_config_before_loading(tiny_folder, images, tmp_path, capsys):
    toml = tmp_path / "t.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{tiny_folder}"\ntrain_data_dir = "{images}"\nresolution = 64\n'
                    f'max_train_steps = 2\noutput_dir = "{tmp_path / "cli"}"\nnetwork_dim = 4\n')
    assert main(["train", str(toml), "--conv_dim", "4", "--conv_alpha", "2"]) == 0
    assert "saved" in capsys.readouterr().out and (tmp_path / "cli" / "lora.safetensors").is_file()
    assert main(["train", str(toml), "--netwrok_dim", "4"]) == 2
    assert "did you mean 'network_dim'" in capsys.readouterr().err


def test_bf16_autocast_and_gradient_checkpointing_train_only_the_adapters(tiny_folder, images, tmp_path):
    import torch

    cfg = config(tiny_folder, images, tmp_path, mixed_precision="bf16", gradient_checkpointing=True,
                 conv_dim=4, conv_alpha=2, max_train_steps=3)
    trainer = Trainer(cfg)
    frozen = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    start = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    result = trainer.run()
    assert result.steps == 3 and np.all(np.isfinite(result.losses))
    assert all(torch.equal(frozen[k], v) for k, v in trainer.unet.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in trainer.network.state_dict().items())
