"""Quotas from configuration: the same limits for every project, with per-project overrides.

    StaticSource({"secrets": 100, "orders": 0})
    StaticSource({"credits": Limit(500_000, scale=1000, period=Period.parse("month"), unit="credits")})
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ConfigurationError, SourceInvalid
from ..quotas import Limit, Quotas, parse_limit
from .base import QuotaSource


class StaticSource(QuotaSource):
    namespace = "static"
    cacheable = False
    constant = True  # its Quotas are made once, in __init__

    def __init__(self, limits: Mapping[str, int | Limit], *,
                 projects: Mapping[str, Mapping[str, int | Limit]] | None = None) -> None:
        try:
            self._default = Quotas({k: _limit(v, f"limit {k!r}") for k, v in limits.items()})
            self._projects = {
                project: Quotas({**self._default.limits,
                                 **{k: _limit(v, f"limit {k!r} of project {project!r}") for k, v in own.items()}})
                for project, own in (projects or {}).items()
            }
        except SourceInvalid as exc:
            raise ConfigurationError(str(exc)) from None

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        return self.fetch_nowait(project)

    def fetch_nowait(self, project: str) -> Quotas:
        return self._projects.get(project, self._default)


def _limit(value: int | Limit, where: str) -> Limit:
    """A plain integer, or a Limit for windowed or scaled quotas (credits per month, bytes per minute)."""
    return value if isinstance(value, Limit) else Limit(parse_limit(value, where))
