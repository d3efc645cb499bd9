"""The kohya key table (lorakit/data/kohya_keys.toml) and the page generated from it."""
import re
from pathlib import Path

import pytest

from lorakit.training import kohya_table as kt
from lorakit.training.kohya_table import KOHYA_KEYS, STATUSES, dataset_keys, parse_entry, render_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "kohya-compatibility.md"

# The keys of a typical kohya LoRA config (shared reference list, 43 entries with one repeated).
TYPICAL_KEYS = """save_model_as cache_latents xformers max_token_length shuffle_caption keep_tokens enable_bucket
min_bucket_reso max_bucket_reso bucket_reso_steps max_data_loader_n_workers persistent_data_loader_workers
sample_sampler log_prefix max_grad_norm lr_scheduler_num_cycles optimizer_args bucket_no_upscale v2 mem_eff_attn
lr_scheduler_power no_half_vae prior_loss_weight token_warmup_min token_warmup_step multires_noise_iterations
multires_noise_discount persistent_data_loader_workers save_every_n_steps caption_dropout_rate
caption_dropout_every_n_epochs caption_tag_dropout_rate color_aug full_fp16 lowram weighted_captions
dim_from_weights loss_type lr_scheduler_type max_timestep save_last_n_steps_state
scale_v_pred_loss_like_noise_pred cache_text_encoder_outputs""".split()


def all_entries():
    return list(KOHYA_KEYS.values()) + list(dataset_keys().values())


def test_every_key_has_a_known_status_and_a_reason_when_not_implemented():
    assert len(KOHYA_KEYS) > 150 and dataset_keys()
    for key in all_entries():
        assert key.status in STATUSES, key
        if key.status != "implemented":
            assert key.note.strip(), f"{key.name}: {key.status} without a note"
        if key.values_ok:
            assert key.values_refused_note.strip(), key.name
        assert key.defined_in and key.type and key.scripts, key.name


def test_the_source_commit_is_recorded():
    assert kt.SOURCE_REPO == "kohya-ss/sd-scripts"
    assert re.fullmatch(r"[0-9a-f]{40}", kt.SOURCE_COMMIT), kt.SOURCE
    assert kt.SOURCE_COMMIT.startswith("48d368fa")
    assert kt.SOURCE in render_markdown()


def test_the_typical_config_keys_are_all_in_the_table():
    assert len(TYPICAL_KEYS) == 43
    missing = sorted(set(TYPICAL_KEYS) - set(KOHYA_KEYS))
    assert not missing, missing


def test_facts_read_from_sd_scripts():
    """A few argparse facts at the recorded commit, as a guard against hand edits of the data."""
    assert KOHYA_KEYS["network_alpha"].default == "1" and KOHYA_KEYS["network_alpha"].type == "float"
    assert KOHYA_KEYS["max_train_steps"].default == "1600"
    assert KOHYA_KEYS["caption_extension"].default == ".caption"
    assert KOHYA_KEYS["text_encoder_lr"].type == "list[float]"
    assert KOHYA_KEYS["save_model_as"].choices == ("ckpt", "pt", "safetensors")
    assert KOHYA_KEYS["learning_rate"].defined_in == "library/train_util.py:add_optimizer_arguments"
    sdxl_only = {k.name for k in KOHYA_KEYS.values() if k.scripts == ("sdxl_train_network",)}
    assert sdxl_only == {"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                         "disable_mmap_load_safetensors"}
    assert set(KOHYA_KEYS["shuffle_caption"].dataset_levels) == {"general", "dataset", "subset"}
    assert KOHYA_KEYS["alpha_mask"].dataset_levels == ("subset",)
    assert {"image_dir", "num_repeats", "class_tokens", "is_reg", "batch_size"} <= set(dataset_keys())
    assert not set(dataset_keys()) & (set(KOHYA_KEYS) - {"conditioning_data_dir"})


def test_value_level_rules():
    save_as = KOHYA_KEYS["save_model_as"]
    assert save_as.status == "implemented" and save_as.values_ok == ("safetensors",)
    assert save_as.value_ok("safetensors") and not save_as.value_ok("ckpt")
    assert "pickle" in save_as.values_refused_note
    log_with = KOHYA_KEYS["log_with"]
    assert log_with.value_ok("tensorboard") and not log_with.value_ok("wandb")
    assert KOHYA_KEYS["learning_rate"].value_ok(1e-4)  # no values_ok: every value


@pytest.mark.parametrize("raw, message", [
    ({"status": "maybe"}, "is not one of"),
    ({"status": "refused", "note": " "}, "needs a note"),
    ({"status": "implemented", "values_ok": ["a"]}, "values_refused_note"),
    ({"status": "implemented", "scripts": ["train_db"]}, "scripts"),
])
def test_malformed_entries_are_errors_naming_the_key(raw, message):
    base = {"note": "", "defined_in": "x.py:f", "scripts": ["train_network"], "type": "int"}
    with pytest.raises(ValueError, match=message) as info:
        parse_entry("some_key", {**base, **raw})
    assert "[keys.some_key]" in str(info.value)


def test_the_committed_doc_is_up_to_date():
    assert DOC.is_file(), "run: python -m lorakit.training.kohya_table --write-docs"
    assert DOC.read_text(encoding="utf-8") == render_markdown(), \
        "docs/kohya-compatibility.md is stale; run: python -m lorakit.training.kohya_table --write-docs"


def test_doc_lists_every_key_with_counts():
    text = render_markdown()
    for key in all_entries():
        assert f"| `{key.name}`" in text, key.name
    counts = kt.counts()
    for status in STATUSES:
        assert f"| {kt.TITLES[status]} | {counts[status]} |" in text
    assert sum(counts.values()) == len(KOHYA_KEYS)


def test_write_docs_and_check(tmp_path, capsys):
    page = tmp_path / "kohya.md"
    assert kt.main(["--check", "--path", str(page)]) == 1  # missing
    assert kt.main(["--write-docs", "--path", str(page)]) == 0
    assert kt.main(["--check", "--path", str(page)]) == 0
    page.write_text(page.read_text() + "edited\n")
    assert kt.main(["--check", "--path", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
