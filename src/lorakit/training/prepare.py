"""Before the first step: the dataset, the sample prompts and the base model, checked cheapest first."""
from __future__ import annotations

import torch

from lorakit.models.checkpoint import BaseModel, load_base_model
from lorakit.training.captions import SamplePrompt
from lorakit.training.config import ConfigError, TrainConfig
from lorakit.training.dataset import DatasetReport, load_specs, scan
from lorakit.training.sampling import SamplePromptError, load_sample_prompts


def prepare_dataset(config: TrainConfig) -> tuple[list, DatasetReport]:
    source = config.dataset_config or config.train_data_dir
    if not source:
        raise ConfigError("set train_data_dir (a folder of `N_name` subfolders) or dataset_config (a TOML)")
    specs, notes = load_specs(source, config.caption_extension, config.resolution)
    if config.dataset_config is None:
        for spec in specs:
            spec.batch_size = config.train_batch_size
    report = scan(specs)
    report.notes[:0] = notes
    if not report.items:
        raise ConfigError(f"{source}: no usable images ({len(report.problems)} problem(s)): "
                          + "; ".join(report.problems[:3]))
    return specs, report


def prepare_samples(config: TrainConfig) -> list[SamplePrompt]:
    if config.sample_every_n_epochs and not config.sample_prompts:
        raise ConfigError("sample_every_n_epochs is set but sample_prompts is not: give a prompt file "
                          "(one prompt per line, kohya options --n --w --h --d --l --s)")
    if not config.sample_prompts:
        return []
    try:
        return load_sample_prompts(config.sample_prompts, config.resolution)
    except SamplePromptError as e:
        raise ConfigError(str(e)) from None


def prepare_base(config: TrainConfig) -> BaseModel:
    base = load_base_model(config.pretrained_model_name_or_path,
                           prediction_type="v_prediction" if config.v_parameterization else None)
    if base.family == "sdxl" and config.clip_skip > 1:
        raise ConfigError("clip_skip does not apply to SDXL (it always uses the penultimate layers, as kohya "
                          "does); remove it")
    return base


def encode_text_sdxl(text_encoders, tokenizers, captions: list[str], size: tuple[int, int]) -> tuple:
    """SDXL conditioning: both encoders' penultimate hidden states side by side (B, 77, 768+1280), the second
    encoder's pooled projection (B, 1280), and the size/crop ids (orig h, w, crop top, left, target h, w)."""
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    height, width = size
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(captions), dtype=pooled.dtype,
                            device=pooled.device)
    return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


def encode_text(text_encoder, tokenizer, captions: list[str], clip_skip: int) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        return text_encoder(ids).last_hidden_state
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    return final_norm(hidden)
