"""Before the first step: the dataset, the sample prompts and the base model, checked cheapest first."""
from __future__ import annotations

from copy import copy

import torch

from lorakit.models.checkpoint import FAMILY_NAMES, BaseModel, CheckpointError, load_base_model, native_resolution
from lorakit.training.captions import SamplePrompt
from lorakit.training.config import ConfigError, TrainConfig
from lorakit.training.dataset import DatasetReport, load_specs, scan, subset_defaults
from lorakit.training.paths import path_problems
from lorakit.training.precision import choose, precision_problems
from lorakit.training.sampling import SamplePromptError, check_sampler, load_sample_prompts


def with_native_resolution(config: TrainConfig, base=None) -> tuple[TrainConfig, list[str]]:
    """resolution unset = the base model's native size (read from its configs or header, not its weights; from
    `base` itself when the caller built the model); a copy of the config with it set, and the note that says
    so. An unreadable model keeps it unset here: preflight and the model load then name the real problem."""
    if config.resolution is not None:
        return config, []
    try:
        side = base.native_resolution if base is not None else native_resolution(config.pretrained_model_name_or_path)
    except (OSError, ValueError, KeyError, IndexError, CheckpointError):
        side = 512  # only until the model load reports why the file cannot be read
    resolved = copy(config)
    resolved.resolution = [side, side]
    return resolved, [f"resolution unset: the base model's native size, {side}x{side}"]


def preflight(config: TrainConfig) -> tuple[list, DatasetReport, list[SamplePrompt]]:
    """Paths, dataset and sample prompts, checked together before any model loads: one error lists them all."""
    problems = path_problems(config)
    specs, report, prompts = [], DatasetReport(), []
    if not problems:  # the dataset is only read once its paths exist
        try:
            specs, report = prepare_dataset(config)
        except ConfigError as e:
            problems.append(str(e))
    if not any(p.startswith("sample_prompts") for p in problems):
        try:
            prompts = prepare_samples(config)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) found before training:\n" +
                          "\n".join(f"  - {p}" for p in problems))
    return specs, report, prompts


def prepare_dataset(config: TrainConfig) -> tuple[list, DatasetReport]:
    config = with_native_resolution(config)[0]  # API callers may pass it unset, as the trainer does
    source = config.dataset_config or config.train_data_dir
    if not source:
        raise ConfigError("set train_data_dir (a folder of `N_name` subfolders) or dataset_config (a TOML)")
    specs, notes = load_specs(source, config.caption_extension, config.resolution, subset_defaults(config),
                              config.reg_data_dir)
    if config.masked_loss and not any(s.alpha_mask for spec in specs for s in spec.subsets):
        raise ConfigError("masked_loss = true has no mask source: set alpha_mask = true (top level, or per subset "
                          "in the dataset TOML) so each image's alpha channel is its loss mask; kohya's other "
                          "source, conditioning_data_dir mask images, is not supported by lorakit")
    if config.dataset_config is None:
        for spec in specs:
            spec.batch_size = config.train_batch_size
    report = scan(specs)
    report.notes[:0] = notes
    if not report.items:
        raise ConfigError(f"{source}: no usable images ({len(report.problems)} problem(s)): "
                          + "; ".join(report.problems[:3]))
    if config.strict_dataset and report.problems:
        raise ConfigError(f"{source}: strict_dataset = true and {len(report.problems)} file(s) cannot be used:\n"
                          + "\n".join(f"  - {p}" for p in report.problems))
    if report.num_train_images == 0:  # an epoch without batches would never end
        raise ConfigError(f"{source}: no training images, only regularization images: an epoch would have no "
                          "batches; add a training subset (not is_reg) with num_repeats >= 1")
    return specs, report


def prepare_samples(config: TrainConfig) -> list[SamplePrompt]:
    wanted = [k for k in ("sample_every_n_epochs", "sample_every_n_steps", "sample_at_first") if getattr(config, k)]
    if wanted and not config.sample_prompts:  # kohya fails at its first sample; lorakit before training
        raise ConfigError(f"{' and '.join(wanted)} {'is' if len(wanted) == 1 else 'are'} set but sample_prompts is "
                          "not: give a prompt file (one prompt per line, kohya options --n --w --h --d --l --s --ss)")
    if not config.sample_prompts:
        return []
    try:
        prompts = load_sample_prompts(config.sample_prompts, config.resolution)
        for name in sorted({config.sample_sampler, *(p.sampler for p in prompts if p.sampler)}):
            check_sampler(name)
        return prompts
    except SamplePromptError as e:
        raise ConfigError(str(e)) from None


def prepare_base(config: TrainConfig, device: torch.device | str = "cpu", base: BaseModel | None = None) -> BaseModel:
    """The base model, read straight into the run's dtypes (never an fp32 copy first under mixed_precision);
    precision switches that cannot run on `device` are refused before anything loads. `base`: a model the
    caller built in-process (in `choose(config).load_dtypes()`), checked like a loaded one."""
    problems = precision_problems(config, torch.device(device))
    if problems:
        raise ConfigError(f"{len(problems)} precision setting(s) cannot be used here:\n" +
                          "\n".join(f"  - {p}" for p in problems))
    if base is None:
        base = load_base_model(config.pretrained_model_name_or_path, dtype=choose(config).load_dtypes(),
                               prediction_type="v_prediction" if config.v_parameterization else None)
    if base.family == "sdxl" and config.clip_skip > 1:
        raise ConfigError("clip_skip does not apply to SDXL (it always uses the penultimate layers, as kohya "
                          "does); remove it")
    if config.v2 and base.family != "sd2":  # kohya would build an SD2 model around an SD1/SDXL file
        raise ConfigError(f"v2 = true, but {base.source} is {FAMILY_NAMES[base.family]}, not SD2.x: remove v2 "
                          "(lorakit detects the family from the file) or give an SD2.x model")
    if config.v2:
        base.notes.append("v2 = true agrees with the file (SD2.x); lorakit detects this by itself")
    problems = model_problems(config, base)
    if problems:
        raise ConfigError(f"{len(problems)} setting(s) do not fit {base.source}:\n" +
                          "\n".join(f"  - {p}" for p in problems))
    return base


def model_problems(config: TrainConfig, base: BaseModel) -> list[str]:
    """Settings that only the model can judge: text-encoder depth for clip_skip, the pixel grid for sizes."""
    out = []
    layers = min(te.config.num_hidden_layers for te in base.text_encoders)
    if config.clip_skip > layers:
        out.append(f"clip_skip = {config.clip_skip}, but the text encoder has {layers} layers; use 1..{layers} "
                   "(2 is common for anime models)")
    vae = base.pipeline.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
    grid = 8 * factor
    for side in dict.fromkeys(config.resolution or ()):  # unset: the native size, on the grid by definition
        if side % grid:
            low, high = side // grid * grid, -(-side // grid) * grid
            out.append(f"resolution {side} is not a multiple of {grid} (8 x the VAE's {factor}x downsampling); "
                       f"use {low or grid} or {high}")
    return out
