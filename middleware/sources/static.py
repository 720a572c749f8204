"""Quotas from configuration: the same limits for every project, with per-project overrides."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ConfigurationError, SourceInvalid
from ..quotas import Quotas, parse_limit
from .base import QuotaSource


class StaticSource(QuotaSource):
    namespace = "static"
    cacheable = False

    def __init__(self, limits: Mapping[str, int], *, projects: Mapping[str, Mapping[str, int]] | None = None) -> None:
        try:
            self._default = Quotas({k: parse_limit(v, f"limit {k!r}") for k, v in limits.items()})
            self._projects = {
                project: Quotas({**self._default.limits,
                                 **{k: parse_limit(v, f"limit {k!r} of project {project!r}") for k, v in own.items()}})
                for project, own in (projects or {}).items()
            }
        except SourceInvalid as exc:
            raise ConfigurationError(str(exc)) from None

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        return self._projects.get(project, self._default)
