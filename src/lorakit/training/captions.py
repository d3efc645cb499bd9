"""Caption handling as in kohya: tag shuffling with keep_tokens, caption dropout, and sample-prompt lines."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass


def process_caption(caption: str, rng: random.Random, shuffle: bool = False, keep_tokens: int = 0,
                    dropout_rate: float = 0.0, separator: str = ",") -> str:
    """Drop the whole caption with probability dropout_rate (for CFG); otherwise shuffle the tags after
    the first keep_tokens (the trigger words stay in front)."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return f"{separator} ".join(fixed + rest)


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 20
    scale: float = 7.0


_OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
            "s": ("steps", int), "l": ("scale", float)}


def parse_prompt_line(line: str, defaults: SamplePrompt | None = None) -> SamplePrompt | None:
    """kohya's prompt file syntax: `prompt --n negative --w 512 --h 768 --d 1 --l 7.5 --s 28`.

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
            raise ValueError(f"prompt option --{key} is not supported (use --n --w --h --d --l --s): {line!r}")
        name, kind = _OPTIONS[key]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            what = {int: "whole number", float: "number"}.get(kind, "value")
            raise ValueError(f"prompt option --{key} needs a {what}, got {value.strip()!r}: {line!r}") from None
    values["steps"] = max(1, min(1000, values["steps"]))
    return SamplePrompt(**values)


def read_prompt_file(text: str, defaults: SamplePrompt | None = None) -> list[SamplePrompt]:
    prompts = [parse_prompt_line(line, defaults) for line in text.splitlines()]
    return [p for p in prompts if p is not None]
