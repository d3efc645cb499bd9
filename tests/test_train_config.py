"""The training config schema: kohya names, network_args, presets, ranges, unknown keys with a suggestion."""
import pytest

from lorakit.training.config import PRESETS, ConfigError, build_config, load_config, parse_overrides


def test_kohya_toml_with_tables_and_network_args(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('''
[model]
pretrained_model_name_or_path = "base.safetensors"
[network]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=8", "conv_alpha=4", "dropout=None"]
[optimizer]
optimizer_type = "adamw"
learning_rate = 1e-4
''')
    cfg = load_config(path)
    assert (cfg.network_dim, cfg.network_alpha, cfg.conv_dim, cfg.conv_alpha) == (16, 8.0, 8, 4.0)
    assert cfg.optimizer_type == "AdamW" and cfg.network_dropout == 0.0
    net = cfg.network_config()
    assert net.conv_dim == 8 and net.with_conv


@pytest.mark.parametrize("raw,message", [
    ({"netwrok_dim": 4}, "unknown key 'netwrok_dim'; did you mean 'network_dim'"),
    ({"network_dim": 0}, r"network_dim = 0 is outside \[1, 4096\]"),
    ({"network_args": ["conv_dimm=3"]}, "did you mean 'conv_dim'"),
    ({"network_args": ["conv_dim"]}, "not key=value"),
    ({"conv_alpha": 4}, "conv_dim is 0"),
    ({"network_dim": 2.5}, "whole number"),
    ({"lr_scheduler": "cosin"}, "did you mean 'cosine'"),
    ({"algo": "loha", "network_dropout": 0.1}, "rank_dropout"),
    ({"network_module": "networks.dylora"}, "not supported"),
])
def test_bad_values_name_the_field_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(raw, "train.toml")
    assert str(info.value).startswith("train.toml: ")


def test_presets_carry_the_brief_values_and_a_reason():
    style = build_config({"preset": "style"})
    assert style.conv_dim == 32 and style.conv_alpha == 16.0 and style.network_dim == 8
    character = build_config({"preset": "character", "network_dim": 64})  # explicit keys win over the preset
    assert character.conv_dim == 0 and character.network_dim == 64
    assert all(p["why"] for p in PRESETS.values())


def test_cli_overrides_are_typed_like_the_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("network_dim = 4\n")
    overrides = parse_overrides(["--network_dim", "32", "--conv-dim=16", "--gradient_checkpointing",
                                 "--block_lr_weights", ",".join(["1"] * 25)])
    cfg = load_config(path, overrides)
    assert cfg.network_dim == 32 and cfg.conv_dim == 16 and cfg.gradient_checkpointing is True
    assert cfg.block_lr_weights == [1.0] * 25
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--network_dim"])
