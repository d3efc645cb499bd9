"""Architecture from tensor shapes: diffusers configs for the U-Net, VAE and text encoders of a single-file SD
checkpoint (LDM layout for SD1/SD2, SGM for SDXL), as ComfyUI's model detection does.

    shapes = tensor_shapes(read_header(path)[0])       # no tensor is loaded
    inferred = infer_configs(shapes, "sd1", hints_from_metadata(metadata))
    inferred.unet, inferred.vae, inferred.text, inferred.note()

Shapes give widths, depths, layer counts, channels, context and embedding sizes exactly. They cannot give head
counts, GroupNorm groups, activations, the default image size or the VAE scaling factor. Those come from the
file's `lorakit_architecture` metadata when lorakit wrote the file, else from the family's conventions:
SD1 U-Nets 8 heads per level, SD2/SDXL U-Nets 64-channel heads, CLIP 64-channel heads, 32 norm groups. For
non-stock widths the convention is narrowed (gcd) so heads and groups divide every width. Each such value is
named in `Inferred.fallbacks`. Pure functions of key -> shape maps: no tensors, no modules.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from lorakit.models.configs import FAMILIES, SD_VAE, SDXL_VAE
from lorakit.models.ldm_layout import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX

Shapes = dict[str, tuple[int, ...]]
ARCH_KEY = "lorakit_architecture"
# values no tensor shape shows, per component; lorakit records them when it writes a single file
HINT_KEYS = {"unet": ("attention_head_dim", "norm_num_groups", "norm_eps", "sample_size", "upcast_attention"),
             "vae": ("norm_num_groups", "sample_size", "scaling_factor"),
             "text": ("num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")}
TEXT_NAMES = ("text_encoder", "text_encoder_2")


@dataclass
class Inferred:
    unet: dict
    vae: dict | None
    text: list[dict]
    found: list[str] = field(default_factory=list)  # what the shapes said
    from_metadata: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # what they could not say, with the value used

    def note(self) -> str:
        line = "architecture from tensor shapes: " + "; ".join(self.found)
        if self.from_metadata:
            keys = sorted({name.split(".", 1)[1] for name in self.from_metadata})
            line += "; from the file's lorakit metadata: " + ", ".join(keys)
        if self.fallbacks:
            line += "; not in the shapes, conventions used: " + ", ".join(self.fallbacks)
        return line


class _Facts:
    """Non-shape values: the file's hint when it is present and valid, else the convention (recorded)."""

    def __init__(self, hints: dict):
        self.hints, self.from_metadata, self.fallbacks = hints, [], []

    def pick(self, part: str, key: str, default, why: str = "", valid=None):
        hint = self.hints.get(part, {}).get(key)
        if hint is not None and _acceptable(hint, default, valid):
            self.from_metadata.append(f"{part}.{key}")
            return tuple(hint) if isinstance(hint, list) else hint
        self.fallbacks.append(f"{part}.{key}={_short(default)}" + (f" ({why})" if why else ""))
        return default

    def quiet(self, part: str, key: str, default):
        """Like pick, for values every SD model shares (norm eps): the default is not worth a note."""
        hint = self.hints.get(part, {}).get(key)
        if hint is None or not _acceptable(hint, default):
            return default
        self.from_metadata.append(f"{part}.{key}")
        return hint


def _acceptable(hint, default, valid=None) -> bool:
    """A metadata value is used only if it fits (edited or foreign metadata must not break loading)."""
    if valid is not None:
        try:
            return bool(valid(hint))
        except TypeError:
            return False
    if isinstance(default, (bool, str)):
        return type(hint) is type(default)
    return isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint > 0


