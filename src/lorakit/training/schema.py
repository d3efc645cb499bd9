"""TrainConfig: the one typed schema behind TOML files, `--key value` flags, `lorakit train --help` and the GUI.

Keys are sd-scripts' names, so kohya configs work unchanged. Network settings live in the nested
`NetworkConfig` (lorakit.surgery.config), which is the single source of their defaults, ranges and help;
their TOML keys stay flat, as in kohya (`network_dim = 8`, not `[network] dim`). Every other sd-scripts key
is listed, with its status, in lorakit/data/kohya_keys.toml.
"""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass, fields

from lorakit.options import opt
from lorakit.surgery.config import NetworkConfig
from lorakit.surgery.presets import LYCORIS_DEFAULT_PRESET

PRESETS = {  # from the design brief's table of starting points
    "character": dict(network_dim=32, network_alpha=16.0, conv_dim=0,
                      why="attention learns the concept (face, clothes); no conv keeps the base model's look"),
    "style": dict(network_dim=8, network_alpha=8.0, conv_dim=32, conv_alpha=16.0,
                  why="conv layers carry texture, colour and line quality; conv_alpha = conv_dim/2 damps baking-in"),
    "character-style": dict(network_dim=32, network_alpha=16.0, conv_dim=32, conv_alpha=16.0,
                            why="both the concept (attention) and the look (conv), at moderate strength"),
}
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor", "piecewise_constant", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
NETWORK_KEY_OF_FIELD = {"dropout": "network_dropout"}  # NetworkConfig field -> kohya's top-level TOML key
NETWORK_FIELD_OF_KEY = {v: k for k, v in NETWORK_KEY_OF_FIELD.items()}
INTERNAL_NETWORK_FIELDS = ("train_unet", "train_text_encoder", "forward_mode")  # set from other keys or by code
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGDNesterov")


