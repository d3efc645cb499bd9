"""Which layers get adapters (kohya's rules, or a LyCORIS preset) and what they are called in files.

U-Net: Linear and 1x1 Conv2d inside Transformer2DModel; with conv enabled also every Linear/Conv2d inside
ResnetBlock2D, Downsample2D, Upsample2D (kxk convs take conv_dim, the others network_dim). Text
encoders: Linear layers inside CLIP attention and MLP. Matching is by class name, as kohya does.
A LyCORIS preset (lorakit.surgery.presets) replaces those class lists and adds layers named by path.
With LyCORIS's train_norm, the affine GroupNorm/LayerNorm layers inside the same modules are targets too
(LyCORIS: a class name containing "Norm"), for norm deltas.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from lorakit.adapters.functional.norm import is_trainable_norm
from lorakit.surgery.blocks import UNetLayout, block_of_kohya_name, to_ldm_path
from lorakit.surgery.presets import Preset

UNET_ATTENTION_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class NoTargetError(ValueError):
    """Nothing in the model matched the target classes."""


@dataclass(frozen=True)
class Target:
    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str  # module path inside its root model
    layer: nn.Module
    component: str  # "unet", "te", "te1", "te2"
    block: str | None  # IN01.. for U-Net modules, TE layer label for text encoders
    in_conv_block: bool  # found through the ResnetBlock2D/Down/Upsample classes

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and tuple(self.layer.kernel_size) != (1, 1)


def unet_kohya_name(path: str, layout: UNetLayout) -> str:
    """SD1/SD2 files use diffusers paths, SDXL files SGM paths (what A1111, ComfyUI and diffusers expect)."""
    body = to_ldm_path(path, layout) if layout.family == "sdxl" else path
    return "lora_unet_" + body.replace(".", "_")


def text_encoder_kohya_name(path: str, prefix: str) -> str:
    """transformers 5 drops `text_model.` from CLIP paths; files must keep it or A1111/ComfyUI skip the keys."""
    if not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}_" + path.replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    return ["lora_te"] if count == 1 else [f"lora_te{i + 1}" for i in range(count)]


def find_targets(unet: nn.Module | None, text_encoders: list[nn.Module], with_conv: bool,
                 preset: Preset | None = None, norms: bool = False) -> list[Target]:
    """kohya's discovery: walk modules of the target classes and take their Linear/Conv2d children.

    With a LyCORIS preset: its classes and path patterns instead; kxk convs only if it enables conv.
    norms (train_norm): their GroupNorm/LayerNorm children as well."""
    targets: list[Target] = []
    if unet is not None:
        layout = UNetLayout.of(unet)
        classes, names = UNET_ATTENTION_CLASSES + (UNET_CONV_CLASSES if with_conv else ()), ()
        if preset is not None:
            classes, names = preset.unet_targets(layout.family)
        # SDXL files (and kohya's SDXL U-Net that presets were written for) use SGM paths
        file_path = (lambda p: _ldm_or_none(p, layout)) if layout.family == "sdxl" else (lambda p: p)
        for path, layer, in_conv in _walk(unet, classes, names, file_path, norms):
            name = unet_kohya_name(path, layout)
            block = block_of_kohya_name(name[len("lora_unet_"):], layout.family)
            targets.append(Target(name, path, layer, "unet", block, in_conv))
    te_classes = TEXT_ENCODER_CLASSES if preset is None else preset.te_classes
    for prefix, te in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for path, layer, _ in _walk(te, te_classes, norms=norms):
            targets.append(Target(text_encoder_kohya_name(path, prefix), path, layer, prefix[len("lora_"):],
                                  _te_block(path, prefix), False))
    if preset is not None and not preset.enable_conv:
        targets = [t for t in targets if not t.is_kxk_conv]  # LyCORIS: conv dim 0 for such presets
    return targets


def _walk(root: nn.Module, classes: tuple[str, ...], names: tuple[str, ...] = (), file_path=lambda p: p,
          norms: bool = False):
    """Linear/Conv2d layers inside modules of `classes`, and layers whose path `re.match`es one of `names`
    (LyCORIS's rule: a module matched by name is not searched by class). Each layer once. norms: affine
    GroupNorm/LayerNorm layers too."""
    seen: set[int] = set()

    def wanted(layer: nn.Module) -> bool:
        name = type(layer).__name__
        return name in ("Linear", "Conv2d") or (norms and "Norm" in name and is_trainable_norm(layer))

    def named(path: str) -> bool:
        target = file_path(path) if names else None
        return target is not None and any(re.match(n, target) for n in names)

    for path, module in root.named_modules():
        if type(module).__name__ in classes and not named(path):
            in_conv = type(module).__name__ in UNET_CONV_CLASSES
            for child_path, child in module.named_modules():
                if wanted(child) and id(child) not in seen:
                    seen.add(id(child))
                    yield f"{path}.{child_path}" if path else child_path, child, in_conv
        elif wanted(module) and id(module) not in seen and named(path):
            seen.add(id(module))
            yield path, module, False


def _ldm_or_none(path: str, layout: UNetLayout) -> str | None:
    try:
        return to_ldm_path(path, layout)
    except ValueError:
        return None  # containers with no LDM equivalent: no path pattern can name them


def _te_block(path: str, prefix: str) -> str:
    parts = path.split(".")
    return te_block_label(prefix[len("lora_"):], parts[parts.index("layers") + 1] if "layers" in parts else "")


def te_block_label(component: str, layer: str) -> str:
    """TE00.. for a single text encoder, TE1_00.. / TE2_00.. for SDXL's two; the component name without a layer."""
    label = component.upper()
    if not layer.isdigit():
        return label
    return f"{label}{int(layer):02d}" if label == "TE" else f"{label}_{int(layer):02d}"


def all_named_layers(unet: nn.Module | None, text_encoders: list[nn.Module]) -> dict[str, tuple[str, nn.Module, str]]:
    """Every Linear/Conv2d (and affine GroupNorm/LayerNorm, for norm deltas) under its kohya name:
    kohya name -> (path, layer, component). For loading files."""
    out: dict[str, tuple[str, nn.Module, str]] = {}
    if unet is not None:
        layout = UNetLayout.of(unet)
        for path, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) or is_trainable_norm(module):
                try:
                    out[unet_kohya_name(path, layout)] = (path, module, "unet")
                except ValueError:
                    continue
    for prefix, te in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for path, module in te.named_modules():
            if (isinstance(module, (nn.Linear, nn.Conv2d)) or is_trainable_norm(module)) and "encoder" in path:
                out[text_encoder_kohya_name(path, prefix)] = (path, module, prefix[len("lora_"):])
    return out


def no_target_error(roots: list[nn.Module], searched: tuple[str, ...]) -> NoTargetError:
    class_names = sorted({type(m).__name__ for r in roots for m in r.modules()})
    nearest = {c: difflib.get_close_matches(c, class_names, n=3, cutoff=0.4) for c in searched}
    hints = "; ".join(f"{c}: nearest {v or 'none'}" for c, v in nearest.items())
    return NoTargetError(f"no layer to adapt: searched Linear/Conv2d inside module classes {list(searched)} "
                         f"and found none. Model classes present include {class_names[:12]}. {hints}")
