"""Effective quotas of one project, and the Barbican rules that read them.

Barbican: a negative limit means unlimited, 0 means the resource is disabled (every create is
rejected), N > 0 admits at most N. A resource the source does not mention falls back to a
configured default (Barbican's own default is -1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import SourceInvalid

UNLIMITED = -1
#: Counters live in Lua numbers (IEEE doubles) inside Redis scripts: larger integers lose precision.
MAX_LIMIT = 2**53 - 1


def parse_limit(value: Any, where: str) -> int:
    """Validate one limit from an upstream document; negative values all mean unlimited."""
    # bool is an int subclass: `true` must never become a limit of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceInvalid(f"{where} must be an integer, got {type(value).__name__}")
    if value > MAX_LIMIT:
        raise SourceInvalid(f"{where} is larger than the store can count ({MAX_LIMIT})")
    return UNLIMITED if value < 0 else value


@dataclass(frozen=True, slots=True)
class Quotas:
    """``{resource: limit}`` for one project, as the source reported it."""

    limits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))

    def limit(self, resource: str, default: int = UNLIMITED) -> int:
        return self.limits.get(resource, default)

    def to_dict(self) -> dict[str, Any]:
        return {"limits": dict(self.limits)}

    @classmethod
    def from_dict(cls, doc: Any) -> Quotas:
        """Read back what :meth:`to_dict` wrote (the shared cache copy); invalid copies raise."""
        limits = doc.get("limits") if isinstance(doc, dict) else None
        if not isinstance(limits, dict):
            raise SourceInvalid("cached quota copy is corrupt: no limits object")
        return cls({str(k): parse_limit(v, f"cached limit {k!r}") for k, v in limits.items()})
