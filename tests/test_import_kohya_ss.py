"""`lorakit import-config`: kohya_ss LoRA-tab JSONs -> sd-scripts keys, with every field accounted for.

The JSONs below use the field names and value types that kohya_ss's `save_configuration` writes (bmaltais/kohya_ss
at 45088f04, kohya_gui/lora_gui.py), including the stale string values of its older presets.
"""
import json
import tomllib

import pytest

from lorakit.cli import main
from lorakit.tools.import_kohya_ss import convert_kohya_ss, import_kohya_ss, to_toml
from lorakit.tools.kohya_ss_fields import (ACCELERATE, GUI_ONLY, KOHYA_IGNORES, LEGACY, LORAPLUS_FIELDS,
                                          NETWORK_FIELDS, OTHER_FAMILY_FIELDS, PASS)
from lorakit.training.config import load_config

CONV_NOTE = ("kohya_ss would have silently dropped conv_dim=8, conv_alpha=4 for LoRA type Standard; not carried over, "
             "as in kohya_ss; choose Kohya LoCon to train conv layers")


def saved(**changes) -> dict:
    """A LoRA-tab JSON as a current kohya_ss saves it (a representative subset of its 287 fields)."""
    data = {
        "LoRA_type": "Standard", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
        "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True,
        "bucket_reso_steps": 64, "bypass_mode": False, "cache_latents": True, "cache_latents_to_disk": False,
        "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0, "caption_extension": ".txt",
        "clip_skip": 1, "constrain": 0.0, "conv_alpha": 4, "conv_block_alphas": "", "conv_block_dims": "",
        "conv_dim": 8, "dataset_config": "", "decompose_both": False, "dora_wd": False, "down_lr_weight": "",
        "dynamo_backend": "no", "enable_bucket": True, "epoch": 10, "factor": -1, "flip_aug": False,
        "flux1_checkbox": False, "gpu_ids": "", "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
        "huggingface_token": "", "learning_rate": 0.0001, "logging_dir": "", "loraplus_lr_ratio": 0,
        "loraplus_text_encoder_lr_ratio": 0, "loraplus_unet_lr_ratio": 0, "lr_scheduler": "cosine",
        "lr_scheduler_args": "", "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_warmup": 0,
        "lr_warmup_steps": 0, "max_bucket_reso": 1024, "max_data_loader_n_workers": 0, "max_resolution": "512,512",
        "max_train_epochs": 0, "max_train_steps": 0, "mid_lr_weight": "", "min_bucket_reso": 256,
        "min_snr_gamma": 5, "mixed_precision": "fp16", "model_list": "custom", "module_dropout": 0,
        "multi_gpu": False, "network_alpha": 16, "network_dim": 32, "network_dropout": 0, "network_weights": "",
        "noise_offset": 0.05, "noise_offset_type": "Original", "num_processes": 1, "optimizer": "AdamW8bit",
        "optimizer_args": "", "output_dir": "/data/out", "output_name": "mychar",
        "pretrained_model_name_or_path": "/models/v1-5.safetensors", "rank_dropout": 0, "rank_dropout_scale": False,
        "reg_data_dir": "", "rescaled": False, "sample_every_n_epochs": 0, "sample_prompts": "", "save_as_bool": False,
        "save_every_n_epochs": 2, "save_model_as": "safetensors", "save_precision": "fp16", "scale_weight_norms": 0,
        "sd3_checkbox": False, "sdxl": False, "sdxl_no_half_vae": True, "seed": 42, "shuffle_caption": False,
        "t5xxl": "", "t5xxl_lr": 0, "text_encoder_lr": 5e-05, "train_batch_size": 2, "train_data_dir": "/data/img",
        "train_norm": False, "train_on_input": True, "unet_lr": 0.0001, "unit": 1, "up_lr_weight": "",
        "use_cp": False, "use_scalar": False, "use_tucker": False, "wandb_api_key": "", "xformers": "sdpa",
    }
    data.update(changes)
    return data


def mentioned(notes, name):
    return any(name in note for note in notes)


