"""Sample images during training: fixed prompts and seeds, kohya's prompt-file syntax, PNGs on disk.

Samples are rendered through the base pipeline with the adapters attached, so they show exactly what the
saved file will do. Dropout is switched off while sampling and the previous train/eval mode restored after.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from lorakit.formats.atomic import atomic_write
from lorakit.training.captions import SamplePrompt, read_prompt_file


class SamplePromptError(ValueError):
    """The sample prompt file cannot be used; the message names the file and line."""


def load_sample_prompts(path: str | Path, resolution: tuple[int, int] | list[int]) -> list[SamplePrompt]:
    """Read a kohya prompt file (one prompt per line, `--n --w --h --d --l --s` options)."""
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


@torch.no_grad()
def render_samples(pipeline, network, prompts: list[SamplePrompt], folder: str | Path, stem: str) -> list[Path]:
    """One PNG per prompt: `{stem}_{index:02d}_{seed}.png`; prompts without --d get seed = index."""
    modules = [m for m in (pipeline.unet, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None), network)
               if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    paths = []
    try:
        for index, p in enumerate(prompts):
            seed = p.seed if p.seed is not None else index
            generator = torch.Generator().manual_seed(seed)  # CPU draws: the same image on any device
            image = pipeline(p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                             num_inference_steps=p.steps, guidance_scale=p.scale, generator=generator).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            paths.append(atomic_write(Path(folder) / f"{stem}_{index:02d}_{seed}.png", buffer.getvalue()))
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return paths
