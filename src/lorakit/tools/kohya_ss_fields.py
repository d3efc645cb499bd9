"""What kohya_ss (bmaltais/kohya_ss at 45088f04, `kohya_gui/lora_gui.py` and `common_gui.update_my_data`) does
with each field of its LoRA-tab JSON, as data for `lorakit.tools.import_kohya_ss`, and how it types and
filters the values.

Each table names the GUI fields and the sd-scripts keys exactly as kohya_ss spells them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

SUPPORTED = "Standard, Kohya LoCon, LyCORIS/LoCon, LyCORIS/LoHa and LyCORIS/LoKr"
LYCORIS_COMMON = ("preset=LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode",
                  "dora_wd", "module_dropout")


@dataclass(frozen=True)
class LoraType:
    module: str
    args: tuple[str, ...] = ()  # network_args in kohya_ss's order: "field", "arg=field" or "arg=:constant"
    kohya_blocks: bool = False  # kohya_ss appends its block/dropout fields (networks.lora only)
    conv_dropped: bool = False  # the GUI keeps conv values that train_model never passes


LORA_TYPES = {
    "Standard": LoraType("networks.lora", kohya_blocks=True, conv_dropped=True),
    "Kohya LoCon": LoraType("networks.lora", ("conv_dim", "conv_alpha"), kohya_blocks=True),
    # kohya_ss's LoCon and LoHa strings name use_tucker twice; the repeat is dropped
    "LyCORIS/LoCon": LoraType("lycoris.kohya", LYCORIS_COMMON + (
        "use_scalar", "rank_dropout_scale", "algo=:locon", "train_norm")),
    "LyCORIS/LoHa": LoraType("lycoris.kohya", LYCORIS_COMMON + (
        "use_scalar", "rank_dropout_scale", "algo=:loha", "train_norm")),
    "LyCORIS/LoKr": LoraType("lycoris.kohya", LYCORIS_COMMON + (
        "factor", "use_cp", "use_scalar", "decompose_both", "rank_dropout_scale", "algo=:lokr", "train_norm")),
}
# lycoris.kohya.create_network copies a deprecated arg over its new name, so kohya_ss's LoKr string
# "use_tucker=True ... use_cp=False" trains without Tucker (LyCORIS f49d30d, lycoris/wrapper.py deprecated_arg_dict)
LYCORIS_SHADOWS = {"use_tucker": "use_cp"}
REFUSED = {
    "Kohya DyLoRA": "networks.dylora, dynamic rank", "LyCORIS/DyLoRA": "dynamic rank",
    "LoRA-FA": "networks.lora_fa, frozen down matrices", "LyCORIS/iA3": "IA3 scaling vectors",
    "LyCORIS/GLoRA": "generalized LoRA", "LyCORIS/BOFT": "butterfly orthogonal fine-tuning",
    "LyCORIS/Diag-OFT": "orthogonal fine-tuning", "LyCORIS/Native Fine-Tuning": "full weight fine-tuning",
    "Kohya LoHa": "sd-scripts' native networks.loha; LyCORIS/LoHa is the same algorithm",
    "Kohya LoKr": "sd-scripts' native networks.lokr; LyCORIS/LoKr is the same algorithm",
    "Flux1": "Flux.1 model", "Flux1 OFT": "Flux.1 model", "Anima": "Anima model", "Lumina": "Lumina model",
    "HunyuanImage-2.1": "HunyuanImage model",
}
GUI_DEFAULTS = {  # lora_tab's control values: what kohya_ss passes when a saved file lacks the field
    "LyCORIS_preset": "full", "conv_dim": 1, "conv_alpha": 1, "factor": -1, "use_tucker": False,
    "use_scalar": False, "use_cp": False, "bypass_mode": False, "dora_wd": False, "rank_dropout": 0,
    "module_dropout": 0, "rank_dropout_scale": False, "train_norm": False, "decompose_both": False,
}
NETWORK_DEFAULTS = GUI_DEFAULTS | {"unit": 1, "train_on_input": True, "constrain": 0.0, "rescaled": False}
KOHYA_BLOCK_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                      "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
LORAPLUS_FIELDS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
NETWORK_FIELDS = set(NETWORK_DEFAULTS) | set(KOHYA_BLOCK_FIELDS)


@dataclass(frozen=True)
class Field:
    key: str           # the sd-scripts key kohya_ss writes
    kind: str          # how the value is typed (see CONVERT)
    when: str = ""     # kohya_ss passes it only under this condition (see CONDITIONS)
    always: bool = False  # passed even at 0 (kohya_ss sets it after its empty filter)


_SAME_NAME = {  # JSON field = sd-scripts key, typed as sd-scripts' argparse would type it
    "bool": "bucket_no_upscale cache_latents cache_latents_to_disk color_aug debiased_estimation_loss "
            "dim_from_weights enable_bucket flip_aug fp8_base full_bf16 full_fp16 gradient_checkpointing highvram "
            "ip_noise_gamma_random_strength log_config masked_loss mem_eff_attn persistent_data_loader_workers "
            "random_crop resume_from_huggingface save_state save_state_on_train_end save_state_to_huggingface "
            "async_upload scale_v_pred_loss_like_noise_pred shuffle_caption skip_cache_check train_inpainting v2 "
            "v_parameterization weighted_captions",
    "int": "bucket_reso_steps caption_dropout_every_n_epochs clip_skip gradient_accumulation_steps keep_tokens "
           "max_bucket_reso max_timestep min_timestep max_token_length min_bucket_reso network_dim "
           "sample_every_n_epochs sample_every_n_steps save_every_n_epochs save_every_n_steps save_last_n_steps "
           "save_last_n_steps_state save_last_n_epochs save_last_n_epochs_state seed train_batch_size "
           "vae_batch_size lr_scheduler_num_cycles",
    "float": "caption_dropout_rate huber_c huber_scale ip_noise_gamma learning_rate lr_scheduler_power "
             "max_grad_norm min_snr_gamma network_alpha network_dropout prior_loss_weight scale_weight_norms "
             "v_pred_like_loss",
    "str": "caption_extension dataset_config dynamo_backend dynamo_mode huber_schedule huggingface_repo_id "
           "huggingface_repo_type huggingface_repo_visibility huggingface_path_in_repo log_tracker_name "
           "log_tracker_config log_with logging_dir loss_type lr_scheduler lr_scheduler_type metadata_author "
           "metadata_description metadata_license metadata_tags metadata_title mixed_precision network_weights "
           "output_dir output_name pretrained_model_name_or_path reg_data_dir resume sample_sampler save_model_as "
           "save_precision train_data_dir training_comment vae",
    "split": "optimizer_args lr_scheduler_args",
}
PASS = {name: Field(name, kind) for kind, names in _SAME_NAME.items() for name in names.split()} | {
    "max_resolution": Field("resolution", "resolution"),
    "optimizer": Field("optimizer_type", "str"),
    "max_data_loader_n_workers": Field("max_data_loader_n_workers", "int", always=True),
    "noise_offset": Field("noise_offset", "float", "original"),
    "noise_offset_random_strength": Field("noise_offset_random_strength", "bool", "original"),
    "adaptive_noise_scale": Field("adaptive_noise_scale", "float", "original"),
    "multires_noise_iterations": Field("multires_noise_iterations", "int", "multires"),
    "multires_noise_discount": Field("multires_noise_discount", "float", "multires"),
    "sdxl_no_half_vae": Field("no_half_vae", "bool", "sdxl"),
    "sdxl_cache_text_encoder_outputs": Field("cache_text_encoder_outputs", "bool", "sdxl"),
}
CONDITIONS = {  # condition -> (JSON field, value it must have, its GUI default, why the field is not passed)
    "original": ("noise_offset_type", "Original", "Original", "noise_offset_type is not Original"),
    "multires": ("noise_offset_type", "Multires", "Original", "noise_offset_type is not Multires"),
    "sdxl": ("sdxl", True, False, "sdxl is off"),
}
LIST_KEYS = {"network_args", "optimizer_args", "lr_scheduler_args", "schedulefree_wrapper_args", "text_encoder_lr",
             "base_weights", "base_weights_multiplier"}  # nargs="*" in sd-scripts: lists even with one value
UPGRADE_NUMBERS = {  # update_my_data's coercions: field -> (type, value when it does not parse)
    **{n: (int, 0) for n in ("clip_skip", "epoch", "gradient_accumulation_steps", "keep_tokens", "lr_warmup",
                             "max_data_loader_n_workers", "max_train_epochs", "save_every_n_epochs", "seed",
                             "max_train_steps", "caption_dropout_every_n_epochs")},
    "lr_scheduler_num_cycles": (int, 1), "max_token_length": (int, 75), "lr_scheduler_power": (float, 1.0),
    **{n: (float, 0.0) for n in ("adaptive_noise_scale", "noise_offset", "learning_rate", "text_encoder_lr",
                                 "unet_lr")},
}
FAMILY_CHECKBOXES = {"flux1_checkbox": "Flux.1", "sd3_checkbox": "SD3", "hunyuan_image_checkbox": "HunyuanImage-2.1",
                     "anima_checkbox": "Anima", "lumina_checkbox": "Lumina"}
OTHER_FAMILY_PREFIXES = ("flux1_", "sd3_", "hunyuan_", "anima_", "lumina_")
OTHER_FAMILY_FIELDS = set(
    "model_type ae clip_l t5xxl discrete_flow_shift model_prediction_type timestep_sampling split_mode train_blocks "
    "t5xxl_max_token_length enable_all_linear guidance_scale mem_eff_save apply_t5_attn_mask split_qkv train_t5xxl "
    "cpu_offload_checkpointing blocks_to_swap single_blocks_to_swap double_blocks_to_swap show_timesteps "
    "show_timesteps_resolution img_attn_dim img_mlp_dim img_mod_dim single_dim txt_attn_dim txt_mlp_dim txt_mod_dim "
    "single_mod_dim in_dims train_double_block_indices train_single_block_indices clip_g clip_g_dropout_rate "
    "logit_mean logit_std mode_scale pos_emb_random_crop_rate save_clip save_t5xxl t5xxl_device t5xxl_dtype "
    "weighting_scheme fp8_base_unet train_lora_ggpo ggpo_sigma ggpo_beta".split())
ACCELERATE = set("num_cpu_threads_per_process num_processes num_machines multi_gpu gpu_ids main_process_port "
                 "dynamo_use_fullgraph dynamo_use_dynamic extra_accelerate_launch_args".split())
GUI_ONLY = {"LoRA_type": "", "model_list": "", "save_as_bool": "", "save_as": "", "file_path": "", "headless": "",
            "print_only": "", "training_preset": "", "noise_offset_type": "picks the noise keys that kohya_ss passes",
            "sdxl": "picks sdxl_train_network.py; lorakit detects SDXL from the checkpoint",
            "train_dir": "finetune tab's metadata folder"}
KOHYA_IGNORES = {"lowvram": "sd-scripts removed --lowvram",
                 "stop_text_encoder_training": "kohya_ss sets it to 0: 'not yet supported'"}
LEGACY = set("block_lr cache_latent caption_extention conv_alphas conv_dims locon network_train no_token_padding "
             "sdxl_max_timestep sdxl_min_timestep stop_text_encoder_training_pct use_wandb_checkbox "
             "wandb_api_key_textbox cache_text_encoder_outputs no_half_vae use_8bit_adam image_folder "
             "use_wandb".split())
SECRET = re.compile(r"token|api_key|password|secret", re.I)
GROUP_NOTES = {  # the note that lists each kind of field without a key
    "gui": "GUI-only, not needed",
    "accelerate": "accelerate launch options, not training keys (give them to `accelerate launch` if you launch "
                  "lorakit with it)",
    "family": "Flux.1/SD3/HunyuanImage/Anima/Lumina fields, unused for SD1/SD2/SDXL as in kohya_ss",
    "legacy": "fields of an older kohya_ss that the current one ignores, not carried over",
    "unknown": "unknown kohya_ss fields, not converted",
    "off": "left out as kohya_ss leaves them out (empty, 0, off, or another LoRA type's default)",
}


# ---- how kohya_ss types and filters values ----

def as_bool(value) -> bool:
    """A checkbox value; strings from hand-edited files count as true only when they say so."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def as_int(value) -> int:
    number = float(value)
    if number != int(number):
        raise ValueError("a whole number is required")
    return int(number)


