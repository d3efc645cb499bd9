"""`lorakit train`: a LoRA/LoCon/LoHa/LoKr from a folder of images, as one sequence of named steps.

    result = train(load_config("train.toml"))

Everything that can be wrong (config, dataset, base model, block lists, sample prompts) is checked before
the first step. Every random draw comes from (seed, epoch) or (seed, micro-batch index, process), so an
interrupted run resumed with `--resume` gives the same losses as an unbroken one. Files are written
atomically with full metadata; a NaN/inf loss stops the run and keeps the last good file; SIGINT/SIGTERM
save the state and the current LoRA, then stop.
"""
from __future__ import annotations

import hashlib
import random
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit.formats.atomic import remove_stale_temp_files
from lorakit.models import noise as nz
from lorakit.models import objectives as obj
from lorakit.models.checkpoint import BaseModel
from lorakit.models.lean import Recompute, make_lean
from lorakit.surgery.network import LoraNetwork
from lorakit.formats.start import start_network
from lorakit.training.captions import CaptionClock, process_caption
from lorakit.training.config import ConfigError, TrainConfig
from lorakit.training.data import LatentCache, batches_per_epoch, epoch_batches, live_note, loss_weights
from lorakit.training.distributed import Processes
from lorakit.training.monitor import Monitor
from lorakit.training.optim import apply_max_norm, make_optimizer, make_scheduler, resolve_warmup, schedule_options
from lorakit.training.outputs import (StopRequest, TrainingInterrupted, TrainingStopped, epoch_file_stem, removed_epoch,
                                      removed_step, save_lora, step_file_stem)
from lorakit.training.precision import (apply_release, cast_adapters, choose, cpu_half_note, deterministic_captions,
                                        keep_large_buffers, make_scaler, peak_memory, release_plan, return_freed_memory,
                                        to_fp8)
from lorakit.training.prepare import prepare_base, preflight, with_native_resolution
from lorakit.training.sampling import render_samples
from lorakit.training.state import Progress, load_state, save_state
from lorakit.training.text_encoding import encode_text, encode_text_sdxl
from lorakit.training.validation import Validation, split_datasets

__all__ = ["Trainer", "TrainResult", "TrainingStopped", "TrainingInterrupted", "train"]


@dataclass
class TrainResult:
    files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    is_main: bool = True  # False on the other processes of a multi-process run


@dataclass
class RunState:
    """What one run() carries between its steps (one object instead of many arguments)."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    progress: Progress
    monitor: Monitor | None
    result: TrainResult


def derived_seed(*parts) -> int:
    """A 63-bit seed from the run seed and a position (epoch, micro-batch, process): order-independent draws."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def noised_latents(cfg: TrainConfig, latents: torch.Tensor, alphas_cumprod: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise ε, U-Net input x_t, timesteps t) as kohya's get_noise_noisy_latents_and_timesteps, drawn from
    `gen` in its order: ε (offset noise, then pyramid noise), t ∈ [min_timestep, max_timestep), then the
    input perturbation ξ. ξ reaches the input only: x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·(ε + γξ); the target uses ε."""
    noise = obj.offset_noise(latents, cfg.noise_offset, gen, cfg.adaptive_noise_scale,
                             cfg.noise_offset_random_strength)
    if cfg.multires_noise_iterations:
        noise = nz.pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, gen)
    low = 0 if cfg.min_timestep is None else cfg.min_timestep
    high = len(alphas_cumprod) if cfg.max_timestep is None else cfg.max_timestep
    t = nz.sample_timesteps(latents.shape[0], low, high, gen).to(latents.device)
    model_noise = noise
    if cfg.ip_noise_gamma:
        model_noise = nz.perturbed_noise(noise, cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength, gen)
    return noise, obj.add_noise(latents, model_noise, alphas_cumprod, t), t


def per_sample_loss(cfg: TrainConfig, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor, snr_alphas_cumprod: torch.Tensor, v_prediction: bool,
                    weights: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) losses in the order of kohya's process_batch and post_process_loss: the element loss of
    loss_type (Huber threshold from alphas_cumprod), the mask, the mean over C x H x W, the per-sample
    weights, then min-SNR, scale_v_pred_loss_like_noise_pred, v_pred_like_loss and debiased estimation, whose
    SNR comes from snr_alphas_cumprod."""
    huber_c = None
    if cfg.loss_type in ("huber", "smooth_l1"):
        huber_c = obj.huber_threshold(cfg.huber_schedule, cfg.huber_c, t, alphas_cumprod)
    loss = obj.elementwise_loss(pred.float(), target.float(), cfg.loss_type, huber_c)
    if masks is not None:
        loss = obj.masked(loss, masks)
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    if weights is not None:
        loss = loss * weights.to(loss)
    ac = snr_alphas_cumprod
    if cfg.min_snr_gamma:
        loss = loss * obj.min_snr_weight(ac, t, cfg.min_snr_gamma, v_prediction).to(loss)
    if cfg.scale_v_pred_loss_like_noise_pred:
        loss = loss * obj.v_pred_scale(ac, t).to(loss)
    if cfg.v_pred_like_loss:
        loss = obj.add_v_pred_like_loss(loss, ac, t, cfg.v_pred_like_loss)
    if cfg.debiased_estimation_loss:
        loss = loss * obj.debiased_weight(ac, t, v_prediction).to(loss)
    return loss