def test_standard_keeps_kohya_ss_keys_and_says_conv_values_are_not_carried_over():
    keys, notes, prompts = convert_kohya_ss(saved(gui_field_from_the_future=[1, 2], use_cp=True))
    assert keys == {
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
        "clip_skip": 1, "dynamo_backend": "no", "enable_bucket": True, "gradient_accumulation_steps": 1,
        "gradient_checkpointing": True, "learning_rate": 0.0001, "lr_scheduler": "cosine",
        "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0, "max_bucket_reso": 1024,
        "max_data_loader_n_workers": 0, "max_train_epochs": 10, "min_bucket_reso": 256, "min_snr_gamma": 5.0,
        "mixed_precision": "fp16", "network_alpha": 16.0, "network_dim": 32, "network_module": "networks.lora",
        "noise_offset": 0.05, "optimizer_type": "AdamW8bit", "output_dir": "/data/out", "output_name": "mychar",
        "pretrained_model_name_or_path": "/models/v1-5.safetensors", "resolution": "512", "save_every_n_epochs": 2,
        "save_model_as": "safetensors", "save_precision": "fp16", "sdpa": True, "seed": 42, "text_encoder_lr": 5e-05,
        "train_batch_size": 2, "train_data_dir": "/data/img", "unet_lr": 0.0001}
    assert list(keys) == sorted(keys)  # kohya_ss writes its TOML sorted by key
    assert prompts is None
    assert CONV_NOTE in notes
    assert "epoch=10 -> max_train_epochs = 10 (kohya_ss counts the images to turn it into the same max_train_steps)" \
        in notes
    assert "not used by LoRA type Standard in kohya_ss, not carried over: use_cp=true" in notes
    assert "not passed by kohya_ss in this configuration: sdxl_no_half_vae=true (sdxl is off)" in notes
    assert "unknown kohya_ss fields, not converted: gui_field_from_the_future=[1, 2]" in notes
    assert "GUI-only, not needed: model_list, noise_offset_type (picks the noise keys that kohya_ss passes), " \
           "save_as_bool, sdxl (picks sdxl_train_network.py; lorakit detects SDXL from the checkpoint)" in notes
    assert mentioned(notes, "accelerate launch options, not training keys") and mentioned(notes, "num_processes=1")
    assert mentioned(notes, "Flux.1/SD3/HunyuanImage/Anima/Lumina fields, unused for SD1/SD2/SDXL as in kohya_ss: "
                            "t5xxl")
    left_out = notes[-1]
    assert left_out.startswith("left out as kohya_ss leaves them out")
    for name in ("adaptive_noise_scale", "block_dims", "loraplus_lr_ratio", "network_dropout", "wandb_api_key",
                 "sample_prompts", "reg_data_dir", "t5xxl_lr", "factor", "unit", "train_on_input", "flux1_checkbox",
                 "LyCORIS_preset"):
        assert name in left_out


def test_dynamo_mode_becomes_the_torch_compile_mode_key():
    keys, notes, _ = convert_kohya_ss(saved(dynamo_backend="inductor", dynamo_mode="reduce-overhead"))
    assert (keys["dynamo_backend"], keys["dynamo_mode"]) == ("inductor", "reduce-overhead")
    assert not mentioned(notes, "dynamo_mode")


def test_every_field_is_a_key_or_named_in_the_notes():
    data = saved(weird_field="x", hunyuan_vae="/vae", lowvram=True, stop_text_encoder_training=20)
    keys, notes, _ = convert_kohya_ss(data)
    # fields whose sd-scripts key has another name, or that are turned into other keys
    became = {"max_resolution": "resolution", "optimizer": "optimizer_type", "epoch": "max_train_epochs",
              "xformers": "sdpa", "LoRA_type": "network_module"}
    for name in data:
        key = became.get(name, name)
        assert key in keys or mentioned(notes, name), f"{name} vanished"
    assert "lowvram=true: dropped by kohya_ss (sd-scripts removed --lowvram); not carried over" in notes
    assert mentioned(notes, "stop_text_encoder_training=20: dropped by kohya_ss")