@dataclass
class TrainConfig:
    # ---- model ----
    pretrained_model_name_or_path: str | None = opt(None, "base model: single file or diffusers folder; "
                                                          "unset = the embedded tiny model")
    v2: bool = opt(False, "the base model is SD2.x (lorakit also detects it from the file and says so)")
    v_parameterization: bool = opt(False, "the base model predicts v (SD2 768-v)")
    clip_skip: int = opt(1, "use the n-th last text-encoder layer", lo=1, hi=48)
    max_token_length: int | None = opt(None, "caption tokens: 75 (unset), 150 or 225, in 75-token chunks as "
                                             "kohya", choices=(75, 150, 225))
    weighted_captions: bool = opt(False, "(word:1.2) weights in captions scale their text embeddings, as kohya")
    # ---- network: the fields of NetworkConfig, flat in TOML ----
    network: NetworkConfig = opt(None, "the adapter network (its keys are flat in TOML)", factory=NetworkConfig)
    preset: str | None = opt(None, "starting values from the design brief", choices=tuple(PRESETS))
    network_module: str | None = opt(None, "kohya name: networks.lora or lycoris.kohya (algo then picks)",
                                     choices=("networks.lora", "lycoris.kohya"))
    network_args: list[str] | None = opt(None, 'kohya form: ["conv_dim=8", "conv_alpha=4", "algo=loha"]')
    network_train_unet_only: bool = opt(False, "do not train the text encoder")
    network_train_text_encoder_only: bool = opt(False, "do not train the U-Net")
    network_weights: str | None = opt(None, "start from this LoRA file's weights (continue training)")
    dim_from_weights: bool = opt(False, "take each module's dim and alpha from network_weights")
    scale_weight_norms: float | None = opt(None, "max-norm: after each step, shrink modules with |dW| above this",
                                           lo=0.0, hi=1e6)
    # ---- data ----
    train_data_dir: str | None = opt(None, "folder of `N_name` subfolders (kohya convention)")
    reg_data_dir: str | None = opt(None, "regularization images, `N_name` subfolders (their loss is weighted by "
                                         "prior_loss_weight)")
    dataset_config: str | None = opt(None, "kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    resolution: list[int] | None = opt(None, 'training resolution: 512, or "W,H" as kohya; unset = the base '
                                             "model's native size (U-Net sample_size x the VAE's scale factor: "
                                             "64 for the embedded tiny model, 512 for SD1.5, 1024 for SDXL)",
                                       lo=8, hi=8192)
    strict_dataset: bool = opt(False, "a file that cannot be used (corrupt, truncated, not an image) is an error "
                                      "instead of being skipped with a line saying so")
    train_batch_size: int = opt(1, "batch size", lo=1, hi=1024)
    caption_extension: str = opt(".txt", "caption file extension")
    shuffle_caption: bool = opt(False, "shuffle the caption's tags (after keep_tokens)")
    caption_separator: str = opt(",", "tag separator for shuffling and tag dropout")
    keep_tokens: int = opt(0, "tags kept in front when shuffling", lo=0, hi=1000)
    keep_tokens_separator: str = opt("", "a marker: tags before it are kept in front (instead of keep_tokens); "
                                         "a second one keeps the tags after it at the end")
    caption_prefix: str | None = opt(None, "text put before every caption")
    caption_suffix: str | None = opt(None, "text put after every caption")
    caption_dropout_rate: float = opt(0.0, "drop the whole caption with this probability", lo=0.0, hi=1.0)
    caption_dropout_every_n_epochs: int | None = opt(None, "drop every caption in every n-th epoch; 0 = never",
                                                     lo=0)
    caption_tag_dropout_rate: float = opt(0.0, "drop each tag with this probability", lo=0.0, hi=1.0)
    token_warmup_min: int = opt(1, "tags used at the start of token warmup", lo=0, hi=1000)
    token_warmup_step: float = opt(0.0, "steps (or a fraction of the run if < 1) to reach every tag", lo=0.0)
    enable_bucket: bool = opt(False, "aspect-ratio buckets")
    min_bucket_reso: int = opt(256, "smallest bucket side", lo=8, hi=8192)
    max_bucket_reso: int = opt(1024, "largest bucket side", lo=8, hi=8192)
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this", lo=8, hi=1024)
    bucket_no_upscale: bool = opt(False, "small images get a bucket no larger than themselves")
    flip_aug: bool = opt(False, "random horizontal flips")
    color_aug: bool = opt(False, "a random hue shift or gamma in 1 of 3 uses (latents are then encoded every step)")
    random_crop: bool = opt(False, "random instead of centre crop (latents are then encoded every step)")
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images", lo=0.0, hi=1e6)
    masked_loss: bool = opt(False, "weight the loss by a mask (the image's alpha channel with alpha_mask)")
    alpha_mask: bool = opt(False, "use the image's alpha channel as the loss mask")
    cache_latents_to_disk: bool = opt(False, "also keep VAE latents on disk (reused while image and VAE are "
                                             "unchanged)")
    latent_cache_dir: str | None = opt(None, "where disk latents go (unset: <output_dir>/latent-cache)")
    # ---- optimisation ----
    learning_rate: float = opt(1e-4, "default learning rate", lo=0.0, hi=1.0)
    unet_lr: float | None = opt(None, "U-Net LR (unset: learning_rate; 0 freezes)", lo=0.0, hi=1.0)
    text_encoder_lr: float | None = opt(None, "text-encoder LR (unset: learning_rate; 0 freezes)", lo=0.0, hi=1.0)
    optimizer_type: str = opt("AdamW", "optimizer", choices=OPTIMIZERS)
    optimizer_args: list[str] | None = opt(None, 'optimizer options as kohya: ["weight_decay=0.1", '
                                                 '"betas=0.9,0.99"]')
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this; 0 = no clipping", lo=0.0, hi=1e6)
    lr_scheduler: str = opt("constant", "LR schedule", choices=SCHEDULERS)
    lr_warmup_steps: float = opt(0, "warmup steps, or a fraction of the run if < 1", lo=0.0)
    lr_scheduler_num_cycles: int = opt(1, "cosine_with_restarts: number of cosine cycles (hard restarts)",
                                       lo=1, hi=10000)
    lr_scheduler_power: float = opt(1.0, "polynomial: the power", lo=0.0, hi=100.0)
    lr_scheduler_type: str | None = opt(None, "a scheduler class, e.g. torch.optim.lr_scheduler.CosineAnnealingLR")
    lr_scheduler_args: list[str] | None = opt(None, 'its arguments as kohya: ["T_max=100"]')
    max_train_steps: int = opt(1600, "training steps (max_train_epochs overrides)", lo=1)
    max_train_epochs: int | None = opt(None, "training epochs", lo=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", lo=1)
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    mixed_precision: str = opt("no", "training precision: bf16/fp16 hold the frozen model in that dtype and "
                                     "autocast the adapter math (fp16 adds loss scaling)",
                               choices=("no", "fp16", "bf16"))
    full_bf16: bool = opt(False, "the adapters' own weights in bf16 too (needs mixed_precision bf16)")
    full_fp16: bool = opt(False, "the adapters' own weights in fp16 too (needs mixed_precision fp16)")
    no_half_vae: bool = opt(False, "keep the VAE in fp32 under mixed_precision")
    fp8_base: bool = opt(False, "frozen U-Net and text-encoder Linear/Conv weights in float8 (CUDA only)")
    fp8_base_unet: bool = opt(False, "frozen U-Net Linear/Conv weights in float8 (CUDA only)")
    torch_compile: bool = opt(False, "torch.compile the U-Net (speed only; the first steps compile)")
    dynamo_backend: str = opt("inductor", "torch.compile backend for torch_compile; \"no\" (accelerate's and "
                                          "kohya_ss's word for off) compiles nothing",
                              choices=("no", "inductor", "aot_eager", "eager", "cudagraphs"))
    dynamo_mode: str = opt("default", "torch.compile mode for torch_compile (accelerate's and kohya_ss's "
                                      "dynamo_mode): \"reduce-overhead\" replays the step's kernels as CUDA graphs, "
                                      "for GPUs whose host cannot launch kernels fast enough (no effect on the CPU); "
                                      "\"max-autotune\" also tunes kernels (a longer compile)",
                           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    seed: int = opt(42, "random seed", lo=0)
    # ---- noise, timesteps and loss ----
    noise_offset: float = opt(0.0, "noise offset", lo=0.0, hi=1.0)
    noise_offset_random_strength: bool = opt(False, "noise_offset scaled by one U(0, 1) draw per batch")
    adaptive_noise_scale: float | None = opt(None, "adds |mean latent| x this to noise_offset (needs noise_offset)",
                                              lo=-1.0, hi=1.0)
    multires_noise_iterations: int | None = opt(None, "pyramid noise levels (6-10 is common)", lo=1, hi=20)
    multires_noise_discount: float = opt(0.3, "pyramid noise: weight decay per level", lo=0.0, hi=1.0)
    ip_noise_gamma: float | None = opt(None, "input perturbation noise (0.1 is common)", lo=0.0, hi=1.0)
    ip_noise_gamma_random_strength: bool = opt(False, "ip_noise_gamma scaled by one U(0, 1) draw per batch")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero SNR at the last timestep")
    min_timestep: int | None = opt(None, "smallest training timestep (default 0)", lo=0, hi=999)
    max_timestep: int | None = opt(None, "largest training timestep, exclusive (default 1000)", lo=1, hi=1000)
    min_snr_gamma: float | None = opt(None, "min-SNR weighting gamma (5 is common)", lo=0.0, hi=1e6)
    debiased_estimation_loss: bool = opt(False, "weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1))")
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "v-prediction: weight by SNR/(SNR+1) like noise pred")
    v_pred_like_loss: float | None = opt(None, "add this x a v-prediction-like loss", lo=0.0, hi=1e6)
    loss_type: str = opt("l2", "l2, l1, huber or smooth_l1", choices=("l2", "l1", "huber", "smooth_l1"))
    huber_c: float = opt(0.1, "Huber loss parameter", lo=0.0, hi=1e6)
    huber_schedule: str = opt("snr", "how huber_c changes with the timestep",
                              choices=("constant", "exponential", "snr"))
    # ---- outputs ----
    output_dir: str = opt("output", "where files go")
    output_name: str = opt("lora", "file stem of saved LoRAs")
    save_model_as: str = opt("safetensors", "file format: lorakit writes safetensors only",
                             choices=("safetensors",))
    save_every_n_epochs: int | None = opt(None, "save a file every N epochs", lo=1)
    save_every_n_steps: int | None = opt(None, "save a file every N steps", lo=1)
    save_last_n_epochs: int | None = opt(None, "keep only the last N epoch files", lo=1)
    save_last_n_steps: int | None = opt(None, "keep only step files from the last N steps", lo=1)
    save_precision: str = opt("fp16", "dtype of saved tensors", choices=("float", "fp16", "bf16"))
    training_comment: str | None = opt(None, "stored in the file's metadata (ss_training_comment)")
    no_metadata: bool = opt(False, "write no ss_* training metadata (only what loaders need)")
    sample_every_n_epochs: int | None = opt(None, "render samples every N epochs", lo=1)
    sample_every_n_steps: int | None = opt(None, "render samples every N steps", lo=1)
    sample_at_first: bool = opt(False, "render samples before the first step")
    sample_prompts: str | None = opt(None, "prompt file (kohya syntax: --n --w --h --d --l --s --ss)")
    sample_sampler: str = opt("ddim", "sampler for samples", choices=SAMPLERS)
    logging_dir: str | None = opt(None, "TensorBoard log folder: loss, LR, per-block dW norms (attention vs conv)")
    log_with: str = opt("tensorboard", "where logs go (lorakit writes TensorBoard)", choices=("tensorboard",))
    log_prefix: str | None = opt(None, "logs go to logging_dir/<log_prefix><YYYYmmddHHMMSS>, a folder per run "
                                       "as kohya (unset: straight into logging_dir)")
    # ---- held-out validation (kohya's names) ----
    validation_split: float = opt(0.0, "share of the training images held out for a validation loss (never trained "
                                       "on, nor their repeats): the mean MSE over a fixed grid of timesteps with "
                                       "fixed noise per image, so it compares across epochs and sweep variants; "
                                       "0 = off. Under 4 images (or a split that holds out none): a caption-only "
                                       "check instead (training images with unrelated captions)", lo=0.0, hi=0.9)
    validation_seed: int | None = opt(None, "seed of the held-out split and of the validation noise (unset: seed)",
                                      lo=0)
    validate_every_n_steps: int | None = opt(None, "also compute the validation loss every N steps", lo=1)
    validate_every_n_epochs: int | None = opt(None, "compute the validation loss every N epochs (unset: every "
                                                    "epoch; the last step always)", lo=1)
    max_validation_steps: int | None = opt(None, "at most this many held-out images per validation (unset: all)",
                                           lo=1)
    save_state: bool = opt(False, "also save the training state with every saved file (for --resume)")
    resume: str | None = opt(None, "continue from a `<output_name>-state` folder (same losses as an unbroken run)")

    notes = ()  # not a field: settings accepted without effect, set by build_config

    def network_config(self) -> NetworkConfig:
        """The network to build: lycoris.kohya without a preset targets LyCORIS's default preset (full)."""
        if self.network_module == "lycoris.kohya" and self.network.lycoris_preset is None:
            network = copy(self.network)  # not replace(): that would validate again, and build_config collects
            network.lycoris_preset = LYCORIS_DEFAULT_PRESET
            return network
        return self.network

    def __getattr__(self, name: str):
        """Network keys read through the config as TOML writes them: config.network_dim, config.conv_alpha."""
        network = self.__dict__.get("network")  # absent while the dataclass is being built or copied
        field_name = NETWORK_FIELD_OF_KEY.get(name, name)
        if network is not None and field_name in network.__dict__:
            return network.__dict__[field_name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def settings(self) -> dict[str, object]:
        """Every key as the TOML spells it (network keys flat): for state checks and saved settings."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "network"}
        for f in fields(self.network):
            if f.name not in INTERNAL_NETWORK_FIELDS:
                flat[NETWORK_KEY_OF_FIELD.get(f.name, f.name)] = getattr(self.network, f.name)
        return flat