def as_resolution(value) -> str:
    # sd-scripts splits the string on ","; a square "512,512" is written "512", which it reads the same way
    parts = [str(as_int(p)) for p in str(value).replace(" ", "").split(",") if p]
    return parts[0] if len(set(parts)) == 1 else ",".join(parts)


CONVERT = {"bool": as_bool, "int": as_int, "float": float, "str": str, "resolution": as_resolution,
           "split": lambda v: str(v).replace('"', "").split()}  # kohya_ss's own split of these fields


def is_off(value) -> bool:
    """kohya_ss's filter `value not in ["", False, None]` (0 == False, so zeros go too), plus empty lists."""
    return value is None or value == [] or (not isinstance(value, list) and value in ("", False))


def arg_text(value) -> str:
    """A network_args value as kohya_ss's f-strings write it, whole floats as ints (sd-scripts int()s dims)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def show(name: str, value) -> str:
    """`name=value` for a note; secrets are never printed."""
    if SECRET.search(name) and not is_off(value):
        return f"{name}=<hidden>"
    text = json.dumps(value, ensure_ascii=False)
    return f"{name}={text if len(text) <= 80 else text[:77] + '...'}"


def condition_holds(condition: str, data: dict) -> bool:
    """Whether kohya_ss passes the fields under `condition` for this JSON (see CONDITIONS)."""
    field, wanted, default, _ = CONDITIONS[condition]
    value = data.get(field, default)
    return as_bool(value) == wanted if isinstance(wanted, bool) else value == wanted
