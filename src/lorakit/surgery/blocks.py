"""U-Net block tables: diffusers module path -> LDM/SGM path -> block (IN00..OUT11, SDXL's 23 slots).

SD1.x/SD2.x have 25 blocks (kohya's indices): IN00-IN11, M00, OUT00-OUT11. With L = layers_per_block:
    down_blocks.i.{resnets,attentions}.j  -> input_blocks.(1 + (L+1)i + j)
    down_blocks.i.downsamplers.0          -> input_blocks.((L+1)(i+1))
    mid_block                             -> middle_block.{0: resnet 0, 1: attention, 2: resnet 1}
    up_blocks.i.{resnets,attentions}.j    -> output_blocks.((L+1)i + j)
    up_blocks.i.upsamplers.0              -> output_blocks.((L+1)i + L)   (shares the last resnet's block)
SDXL uses 23 slots: 0 = EMB (time/label embedding), 1-9 input_blocks 0-8, 10-12 middle_block 0-2,
13-21 output_blocks 0-8, 22 = FINAL (norm/conv_out). Neither end ever gets an adapter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

SD_BLOCKS = tuple([f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
SDXL_BLOCKS = tuple(["EMB"] + [f"IN{i:02d}" for i in range(9)] + [f"M{i:02d}" for i in range(3)]
                    + [f"OUT{i:02d}" for i in range(9)] + ["FINAL"])

# diffusers ResnetBlock2D child -> LDM ResBlock child
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class UNetLayout:
    """What the path mapping needs to know about a diffusers UNet2DConditionModel."""

    family: str  # "sd1", "sd2" or "sdxl"
    layers_per_block: int
    up_has_attention: tuple[bool, ...]

    @property
    def block_names(self) -> tuple[str, ...]:
        return SDXL_BLOCKS if self.family == "sdxl" else SD_BLOCKS

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @staticmethod
    def of(unet) -> "UNetLayout":
        cfg = unet.config
        lpb = cfg.layers_per_block
        if not isinstance(lpb, int):
            raise ValueError(f"per-level layers_per_block {lpb} is not supported (SD1/SD2/SDXL use one int)")
        # SD2 is the SD1 topology with linear projections in its transformers (and a 1024-wide context)
        family = "sdxl" if cfg.get("addition_embed_type") == "text_time" else (
            "sd2" if cfg.get("use_linear_projection") else "sd1")
        return UNetLayout(family, lpb, tuple("CrossAttn" in t for t in cfg.up_block_types))


def to_ldm_path(path: str, layout: UNetLayout) -> str:
    """diffusers module path -> LDM/SGM module path (the names kohya's SDXL files use)."""
    step = layout.layers_per_block + 1
    for top, ldm in _TOP_TO_LDM.items():
        if path == top or path.startswith(top + "."):
            return ldm + path[len(top):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "downsamplers":
            head, rest = f"input_blocks.{step * (i + 1)}.0", rest.replace("conv", "op", 1) if rest else rest
        elif kind == "upsamplers":
            head = f"output_blocks.{step * i + layout.layers_per_block}.{2 if layout.up_has_attention[i] else 1}"
        else:
            index = 1 + step * i + j if side == "down" else step * i + j
            head = f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}"
        return _join(head, _resnet_child(rest) if kind == "resnets" else rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        index = 1 if kind == "attentions" else 2 * j
        return _join(f"middle_block.{index}", _resnet_child(rest) if kind == "resnets" else rest)
    raise ValueError(f"no LDM equivalent for U-Net module path {path!r}")


def _resnet_child(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _join(_RESNET_TO_LDM.get(head, head), tail)


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


_SD_NAME = re.compile(r"(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
_SGM_NAME = re.compile(r"(input_blocks|middle_block|output_blocks)_(\d+)_")


def block_of_kohya_name(name: str, family: str) -> str | None:
    """Block of a U-Net module from its kohya name (without the `lora_unet_` prefix); None if outside blocks.

    SD1/SD2 names use diffusers paths (kohya's get_block_index); SDXL names use SGM paths.
    """
    if family == "sdxl":
        m = _SGM_NAME.match(name)
        if m:
            offset = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)]
            return SDXL_BLOCKS[offset + int(m.group(2))]
        if name.startswith(("time_embed", "label_emb")):
            return "EMB"
        return "FINAL" if name.startswith("out_") else None
    m = _SD_NAME.match(name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if kind == "downsamplers":
            return SD_BLOCKS[1 + 3 * i + 2]
        if kind == "upsamplers":
            return SD_BLOCKS[13 + 3 * i + 2]
        return SD_BLOCKS[1 + 3 * i + j] if side == "down" else SD_BLOCKS[13 + 3 * i + j]
    if name.startswith("mid_block_"):
        return "M00"
    return "IN00" if name.startswith("conv_in") else None


def family_of_kohya_names(names: list[str]) -> str:
    """Guess the base family from a file's module names (SGM names or two text encoders mean SDXL)."""
    if any(n.startswith(("lora_te1_", "lora_te2_")) or n.startswith("lora_unet_input_blocks_") for n in names):
        return "sdxl"
    return "sd1"


LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def lr_weight_preset(spec: str, n: int) -> list[float]:
    """kohya's named down/up_lr_weight curves over n blocks (i = 0..n-1, shallow to deep), plus an optional
    `+offset` added to every value ("cosine+.25"):
        sine   sin(π/2 · i/(n-1))          cosine  the same, reversed
        linear i/(n-1)                     reverse_linear  the same, reversed      zeros  0
    """
    name, _, offset = spec.partition("+")
    base = float(offset) if offset else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    curves = {"sine": [math.sin(math.pi * r / 2) for r in ramp], "linear": ramp, "zeros": [0.0] * n}
    curves["cosine"], curves["reverse_linear"] = curves["sine"][::-1], ramp[::-1]
    if name not in curves:
        raise ValueError(f"unknown LR-weight preset {spec!r}; kohya's are {', '.join(LR_WEIGHT_PRESETS)} "
                         "(optionally +offset, e.g. cosine+.25)")
    return [v + base for v in curves[name]]


def kohya_block_lr_weights(down: list[float] | str | None, mid: list[float] | None, up: list[float] | str | None,
                           zero_threshold: float, family: str) -> list[float] | None:
    """kohya's get_block_lr_weight: down/mid/up multipliers -> one per U-Net block (25 SD1/SD2, 23 SDXL).

    Per side (12 or 9 values; mid 1 or 3): a named curve (see lr_weight_preset), or a list cut to length or
    padded with 1.0. A side given has every value <= zero_threshold set to 0 (its blocks then get no
    adapters); a side not given is all 1.0. SDXL adds 1.0 for its EMB and FINAL slots. None if no side given.
    """
    if down is None and mid is None and up is None:
        return None
    n, n_mid = (9, 3) if family == "sdxl" else (12, 1)

    def side(values, length):
        if values is None:
            return [1.0] * length
        values = lr_weight_preset(values, length) if isinstance(values, str) else list(values)
        values = (values + [1.0] * length)[:length]
        return [float(v) if v > zero_threshold else 0.0 for v in values]

    weights = side(down, n) + side(mid, n_mid) + side(up, n)
    return [1.0] + weights + [1.0] if family == "sdxl" else weights