def test_every_field_the_tables_name_is_accounted_for():
    """Every field the tables name, set (not empty): each becomes a key or is named in a note, none as unknown."""
    typed = {"bool": True, "int": 2, "float": 0.5, "str": "x", "split": "a=1", "resolution": "512"}
    names = [*PASS, *NETWORK_FIELDS, *LORAPLUS_FIELDS, *ACCELERATE, *GUI_ONLY, *OTHER_FAMILY_FIELDS, *LEGACY,
             *KOHYA_IGNORES, "hunyuan_vae", "anima_qwen3"]
    data = saved(**{n: typed[PASS[n].kind] if n in PASS else "x" for n in names})
    data.update(LoRA_type="Kohya LoCon", conv_dim=4, conv_alpha=2, rank_dropout=0.1, module_dropout=0.1,
                block_dims="1,2", xformers="sdpa", noise_offset_type="Original", sample_prompts="a photo",
                lr_warmup=2, lr_warmup_steps=0, t5xxl_lr=0, max_train_steps=0, max_train_epochs=0, dataset_config="",
                additional_parameters="--foo 1", use_8bit_adam="x", image_folder="x", use_wandb="x")
    keys, notes, _ = convert_kohya_ss(data)
    text, net_args = "\n".join(notes), " ".join(keys["network_args"])
    became = {**{n: f.key for n, f in PASS.items()}, "epoch": "max_train_epochs", "xformers": "sdpa",
              "LoRA_type": "network_module", "lr_warmup": "lr_warmup_steps"}
    vanished = [n for n in data if n not in text and became.get(n, n) not in keys and f"{n}=" not in net_args]
    assert vanished == [] and not mentioned(notes, "unknown kohya_ss fields")


def test_kohya_locon_network_args_in_kohya_ss_order():
    keys, notes, _ = convert_kohya_ss(saved(
        LoRA_type="Kohya LoCon", conv_dim=16.0, conv_alpha=8, block_dims="4, 4, 8", down_lr_weight="1,0.5,0",
        block_lr_zero_threshold=0.1, rank_dropout=0.1, module_dropout=0.05, loraplus_unet_lr_ratio=16))
    assert keys["network_module"] == "networks.lora"
    assert keys["network_args"] == ["conv_dim=16", "conv_alpha=8", "down_lr_weight=1,0.5,0",
                                    "block_lr_zero_threshold=0.1", "block_dims=4,4,8", "rank_dropout=0.1",
                                    "module_dropout=0.05", "loraplus_unet_lr_ratio=16"]
    assert not mentioned(notes, "silently dropped")
    assert "block_dims: spaces removed (kohya_ss splits network_args at spaces, which would cut this list into " \
           "pieces)" in notes


def test_lycoris_lokr_with_preset_and_tucker():
    keys, notes, _ = convert_kohya_ss(saved(
        LoRA_type="LyCORIS/LoKr", LyCORIS_preset="attn-mlp", use_tucker=True, use_cp=True, factor=8,
        decompose_both=True, conv_dim=16, conv_alpha=8, rank_dropout=0.1, block_dims="4,4,8", unit=4))
    assert keys["network_module"] == "lycoris.kohya"
    assert keys["network_args"] == [
        "preset=attn-mlp", "conv_dim=16", "conv_alpha=8", "use_tucker=True", "rank_dropout=0.1", "bypass_mode=False",
        "dora_wd=False", "module_dropout=0", "factor=8", "use_cp=True", "use_scalar=False", "decompose_both=True",
        "rank_dropout_scale=False", "algo=lokr", "train_norm=False"]
    assert "not used by LoRA type LyCORIS/LoKr in kohya_ss, not carried over: block_dims=\"4,4,8\", unit=4" in notes
    assert not mentioned(notes, "GUI defaults used") and not mentioned(notes, "silently dropped")


def test_lycoris_lokr_use_tucker_without_use_cp_is_dropped_as_lycoris_drops_it():
    keys, notes, _ = convert_kohya_ss(saved(LoRA_type="LyCORIS/LoKr", use_tucker=True, use_cp=False))
    assert "use_tucker=True" in keys["network_args"] and "use_cp=False" in keys["network_args"]
    assert "kohya_ss would have silently dropped use_tucker=True for LoRA type LyCORIS/LoKr: it also passes " \
           "use_cp=False, which LyCORIS reads in its place; kept as in kohya_ss (lorakit reads it the same way); " \
           "set use_cp=True in network_args to change it" in notes


def test_lycoris_locon_and_loha_name_use_tucker_once_and_fill_gui_defaults():
    data = saved(LoRA_type="LoCon")  # older kohya_ss name for LyCORIS/LoCon
    for name in ("use_scalar", "dora_wd", "bypass_mode"):
        del data[name]
    keys, notes, _ = convert_kohya_ss(data)
    assert keys["network_args"] == [
        "preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
        "dora_wd=False", "module_dropout=0", "use_scalar=False", "rank_dropout_scale=False", "algo=locon",
        "train_norm=False"]
    assert "LoRA_type 'LoCon' (older kohya_ss) read as 'LyCORIS/LoCon', as kohya_ss does" in notes
    assert "absent from the JSON, kohya_ss's GUI defaults used: bypass_mode=False, dora_wd=False, use_scalar=False" \
        in notes
    keys, _, _ = convert_kohya_ss(saved(LoRA_type="LyCORIS/LoHa"))
    assert "algo=loha" in keys["network_args"] and keys["network_args"].count("use_tucker=False") == 1


