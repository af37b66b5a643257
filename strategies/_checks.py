"""Parameter checks shared by strategies/.

Every ValueError raised here starts with the offending parameter's name (then a space),
so a caller at the configuration edge can map that first word to its own config key.
"""
from __future__ import annotations

import math
import numbers
from typing import Any


def is_real(value: Any) -> bool:
    """A real number (Python or NumPy), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """``value`` as error messages show it: numbers plainly (``inf``, ``0.5``), anything else by repr."""
    return str(value) if is_real(value) else repr(value)


def finite(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float, or ValueError unless it is a finite number >= (or >, with strict) ``minimum``."""
    if not (is_real(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}; got {shown(value)}")
    return float(value)


def integer(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int, or ValueError unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {shown(value)}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """``value`` itself, or ValueError unless it is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {shown(value)}")
    return value
