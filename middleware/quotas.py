"""Effective quotas of one project, and the Barbican rules that read them.

Barbican: a negative limit means unlimited, 0 means the resource is disabled (every create is
rejected), N > 0 admits at most N. A resource the source does not mention falls back to a
configured default (Barbican's own default is -1).

Limits are integers in *store units*: ``scale`` store units make one quota unit, so fractional
costs stay exact (Captain Data credits are counted in thousandths, Latitude traffic in bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from .errors import SourceInvalid
from .windows import Period, Window

UNLIMITED = -1
#: Counters live in Lua numbers (IEEE doubles) inside Redis scripts: larger integers lose precision.
MAX_LIMIT = 2**53 - 1


#: A cost or an amount in quota units: fractions allowed (``0.5`` credits), as a number or a string.
Number = int | float | Decimal | str


def to_store_units(amount: Number, scale: int) -> int:
    """Quota units -> whole store units, rounded up so that fractional costs never undercount."""
    if type(amount) is int and amount >= 0:  # nearly every cost (1): no Decimal arithmetic
        return amount * scale
    try:
        value = Decimal(str(amount)) * scale
    except InvalidOperation:
        raise ValueError(f"cost {amount!r} is not a number") from None
    if not value.is_finite() or value < 0 or isinstance(amount, bool):
        raise ValueError(f"cost {amount!r} must be a finite number >= 0")
    return math.ceil(value)


def in_quota_units(units: int, scale: int) -> int | float:
    """Store units -> quota units, whole where they divide evenly (for messages and bodies)."""
    return units // scale if units % scale == 0 else units / scale


def parse_limit(value: Any, where: str) -> int:
    """Validate one limit from an upstream document; negative values all mean unlimited."""
    # bool is an int subclass: `true` must never become a limit of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceInvalid(f"{where} must be an integer, got {type(value).__name__}")
    if value > MAX_LIMIT:
        raise SourceInvalid(f"{where} is larger than the store can count ({MAX_LIMIT})")
    return UNLIMITED if value < 0 else value


@dataclass(frozen=True, slots=True)
class Limit:
    """One resource's limit, in store units."""

    value: int
    #: Store units per quota unit (for messages and headers).
    scale: int = 1
    #: What the limit counts over: the billing period the source reported (a fixed Window), or a
    #: repeating Period the source implies (a calendar month); None: a count quota. A request
    #: counts in the window of it that contains the request (windows.current_window).
    period: Window | Period | None = None
    #: Usage the upstream itself reported, in store units; it seeds the local counter.
    used: int | None = None
    #: What one quota unit is, for messages ("credits", "TB").
    unit: str = ""

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"value": self.value}
        if self.scale != 1:
            doc["scale"] = self.scale
        if isinstance(self.period, Window):
            doc["window"] = [self.period.start, self.period.end]
        elif isinstance(self.period, Period):
            doc["period"] = self.period.seconds if self.period.seconds is not None else "month"
        if self.used is not None:
            doc["used"] = self.used
        if self.unit:
            doc["unit"] = self.unit
        return doc

    @classmethod
    def from_dict(cls, doc: Any, where: str) -> Limit:
        if not isinstance(doc, dict):
            return cls(parse_limit(doc, where))
        period: Window | Period | None = None
        if "window" in doc:
            start, end = doc["window"]
            period = Window(float(start), float(end))
        elif "period" in doc:
            period = Period.parse(doc["period"])
        used = doc.get("used")
        return cls(parse_limit(doc["value"], where), int(doc.get("scale", 1)), period,
                   None if used is None else parse_limit(used, f"{where} usage"), str(doc.get("unit", "")))


@dataclass(frozen=True, slots=True)
class Quotas:
    """``{resource: Limit}`` for one project, as the source reported it."""

    limits: Mapping[str, Limit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        limits = {name: value if isinstance(value, Limit) else Limit(value) for name, value in self.limits.items()}
        object.__setattr__(self, "limits", MappingProxyType(limits))

    def limit(self, resource: str, default: int = UNLIMITED) -> Limit:
        found = self.limits.get(resource)
        return found if found is not None else Limit(default)

    def to_dict(self) -> dict[str, Any]:
        return {"limits": {name: limit.to_dict() for name, limit in self.limits.items()}}

    @classmethod
    def from_dict(cls, doc: Any) -> Quotas:
        """Read back what :meth:`to_dict` wrote (the shared cache copy); invalid copies raise."""
        limits = doc.get("limits") if isinstance(doc, dict) else None
        if not isinstance(limits, dict):
            raise SourceInvalid("cached quota copy is corrupt: no limits object")
        try:
            return cls({str(k): Limit.from_dict(v, f"cached limit {k!r}") for k, v in limits.items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceInvalid(f"cached quota copy is corrupt: {exc}") from exc
