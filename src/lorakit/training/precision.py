"""Which dtype each part of a run is held in, fp16's loss scaling, and when the VAE and text encoders go.

With mixed_precision bf16/fp16 the frozen U-Net, text encoders and VAE are loaded straight into that dtype
(half the memory of fp32, and no autocast casts of the weights at every step); the adapters keep fp32
master weights and autocast runs their math in the half dtype. kohya's switches keep their meaning:
full_bf16/full_fp16 put the adapters in half too, no_half_vae keeps the VAE in fp32, and fp8_base /
fp8_base_unet store the frozen Linear/Conv weights in float8 (CUDA only; autocast upcasts them per op).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = getattr(torch, "float8_e4m3fn", None)


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None  # mixed_precision's dtype; None = fp32 throughout
    weights: torch.dtype  # the frozen U-Net and text encoders
    vae: torch.dtype
    adapters: torch.dtype  # the trained weights (fp32 masters unless full_bf16/full_fp16)
    fp8_unet: bool = False
    fp8_text: bool = False

    def load_dtypes(self) -> dict[str, torch.dtype]:
        """Per-component dtypes for diffusers' loaders: each part is read straight into its own dtype."""
        return {"default": self.weights, "vae": self.vae}


def choose(config) -> Precision:
    half = HALF.get(config.mixed_precision)
    weights = half or torch.float32
    full = (config.full_bf16 and half is torch.bfloat16) or (config.full_fp16 and half is torch.float16)
    return Precision(half, weights, torch.float32 if config.no_half_vae else weights,
                     weights if full else torch.float32,
                     fp8_unet=bool(config.fp8_base or config.fp8_base_unet), fp8_text=bool(config.fp8_base))


def precision_problems(config, device: torch.device) -> list[str]:
    """kohya's own checks on these switches, plus fp8's hardware need (said before anything loads)."""
    out = []
    if config.full_bf16 and config.mixed_precision != "bf16":
        out.append(f"full_bf16 = true needs mixed_precision = \"bf16\" (it is {config.mixed_precision!r}), as "
                   "in kohya")
    if config.full_fp16 and config.mixed_precision != "fp16":
        out.append(f"full_fp16 = true needs mixed_precision = \"fp16\" (it is {config.mixed_precision!r}), as "
                   "in kohya")
    for key in ("fp8_base", "fp8_base_unet"):
        if getattr(config, key):
            problem = fp8_problem(config, device)
            if problem:
                out.append(f"{key} = true: {problem}")
    return out


def fp8_problem(config, device: torch.device) -> str | None:
    if config.mixed_precision not in HALF:
        return "float8 weights need mixed_precision = \"bf16\" or \"fp16\" to compute in (as kohya)"
    if FP8 is None:
        return f"this torch ({torch.__version__}) has no float8_e4m3fn dtype; upgrade torch or remove it"
    if torch.device(device).type != "cuda":
        return (f"float8 weights are for CUDA GPUs; this run is on {torch.device(device).type}, where they "
                "save nothing and every op would upcast them: use mixed_precision = \"bf16\" instead")
    return None


def cpu_half_note(config, device: torch.device) -> str | None:
    """bf16/fp16 on a CPU without native bf16 (no AVX512_BF16 or AMX: e.g. AVX2-only AMD EPYC) runs convs in
    slow fallback kernels: measured on such a 2-core EPYC, one 320-channel 3x3 bf16 conv at 32x32 took 14.8 s
    against 0.2 s in fp32. Said once before training, so a user can switch to fp32 on that machine."""
    if config.mixed_precision not in HALF or torch.device(device).type != "cpu":
        return None
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None or probe() for probe in probes):
        return None
    return (f"mixed_precision = \"{config.mixed_precision}\" on a CPU without native bf16/fp16 (capability "
            f"{torch.backends.cpu.get_cpu_capability()}, no AVX512_BF16 or AMX): half-precision convolutions "
            "fall back to kernels many times slower than fp32 here; mixed_precision = \"no\" trains faster on "
            "this machine (half precision still halves the model's memory)")


def to_fp8(modules) -> int:
    """Store the weights of every Linear/Conv2d of `modules` in float8_e4m3fn (norms, embeddings and biases
    keep their dtype). Under autocast each op upcasts the weight to the autocast dtype; adapters compute
    around it (AdapterModule.compute_dtype). Returns how many weights were converted."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                layer.weight.data = layer.weight.data.to(FP8)
                count += 1
    return count


def cast_adapters(network, dtype: torch.dtype) -> None:
    """The trained parameters in `dtype` (full_bf16/full_fp16); buffers such as alpha stay exact in fp32."""
    for p in network.parameters():
        p.data = p.data.to(dtype)


class HalfGradScaler(torch.amp.GradScaler):
    """full_fp16: the gradients themselves are fp16, which GradScaler.unscale_ refuses by default; kohya
    patches accelerate's scaler the same way (allow_fp16 = True)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def make_scaler(config, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaling: a step whose gradients hold inf/NaN is skipped and the scale halved."""
    if config.mixed_precision != "fp16":
        return None
    cls = HalfGradScaler if config.full_fp16 else torch.amp.GradScaler
    return cls(torch.device(device).type)


