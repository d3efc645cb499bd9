"""Captions to U-Net context as kohya's train_network does (library/strategy_base.py, strategy_sd.py,
strategy_sdxl.py): max_token_length 150/225 in 75-token chunks, and weighted_captions.

A caption is tokenized to L = max_token_length + 2 tokens (77 when unset or 75) and cut into n = (L - 2) / 75
chunks, each read by the text encoder as BOS + 75 tokens + the sequence's last token (chunk_ids). The
chunks' hidden states are put back together without their inner BOS/EOS (merge_chunks), so the context is
(B, L, D). One chunk is the plain 77-token encoding. With weighted_captions, `(word:1.3)`, `(word)` and
`[word]` (parse_weights) scale the hidden states of the word's tokens (apply_weights).
"""
from __future__ import annotations

import re

import torch

# kohya's grammar (A1111's): escapes, brackets, ':weight)' closing a round bracket, plain text
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs: `(x)` multiplies x's weight by 1.1, `[x]` by 1/1.1, `(x:w)` by w; brackets nest
    and multiply; unclosed ones reach the end; `\\(` is a literal bracket. Neighbours of equal weight merge."""
    parts: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token in ("(", "["):
            (rounds if token == "(" else squares).append(len(parts))
        elif weight is not None and rounds and _is_number(weight):
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            parts.append([token, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for part, weight in parts or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += part
        else:
            merged.append([part, weight])
    return [(part, weight) for part, weight in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:  # "(x:.)": kohya would crash; the text is kept as text
        return False
    return True


def weighted_token_ids(tokenizer, text: str, length: int) -> tuple[list[int], list[float]]:
    """kohya's weighted tokenization: each run of parse_weights tokenized on its own, cut to length - 2,
    then BOS + tokens + EOS + PAD...; BOS, EOS and padding weigh 1."""
    ids: list[int] = []
    weights: list[float] = []
    for part, weight in parse_weights(text):
        part_ids = tokenizer(part).input_ids[1:-1]
        ids += part_ids
        weights += [weight] * len(part_ids)
        if len(ids) > length - 2:
            break
    ids, weights = ids[:length - 2], weights[:length - 2]
    padding = length - 2 - len(ids)
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return ids, [1.0] + weights + [1.0] * (padding + 1)


def chunk_ids(ids: torch.Tensor, chunk: int, eos: int, pad: int) -> torch.Tensor:
    """(L,) token ids -> (n, chunk) with n = (L - 2) / (chunk - 2): chunk k is BOS + ids[1 + k(chunk-2) :
    1 + (k+1)(chunk-2)] + ids[-1]. Where PAD is not EOS (SD2, SDXL's second encoder), a chunk whose body
    ends in a word gets EOS last, and an empty chunk reads BOS EOS PAD..., as kohya makes them."""
    body = chunk - 2
    chunks = []
    for start in range(1, len(ids) - 1, body):
        part = torch.cat([ids[:1], ids[start:start + body], ids[-1:]])
        if pad != eos:
            if int(part[-2]) not in (eos, pad):
                part[-1] = eos
            if int(part[1]) == pad:
                part[1] = eos
        chunks.append(part)
    return torch.stack(chunks)


def tokenize(tokenizer, captions: list[str], max_token_length: int | None,
             weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (B, n, 77), weights (B, L) or None) for L = max_token_length + 2 (77 when unset)."""
    chunk = tokenizer.model_max_length
    length = chunk if max_token_length is None else max_token_length + 2
    if weighted:
        pairs = [weighted_token_ids(tokenizer, c, length) for c in captions]
        rows = torch.tensor([ids for ids, _ in pairs])
        weights = torch.tensor([w for _, w in pairs], dtype=torch.float32)
    else:
        rows = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
        weights = None
    ids = torch.stack([chunk_ids(r, chunk, tokenizer.eos_token_id, tokenizer.pad_token_id) for r in rows])
    return ids, weights


def merge_chunks(hidden: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """(B*n, C, D) per-chunk hidden states -> (B, n(C-2) + 2, D): the first chunk's BOS, every chunk's
    body without its BOS/EOS, the last chunk's final token. For n = 1 this is the input itself."""
    rows, chunk, dim = hidden.shape
    hidden = hidden.reshape(rows // num_chunks, num_chunks * chunk, dim)
    bodies = [hidden[:, k * chunk + 1:(k + 1) * chunk - 1] for k in range(num_chunks)]
    return torch.cat([hidden[:, :1], *bodies, hidden[:, -1:]], dim=1)


def apply_weights(context: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """c'[b, p] = w[b, p] c[b, p]. kohya's training path (encode_tokens_with_weights) restores no mean;
    only its old inference helper get_weighted_text_embeddings did."""
    if weights is None:
        return context
    return context * weights.to(context.device, context.dtype)[..., None]


def encode_text(text_encoder, tokenizer, captions: list[str], clip_skip: int = 1,
                max_token_length: int | None = None, weighted: bool = False) -> torch.Tensor:
    """SD1/SD2 context (B, L, D): the last layer, or with clip_skip n the n-th last through the final norm."""
    ids, weights = tokenize(tokenizer, captions, max_token_length, weighted)
    flat = ids.reshape(-1, ids.shape[-1]).to(text_encoder.device)
    if clip_skip <= 1:
        hidden = text_encoder(flat).last_hidden_state
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-clip_skip]
        final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
        hidden = final_norm(hidden)
    return apply_weights(merge_chunks(hidden, ids.shape[1]), weights)


def eos_pooled(text_encoder, last_hidden: torch.Tensor, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """kohya's pool_workaround: the projected last hidden state at each row's first EOS token."""
    first_eos = (ids == eos).int().argmax(dim=1)
    pooled = last_hidden[torch.arange(len(ids), device=last_hidden.device), first_eos.to(last_hidden.device)]
    projection = text_encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden.dtype)


def encode_text_sdxl(text_encoders, tokenizers, captions: list[str], size: tuple[int, int],
                     max_token_length: int | None = None, weighted: bool = False) -> tuple:
    """SDXL conditioning: both encoders' penultimate hidden states side by side (B, L, 768+1280), the
    second encoder's pooled projection of the first chunk (B, 1280), unweighted as in kohya, and the
    size/crop ids (orig h, w, crop top, left, target h, w)."""
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        ids, weights = tokenize(tokenizer, captions, max_token_length, weighted)
        flat = ids.reshape(-1, ids.shape[-1]).to(encoder.device)
        out = encoder(flat, output_hidden_states=True)
        hidden.append(apply_weights(merge_chunks(out.hidden_states[-2], ids.shape[1]), weights))
        if hasattr(encoder, "text_projection"):
            pooled = eos_pooled(encoder, out.last_hidden_state, flat, tokenizer.eos_token_id)[::ids.shape[1]]
    height, width = size
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(captions), dtype=pooled.dtype,
                            device=pooled.device)
    return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}