class Trainer:
    def __init__(self, config: TrainConfig, device: str | torch.device | None = None, base: BaseModel | None = None):
        """`base`: a model built in-process (benchmarks, the Python API) instead of the config's file."""
        config, resolution_note = with_native_resolution(config, base)  # unset: the base model's native size
        self.config = config
        self.specs, self.report, self.prompts = preflight(config)  # every cheap check, before any model loads
        self.report.notes[:0] = resolution_note
        seed = config.seed if config.validation_seed is None else config.validation_seed
        self.report.items, self.held_out = split_datasets(self.report, self.specs, config.validation_split,
                                                          seed)  # never trained
        self.procs = Processes(device)
        self.device = self.procs.device
        self.tell([f"skipped: {p}" for p in self.report.problems] + [f"note: {n}" for n in self.report.notes])
        self.precision = choose(config)
        self.base = prepare_base(config, self.device, base)
        half_note = cpu_half_note(config, self.device)
        self.tell([f"note: {n}" for n in self.base.notes + ([half_note] if half_note else [])])
        pipe = self.base.pipeline
        pipe.set_progress_bar_config(disable=True)
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.text_encoders = self.base.text_encoders  # SDXL: two
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if len(self.text_encoders) == 2 else [])
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False).to(self.device)
        if self.precision.fp8_unet:  # refused off CUDA by prepare_base
            to_fp8([self.unet] + (self.text_encoders if self.precision.fp8_text else []))
        self.network: LoraNetwork = start_network(self.unet, self.text_encoders, config.network_config(),
                                                  config.seed, config.network_weights, config.dim_from_weights)
        self.network.to(self.device)
        cast_adapters(self.network, self.precision.adapters)  # fp32 masters unless full_bf16/full_fp16
        self.scaler = make_scaler(config, self.device)  # fp16 only
        self.step_unet = self.unet  # torch_compile: the compiled U-Net, for training steps only
        self.recompute = Recompute(lambda: peak_memory(self.device), self.tell)  # see models/lean.py
        self.offloaded: list = []  # VAE/text encoders moved to the CPU after caching (sampling moves them in)
        self.train_text = any(i.component != "unet" for i in self.network.info.values()) and \
            (config.text_encoder_lr is None or config.text_encoder_lr > 0)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(self.device)
        self._text_cache: dict[tuple, tuple] = {}  # (caption, pixel size) -> (hidden, SDXL extras)
        self.out = Path(config.output_dir)

    def tell(self, lines: list[str]) -> None:
        """What the run skipped or decided, said once on the main process (stderr: stdout stays the result)."""
        if self.procs.is_main:
            for line in lines:
                print(line, file=sys.stderr)

    # ---- steps ------------------------------------------------------------------------------
    def total_steps(self) -> int:
        # one optimizer step = gradient_accumulation_steps micro-batches on each process
        micro = batches_per_epoch(self.report.items, self.specs[0].batch_size) // self.procs.world
        per_epoch = max(1, micro // self.config.gradient_accumulation_steps)
        if self.config.max_train_epochs:
            return per_epoch * self.config.max_train_epochs
        return self.config.max_train_steps

    def encode(self, captions: list[str], size: tuple[int, int]) -> tuple[torch.Tensor, dict | None]:
        """(context (B, max_token_length + 2, D), SDXL's added_cond_kwargs or None)."""
        cfg = self.config
        if self.base.family == "sdxl":
            return encode_text_sdxl(self.text_encoders, self.tokenizers, captions, size, cfg.max_token_length,
                                    cfg.weighted_captions)
        return encode_text(self.text_encoder, self.tokenizer, captions, cfg.clip_skip, cfg.max_token_length,
                           cfg.weighted_captions), None

    def context(self, captions: list[str], size: tuple[int, int]) -> tuple[torch.Tensor, dict | None]:
        if self.train_text:
            return self.encode(captions, size)
        missing = [c for c in dict.fromkeys(captions) if (c, size) not in self._text_cache]
        if missing and self.text_encoder is None:
            raise RuntimeError(f"caption {missing[0]!r} at {size} was not cached before the text encoders were "
                               "released (a lorakit bug: please report it)")
        if missing:  # frozen text encoders: each distinct caption is encoded once
            with torch.no_grad():
                hidden, extra = self.encode(missing, size)
                for n, c in enumerate(missing):
                    self._text_cache[(c, size)] = (hidden[n], {k: v[n] for k, v in (extra or {}).items()})
        entries = [self._text_cache[(c, size)] for c in captions]
        extra = {k: torch.stack([e[1][k] for e in entries]) for k in entries[0][1]} or None
        return torch.stack([e[0] for e in entries]), extra

    def loss(self, latents: torch.Tensor, captions: list[str], rng: torch.Generator,
             weights: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of one micro-batch, in the order of kohya's process_batch (see noised_latents and
        per_sample_loss). weights: (B,) per-sample loss weights (prior_loss_weight); masks: (B, 1, h, w) loss
        masks in [0, 1] (masked_loss). Every draw comes from `rng`."""
        cfg, v_pred = self.config, self.base.prediction_type == "v_prediction"
        # kohya computes its SNR weights from the schedule before the zero-terminal-SNR rescale; only noising,
        # targets and the Huber "snr" schedule see the rescaled one
        schedule = nz.zero_terminal_snr(self.alphas_cumprod) if cfg.zero_terminal_snr else self.alphas_cumprod
        noise, noisy, t = noised_latents(cfg, latents, schedule, rng)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        size = (latents.shape[-2] * 8, latents.shape[-1] * 8)  # pixels: the VAE downsamples 8x
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            context, extra = self.context(captions, size)
            with self.recompute.context(noisy.numel(), self.step_unet is self.unet):  # compiled: traces no hooks
                pred = self.step_unet(noisy, t, context, added_cond_kwargs=extra).sample
        target = obj.target(latents, noise, schedule, t, v_pred)
        return per_sample_loss(cfg, pred, target, t, schedule, self.alphas_cumprod, v_pred, weights, masks).mean()

    def micro_batch(self, cache: LatentCache, batch: list[int], micro: int) -> torch.Tensor:
        """Loss of one micro-batch; its flips, caption shuffles, noise, timesteps and dropout masks all come
        from (seed, micro, process), never from earlier draws."""
        cfg, items = self.config, self.report.items
        seed = derived_seed(cfg.seed, "micro", micro, self.procs.rank)
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # adapter dropout draws from the global generator
        latents, masks = cache.batch(batch, rng, self.device)  # color_aug/random_crop images are encoded now
        progress = self.run_state.progress  # epoch and step: caption_dropout_every_n_epochs, token warmup
        clock = CaptionClock(progress.epoch, progress.step, self.total_steps())
        captions = [process_caption(items[j].caption, items[j].subset, rng, clock) for j in batch]
        weights = loss_weights(items, batch, cfg.prior_loss_weight)  # reg images: prior_loss_weight
        return self.loss(latents, captions, gen, weights=weights, masks=masks)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.report.items, self.specs[0].batch_size,
                                random.Random(derived_seed(self.config.seed, "epoch", epoch)))
        return self.procs.shard(batches)

    def release_frozen(self, cache: LatentCache) -> None:
        """Once latents are cached, the VAE and (with frozen text encoders and fixed captions, after every
        caption is encoded) the text encoders leave: deleted on the CPU, moved to the CPU from a GPU; kept
        when a later step or a sample needs them. The run says which, on stderr."""
        items = self.report.items
        text_adapters = any(i.component != "unet" for i in self.network.info.values())
        plan = release_plan(self.device, any(z is None for z in cache.latents), bool(self.prompts),
                            self.train_text, text_adapters, deterministic_captions(items))
        if plan.text != "keep":
            self.cache_all_text(cache)
        pipe = self.base.pipeline
        self.offloaded = apply_release(plan, pipe, cache)
        self.vae, self.text_encoder = pipe.vae, pipe.text_encoder
        self.text_encoders = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                              if te is not None]
        if "delete" in (plan.vae, plan.text):
            return_freed_memory()  # only now: until the lines above, this trainer still held them
        self.tell(list(plan.lines))

    @torch.no_grad()
    def cache_all_text(self, cache: LatentCache) -> None:
        """Every (caption, size) the run will ask for, encoded now as the steps would (fixed captions only)."""
        by_size = defaultdict(list)
        for item, z in zip(self.report.items, cache.latents):
            size = (z.shape[-2] * 8, z.shape[-1] * 8) if z is not None else (item.bucket[1], item.bucket[0])
            by_size[size].append(process_caption(item.caption, item.subset, random.Random(0), CaptionClock()))
        dtype = self.precision.autocast
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            for size, captions in by_size.items():
                captions = list(dict.fromkeys(captions))
                for start in range(0, len(captions), 16):
                    self.context(captions[start:start + 16], size)

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, start = self.config, time.time()
        if self.procs.is_main:
            for folder in (self.out, self.state_dir):  # a save killed by SIGKILL leaves its temp file behind
                for path in remove_stale_temp_files(folder):
                    print(f"note: removed {path}, left by an interrupted save", file=sys.stderr)
        note = live_note(self.report.items)
        if note and self.procs.is_main:
            print(f"note: {note}", file=sys.stderr)
        with tqdm(total=len(self.report.items), desc="caching latents", unit="img", leave=False,
                  disable=not self.procs.is_main) as bar:
            disk = (cfg.latent_cache_dir or self.out / "latent-cache") if cfg.cache_latents_to_disk else None
            cache = LatentCache.build(self.report.items, self.vae, progress=bar.update, disk=disk)
        self.validation = Validation.prepare(self, self.held_out)  # encoded while the VAE is loaded
        self.release_frozen(cache)
        keep_large_buffers(self.device)  # no page faults for oneDNN's per-call weight buffers
        total = self.total_steps()
        optimizer = make_optimizer(cfg.optimizer_type, self.network.param_groups(
            cfg.unet_lr, cfg.text_encoder_lr, cfg.learning_rate), cfg.learning_rate, self.device, cfg.optimizer_args)
        scheduler = make_scheduler(cfg.lr_scheduler, optimizer, resolve_warmup(cfg.lr_warmup_steps, total), total,
                                   **schedule_options(cfg))
        progress = Progress()
        if cfg.resume:
            progress = load_state(cfg.resume, self.network, optimizer, scheduler, cfg.settings(), self.scaler)
        make_lean(self.unet)  # the same gradients with fewer activations kept (see models/lean.py)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.torch_compile and cfg.dynamo_backend != "no":  # speed only: the same math, traced through the adapters' forwards
            for adapter in (a for a in self.network.adapters.values() if getattr(a, "alpha", None) is not None):
                adapter.alpha_value  # read now, in eager: the traced graph takes it as a constant
            mode = None if cfg.dynamo_mode == "default" else cfg.dynamo_mode  # inductor's (cross_field_problems)
            self.step_unet = torch.compile(self.unet, backend=cfg.dynamo_backend, mode=mode)
        self.unet.train(), self.network.train()
        monitor = Monitor(self.out / f"{cfg.output_name}-history.json", cfg.logging_dir, resume_step=progress.step,
                          total_steps=total, log_prefix=cfg.log_prefix) if self.procs.is_main else None
        result = TrainResult(losses=list(progress.losses), steps=progress.step, is_main=self.procs.is_main)
        self.run_state = RunState(optimizer, scheduler, progress, monitor, result)
        if self.validation and progress.step == 0:  # the base model's value, which fitting is measured against
            self.validation.run(self, 0, progress.epoch - 1)
        if cfg.sample_at_first and self.prompts and progress.step == 0:  # kohya names these epoch 0
            self.sample(f"{cfg.output_name}_e{0:06d}", progress)
        with StopRequest() as stop, tqdm(total=total, initial=progress.step, desc="training", unit="step",
                                         disable=not self.procs.is_main) as bar:
            while progress.step < total:
                self._epoch(cache, total, stop, bar)
        result.files.append(self.save(cfg.output_name, progress))
        if self.prompts:
            self.sample(f"{cfg.output_name}_e{progress.epoch:06d}", progress)
        self.procs.check_in_sync(list(self.network.parameters()))
        if monitor:
            monitor.close()
        result.seconds = time.time() - start
        return result

    def _epoch(self, cache: LatentCache, total: int, stop: StopRequest, bar) -> None:
        cfg, progress = self.config, self.run_state.progress
        accumulate = cfg.gradient_accumulation_steps
        params = [p for group in self.run_state.optimizer.param_groups for p in group["params"]]
        plan, group_losses = self.epoch_plan(progress.epoch), []
        if not plan:  # never spin: an epoch without batches would repeat forever, deaf to Ctrl-C
            raise TrainingStopped(f"epoch {progress.epoch} has no batches on this process (too few images for "
                                  f"{self.procs.world} processes, or every repeat is 0); nothing was trained")
        while progress.batch < len(plan):
            loss = self.micro_batch(cache, plan[progress.batch], progress.micro)
            value = self.procs.mean(float(loss.detach()))
            if not torch.isfinite(torch.tensor(value)):
                raise TrainingStopped(f"loss became {value} at step {progress.step + 1} (epoch {progress.epoch}); "
                                      f"stopped without saving it. Last good files: {self.out}/"
                                      f"{cfg.output_name}-*.safetensors. Lower the learning rate or use "
                                      "mixed_precision bf16 instead of fp16")
            loss = loss / accumulate
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            group_losses.append(value)
            progress.batch, progress.micro = progress.batch + 1, progress.micro + 1
            if progress.micro % accumulate:
                continue
            self._optimizer_step(params, group_losses, bar)
            group_losses = []
            self._step_outputs(progress, final=progress.step >= total)
            if self.procs.any(stop.requested):
                self.interrupt(progress, stop.signal_name)
            if progress.step >= total:
                return self.end_of_epoch(progress, total)  # logs the final norms; the final save follows
        self.end_of_epoch(progress, total)
        progress.epoch, progress.batch = progress.epoch + 1, 0

    def end_of_epoch(self, progress: Progress, total: int) -> None:
        cfg, run = self.config, self.run_state
        optimizer, scheduler, monitor, result = run.optimizer, run.scheduler, run.monitor, run.result
        if monitor:
            monitor.norms(progress.step, progress.epoch, self.network.delta_norms())
        if self.validation and self.validation.due(progress.step, progress.epoch, final=progress.step >= total):
            self.validation.run(self, progress.step, progress.epoch)
        if progress.step >= total:
            return  # the final save follows
        if cfg.save_every_n_epochs and progress.epoch % cfg.save_every_n_epochs == 0:
            result.files.append(self.save(epoch_file_stem(cfg.output_name, progress.epoch), progress))
            old = removed_epoch(progress.epoch, cfg.save_every_n_epochs, cfg.save_last_n_epochs)
            if old is not None:
                self.remove_file(epoch_file_stem(cfg.output_name, old))
            if cfg.save_state and self.procs.is_main:
                done = Progress(progress.step, progress.epoch + 1, 0, progress.micro, list(progress.losses))
                save_state(self.state_dir, self.network, optimizer, scheduler, done, cfg.settings(), self.scaler)
        if self.prompts and cfg.sample_every_n_epochs and progress.epoch % cfg.sample_every_n_epochs == 0:
            self.sample(f"{cfg.output_name}_e{progress.epoch:06d}", progress)
        if monitor:
            monitor.flush()

    def _optimizer_step(self, params: list, losses: list[float], bar) -> None:
        """One optimizer step on the accumulated gradients, kohya's max-norm after it, then progress and logs."""
        cfg, run = self.config, self.run_state
        progress = run.progress
        self.procs.average_gradients(params)
        if self.scaler:  # fp16: true gradients before clipping; a step with inf/NaN gradients is skipped
            self.scaler.unscale_(run.optimizer)
        if cfg.max_grad_norm:  # kohya: 0 turns clipping off
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm,  # foreach: one pass, not one per tensor
                                           foreach=True if self.device.type in ("cpu", "cuda") else None)
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(run.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
            if skipped:
                self.tell([f"note: step {progress.step + 1}: fp16 gradients overflowed; step skipped, loss scale "
                           f"now {self.scaler.get_scale():g}"])
        else:
            run.optimizer.step()
            skipped = False
        if not skipped:  # as accelerate: the LR schedule does not advance on a skipped step
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        scalars, postfix = {}, {}
        if cfg.scale_weight_norms:
            stats = apply_max_norm(self.network.adapters.values(), cfg.scale_weight_norms)
            scalars = {"max_norm/keys_scaled": stats.keys_scaled, "max_norm/max_key_norm": stats.max_norm,
                       "norm/avg_key_norm": stats.mean_norm}  # kohya's TensorBoard tags
            postfix = {"Keys Scaled": stats.keys_scaled, "Average key norm": f"{stats.mean_norm:.4f}"}
        progress.step += 1
        progress.losses.append(sum(losses) / len(losses))
        run.result.steps, run.result.losses = progress.step, progress.losses
        bar.update(1)
        bar.set_postfix(loss=f"{progress.losses[-1]:.4f}", epoch=progress.epoch, **postfix)
        if run.monitor:
            run.monitor.step(progress.step, progress.epoch, progress.losses[-1],
                             {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)},
                             scalars)

    def _step_outputs(self, progress: Progress, final: bool) -> None:
        """kohya's step-wise outputs: samples every sample_every_n_steps (sample_every_n_epochs overrides it; at
        the last step the final sample follows anyway), and every save_every_n_steps a file, the training state
        with save_state (so a killed run resumes from here), and the deletion of files past save_last_n_steps."""
        cfg, run = self.config, self.run_state
        if self.validation and cfg.validate_every_n_steps and self.validation.due(progress.step):
            self.validation.run(self, progress.step, progress.epoch)
        every = cfg.sample_every_n_steps
        if self.prompts and every and not cfg.sample_every_n_epochs and not final and progress.step % every == 0:
            self.sample(f"{cfg.output_name}_{progress.step:06d}", progress)
        every = cfg.save_every_n_steps
        if not every or progress.step % every:
            return
        run.result.files.append(self.save(step_file_stem(cfg.output_name, progress.step), progress))
        if cfg.save_state and self.procs.is_main:
            save_state(self.state_dir, self.network, run.optimizer, run.scheduler, progress, cfg.settings(),
                       self.scaler)
        old = removed_step(progress.step, every, cfg.save_last_n_steps)
        if old is not None:
            self.remove_file(step_file_stem(cfg.output_name, old))

    # ---- outputs ----------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.out / f"{self.config.output_name}-state"

    def save(self, stem: str, progress: Progress) -> Path:
        path = self.out / f"{stem}.safetensors"
        if self.procs.is_main:
            save_lora(self, path, progress)
        self.procs.barrier()
        return path

    def remove_file(self, stem: str) -> None:
        """Delete an older saved file (save_last_n_epochs / save_last_n_steps); it is no longer a result."""
        path = self.out / f"{stem}.safetensors"
        if self.procs.is_main:
            path.unlink(missing_ok=True)
        self.run_state.result.files = [f for f in self.run_state.result.files if f != path]

    def sample(self, stem: str, progress: Progress) -> None:
        if self.procs.is_main:
            dtype = self.precision.autocast  # e.g. a bf16 U-Net beside an fp32 VAE (no_half_vae)
            with self.frozen_on_device(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                paths = render_samples(self.base.pipeline, self.network, self.prompts, self.out / "sample", stem,
                                       self.config.sample_sampler)
            self.run_state.result.samples.extend(paths)
            if self.run_state.monitor:
                self.run_state.monitor.samples(progress.step, progress.epoch, paths)
        self.procs.barrier()

    @contextmanager
    def frozen_on_device(self):
        """The VAE/text encoders moved off the GPU after caching come back for the duration (sampling)."""
        for module in self.offloaded:
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.offloaded:
                module.to("cpu")

    def interrupt(self, progress: Progress, signal_name: str) -> None:
        run = self.run_state
        stem = step_file_stem(self.config.output_name, progress.step)
        path = self.save(stem, progress)
        if self.procs.is_main:
            save_state(self.state_dir, self.network, run.optimizer, run.scheduler, progress, self.config.settings(),
                       self.scaler)
            if run.monitor:
                run.monitor.close()
        raise TrainingInterrupted(f"{signal_name}: stopped after step {progress.step}; saved {path} and the "
                                  f"training state in {self.state_dir}. Continue with: lorakit train CONFIG "
                                  f"--resume {self.state_dir}", path, self.state_dir)


def train(config: TrainConfig, device: str | torch.device | None = None) -> TrainResult:
    return Trainer(config, device).run()
