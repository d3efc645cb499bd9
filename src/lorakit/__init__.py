"""lorakit: LoRA / LoCon / LoHa / LoKr adapters for Stable Diffusion.

The convolution layers (LoCon: ``conv_dim`` / ``conv_alpha``) are controlled apart from the
attention and other linear layers (``network_dim`` / ``network_alpha``).
"""

__version__ = "0.1.0"

_LAZY = {
    "LoraNetwork": "lorakit.surgery.network",
    "NetworkConfig": "lorakit.surgery.config",
    "create_network": "lorakit.surgery.network",
    "save_network": "lorakit.formats.files",
    "load_network_file": "lorakit.formats.files",
}


def __getattr__(name):  # keep `import lorakit` light: torch/diffusers load only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "__version__"]
