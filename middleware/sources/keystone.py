"""OpenStack Keystone unified limits: registered (default) limits, project limits, and parents.

    GET {base}/v3/registered_limits?service_id=S[&region_id=R]   {"registered_limits": [{"resource_name",
                                                                   "default_limit", ...}]}
    GET {base}/v3/limits?project_id=P&service_id=S[&region_id=R] {"limits": [{"resource_name",
                                                                   "resource_limit", "project_id", ...}]}
    GET {base}/v3/limits/model                                   {"model": {"name": "flat" | "strict-two-level"}}
    GET {base}/v3/projects/P                                     {"project": {"id", "parent_id", "domain_id"}}

A project's effective limit for a resource is its project limit when one is set, else the
registered default; ``-1`` is unlimited, as everywhere. All calls carry a service credential
(``X-Auth-Token``), not the caller's token. Under the ``strict-two-level`` model a project's
parent (a project, not its domain) is charged too, so that the parent's limit covers its own usage
and its children's; under ``flat``, projects stand alone. Domain-level limits are not read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from ..errors import ConfigurationError, SourceInvalid
from ..quotas import Limit, Quotas, parse_limit
from .base import DEFAULT_TIMEOUT, HTTPSource

#: The service credential: a token, or a function that returns a current one (tokens expire).
Token = str | Callable[[], "str | Awaitable[str]"]
MODELS = ("flat", "strict-two-level")


class KeystoneLimitsSource(HTTPSource):
    namespace = "keystone"
    has_parents = True

    def __init__(self, base_url: str, *, token: Token, service_id: str, region_id: str | None = None,
                 client: httpx.AsyncClient | None = None, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        super().__init__(base_url, client=client, timeout=timeout, deadline=deadline)
        if not token:
            raise ConfigurationError("KeystoneLimitsSource needs a service token (or a function returning one)")
        if not service_id:
            raise ConfigurationError("KeystoneLimitsSource needs the service_id whose limits it reads")
        self._token = token
        self.service_id = service_id
        self.region_id = region_id
        #: The enforcement model, once read (it changes only with Keystone's configuration).
        self.model: str | None = None

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        scope = self._scope()
        registered = await self._get("/v3/registered_limits", scope, "registered_limits")
        # Without a region_id Keystone lists every region's: only this source's region (or none) counts.
        limits = {entry_name(e, "registered limit"): parse_limit(e.get("default_limit"), "default_limit")
                  for e in registered if e.get("region_id") == self.region_id}
        own = await self._get("/v3/limits", {**scope, "project_id": project}, "limits")
        for entry in own:
            if entry.get("project_id") != project or entry.get("region_id") != self.region_id:
                continue  # a domain's limit, another project's or region's: not this project's own
            limits[entry_name(entry, "limit")] = parse_limit(entry.get("resource_limit"), "resource_limit")
        return Quotas({name: Limit(value) for name, value in limits.items()})

    async def parent_of(self, project: str, headers: Mapping[str, str]) -> str | None:
        if await self.enforcement_model() != "strict-two-level":
            return None
        doc = await self.get_json(f"/v3/projects/{project}", headers=await self._headers())
        found = doc.get("project") if isinstance(doc, dict) else None
        if not isinstance(found, dict):
            raise SourceInvalid("Keystone project document has no 'project' object")
        parent, domain = found.get("parent_id"), found.get("domain_id")
        if parent is None or parent == domain:
            return None  # a top-level project: its parent is its domain
        if not isinstance(parent, str) or not parent:
            raise SourceInvalid(f"Keystone project {project!r} has a parent_id that is not an id: {parent!r}")
        return parent

    async def enforcement_model(self) -> str:
        """``flat`` or ``strict-two-level``, as Keystone is configured (read once)."""
        if self.model is None:
            doc = await self.get_json("/v3/limits/model", headers=await self._headers())
            model = doc.get("model") if isinstance(doc, dict) else None
            name = model.get("name") if isinstance(model, dict) else None
            if name not in MODELS:
                raise SourceInvalid(f"Keystone's limit model is {name!r}, not one of {', '.join(MODELS)}")
            self.model = name
        return self.model

    def _scope(self) -> dict[str, str]:
        scope = {"service_id": self.service_id}
        if self.region_id is not None:
            scope["region_id"] = self.region_id
        return scope

    async def _headers(self) -> dict[str, str]:
        token = self._token() if callable(self._token) else self._token
        if not isinstance(token, str):
            token = await token
        return {"X-Auth-Token": token, "Accept": "application/json"}

    async def _get(self, path: str, params: Mapping[str, str], key: str) -> list[dict[str, Any]]:
        doc = await self.get_json(path, headers=await self._headers(), params=params)
        entries = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SourceInvalid(f"Keystone answered no {key!r} list")
        return entries


def entry_name(entry: Mapping[str, Any], what: str) -> str:
    name = entry.get("resource_name")
    if not isinstance(name, str) or not name:
        raise SourceInvalid(f"a Keystone {what} has no resource_name")
    return name
