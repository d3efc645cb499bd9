"""Caption handling as in kohya (library/train_util.py BaseDataset.process_caption): prefix/suffix, caption
and tag dropout, token warmup, tag shuffling with keep_tokens / keep_tokens_separator; and sample-prompt lines."""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Protocol


class CaptionRules(Protocol):
    """kohya's per-subset caption keys; dataset.Subset carries them under these names."""
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    keep_tokens_separator: str
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int | None
    caption_tag_dropout_rate: float
    token_warmup_min: int
    token_warmup_step: float


@dataclass(frozen=True)
class CaptionClock:
    """Where the run is, for the epoch- and step-dependent rules (kohya's current_epoch / current_step)."""
    epoch: int = 1  # 1-based, as kohya counts it
    step: int = 0  # optimizer steps done
    max_steps: int = 0  # the run's total steps: token_warmup_step < 1 is a fraction of it


def warmup_steps(token_warmup_step: float, max_steps: int) -> float:
    """kohya: a value below 1 is a fraction of the run, floor(value x max_steps); otherwise a step count."""
    return math.floor(token_warmup_step * max_steps) if token_warmup_step < 1 else token_warmup_step


def warmup_tag_count(num_tags: int, step: int, warmup: float, minimum: int) -> int:
    """Tags used at `step` of a token warmup: floor(step x (num_tags - minimum) / warmup) + minimum."""
    return math.floor(step * ((num_tags - minimum) / warmup)) + minimum


def split_tags(caption: str, separator: str, keep_tokens: int,
               keep_separator: str) -> tuple[list[str], list[str], list[str]]:
    """(fixed tags in front, flexible tags, fixed tags at the end).

    With keep_separator in the caption, the tags before it are fixed and, if it appears a second time, the
    tags after that are a fixed tail; otherwise the first keep_tokens tags are fixed. As in kohya, empty tags
    are dropped only in the separator form."""
    if keep_separator and keep_separator in caption:
        fixed_part, flex_part = caption.split(keep_separator, 1)
        tail_part = ""
        if keep_separator in flex_part:
            flex_part, tail_part = flex_part.split(keep_separator, 1)
        fixed, flex, tail = ([t.strip() for t in part.split(separator) if t.strip()]
                             for part in (fixed_part, flex_part, tail_part))
        return fixed, flex, tail
    tags = [t.strip() for t in caption.strip().split(separator)]
    keep = max(keep_tokens, 0)
    return tags[:keep], tags[keep:], []


def process_caption(caption: str, rules: CaptionRules, rng: random.Random,
                    clock: CaptionClock = CaptionClock()) -> str:
    """kohya's caption pipeline, in its order, every draw from `rng`:

    1. caption_prefix / caption_suffix are joined on with a space;
    2. the whole caption becomes "" with probability caption_dropout_rate, and in every epoch divisible by
       caption_dropout_every_n_epochs (for classifier-free guidance);
    3. only if shuffle_caption, token warmup or caption_tag_dropout_rate is on: the caption is cut into tags
       at caption_separator (split_tags), token warmup keeps the first warmup_tag_count flexible tags until
       its last step, the flexible tags are shuffled, each is dropped with caption_tag_dropout_rate, and
       the tags are joined with ", " (kohya's join, whatever the separator). Otherwise the caption is used
       as written, keep_tokens_separator included, as kohya does.
    """
    if rules.caption_prefix:
        caption = f"{rules.caption_prefix} {caption}"
    if rules.caption_suffix:
        caption = f"{caption} {rules.caption_suffix}"
    dropped = rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate
    every = rules.caption_dropout_every_n_epochs
    if dropped or (every and clock.epoch % every == 0):
        return ""
    warmup = warmup_steps(rules.token_warmup_step, clock.max_steps)
    if not (rules.shuffle_caption or warmup > 0 or rules.caption_tag_dropout_rate > 0):
        return caption
    fixed, flex, tail = split_tags(caption, rules.caption_separator, rules.keep_tokens,
                                   rules.keep_tokens_separator)
    if warmup and clock.step < warmup:
        flex = flex[:warmup_tag_count(len(flex), clock.step, warmup, rules.token_warmup_min)]
    if rules.shuffle_caption:
        rng.shuffle(flex)
    if rules.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= rules.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + tail)


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 20
    scale: float = 7.0
    sampler: str | None = None  # --ss: this prompt's sampler (None: the run's sample_sampler)


def _sampler_name(value: str) -> str:
    from lorakit.training.schema import SAMPLERS

    name = value.lower()  # kohya compares exactly and falls back to ddim; lorakit says what is wrong
    if name not in SAMPLERS:
        raise ValueError(f"sampler name ({', '.join(SAMPLERS)})")
    return name


_OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
            "s": ("steps", int), "l": ("scale", float), "ss": ("sampler", _sampler_name)}


def parse_prompt_line(line: str, defaults: SamplePrompt | None = None) -> SamplePrompt | None:
    """kohya's prompt file syntax: `prompt --n negative --w 512 --h 768 --d 1 --l 7.5 --s 28 --ss euler_a`.

    Options are case-insensitive; blank lines and lines starting with # give None; unknown options are an
    error naming the option (kohya ignores them silently).
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = re.split(r"\s--(?=[A-Za-z]+\s)", " " + line + " ")
    base = defaults or SamplePrompt("")
    values = dict(base.__dict__, prompt=parts[0].strip())
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key = key.lower()
        if key not in _OPTIONS:
            raise ValueError(f"prompt option --{key} is not supported (use --n --w --h --d --l --s --ss): {line!r}")
        name, kind = _OPTIONS[key]
        try:
            values[name] = kind(value.strip())
        except ValueError as e:
            what = {int: "whole number", float: "number"}.get(kind, str(e) or "value")
            raise ValueError(f"prompt option --{key} needs a {what}, got {value.strip()!r}: {line!r}") from None
    values["steps"] = max(1, min(1000, values["steps"]))
    for key, name in (("w", "width"), ("h", "height")):
        if values[name] < 8:  # kohya would render a 64-px image whatever was asked; say it instead
            raise ValueError(f"prompt option --{key} {values[name]} is below 8 pixels: {line!r}")
        values[name] -= values[name] % 8  # the VAE works in 8-pixel cells (kohya rounds down the same way)
    if not math.isfinite(values["scale"]):
        raise ValueError(f"prompt option --l needs a finite number, got {values['scale']}: {line!r}")
    return SamplePrompt(**values)


def read_prompt_file(text: str, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    prompts = [parse_prompt_line(line, defaults) for line in text.splitlines()]
    return [p for p in prompts if p is not None]
