"""Base models from a user's files, offline: diffusers folders and single-file SD1.x / SD2.x / SDXL checkpoints.

    base = load_base_model("v1-5-pruned-emaonly.safetensors")   # family and prediction type detected
    base.pipeline.unet, base.pipeline.text_encoder, ...

Single files are `.safetensors` in the original layout (LDM for SD1/SD2, SGM for SDXL). `.ckpt`/`.pt` files are
read only through torch's weights-only loader, never plain unpickling. The architecture (widths, depths, heads,
text encoders) is inferred from the tensor shapes in the header (see infer_config.py), so fine-tunes and
non-stock sizes load too; what the shapes could not tell is said in `notes`. Tokenizer data ships with
lorakit, so nothing is fetched. With no path, the embedded tiny model is used (and that is said).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.formats.safetensors_io import LoraFileError, read_header, write_safetensors
from lorakit.models.configs import PIPELINES, write_config_folder
from lorakit.models.infer_config import architecture_metadata, hints_from_metadata, infer_configs, tensor_shapes
from lorakit.models.ldm_layout import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, to_original_layout

SUPPORTED = "SD1.x (LDM, CLIP-L), SD2.x (LDM, OpenCLIP-H; eps or v), SDXL base (SGM, CLIP-L + OpenCLIP-bigG)"
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
FOLDER_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# what building a model from a user's files raises when the files do not fit (never a traceback for these)
BUILD_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError, OSError)


class CheckpointError(LoraFileError):
    """A base-model file that cannot be loaded; the message says what is wrong and what to do."""


@dataclass
class BaseModel:
    pipeline: object  # StableDiffusionPipeline or StableDiffusionXLPipeline
    family: str
    prediction_type: str
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def native_resolution(self) -> int:
        """The native image side of this model as built (see native_side)."""
        return native_side(self.pipeline.unet.config, self.pipeline.vae.config)

    @property
    def text_encoders(self) -> list:
        encoders = [self.pipeline.text_encoder]
        if getattr(self.pipeline, "text_encoder_2", None) is not None:
            encoders.append(self.pipeline.text_encoder_2)
        return encoders


def detect_family(keys) -> str:
    keys = set(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ValueError("no U-Net weights (`model.diffusion_model.*`): not a Stable Diffusion checkpoint")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.") for k in keys):
        raise ValueError(f"an SGM checkpoint that is not SDXL base (a refiner?); supported: {SUPPORTED}")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if f"{UNET_PREFIX}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight" in keys or any(
            k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ValueError(f"unknown architecture; supported: {SUPPORTED}")


def detect_prediction(keys, family: str) -> tuple[str, str]:
    """(prediction type, how it was decided). The keys rarely say: markers if present, else the family default."""
    keys = set(keys)
    if "v_pred" in keys or "edm_vpred.sigma_max" in keys:
        return "v_prediction", "a v-prediction marker key in the file"
    return "epsilon", (f"no v-prediction marker in the file; {FAMILY_NAMES[family]} default. SD2 768-v models need "
                       "prediction_type='v_prediction'")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint; .safetensors validated first, pickles only weights-only."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # weights-only unpickling refuses code objects: say so, do not fall back
            raise CheckpointError(path, f"not readable with weights-only loading ({type(e).__name__}: {e}); lorakit "
                                        "never unpickles arbitrary objects. Convert it to .safetensors with a tool "
                                        "you trust") from None
        state = data.get("state_dict", data) if isinstance(data, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(path, "no state dict inside this pickle")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if suffix != ".safetensors":
        raise CheckpointError(path, f"unsupported file type {suffix!r}: give a .safetensors single file, a .ckpt "
                                    "(read weights-only) or a diffusers folder")
    _checked_header(path)
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_parts(path, keys, family: str, vae) -> None:
    if vae is None and not any(k.startswith(VAE_PREFIX) for k in keys):
        raise CheckpointError(path, "the file has no VAE (`first_stage_model.*`); pass vae=<diffusers AutoencoderKL "
                                    "folder or .safetensors> (CLI: --vae) to supply one")
    for prefix in TEXT_PREFIXES[family]:
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(path, f"the file has no text encoder (`{prefix}*`); {FAMILY_NAMES[family]} single "
                                        "files must contain it. Use the full checkpoint or a diffusers folder")


def load_single_file(path: str | os.PathLike, family: str | None = None, prediction_type: str | None = None,
                     config_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                     vae=None) -> BaseModel:
    """Load an original-layout checkpoint through diffusers' single-file loader, fully offline.

    config_dir: a weightless diffusers folder describing the architecture (default: inferred from the file's
    tensor shapes and written by lorakit; one `notes` line says what was inferred and what fell back).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        source, shapes, metadata = _readable_source(path, Path(tmp))
        family, prediction_type, notes = _identify(path, list(shapes), family, prediction_type, vae)
        if config_dir:
            folder = Path(config_dir)
        else:
            folder = _inferred_config_folder(path, Path(tmp) / "config", shapes, metadata, family, notes)
        pipe = _from_single_file(path, source, folder, family, prediction_type, dtype, vae)
    return BaseModel(pipe, family, prediction_type, str(path), notes)


