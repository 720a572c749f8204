"""Effective quotas of one project, and the Barbican rules that read them.

Barbican: a negative limit means unlimited, 0 means the resource is disabled (every create is
rejected), N > 0 admits at most N. A resource the source does not mention falls back to a
configured default (Barbican's own default is -1).
"""

from __future__ import annotations

import json
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

    def dumps(self) -> bytes:
        return json.dumps({"limits": dict(self.limits)}, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, blob: bytes | str) -> Quotas:
        """Read back what :meth:`dumps` wrote (the shared cache copy); invalid copies raise."""
        try:
            doc = json.loads(blob)
            limits = doc["limits"]
            if not isinstance(limits, dict):
                raise TypeError("limits is not an object")
            return cls({str(k): parse_limit(v, f"cached limit {k!r}") for k, v in limits.items()})
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceInvalid(f"cached quota copy is corrupt: {exc}") from exc
