"""The algorithm registry: one small interface per algorithm, options as typed dataclasses.

Each entry says how to build a module, which options it takes, and how its tensors are named in
kohya/LyCORIS files (internal name -> file suffix). File readers detect the algorithm of a module from
its keys through `detect_algorithm`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from lorakit.adapters.modules.base import AdapterModule
from lorakit.adapters.modules.loha import LoHaModule, LoHaOptions
from lorakit.adapters.modules.lokr import LoKrModule, LoKrOptions
from lorakit.adapters.modules.lora import LoRAModule, LoRAOptions
from lorakit.adapters.modules.norm import NormModule, NormOptions


@dataclass(frozen=True)
class Algorithm:
    name: str
    module: type[AdapterModule] | type[NormModule]
    options: type
    file_keys: dict[str, str]  # internal parameter name -> key suffix in files
    required: tuple[tuple[str, ...], ...]  # each tuple: one acceptable set of required internal names
    summary: str

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.options)]


_REGISTRY: dict[str, Algorithm] = {}


def register(algo: Algorithm) -> None:
    if algo.name in _REGISTRY:
        raise ValueError(f"algorithm {algo.name!r} is already registered")
    _REGISTRY[algo.name] = algo


def get_algorithm(name: str) -> Algorithm:
    key = {"locon": "lora", "c3lier": "lora"}.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(_REGISTRY)} (locon = lora)")
    return _REGISTRY[key]


def algorithms() -> list[Algorithm]:
    return list(_REGISTRY.values())


def detect_algorithm(suffixes: set[str]) -> Algorithm | None:
    """The algorithm whose file keys explain every suffix of one module (alpha aside; every rank algorithm
    takes DoRA's dora_scale)."""
    rest = suffixes - {"alpha"}
    for algo in _REGISTRY.values():
        known = set(algo.file_keys.values())
        if rest <= known and any({algo.file_keys[n] for n in req} <= rest for req in algo.required):
            return algo
    return None


register(Algorithm(
    "lora", LoRAModule, LoRAOptions,
    {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "magnitude": "dora_scale"},
    (("down", "up"),),
    "LoRA on Linear/1x1 conv, LoCon on kxk conv: ΔW = (alpha/r)·up@down"))
register(Algorithm(
    "loha", LoHaModule, LoHaOptions,
    {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b", "t1": "hada_t1", "t2": "hada_t2",
     "magnitude": "dora_scale"},
    (("w1a", "w1b", "w2a", "w2b"),),
    "LoHa: ΔW = (alpha/r)·(w1a@w1b)⊙(w2a@w2b), rank up to r²"))
register(Algorithm(
    "lokr", LoKrModule, LoKrOptions,
    {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b",
     "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b", "t2": "lokr_t2", "magnitude": "dora_scale"},
    (("w1", "w2"), ("w1", "w2a", "w2b"), ("w1a", "w1b", "w2"), ("w1a", "w1b", "w2a", "w2b")),
    "LoKr: ΔW = scale·kron(W1, W2); scale 1 when both factors are full"))
# not a network algorithm (NetworkConfig.algo never names it): the norm-layer deltas train_norm adds beside one
register(Algorithm(
    "norm", NormModule, NormOptions, {"w_norm": "w_norm", "b_norm": "b_norm"}, (("w_norm",),),
    "norm delta (LyCORIS train_norm): GroupNorm/LayerNorm weight + w_norm, bias + b_norm"))
