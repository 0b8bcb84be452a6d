"""Small helpers shared across dasam3's modules."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """ "auto" → the GPU when there is one, else the CPU; any other name as torch reads it ("cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def factory_of(module: nn.Module) -> dict:
    """`device` and `dtype` keywords matching the module's first parameter (for modules added beside it)."""
    param = next(module.parameters())
    return {"device": param.device, "dtype": param.dtype}


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """values [B, S, D], valid [B, S] (nonzero = a real token) or None (all are) → [B, D]: the mean of each
    row's valid tokens (zeros for a row with none)."""
    if valid is None:
        return values.mean(dim=1)
    weights = valid.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def check_fields(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Validate a mapping meant for the dataclass `cls` before it is built: every key must be one of its
    fields and every value of the type its annotation names (recursively for nested dataclasses, lists
    and dicts). Raises ValueError naming the option as `where + field`, the expected type and the value.

    Stricter than Python on purpose: a bool is not an int, a string is not a number (YAML 1.1 reads
    `5e-4` as the string "5e-4"), an int is accepted where a float is expected.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where.rstrip('.') or cls.__name__} must be a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"unknown option(s) {[where + k for k in unknown]}; known: {known}")
    for name, value in values.items():
        _check_value(value, hints[name], f"{where}{name}")


def _check_value(value: Any, hint: Any, where: str) -> None:
    if not _matches(value, hint):
        hint_text = ""
        if isinstance(value, str) and _accepts(hint, float) and _is_number(value):
            hint_text = " (YAML reads a number without a decimal point, like 5e-4, as text: write 5.0e-4)"
        raise ValueError(f"{where} must be {_describe(hint)}, got {value!r} ({type(value).__name__}){hint_text}")
    for option in _options(hint):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            check_fields(option, value, where + ".")
            return
        if origin is list and isinstance(value, (list, tuple)) and args:
            for index, item in enumerate(value):
                _check_value(item, args[0], f"{where}[{index}]")
            return


def _options(hint: Any) -> tuple:
    """The members of a union (`int | None` → (int, NoneType)), or the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _accepts(hint: Any, kind: type) -> bool:
    return any(option is kind for option in _options(hint))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has the (shallow) type `hint` names; list items and nested dataclasses are
    checked by `_check_value` so that errors name the exact item."""
    for option in _options(hint):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if option is Any or (option is type(None) and value is None):
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option is str and isinstance(value, str):
            return True
        if (option is list or origin is list) and isinstance(value, (list, tuple)):
            return True
        if (option is dict or origin is dict) and isinstance(value, Mapping) and \
                (not args or all(_matches(key, args[0]) for key in value)):
            return True
        if origin is typing.Literal and value in args:
            return True
        if dataclasses.is_dataclass(option) and isinstance(value, (option, Mapping)):
            return True
    return False


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _describe(hint: Any) -> str:
    parts = []
    for option in _options(hint):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if option in _NAMES:
            parts.append(_NAMES[option])
        elif origin is list or option is list:
            parts.append(f"a list (each item {_describe(args[0])})" if args else "a list")
        elif origin is dict or option is dict:
            parts.append("a mapping")
        elif origin is typing.Literal:
            parts.append("one of " + ", ".join(repr(a) for a in args))
        elif dataclasses.is_dataclass(option):
            parts.append(f"a mapping of {option.__name__} options")
        else:
            parts.append(getattr(option, "__name__", str(option)))
    return " or ".join(parts)
