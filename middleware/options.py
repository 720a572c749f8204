"""Checks of configuration options: a wrong type or value is a ConfigurationError naming the option.

Without them a bad option surfaces later, as a raw ``TypeError`` on the first request (``"x" < 0``)
or not at all (``renderer=None`` fails only when a request is refused).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigurationError


def _type_name(value: Any) -> str:
    return type(value).__name__


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    # bool is an int subclass: `True` is not a limit of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {value!r} ({_type_name(value)})")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def number(name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
           maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r} ({_type_name(value)})")
    if positive and value <= 0:
        raise ConfigurationError(f"{name} must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum}, got {value!r}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r} ({_type_name(value)})")
    return value


def function(name: str, value: Any, what: str) -> Any:
    if not callable(value):
        raise ConfigurationError(f"{name} must be {what}, got {value!r} ({_type_name(value)})")
    return value