def _inferred_config_folder(path: Path, folder: Path, shapes, metadata, family: str, notes: list[str]) -> Path:
    try:
        inferred = infer_configs(shapes, family, hints_from_metadata(metadata))
    except (KeyError, IndexError, ValueError) as e:  # a KeyError names the tensor the layout needs
        raise CheckpointError(path, f"cannot tell the {FAMILY_NAMES[family]} architecture from the tensor shapes "
                                    f"({type(e).__name__}: {e}); pass config_dir=<diffusers folder> that "
                                    "describes it") from None
    notes.append(inferred.note())
    return write_config_folder(folder, family, inferred.unet, inferred.vae, inferred.text)


def _checked_header(path: Path) -> tuple[dict, dict[str, str]]:
    """The validated safetensors header and metadata; truncated or malformed files fail here, naming the file."""
    try:
        return read_header(path)[:2]
    except LoraFileError as e:
        raise CheckpointError(path, e.detail, e.key) from None


def _readable_source(path: Path, tmp: Path) -> tuple[Path, dict[str, tuple[int, ...]], dict[str, str]]:
    """(a .safetensors path diffusers may read, its key -> shape map, its metadata). Headers are validated; a
    pickle is read weights-only and rewritten as safetensors, so diffusers never unpickles anything.
    Safetensors are not loaded here: the shapes come from the header."""
    if path.suffix.lower() == ".safetensors":
        header, metadata = _checked_header(path)
        return path, tensor_shapes(header), metadata
    state = read_checkpoint(path)
    source = tmp / "converted.safetensors"
    write_safetensors(source, {k: v.contiguous() for k, v in state.items()}, {})
    return source, tensor_shapes(state), {}


def _identify(path, keys, family, prediction_type, vae) -> tuple[str, str, list[str]]:
    try:
        detected = detect_family(keys)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    notes = [] if not family or family == detected else [f"family {family} given; keys look like {detected}"]
    family = family or detected
    _check_parts(path, keys, family, vae)
    guess, why = detect_prediction(keys, family)
    chosen = prediction_type or guess
    notes.insert(0, f"detected {FAMILY_NAMES[detected]} from the keys; prediction type {chosen}"
                 + (" (given)" if prediction_type else f" ({why})"))
    return family, chosen, notes


def _from_single_file(path, source, folder, family, prediction_type, dtype, vae):
    import diffusers

    scheduler = diffusers.DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler",
                                                        prediction_type=prediction_type)
    if isinstance(dtype, dict):  # per-component dtypes (no_half_vae): the VAE is read on its own, in its dtype
        dtype, vae_dtype = dtype.get("default", torch.float32), dtype.get("vae", dtype.get("default"))
        if vae is None and vae_dtype not in (None, dtype):
            vae = diffusers.AutoencoderKL.from_single_file(str(source), config=str(folder), subfolder="vae",
                                                           local_files_only=True, dtype=vae_dtype)
    extra = {"vae": vae} if vae is not None else {}
    if family != "sdxl":
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        return getattr(diffusers, PIPELINES[family]).from_single_file(
            str(source), config=str(folder), local_files_only=True, dtype=dtype, scheduler=scheduler, **extra)
    except BUILD_ERRORS as e:  # e.g. a text encoder whose tensors do not fit any CLIP config
        raise CheckpointError(path, f"could not be loaded as {FAMILY_NAMES[family]} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}); supported: {SUPPORTED}") from None


