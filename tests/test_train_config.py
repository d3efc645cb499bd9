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
    ({"network_dim": 0}, r"network_dim = 0 is outside \[1, 1000000\]"),
    ({"network_args": ["conv_dimm=3"]}, "did you mean 'conv_dim'"),
    ({"network_args": ["conv_dim"]}, "not key=value"),
    ({"network_dim": 2.5}, "whole number"),
    ({"lr_scheduler": "cosin"}, "did you mean 'cosine'"),
    ({"algo": "loha", "network_dropout": 0.1}, "rank_dropout"),
    ({"network_module": "networks.dylora"}, r"network_module = 'networks.dylora' is not one of"),
    ({"network_dim": float("inf")}, "network_dim = inf is not a valid int .*finite"),
    ({"learning_rate": float("nan")}, "learning_rate = nan .*finite"),
    ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, "nothing would train"),
    ({"learning_rate": 0}, "every learning rate at 0"),
    ({"min_bucket_reso": 1024, "max_bucket_reso": 512}, "swap them"),
    ({"resolution": "big"}, "resolution = 'big' is not a valid list"),
])
def test_bad_values_name_the_field_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(raw, "train.toml")
    assert str(info.value).startswith("train.toml: ")


def test_conv_alpha_without_conv_dim_is_a_note_not_an_error():
    """The brief's baseline-first workflow toggles conv_dim alone; conv_alpha may stay in the file."""
    cfg = build_config({"conv_dim": 0, "conv_alpha": 4})
    assert cfg.conv_alpha == 4.0 and not cfg.network.with_conv
    assert any("conv_alpha = 4 has no effect at conv_dim 0" in n for n in cfg.notes)


def test_five_problems_are_reported_in_one_message():
    raw = {"netwrok_dim": 8, "network_alpha": float("inf"), "save_model_as": "ckpt", "min_bucket_reso": 900,
           "max_bucket_reso": 512, "network_args": ["conv_dim=8", "algo=lohaa"]}
    with pytest.raises(ConfigError) as info:
        build_config(raw, "five.toml")
    text = str(info.value)
    assert text.startswith("five.toml: 5 problems in the config:")
    for part in ("unknown key 'netwrok_dim'; did you mean 'network_dim'", "network_alpha = inf",
                 "save_model_as = 'ckpt'", "min_bucket_reso = 900 is above max_bucket_reso = 512",
                 "network_args algo = 'lohaa' is not one of"):
        assert part in text, part


def test_resolution_takes_kohya_forms():
    assert build_config({"resolution": 512}).resolution == [512, 512]
    assert build_config({"resolution": "512,768"}).resolution == [512, 768]
    assert build_config({"resolution": [640, 448]}).resolution == [640, 448]


def test_network_keys_have_one_schema_and_one_set_of_defaults():
    """The TOML keys of the network are NetworkConfig's fields: same defaults (kohya's: dim 4, alpha 1)."""
    from lorakit.surgery.config import NetworkConfig
    from lorakit.training.config import FIELDS, default_of

    cfg = build_config({})
    assert cfg.network == NetworkConfig()
    assert (cfg.network_dim, cfg.network_alpha) == (4, 1.0)
    assert FIELDS["network_dim"].metadata["help"] == NetworkConfig.__dataclass_fields__["network_dim"].metadata["help"]
    assert default_of("network_dropout") == NetworkConfig().dropout


def test_lycoris_network_args_reach_typed_fields():
    cfg = build_config({"network_module": "lycoris.kohya", "network_args": [
        "algo=lokr", "preset=attn-mlp", "use_cp=True", "factor=8", "decompose_both=True", "bypass_mode=True"]})
    assert (cfg.algo, cfg.lycoris_preset, cfg.use_tucker, cfg.factor, cfg.decompose_both) == \
        ("lokr", "attn-mlp", True, 8, True)
    assert any("bypass_mode" in n for n in cfg.notes)
    dora = build_config({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "dora_wd=True",
                                                                             "wd_on_output=True"]})
    assert (dora.dora_wd, dora.wd_on_output) == (True, True)
    assert build_config({"network_args": ["weight_decompose=True"]}).dora_wd  # LyCORIS's old name
    with pytest.raises(ConfigError, match="DoRA's forward"):
        build_config({"network_args": ["dora_wd=True", "dropout=0.1"]})


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


def test_every_kohya_key_has_its_status_honoured_by_the_schema():
    """implemented = a typed schema key; no_effect / refused = not in the schema (the table speaks for it)."""
    from lorakit.training.config import KEYS
    from lorakit.training.kohya_table import KOHYA_KEYS

    implemented = {k for k, e in KOHYA_KEYS.items() if e.status == "implemented"}
    assert implemented - set(KEYS) == set()
    assert {k for k, e in KOHYA_KEYS.items() if e.status != "implemented"} & set(KEYS) == set()


@pytest.mark.parametrize("key,value,outcome", [
    ("xformers", True, "note"), ("max_data_loader_n_workers", 8, "note"), ("cache_latents", True, "note"),
    ("save_model_as", "safetensors", "ok"), ("save_model_as", "ckpt", "never writes pickles"),
    ("deepspeed", True, "not supported"), ("debug_dataset", False, "note"), ("use_8bit_adam", True, "AdamW8bit"),
])
def test_kohya_keys_by_status(key, value, outcome):
    if outcome in ("note", "ok"):
        cfg = build_config({key: value})
        assert any(n.startswith(key) for n in cfg.notes) == (outcome == "note")
    else:
        with pytest.raises(ConfigError, match=outcome):
            build_config({key: value})


def test_use_cp_decides_over_use_tucker_in_any_order():
    """kohya_ss writes both; LyCORIS reads use_cp, so a Tucker switch left on alone does nothing there."""
    for args in (["use_cp=False", "use_tucker=True"], ["use_tucker=True", "use_cp=False"]):
        assert build_config({"network_args": ["algo=lokr", *args]}).use_tucker is False