def deterministic_captions(items) -> bool:
    """Every caption encodes the same at every use: no shuffling, dropout or token warmup in any subset."""
    return not any(s.shuffle_caption or s.caption_dropout_rate or s.caption_dropout_every_n_epochs
                   or s.caption_tag_dropout_rate or s.token_warmup_step for s in {id(i.subset): i.subset
                                                                                 for i in items}.values())


@dataclass(frozen=True)
class ReleasePlan:
    vae: str  # "keep", "offload" (to the CPU, back for samples) or "delete"
    text: str
    lines: tuple[str, ...]


def release_plan(device: torch.device, live_images: bool, samples: bool, train_text: bool,
                 text_adapters: bool, fixed_captions: bool) -> ReleasePlan:
    """What happens to the VAE and the text encoders once latents and text embeddings are cached, and the
    lines that say so. On a GPU they leave it (to the CPU) unless a step needs them; on the CPU they are
    deleted unless anything later (samples, live images, a text encoder that trains) needs them."""
    on_gpu = torch.device(device).type != "cpu"
    gone = "moved to the CPU" if on_gpu else "released"
    if live_images:
        vae, vae_line = "keep", "VAE kept: color_aug/random_crop images are encoded at every step"
    elif samples and not on_gpu:
        vae, vae_line = "keep", "VAE kept: samples decode with it"
    else:
        vae = "offload" if on_gpu else "delete"
        vae_line = f"VAE {gone} after caching the latents" + (" (moved back for samples)" if samples else "")
    if train_text:
        text, text_line = "keep", "text encoders kept: they train"
    elif text_adapters:
        text, text_line = "keep", "text encoders kept: the network has (frozen) text-encoder adapters"
    elif not fixed_captions:
        text, text_line = "keep", ("text encoders kept: shuffled/dropped/warmed-up captions change at every use, "
                                   "so they are encoded per step")
    elif samples and not on_gpu:
        text, text_line = "keep", "text encoders kept: samples need them"
    else:
        text = "offload" if on_gpu else "delete"
        text_line = f"text encoders {gone} after caching the text embeddings" + (
            " (moved back for samples)" if samples else "")
    return ReleasePlan(vae, text, (f"note: {vae_line}", f"note: {text_line}"))


def apply_release(plan: ReleasePlan, pipeline, cache) -> list[torch.nn.Module]:
    """Carry out `plan` on the pipeline (and the latent cache's VAE reference, so nothing keeps a deleted
    VAE alive). Returns the modules moved to the CPU, which sampling moves back in for its duration."""
    offloaded = []
    for action, names in ((plan.vae, ("vae",)), (plan.text, ("text_encoder", "text_encoder_2"))):
        for name in names:
            module = getattr(pipeline, name, None)
            if module is None or action == "keep":
                continue
            if action == "offload":
                offloaded.append(module.to("cpu"))
            else:
                setattr(pipeline, name, None)
    if plan.vae == "delete":
        cache.vae = None
    if offloaded and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return offloaded


def _glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None (macOS, Windows, musl)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand memory freed on the CPU back to the system, once nothing references the freed models. glibc keeps
    freed blocks under its mmap threshold in the heap, so deleting the text encoders and VAE left RSS where it
    was: measured on an SDXL bf16 build, 6.9 GiB before and after deleting them, 5.3 GiB after malloc_trim.
    (Trimmed while the trainer still held the text encoders, RSS stayed at 6.8 GiB into training.) A no-op
    off glibc."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory(device: torch.device) -> int | None:
    """The process's peak memory so far, in bytes: the peak allocation on a GPU, peak RSS on the CPU (Linux,
    macOS); None where it cannot be read (Windows, other devices)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        return None
    import sys

    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_large_buffers(device: torch.device) -> bool:
    """On a glibc CPU run, serve every allocation from malloc's heap instead of a fresh mmap, and keep up to
    2 GiB freed at the heap's top instead of returning it at once. Returns whether it did (not on a GPU, off
    glibc, or where GLIBC_TUNABLES / MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ already choose).

    Blocks above glibc's mmap threshold (at most 32 MiB) are mapped on allocation and unmapped on free, so
    each one costs a page fault per 4 KiB every time. oneDNN's conv backward reorders the weight into a new
    buffer on every call, 56-113 MiB for SD1.5's 1280-channel convs. Where the heap had no free block that
    large, that was 306,000 page faults per forward + backward at 256 px fp32 (22 maps, 1.8 GiB). Without
    the trim threshold, a block freed at the heap's top would go back and fault in again the same way. What is
    kept was in use a moment before and the next step uses it again: peak RSS in benchmarks/train_step.py
    moved by 0.0-0.2 GiB (fragmentation), RSS stays flat over 25 steps (docs/benchmarks.md).
    Called after the VAE and text encoders are released, so their memory has been handed back first."""
    import os

    chosen = ("MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
              or "malloc.mmap_max" in os.environ.get("GLIBC_TUNABLES", "")
              or "malloc.trim_threshold" in os.environ.get("GLIBC_TUNABLES", ""))
    libc = _glibc() if device.type == "cpu" and not chosen else None
    return libc is not None and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and libc.mallopt(M_MMAP_MAX, 0) == 1