@pytest.mark.parametrize("changes,named", [
    ({"LoRA_type": "Kohya DyLoRA"}, "'Kohya DyLoRA'"), ({"LoRA_type": "LoRA-FA"}, "'LoRA-FA'"),
    ({"LoRA_type": "LyCORIS/iA3"}, "'LyCORIS/iA3'"), ({"LoRA_type": "LyCORIS/GLoRA"}, "'LyCORIS/GLoRA'"),
    ({"LoRA_type": "LyCORIS/BOFT"}, "'LyCORIS/BOFT'"), ({"LoRA_type": "LyCORIS/Diag-OFT"}, "'LyCORIS/Diag-OFT'"),
    ({"LoRA_type": "LyCORIS/Native Fine-Tuning"}, "full weight fine-tuning"),
    ({"LoRA_type": "Kohya LoKr"}, "LyCORIS/LoKr is the same algorithm"),
    ({"LoRA_type": "Flux1", "flux1_checkbox": True}, "Flux.1 (flux1_checkbox is on)"),
    ({"sd3_checkbox": True}, "SD3 (sd3_checkbox is on)"),
    ({"LoRA_type": "Something New"}, "unknown to lorakit"),
])
def test_unsupported_types_are_refused_in_one_line(changes, named):
    with pytest.raises(ValueError) as e:
        convert_kohya_ss(saved(**changes))
    message = str(e.value)
    assert named in message and "\n" not in message
    assert "lorakit trains" in message


def test_older_kohya_ss_values_are_read_as_kohya_ss_reads_them():
    data = saved(use_8bit_adam=True, lora_network_weights="/w/prev.safetensors", xformers=True, clip_skip="2",
                 seed="", max_train_epochs="", lr_scheduler_num_cycles="", keep_tokens="1", lr_warmup=10,
                 no_token_padding=False, max_resolution="768,512", save_model_as="ckpt-old")
    del data["optimizer"], data["network_weights"]  # fields that older kohya_ss did not have
    keys, notes, _ = convert_kohya_ss(data)
    del keys["network_module"]
    assert keys["optimizer_type"] == "AdamW8bit" and keys["network_weights"] == "/w/prev.safetensors"
    assert keys["xformers"] is True and "sdpa" not in keys
    assert (keys["clip_skip"], keys["keep_tokens"], keys["lr_scheduler_num_cycles"]) == (2, 1, 1)
    assert "seed" not in keys and keys["resolution"] == "768,512" and keys["save_model_as"] == "safetensors"
    assert keys["lr_warmup_steps"] == 0.1
    assert mentioned(notes, "fields of an older kohya_ss that the current one ignores, not carried over: "
                            "no_token_padding=false")
    assert "use_8bit_adam (older kohya_ss) -> optimizer_type = 'AdamW8bit'" in notes


def test_steps_and_warmup_follow_train_model():
    keys, notes, _ = convert_kohya_ss(saved(max_train_steps=1000, lr_warmup=10))
    assert keys["max_train_steps"] == 1000 and "max_train_epochs" not in keys and keys["lr_warmup_steps"] == 0.1
    assert mentioned(notes, "epoch=10: not carried over")
    keys, _, _ = convert_kohya_ss(saved(dataset_config="/d.toml", max_train_steps=1000, lr_warmup=10))
    assert keys["lr_warmup_steps"] == 100 and keys["dataset_config"] == "/d.toml"
    keys, notes, _ = convert_kohya_ss(saved(lr_warmup=10, lr_warmup_steps=50))
    assert keys["lr_warmup_steps"] == 50 and "lr_warmup=10% not used: lr_warmup_steps wins, as in kohya_ss" in notes


def test_learning_rates_pick_the_trained_parts():
    keys, _, _ = convert_kohya_ss(saved(text_encoder_lr=0))
    assert keys["network_train_unet_only"] is True and "text_encoder_lr" not in keys
    keys, _, _ = convert_kohya_ss(saved(unet_lr=0))
    assert keys["network_train_text_encoder_only"] is True and "unet_lr" not in keys
    with pytest.raises(ValueError, match="all 0"):
        convert_kohya_ss(saved(learning_rate=0, text_encoder_lr=0, unet_lr=0))