def tensor_shapes(entries) -> Shapes:
    """key -> shape from a safetensors header ({key: {"shape": ...}}) or a state dict of tensors."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v["shape"]) for k, v in entries.items()}


def infer_configs(shapes: Shapes, family: str, hints: dict | None = None) -> Inferred:
    """U-Net, VAE (None when the file has none) and text-encoder configs of a `family` single file."""
    facts = _Facts(hints or {})
    found: list[str] = []
    text_found: list[str] = []  # reported last, though inferred first: SDXL's U-Net needs the pooled width
    text = [infer_text_encoder(shapes, prefix, stock, facts, name, family, text_found)
            for prefix, stock, name in zip(TEXT_PREFIXES[family], FAMILIES[family][1], TEXT_NAMES)]
    if family == "sdxl" and text[0]["hidden_size"] == text[1]["hidden_size"]:
        raise ValueError(f"both SDXL text encoders are {text[0]['hidden_size']} wide; diffusers tells them apart "
                         "by width, so this file cannot be loaded")
    pooled = text[-1]["projection_dim"] if family == "sdxl" else None
    unet = infer_unet(shapes, family, facts, found, pooled)
    vae = infer_vae(shapes, family, facts, found)
    return Inferred(unet, vae, text, found + text_found, facts.from_metadata, facts.fallbacks)


# ---- U-Net ----
def infer_unet(shapes: Shapes, family: str, facts: _Facts, found: list[str], pooled_dim: int | None = None) -> dict:
    p = UNET_PREFIX
    widths, layers, depths = _unet_levels(shapes, p)
    mid = _count(shapes, p + "middle_block.1.transformer_blocks.")
    if not mid:
        raise ValueError("the U-Net middle block has no transformer; only SD-style cross-attention U-Nets load")
    _check_up_levels(shapes, p, layers, depths)
    if depths[-1] and depths[-1] != mid:
        raise ValueError(f"the deepest level has {depths[-1]} transformer layers but the middle block {mid}; "
                         "diffusers' U-Net needs them equal")
    # attention-less levels take 1 (diffusers' default) except the last, which sets the middle block's depth
    per_level = [d or 1 for d in depths[:-1]] + [mid]
    proj_in = _first(shapes, p, ".proj_in.weight")
    linear = len(shapes[proj_in]) == 2
    context = shapes[_first(shapes, p, ".attn2.to_k.weight")][1]
    c0 = shapes[p + "input_blocks.0.0.weight"][0]
    config = dict(FAMILIES[family][0], in_channels=shapes[p + "input_blocks.0.0.weight"][1],
                  out_channels=shapes[p + "out.2.weight"][0], block_out_channels=widths,
                  layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
                  down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
                  up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)),
                  transformer_layers_per_block=per_level[0] if len(set(per_level)) == 1 else tuple(per_level),
                  cross_attention_dim=context, use_linear_projection=linear)
    if shapes[p + "time_embed.0.weight"][0] != 4 * c0:  # diffusers' default is 4x the first width
        config["time_embedding_dim"] = shapes[p + "time_embed.0.weight"][0]
    _unet_embeddings(shapes, p, family, config, pooled_dim, facts)
    config["attention_head_dim"] = _unet_heads(widths, linear, facts)
    config["norm_num_groups"] = _norm_groups("unet", widths, facts)
    config["sample_size"] = facts.pick("unet", "sample_size", config["sample_size"])
    config["norm_eps"] = facts.quiet("unet", "norm_eps", 1e-5)
    config["upcast_attention"] = facts.quiet("unet", "upcast_attention", False)
    found.append(f"U-Net in {config['in_channels']}/out {config['out_channels']}, widths {widths} x{layers[0]}, "
                 f"transformer depth {tuple(depths)}/mid {mid}, context {context}, "
                 f"{'linear' if linear else 'conv'} proj_in")
    return config


def _unet_levels(shapes: Shapes, p: str) -> tuple[tuple[int, ...], list[int], list[int]]:
    """(width, resnets, transformer depth) per down level, read from `input_blocks`: a block holding a
    downsampler (`0.op`) closes a level; every other block is a resnet with an optional transformer at `1`."""
    widths, layers, depths = [], [], []
    count, level_depths, width = 0, set(), None
    blocks = _indices(shapes, p + "input_blocks.")
    if blocks != list(range(len(blocks))):
        raise ValueError(f"U-Net input blocks {blocks} have gaps (weightless downsamplers?): not an SD-style U-Net")
    for i in blocks[1:] + [None]:
        block = f"{p}input_blocks.{i}."
        if i is None or block + "0.op.weight" in shapes:
            if count == 0 or len(level_depths) > 1:
                raise ValueError(f"U-Net down level {len(widths)} has {count} resnets and transformer depths "
                                 f"{sorted(level_depths)}: not an SD-style U-Net")
            widths.append(width)
            layers.append(count)
            depths.append(level_depths.pop())
            count, level_depths = 0, set()
            continue
        if block + "0.out_layers.3.weight" not in shapes:
            raise ValueError(f"`{block}0` is neither a resnet nor a downsampler: not an SD-style U-Net")
        width = shapes[block + "0.out_layers.3.weight"][0]
        count += 1
        level_depths.add(_count(shapes, block + "1.transformer_blocks."))
    return tuple(widths), layers, depths


def _check_up_levels(shapes: Shapes, p: str, layers: list[int], depths: list[int]) -> None:
    """diffusers mirrors the down levels on the way up (one more resnet each); refuse files that do not."""
    blocks = _indices(shapes, p + "output_blocks.")
    up = [_count(shapes, f"{p}output_blocks.{j}.1.transformer_blocks.") for j in blocks]
    expected = [depths[level] for level in reversed(range(len(layers))) for _ in range(layers[level] + 1)]
    if up != expected:
        raise ValueError(f"up-path transformer depths {up} do not mirror the down path {expected}; diffusers' "
                         "U-Net cannot express this architecture")


def _unet_embeddings(shapes: Shapes, p: str, family: str, config: dict, pooled_dim: int | None, facts) -> None:
    """SDXL's size/crop conditioning: label_emb in = pooled text width + 6 sinusoidal embeddings."""
    key = p + "label_emb.0.0.weight"
    if family != "sdxl":
        if key in shapes:
            raise ValueError("a class-conditioned U-Net (label_emb) in an SD1/SD2 file (unCLIP?) is not supported")
        return
    adm = shapes[key][1]
    config["projection_class_embeddings_input_dim"] = adm
    time_dim, rest = divmod(adm - (pooled_dim or 0), 6)
    if pooled_dim and time_dim > 0 and not rest:
        config["addition_time_embed_dim"] = time_dim
    else:
        config["addition_time_embed_dim"] = facts.pick("unet", "addition_time_embed_dim", 256,
                                                       f"label_emb in {adm} does not split as pooled + 6 x dim")


