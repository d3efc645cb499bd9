"""`lorakit train`: a LoRA/LoCon/LoHa/LoKr from a folder of images, as one sequence of named steps.

    result = train(load_config("train.toml"))

Everything that can be wrong (config, dataset, base model, block lists) is checked before the first step.
Files are written atomically with full metadata; a NaN/inf loss stops the run and keeps the last good file.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit.formats.files import save_network
from lorakit.models.checkpoint import BaseModel, load_base_model
from lorakit.surgery.network import LoraNetwork, create_network
from lorakit.models import objectives as obj
from lorakit.training.captions import process_caption
from lorakit.training.config import ConfigError, TrainConfig
from lorakit.training.data import LatentCache, batches_per_epoch, epoch_batches
from lorakit.training.dataset import DatasetReport, load_specs, scan
from lorakit.training.optim import make_optimizer, make_scheduler


class TrainingStopped(RuntimeError):
    """The run stopped early (NaN/inf loss); the message says where and which file is the last good one."""


@dataclass
class TrainResult:
    files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


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


def prepare_base(config: TrainConfig) -> BaseModel:
    base = load_base_model(config.pretrained_model_name_or_path,
                           prediction_type="v_prediction" if config.v_parameterization else None)
    if base.family == "sdxl":
        raise ConfigError("SDXL training is not implemented yet (SD1.x/SD2.x are); the adapter core and files "
                          "support SDXL already")
    return base


def encode_text(text_encoder, tokenizer, captions: list[str], clip_skip: int) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        return text_encoder(ids).last_hidden_state
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    return final_norm(hidden)


class Trainer:
    def __init__(self, config: TrainConfig, device: str | torch.device = "cpu"):
        self.config, self.device = config, torch.device(device)
        self.specs, self.report = prepare_dataset(config)  # cheap checks first
        self.base = prepare_base(config)
        pipe = self.base.pipeline
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).to(self.device)
        self.network: LoraNetwork = create_network(self.unet, [self.text_encoder], config.network_config(),
                                                   seed=config.seed)
        self.train_text = any(i.component != "unet" for i in self.network.info.values()) and \
            (config.text_encoder_lr is None or config.text_encoder_lr > 0)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(self.device)
        self._text_cache: dict[str, torch.Tensor] = {}

    # ---- steps ------------------------------------------------------------------------------
    def total_steps(self) -> int:
        # an optimizer step needs a full group of micro-batches; a partial group at the epoch's end carries over
        per_epoch = max(1, batches_per_epoch(self.report.items, self.specs[0].batch_size)
                        // self.config.gradient_accumulation_steps)
        if self.config.max_train_epochs:
            return per_epoch * self.config.max_train_epochs
        return self.config.max_train_steps

    def context(self, captions: list[str]) -> torch.Tensor:
        if self.train_text:
            return encode_text(self.text_encoder, self.tokenizer, captions, self.config.clip_skip)
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:  # frozen text encoder: each distinct caption is encoded once
            with torch.no_grad():
                for c, h in zip(missing, encode_text(self.text_encoder, self.tokenizer, missing, self.config.clip_skip)):
                    self._text_cache[c] = h
        return torch.stack([self._text_cache[c] for c in captions])

    def loss(self, latents: torch.Tensor, captions: list[str], rng: torch.Generator) -> torch.Tensor:
        cfg = self.config
        noise = obj.offset_noise(latents, cfg.noise_offset, rng)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), generator=rng).to(self.device)
        noisy = obj.add_noise(latents, noise, self.alphas_cumprod, t)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            pred = self.unet(noisy, t, self.context(captions)).sample
        weights = None
        if cfg.min_snr_gamma:
            weights = obj.min_snr_weight(self.alphas_cumprod, t, cfg.min_snr_gamma, self.base.prediction_type
                                         == "v_prediction")
        target = obj.target(latents, noise, self.alphas_cumprod, t, self.base.prediction_type == "v_prediction")
        return obj.weighted_mse(pred, target, weights)

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, result, start = self.config, TrainResult(), time.time()
        torch.manual_seed(cfg.seed)
        rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
        with tqdm(total=len(self.report.items), desc="caching latents", unit="img", leave=False) as bar:
            cache = LatentCache.build(self.report.items, self.vae, progress=bar.update)
        total = self.total_steps()
        optimizer = make_optimizer(cfg.optimizer_type, self.network.param_groups(
            cfg.unet_lr, cfg.text_encoder_lr, cfg.learning_rate), cfg.learning_rate, self.device)
        scheduler = make_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, total)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train(), self.network.train()
        bar, epoch = tqdm(total=total, desc="training", unit="step"), 0
        while result.steps < total:
            epoch += 1
            for loss in self._epoch(epoch, cache, optimizer, scheduler, rng, gen, result, total):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and result.steps < total:
                result.files.append(self.save(f"{cfg.output_name}-{epoch:06d}", epoch, result.steps, start))
        bar.close()
        result.files.append(self.save(cfg.output_name, epoch, result.steps, start))
        result.seconds = time.time() - start
        return result

    def _epoch(self, epoch, cache, optimizer, scheduler, rng, gen, result, total):
        cfg, items = self.config, self.report.items
        accumulate = cfg.gradient_accumulation_steps
        for i, batch in enumerate(epoch_batches(items, self.specs[0].batch_size, rng)):
            latents = torch.stack([cache.flipped[j] if cache.flipped[j] is not None and rng.random() < 0.5
                                   else cache.latents[j] for j in batch]).to(self.device)
            captions = [process_caption(items[j].caption, rng, items[j].subset.shuffle_caption,
                                        items[j].subset.keep_tokens, items[j].subset.caption_dropout_rate)
                        for j in batch]
            loss = self.loss(latents, captions, gen)
            if not torch.isfinite(loss):
                last = Path(cfg.output_dir) / f"{cfg.output_name}-*.safetensors"
                raise TrainingStopped(f"loss became {float(loss.detach())} at step {result.steps + 1} (epoch {epoch}); "
                                      f"stopped without saving it. Last good files: {last}. Lower the learning "
                                      "rate or use mixed_precision bf16 instead of fp16")
            (loss / accumulate).backward()
            if (i + 1) % accumulate:
                continue
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.losses.append(float(loss.detach()))
            yield result.losses[-1]
            if result.steps >= total:
                return

    def save(self, stem: str, epoch: int, steps: int, start: float) -> Path:
        cfg = self.config
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.save_precision)
        meta = {"ss_epoch": str(epoch), "ss_steps": str(steps), "ss_learning_rate": str(cfg.learning_rate),
                "ss_unet_lr": str(cfg.unet_lr), "ss_text_encoder_lr": str(cfg.text_encoder_lr),
                "ss_optimizer": cfg.optimizer_type, "ss_lr_scheduler": cfg.lr_scheduler,
                "ss_num_train_images": str(self.report.num_train_images), "ss_seed": str(cfg.seed),
                "ss_resolution": f"({cfg.resolution}, {cfg.resolution})", "ss_clip_skip": str(cfg.clip_skip),
                "ss_noise_offset": str(cfg.noise_offset), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
                "ss_mixed_precision": cfg.mixed_precision, "ss_training_started_at": str(start),
                "ss_sd_model_name": Path(self.base.source).name, "ss_max_train_steps": str(self.total_steps()),
                "ss_tag_frequency": json.dumps({k: dict(v) for k, v in self.report.tag_frequency.items()}),
                "ss_dataset_dirs": json.dumps({Path(s.image_dir).name: {
                    "n_repeats": s.num_repeats, "img_count": sum(1 for i in self.report.items if i.subset is s)}
                    for spec in self.specs for s in spec.subsets})}
        path = Path(cfg.output_dir) / f"{stem}.safetensors"
        return save_network(self.network, path, dtype=dtype, title=stem, metadata=meta,
                            v_prediction=self.base.prediction_type == "v_prediction")


def train(config: TrainConfig, device: str | torch.device = "cpu") -> TrainResult:
    return Trainer(config, device).run()
