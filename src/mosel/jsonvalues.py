"""Strict readers of parsed JSON (profiles, plans, schemas, residuals): each names the bad field.

Every reader returns the value if it has the expected JSON type (and range), else raises
``ValueError`` naming where it was read (``what``) and a short, bounded repr of what was found,
so a truncated, tampered or hostile file fails with a message rather than deep in the code.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from typing import Any

__all__ = ["json_bool", "json_dict", "json_field", "json_float", "json_int", "json_list", "json_str", "show"]

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 40
_REPR.maxother = 40


def show(value: object) -> str:
    """A short, bounded repr of a (possibly hostile) JSON value, for error messages."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        return _REPR.repr(value)
    except Exception:  # a repr that fails must not hide the error being reported
        return f"a {type(value).__name__}"


def json_field(data: Mapping[str, Any], key: str, where: str) -> Any:
    """``data[key]``, or ValueError saying that ``where`` lacks the field."""
    if key not in data:
        raise ValueError(f'{where} has no "{key}" field')
    return data[key]


def json_dict(value: object, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object (a dict with string keys)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{what} must be a JSON object, got {show(value)}")
    return value


def json_list(value: object, what: str, *, length: int | None = None) -> list[Any]:
    """``value`` if it is a JSON array (of ``length`` items, when given)."""
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON array, got {show(value)}")
    if length is not None and len(value) != length:
        raise ValueError(f"{what} must have {show(length)} items, got {len(value)}")
    return value


def json_str(value: object, what: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {show(value)}")
    return value


def json_int(value: object, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an integer (not a bool, not a float) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {show(value)}")
    _within(value, what, low, high)
    return value


def json_float(value: object, what: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite number (not a bool) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {show(value)}")
    number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {show(value)}")
    _within(number, what, low, high)
    return number


def _within(value: float, what: str, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else show(low)}, {'inf' if high is None else show(high)}]"
        raise ValueError(f"{what} must lie in {bounds}, got {show(value)}")


def json_bool(value: object, what: str) -> bool:
    """``value`` if it is ``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {show(value)}")
    return value