def _unet_heads(widths: tuple[int, ...], linear: bool, facts: _Facts):
    """diffusers' `attention_head_dim` holds head COUNTS for SD models (a historical misnomer)."""
    if linear:  # SD2/SDXL: num_head_channels=64 -> heads per level = width / 64
        channels = math.gcd(64, *widths)
        default, why = tuple(w // channels for w in widths), f"{channels}-channel heads" + _narrowed(channels, 64)
    else:  # SD1: num_heads=8 at every level
        default = math.gcd(8, *widths)
        why = f"{default} heads per level" + _narrowed(default, 8)

    def valid(heads) -> bool:
        per_level = heads if isinstance(heads, (list, tuple)) else [heads] * len(widths)
        return len(per_level) == len(widths) and all(isinstance(h, int) and h > 0 and w % h == 0
                                                     for h, w in zip(per_level, widths))

    return facts.pick("unet", "attention_head_dim", default, why, valid)


def _norm_groups(part: str, widths: tuple[int, ...], facts: _Facts) -> int:
    """GroupNorm groups: SD's 32, narrowed so every width (and every concatenation of widths) splits evenly."""
    groups = math.gcd(32, *widths)
    return facts.pick(part, "norm_num_groups", groups, _narrowed(groups, 32).lstrip(", "),
                      lambda g: isinstance(g, int) and g > 0 and all(w % g == 0 for w in widths))


# ---- VAE ----
def infer_vae(shapes: Shapes, family: str, facts: _Facts, found: list[str]) -> dict | None:
    p = VAE_PREFIX
    if p + "encoder.conv_in.weight" not in shapes:
        return None
    levels = _indices(shapes, p + "encoder.down.")
    widths = tuple(shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
    layers = _count(shapes, p + "encoder.down.0.block.")
    stock = SDXL_VAE if family == "sdxl" else SD_VAE
    config = dict(stock, in_channels=shapes[p + "encoder.conv_in.weight"][1],
                  out_channels=shapes[p + "decoder.conv_out.weight"][0],
                  latent_channels=shapes[p + "decoder.conv_in.weight"][1], layers_per_block=layers,
                  block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                  up_block_types=("UpDecoderBlock2D",) * len(widths),
                  use_quant_conv=p + "quant_conv.weight" in shapes,
                  use_post_quant_conv=p + "post_quant_conv.weight" in shapes,
                  mid_block_add_attention=any(k.startswith(p + "encoder.mid.attn_1.") for k in shapes))
    config["norm_num_groups"] = _norm_groups("vae", widths, facts)
    config["scaling_factor"] = facts.pick("vae", "scaling_factor", stock["scaling_factor"])
    config["sample_size"] = facts.pick("vae", "sample_size", stock["sample_size"])
    found.append(f"VAE widths {widths} x{layers}, latent {config['latent_channels']}")
    return config


# ---- text encoders ----
def infer_text_encoder(shapes: Shapes, prefix: str, stock: dict, facts: _Facts, name: str, family: str,
                       found: list[str]) -> dict:
    """CLIPTextConfig values for an HF-CLIP (`.transformer.text_model.`) or OpenCLIP (`.model.`) encoder."""
    open_clip = prefix.endswith(".model.")
    if open_clip:
        vocab, hidden = shapes[prefix + "token_embedding.weight"]
        positions = shapes[prefix + "positional_embedding"][0]
        layers = _count(shapes, prefix + "transformer.resblocks.")
        ffn = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes.get(prefix + "text_projection", (hidden, None))[1]  # stored (hidden, proj)
    else:
        p = prefix + "text_model."
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        layers = _count(shapes, p + "encoder.layers.")
        ffn = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
        projection = shapes.get(prefix + "text_projection.weight", (None,))[0]  # nn.Linear: (proj, hidden)
    unused = ""
    if family == "sd2" and layers == 24:  # SD2 conditions on the penultimate layer; diffusers drops resblocks.23
        layers, unused = 23, " (+1 unused)"
    channels = math.gcd(64, hidden)
    config = dict(stock, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  max_position_embeddings=positions)
    config["projection_dim"] = projection or facts.pick(name, "projection_dim", hidden, "no projection in the file")
    config["num_attention_heads"] = facts.pick(name, "num_attention_heads", hidden // channels,
                                               f"{channels}-channel heads" + _narrowed(channels, 64),
                                               lambda h: isinstance(h, int) and h > 0 and hidden % h == 0)
    config["hidden_act"] = facts.pick(name, "hidden_act", stock["hidden_act"],
                                      "OpenCLIP" if open_clip else "CLIP")
    config["layer_norm_eps"] = facts.quiet(name, "layer_norm_eps", stock.get("layer_norm_eps", 1e-5))
    found.append(f"{name} {'OpenCLIP' if open_clip else 'CLIP'} {hidden} wide x{layers}{unused} layers, ffn {ffn}, "
                 f"{positions} positions, vocab {vocab}" + (f", projection {projection}" if projection else ""))
    return config


# ---- the file's own record of the non-shape values ----
def architecture_metadata(unet_config=None, vae_config=None, text_configs=()) -> dict[str, str]:
    """The `lorakit_architecture` metadata entry: the values that tensor shapes cannot give, per component."""
    record = {}
    for part, config in [("unet", unet_config), ("vae", vae_config)] + list(zip(TEXT_NAMES, text_configs)):
        if config is None:
            continue
        keys = HINT_KEYS["text" if part in TEXT_NAMES else part]
        record[part] = {k: _jsonable(config[k]) for k in keys if config.get(k) is not None}
    return {ARCH_KEY: json.dumps(record, sort_keys=True)} if record else {}


def hints_from_metadata(metadata: dict[str, str] | None) -> dict:
    """The parsed `lorakit_architecture` entry; {} when absent or unreadable (then conventions are used)."""
    try:
        record = json.loads((metadata or {}).get(ARCH_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in record.items() if isinstance(v, dict)} if isinstance(record, dict) else {}


# ---- helpers ----
def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers right after `prefix` (block or layer numbers)."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _count(shapes: Shapes, prefix: str) -> int:
    return len(_indices(shapes, prefix))


def _first(shapes: Shapes, prefix: str, suffix: str) -> str:
    for key in sorted(shapes):
        if key.startswith(prefix) and key.endswith(suffix):
            return key
    raise ValueError(f"no `{prefix}*{suffix}` tensor: the U-Net has no cross-attention transformer")


def _narrowed(value: int, stock: int) -> str:
    return "" if value == stock else f", narrowed from {stock} to divide the widths"


def _short(value) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
