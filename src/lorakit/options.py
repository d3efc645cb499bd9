"""Typed option fields: the one way a setting declares its default, help text, range and choices.

Both the network schema (lorakit.surgery.config) and the training schema (lorakit.training.schema) declare
their fields with `opt`, so TOML validation, `network_args`, CLI flags and GUI fields all read the same
metadata. This module imports nothing from lorakit: every layer may use it.
"""
from __future__ import annotations

import types
import typing
from dataclasses import field


def opt(default, help: str, *, lo=None, hi=None, choices=None, arg: str | None = None, factory=None):
    """A dataclass field with schema metadata.

    arg: the key's name inside kohya/LyCORIS `network_args` where it differs from the field name.
    factory: a default factory for mutable defaults (then `default` is ignored).
    """
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "arg": arg}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def base_type(hint):
    """int | None -> int; list[int] | None -> list; plain types unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return list if typing.get_origin(hint) is list else hint


def list_item_type(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint)[0]
