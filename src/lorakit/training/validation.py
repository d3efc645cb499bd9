"""Held-out validation with kohya's keys: a loss that compares across epochs and across the variants of a sweep.

`validation_split` holds a share of the training images out of training (they, and so their repeats, never
reach an epoch), chosen by `validation_seed` (unset: `seed`). The validation loss of one image is the plain
MSE between the U-Net's prediction and the objective's target (ε, or v for v-prediction), averaged over a
fixed grid of GRID_POINTS timesteps evenly spaced over the training range (the midpoints of equal bins of
[min_timestep, max_timestep): 100, 300, 500, 700, 900 by default), with the noise drawn once per (image,
timestep) from the validation seed. The number recorded is the mean over the images and the grid. It is
unweighted (no min-SNR, loss_type or offset noise), so variants that differ in those settings stand on one
scale.

It runs under no_grad, in eval mode (no adapter dropout), with the adapters at their current weights, inside
`torch.random.fork_rng`, and every draw comes from its own generator: the run's random streams are neither
used nor advanced, the same weights always give the same number, and a resumed run stays bit-identical.

With too few images to split (under MIN_SPLIT_IMAGES, or a share that holds out none or all of them) the run
says so once and records a caption-only check instead (kind "caption_only"): the same loss on the training
images paired with UNRELATED_CAPTIONS. The images are trained on, so this is no held-out loss; its movement
from the base model's value (step 0) is drift in loss space: how far the LoRA pulls prompts that are not its
captions towards its images.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from lorakit.models import noise as nz
from lorakit.models import objectives as obj
from lorakit.training.captions import CaptionClock, process_caption
from lorakit.training.data import encode, image_tensor
from lorakit.training.dataset import DatasetReport, DatasetSpec, ImageItem

MIN_SPLIT_IMAGES = 4  # below this a split leaves too little on one side to mean anything
GRID_POINTS = 5  # timesteps per image: coarse enough to be cheap, spread over the whole noise range
UNRELATED_CAPTIONS = ("a city street at night", "a bowl of fruit on a wooden table", "a mountain lake under clouds",
                      "a portrait of an old man")
KINDS = ("split", "caption_only")


def timestep_grid(low: int, high: int, points: int = GRID_POINTS) -> list[int]:
    """The midpoints of `points` equal bins of [low, high): (0, 1000) -> [100, 300, 500, 700, 900]."""
    return list(dict.fromkeys(low + int((k + 0.5) * (high - low) / points) for k in range(points)))


@dataclass
class HeldOut:
    items: list[ImageItem]
    captions: list[str]
    kind: str  # one of KINDS
    latents: list[torch.Tensor] = field(default_factory=list)  # (4, h, w) per item, set by Validation.prepare


def plain_caption(item: ImageItem) -> str:
    """The caption as trained, without its random parts (dropout, shuffles, warmup): prefix and suffix only."""
    fixed = replace(item.subset, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=None, shuffle_caption=False,
                    caption_tag_dropout_rate=0.0, token_warmup_step=0.0)
    return process_caption(item.caption, fixed, random.Random(0), CaptionClock())


def split_items(report: DatasetReport, split: float, seed: int) -> tuple[list[ImageItem], HeldOut | None]:
    """(the items that train, the held-out set or None). Regularization images are never held out. The
    choice is a seeded sample of the training images, so it is the same in every run and every sweep variant
    with the same data and validation_seed. What was decided is appended to report.notes."""
    items = report.items
    if not split:
        return items, None
    train = [n for n, item in enumerate(items) if not item.subset.is_reg]
    count = round(len(train) * split)
    if len(train) < MIN_SPLIT_IMAGES or count == 0 or count >= len(train):
        report.notes.append(
            f"validation_split = {split:g}: {len(train)} training image(s) are too few to hold images out (a "
            f"split needs >= {MIN_SPLIT_IMAGES} images and at least one on each side); every image trains, and "
            "validation is a caption-only check instead: the loss on the training images with unrelated captions "
            "(drift in loss space, recorded as kind caption_only)")
        return items, caption_only([items[n] for n in train])
    held = set(random.Random(seed).sample(train, count))
    out = [items[n] for n in sorted(held)]
    report.notes.append(f"validation: {count} of {len(train)} training images held out (never trained on): "
                        + ", ".join(item.path.name for item in out[:8]) + (" ..." if count > 8 else ""))
    return [item for n, item in enumerate(items) if n not in held], HeldOut(out, [plain_caption(i) for i in out],
                                                                            "split")


def caption_only(chosen: list[ImageItem]) -> HeldOut:
    """The training images paired with unrelated captions (they train too: this measures drift, see above)."""
    return HeldOut(chosen, [UNRELATED_CAPTIONS[n % len(UNRELATED_CAPTIONS)] for n in range(len(chosen))],
                   "caption_only")


def split_datasets(report: DatasetReport, specs: list[DatasetSpec], split: float, seed: int
                   ) -> tuple[list[ImageItem], HeldOut | None]:
    """split_items, with kohya's per-dataset keys: a dataset TOML's [[datasets]] (or [general]) may set its own
    validation_split / validation_seed, the training config's values filling in the rest. Where every dataset
    ends up with the same pair, this is split_items over all images (one seeded draw, as before); otherwise
    each dataset draws from its own images, and a dataset too small to split trains on all of them."""
    def own(spec):
        return (split if spec.validation_split is None else spec.validation_split,
                seed if spec.validation_seed is None else spec.validation_seed)

    plans = [own(spec) for spec in specs]
    if len(set(plans)) <= 1:
        return split_items(report, *(plans[0] if plans else (split, seed)))
    trained, held, small = [], [], []
    for number, (spec, (part_split, part_seed)) in enumerate(zip(specs, plans), 1):
        mine = {id(sub) for sub in spec.subsets}
        part = DatasetReport(items=[i for i in report.items if id(i.subset) in mine])
        kept, out = split_items(part, part_split, part_seed)
        if out is not None and out.kind == "split":
            trained += kept
            held.append(out)
            report.notes += [f"[[datasets]] #{number}: {note}" for note in part.notes]
            continue
        trained += part.items
        if part_split:
            small += [i for i in part.items if not i.subset.is_reg]
            report.notes.append(f"[[datasets]] #{number}: validation_split = {part_split:g}: too few images "
                                f"to hold any out ({len(part.items)}); all of them train")
    if not held and not small:  # validation_split 0 everywhere (only the seeds differ): no validation
        return trained, None
    if not held:  # no dataset could split: the caption-only check on the images of those that asked
        report.notes.append("validation is a caption-only check: the loss on those training images with "
                            "unrelated captions (drift in loss space, recorded as kind caption_only)")
        return trained, caption_only(small)
    return trained, HeldOut([i for h in held for i in h.items], [c for h in held for c in h.captions], "split")


class Validation:
    """The held-out set of a run, its fixed timesteps and what it recorded ({step, epoch, loss, kind, images,
    timesteps} per validation, as the history's "validation" list)."""

    def __init__(self, held: HeldOut, timesteps: list[int], seed: int, limit: int | None = None,
                 every_n_steps: int | None = None, every_n_epochs: int | None = None):
        self.held, self.timesteps, self.seed = held, timesteps, seed
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.count = len(held.items) if limit is None else min(limit, len(held.items))
        self.records: list[dict] = []

    @staticmethod
    @torch.no_grad()
    def prepare(trainer, held: HeldOut | None) -> "Validation | None":
        """Encode the held-out images (centre crop, no augmentation) and, with frozen text encoders, their
        captions, while the VAE and text encoders are still loaded."""
        if held is None:
            return None
        cfg = trainer.config
        low = cfg.min_timestep or 0
        high = len(trainer.alphas_cumprod) if cfg.max_timestep is None else cfg.max_timestep
        seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
        validation = Validation(held, timestep_grid(low, high), seed, cfg.max_validation_steps,
                                cfg.validate_every_n_steps, cfg.validate_every_n_epochs)
        held.latents = [encode(trainer.vae, image_tensor(item)[None])[0] for item in held.items[:validation.count]]
        for latent, caption in zip(held.latents, held.captions):
            trainer.context([caption], pixel_size(latent))  # frozen text encoders: cached before they leave
        return validation

    def due(self, step: int, epoch: int | None = None, final: bool = False) -> bool:
        """kohya's schedule: every validate_every_n_steps steps, and at the end of every epoch (or every
        validate_every_n_epochs-th); the last step always. Never twice at one step."""
        if self.records and self.records[-1]["step"] == step:
            return False
        if epoch is not None and (not self.every_n_epochs or epoch % self.every_n_epochs == 0):
            return True
        return final or bool(self.every_n_steps and step % self.every_n_steps == 0)

    def run(self, trainer, step: int, epoch: int) -> dict:
        """Compute, keep and log one validation; returns its record."""
        loss = validation_loss(trainer, self)
        record = {"step": step, "epoch": epoch, "loss": loss, "kind": self.held.kind, "images": self.count,
                  "timesteps": list(self.timesteps)}
        self.records.append(record)
        monitor = trainer.run_state.monitor
        if monitor:
            monitor.validation(record)
        return record


def pixel_size(latent: torch.Tensor) -> tuple[int, int]:
    return latent.shape[-2] * 8, latent.shape[-1] * 8  # the VAE downsamples 8x (as Trainer.loss)


def validation_loss(trainer, validation: Validation) -> float:
    """The mean plain MSE over the held-out images x the fixed timestep grid (see the module docstring)."""
    from lorakit.training.trainer import derived_seed  # the run's one seed derivation (trainer imports this module)

    cfg, device, unet, network = trainer.config, trainer.device, trainer.unet, trainer.network
    schedule = nz.zero_terminal_snr(trainer.alphas_cumprod) if cfg.zero_terminal_snr else trainer.alphas_cumprod
    v_pred = trainer.base.prediction_type == "v_prediction"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    modes = unet.training, network.training
    cuda = [device.index or 0] if device.type == "cuda" else []
    losses = []
    unet.eval(), network.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            t = torch.tensor(validation.timesteps, device=device)
            for n, (latent, caption) in enumerate(zip(validation.held.latents, validation.held.captions)):
                z = latent[None].expand(len(t), *latent.shape).to(device)  # (T, 4, h, w): one image, every t
                noise = torch.stack([torch.randn(latent.shape, generator=torch.Generator().manual_seed(
                    derived_seed(validation.seed, "validation", n, int(step)))) for step in t]).to(device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    context, extra = trainer.context([caption] * len(t), pixel_size(latent))
                    pred = unet(obj.add_noise(z, noise, schedule, t), t, context, added_cond_kwargs=extra).sample
                target = obj.target(z, noise, schedule, t, v_pred)
                losses.append(float(((pred.float() - target.float()) ** 2).mean()))
    finally:
        unet.train(modes[0]), network.train(modes[1])
    return sum(losses) / len(losses)
