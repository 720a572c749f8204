"""Latitude.sh: ``GET {base}/traffic/quota?filter[project]=ID``, media type ``application/vnd.api+json``.

``data.attributes.quota_per_project[]`` holds, per project (matched by id or slug), a
``billing_method`` and ``quota_per_region[]`` with ``quota_in_tb`` and ``quota_in_mbps`` objects
(``granted + additional = total``; the total is used):

- ``Normal`` bills traffic per month: a limit of ``quota_in_tb.total`` TB per calendar month (UTC),
  metered from response bytes, with **1 TB = 10^12 bytes** (decimal, as bandwidth is billed).
- ``95th percentile`` bills bandwidth: ``quota_in_mbps.total`` Mbps gated as a rate, i.e. at most
  ``Mbps x 10^6 / 8 x 60`` bytes per minute.

The object that does not apply to the billing method is ignored (it is zero there, which means
"not this billing method", never "disabled"); an applicable total of 0 means no quota is set, and
the resource falls back to the middleware's default limit.

Each region becomes the resources ``<resource>:<region_slug>`` and ``<resource>:<region_id>``;
pick the region in the rule: from the route (``Rule(..., "traffic:{region}", action="meter")``),
from configuration (``"traffic:brazil"``) or from a header (a callable resource).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from ..errors import ConfigurationError, SourceInvalid, SourceRejected
from ..quotas import MAX_LIMIT, Limit, Quotas
from ..windows import Period
from .base import DEFAULT_TIMEOUT, HTTPSource
from .bounded import parse_json

BYTES_PER_TB = 10**12
#: Bandwidth quotas are gated over windows of this many seconds.
RATE_WINDOW = 60
BYTES_PER_MBPS_WINDOW = 10**6 // 8 * RATE_WINDOW
MEDIA_TYPES = ("application/vnd.api+json", "application/json")


class LatitudeSource(HTTPSource):
    namespace = "latitude"

    def __init__(self, base_url: str = "https://api.latitude.sh", *, token: str, resource: str = "traffic",
                 client: httpx.AsyncClient | None = None, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        super().__init__(base_url, client=client, timeout=timeout, deadline=deadline)
        if not token:
            raise ConfigurationError("LatitudeSource needs the API token sent in the Authorization header")
        self._token = token
        self.resource = resource

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        doc = await self.get_json("/traffic/quota", params={"filter[project]": project}, media_types=MEDIA_TYPES,
                                  headers={"Authorization": self._token, "Accept": MEDIA_TYPES[0]})
        return parse_latitude(doc, project, self.resource)

    def describe_error(self, response: httpx.Response) -> str:
        """JSON:API errors: ``{"errors": [{"status", "code", "title", "detail"}]}``."""
        try:
            errors = parse_json(response.content)["errors"]
            parts = [": ".join(str(e[k])[:200] for k in ("title", "detail") if e.get(k)) for e in errors[:3]]
            return f" ({'; '.join(p for p in parts if p)})" if any(parts) else ""
        except (SourceInvalid, KeyError, TypeError, IndexError):
            return ""


def parse_latitude(doc: Any, project: str, resource: str = "traffic") -> Quotas:
    try:
        entries = doc["data"]["attributes"]["quota_per_project"]
    except (KeyError, TypeError):
        raise SourceInvalid("Latitude.sh traffic quota has no data.attributes.quota_per_project") from None
    if not isinstance(entries, list):
        raise SourceInvalid("quota_per_project must be a list")
    entry = next((e for e in entries
                  if isinstance(e, dict) and project in (e.get("project_id"), e.get("project_slug"))), None)
    if entry is None:
        raise SourceRejected(f"Latitude.sh reports no traffic quota for project {project!r}", status_code=404)
    method = entry.get("billing_method")
    if method not in ("Normal", "95th percentile"):
        raise SourceInvalid(f"unknown billing_method {str(method)[:40]!r}")
    regions = entry.get("quota_per_region")
    if not isinstance(regions, list):
        raise SourceInvalid("quota_per_region must be a list")
    limits: dict[str, Limit] = {}
    for region in regions:
        if not isinstance(region, dict):
            raise SourceInvalid("quota_per_region entries must be objects")
        if method == "Normal":
            total = _total(region.get("quota_in_tb"), "quota_in_tb")
            limit = Limit(total * BYTES_PER_TB, BYTES_PER_TB, Period.parse("month"), unit="TB")
        else:
            total = _total(region.get("quota_in_mbps"), "quota_in_mbps")
            limit = Limit(total * BYTES_PER_MBPS_WINDOW, BYTES_PER_MBPS_WINDOW, Period.parse(RATE_WINDOW), unit="Mbps")
        if limit.value > MAX_LIMIT:
            raise SourceInvalid("traffic quota is larger than the store can count")
        if total == 0:
            continue  # no quota set for this region
        for name in ("region_slug", "region_id"):
            if isinstance(region.get(name), str) and region[name]:
                limits[f"{resource}:{region[name]}"] = limit
    return Quotas(limits)


def _total(obj: Any, where: str) -> int:
    if not isinstance(obj, dict):
        raise SourceInvalid(f"{where} must be an object for this billing method")
    total = obj.get("total")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise SourceInvalid(f"{where}.total must be an integer >= 0")
    return total