def load_base_model(name_or_path: str | os.PathLike | None = None, **kwargs) -> BaseModel:
    """A user's base model (single file or diffusers folder), or the embedded tiny model when none is given."""
    if name_or_path is None:
        from lorakit.models.tiny import embedded_model_dir, load_pipeline

        pipe = load_pipeline(dtype=kwargs.get("dtype", torch.float32))
        return BaseModel(pipe, "sd1", "epsilon", str(embedded_model_dir()),
                         ["no base model given: using lorakit's embedded tiny SD model (64x64, for tests and demos)"])
    path = Path(name_or_path)
    if path.is_dir():
        return _load_folder(path, **kwargs)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder (models are never downloaded: give a local path)")
    return load_single_file(path, **kwargs)


def _load_folder(path: Path, dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                 **_) -> BaseModel:
    import diffusers

    cls_name = _checked_index(path)
    family = "sdxl" if "XL" in cls_name else "sd1"
    try:  # safetensors only: a .bin component would be a pickle
        pipe = getattr(diffusers, cls_name).from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                            use_safetensors=True)
    except BUILD_ERRORS as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(path, f"cannot be loaded as a diffusers folder ({type(e).__name__}: {first}); every "
                                    "component needs its config and a .safetensors weight file (lorakit never "
                                    "loads .bin pickles: convert them, e.g. with diffusers' save_pretrained)") from None
    if family == "sd1" and pipe.unet.config.get("use_linear_projection"):
        family = "sd2"
    pred = prediction_type or pipe.scheduler.config.get("prediction_type", "epsilon")
    return BaseModel(pipe, family, pred, str(path), [f"diffusers folder ({cls_name}); prediction type {pred}"])


def _checked_index(path: Path) -> str:
    """The folder's pipeline class, after checking model_index.json names only known diffusers/transformers parts."""
    import json

    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(path, "not a diffusers folder (no model_index.json)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(index, f"is not valid JSON ({e}); restore it from the model's source") from None
    cls_name = data.get("_class_name") if isinstance(data, dict) else None
    if cls_name not in FOLDER_PIPELINES:
        raise CheckpointError(index, f"_class_name {cls_name!r} is not a Stable Diffusion pipeline lorakit loads; "
                                     f"supported: {', '.join(FOLDER_PIPELINES)}")
    for name, entry in data.items():
        if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] not in (
                None, "diffusers", "transformers"):
            raise CheckpointError(index, f"component {name!r} comes from {entry[0]!r}, a custom pipeline: lorakit "
                                         "never runs code shipped with a model; use a standard diffusers folder")
    return cls_name


def save_single_file(path: str | os.PathLike, family: str, unet, vae, text_encoders, dtype=None,
                     passthrough: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None):
    """Write the components as one original-layout .safetensors file (atomic). `passthrough` carries source
    keys that diffusers does not model (e.g. SD2's unused last text-encoder layer) unchanged. The metadata
    records what tensor shapes cannot show (heads, norm groups, activations), so the file loads back exactly."""
    state = to_original_layout(family, unet, vae, text_encoders)
    arch = architecture_metadata(unet.config if unet is not None else None, vae.config if vae is not None else None,
                                 [encoder.config.to_dict() for encoder in text_encoders])
    for key, tensor in (passthrough or {}).items():
        state.setdefault(key, tensor)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in state.items()}, {**(metadata or {}), **arch})
    return Path(path)


def native_resolution(name_or_path: str | os.PathLike | None = None) -> int:
    """The base model's native image side in pixels (native_side). Read from configs or the file's header
    only, never the weights (a .ckpt is read weights-only); 64 for the embedded tiny model, 512 for SD1.5,
    1024 for SDXL."""
    import json

    if name_or_path is None:
        from lorakit.models.tiny import embedded_model_dir

        name_or_path = embedded_model_dir()
    path = Path(name_or_path)
    if path.is_dir():
        unet, vae = (json.loads((path / part / "config.json").read_text()) for part in ("unet", "vae"))
    else:
        if path.suffix.lower() == ".safetensors":
            header, metadata = _checked_header(path)
            shapes = tensor_shapes(header)
        else:
            shapes, metadata = tensor_shapes(read_checkpoint(path)), {}
        inferred = infer_configs(shapes, detect_family(shapes), hints_from_metadata(metadata))
        unet, vae = inferred.unet, inferred.vae or {"block_out_channels": (0,) * 4}  # no VAE inside: SD's 8x
    return native_side(unet, vae)


def native_side(unet_config, vae_config) -> int:
    """Pixels per side the model was made for: the U-Net's sample_size (its latent side) times the VAE's scale
    factor, 2 ** (levels - 1)."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)