def test_additional_parameters_override_like_the_command_line():
    keys, notes, _ = convert_kohya_ss(saved(
        additional_parameters='--lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args "T_max=1000" '
                              '"eta_min=0e-0" --max_grad_norm=0.5 --lr_scheduler linear --no_half_vae'))
    assert keys["lr_scheduler_type"] == "CosineAnnealingLR"
    assert keys["lr_scheduler_args"] == ["T_max=1000", "eta_min=0e-0"]
    assert (keys["max_grad_norm"], keys["lr_scheduler"], keys["no_half_vae"]) == (0.5, "linear", True)
    assert mentioned(notes, 'lr_scheduler = "linear" (was "cosine")')


def test_secrets_are_not_copied_and_not_shown():
    keys, notes, _ = convert_kohya_ss(saved(huggingface_token="hf_SECRET", wandb_api_key="abc123", log_with="wandb",
                                            api_token_extra="zzz"))
    assert "huggingface_token" not in keys and "wandb_api_key" not in keys
    assert keys["wandb_run_name"] == "mychar"  # kohya_ss's fallback to output_name
    text = "\n".join(notes)
    assert "hf_SECRET" not in text and "abc123" not in text and "zzz" not in text
    assert mentioned(notes, "wandb_api_key is set but not copied") and mentioned(notes, "api_token_extra=<hidden>")


def test_toml_writer_round_trips():
    keys = {"a": 'quote " back \\ slash\nnewline é', "b": 1e-05, "c": [1, 2.5, "x"], "d": True, "e": 16}
    assert tomllib.loads(to_toml(keys, ["comment"])) == keys


def test_cli_writes_toml_and_prompts(tmp_path, capsys):
    source = tmp_path / "kohya_ss.json"
    source.write_text(json.dumps(saved(sample_prompts="a photo of sks --n blurry --w 512", sample_every_n_epochs=1)))
    out = tmp_path / "cfg" / "train.toml"
    assert main(["import-config", str(source), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert CONV_NOTE in printed and f"wrote {out}" in printed
    written = tomllib.loads(out.read_text())
    prompts = tmp_path / "cfg" / "train-prompts.txt"
    assert written["sample_prompts"] == str(prompts.resolve())
    assert prompts.read_text() == "a photo of sks --n blurry --w 512\n"
    assert written == convert_kohya_ss(saved(sample_prompts="x", sample_every_n_epochs=1),
                                       prompts_file=str(prompts.resolve())).keys


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    (json.dumps(saved(LoRA_type="LoRA-FA")), "LoRA type 'LoRA-FA' is not supported"),
    (json.dumps(["a"]), "JSON object"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, text, message):
    source = tmp_path / "bad.json"
    source.write_text(text)
    assert main(["import-config", str(source), "-o", str(tmp_path / "t.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit import-config: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "t.toml").exists()


@pytest.mark.parametrize("changes,conv_dim,algo", [
    ({}, 0, "lora"),
    ({"LoRA_type": "Kohya LoCon"}, 8, "lora"),
    ({"LoRA_type": "LyCORIS/LoKr", "use_tucker": True, "use_cp": True, "factor": 8}, 8, "lokr"),
], ids=["Standard", "Kohya LoCon", "LyCORIS/LoKr"])
def test_written_toml_loads_in_lorakit_train(tmp_path, changes, conv_dim, algo):
    done = import_kohya_ss(_write(tmp_path, saved(**changes)), tmp_path / "train.toml")
    config = load_config(done.path, {"pretrained_model_name_or_path": str(tmp_path / "base.safetensors"),
                                     "train_data_dir": str(tmp_path / "img"), "output_dir": str(tmp_path / "out")})
    assert (config.network_dim, config.network_alpha, config.optimizer_type) == (32, 16.0, "AdamW8bit")
    assert (config.conv_dim, config.network.algo) == (conv_dim, algo)
    assert config.max_train_epochs == 10 and config.text_encoder_lr == 5e-05 and config.unet_lr == 1e-4
    if algo == "lokr":
        assert (config.network.use_tucker, config.network.factor) == (True, 8)


def _write(tmp_path, data) -> str:
    path = tmp_path / "kohya_ss.json"
    path.write_text(json.dumps(data))
    return str(path)
