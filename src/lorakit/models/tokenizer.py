"""The real CLIP tokenizer, offline: built from the BPE vocabulary that ships inside lorakit.

`data/bpe_simple_vocab_16e6.txt.gz` (open_clip's copy, MIT) holds the 48,894 BPE merges. The 49,408-entry
vocabulary is derived from it the way CLIP does: the 256 byte symbols, the same with `</w>`, one token per
merge, then <|startoftext|> (49406) and <|endoftext|> (49407). The files are written once to a cache folder
and loaded by transformers' CLIPTokenizer: token ids equal CLIP's.
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lorakit.formats.atomic import atomic_write

VOCAB_GZ = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable-unicode table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    raw = resources.files("lorakit.data").joinpath(VOCAB_GZ).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def tokenizer_files(folder: str | os.PathLike | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer configs (a diffusers `tokenizer/` folder); returns it."""
    folder = Path(folder) if folder else _cache_dir() / "clip_tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    for name, text in [("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
                       ("tokenizer_config.json", json.dumps(config, indent=2)),
                       ("special_tokens_map.json", json.dumps(special, indent=2)),
                       ("vocab.json", json.dumps(vocab, ensure_ascii=False))]:  # vocab last: marks completion
        atomic_write(folder / name, text)
    return folder


@lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers.CLIPTokenizer with CLIP's vocabulary, no network access."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_files()), local_files_only=True)


def _cache_dir() -> Path:
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"
