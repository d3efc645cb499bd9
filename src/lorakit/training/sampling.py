"""Sample images during training: fixed prompts and seeds, kohya's prompt-file syntax, PNGs on disk.

Samples are rendered through the base pipeline with the adapters attached, so they show exactly what the
saved file will do. Dropout is switched off while sampling and the previous train/eval mode restored after.
The sampler (sample_sampler, or a prompt's --ss) picks the diffusers scheduler class as kohya's
train_util.get_my_scheduler does; its noise schedule is the base model's own scheduler config.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from lorakit.formats.atomic import atomic_write
from lorakit.training.captions import SamplePrompt, read_prompt_file


class SamplePromptError(ValueError):
    """The sample prompt file cannot be used; the message names the file and line."""


# kohya's sampler names -> (diffusers scheduler class, extra arguments); k_* names are aliases
SAMPLER_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers (0.42) refuses algorithm_type dpmsolver with its default final sigma of zero
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def sampler_scheduler(name: str, base_config):
    """A fresh diffusers scheduler for kohya sampler `name`, on the base model's noise schedule (base_config:
    the pipeline's scheduler config). A sampler whose package is missing (lms: scipy) is a SamplePromptError."""
    import diffusers

    key = name.lower()
    cls_name, extra = SAMPLER_SCHEDULERS[key[2:] if key.startswith("k_") else key]
    try:
        return getattr(diffusers, cls_name).from_config(base_config, **extra)
    except ImportError as e:
        raise SamplePromptError(f"sampler {name} ({cls_name}) cannot run here: {str(e).strip()}") from None


def load_sample_prompts(path: str | Path, resolution: tuple[int, int] | list[int]) -> list[SamplePrompt]:
    """Read a kohya prompt file (one prompt per line, `--n --w --h --d --l --s --ss` options)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SamplePromptError(f"sample_prompts {path}: cannot read ({e})") from None
    defaults = SamplePrompt("", width=resolution[0], height=resolution[1])
    try:
        prompts = read_prompt_file(text, defaults)
    except ValueError as e:
        raise SamplePromptError(f"sample_prompts {path}: {e}") from None
    if not prompts:
        raise SamplePromptError(f"sample_prompts {path}: no prompts (one prompt per line; # starts a comment)")
    for p in prompts:
        if p.width % 8 or p.height % 8:
            raise SamplePromptError(f"sample_prompts {path}: {p.width}x{p.height} for {p.prompt!r} is not a "
                                    "multiple of 8")
    return prompts


def check_sampler(name: str) -> None:
    """SamplePromptError now, before training, if sampler `name` cannot run here."""
    import diffusers

    sampler_scheduler(name, diffusers.DDIMScheduler().config)


@torch.no_grad()
def render_samples(pipeline, network, prompts: list[SamplePrompt], folder: str | Path, stem: str,
                   sampler: str = "ddim") -> list[Path]:
    """One PNG per prompt: `{stem}_{index:02d}_{seed}.png`; prompts without --d get seed = index; a prompt's
    --ss overrides `sampler`."""
    modules = [m for m in (pipeline.unet, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None), network)
               if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    paths, scheduler = [], pipeline.scheduler
    try:
        for index, p in enumerate(prompts):
            pipeline.scheduler = sampler_scheduler(p.sampler or sampler, scheduler.config)
            seed = p.seed if p.seed is not None else index
            generator = torch.Generator().manual_seed(seed)  # CPU draws: the same image on any device
            image = pipeline(p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                             num_inference_steps=p.steps, guidance_scale=p.scale, generator=generator).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            paths.append(atomic_write(Path(folder) / f"{stem}_{index:02d}_{seed}.png", buffer.getvalue()))
    finally:
        pipeline.scheduler = scheduler
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return paths
