"""Captain Data: ``GET {base}/v1/quotas`` with ``X-API-Key``.

Body: ``{"credits_max": 100, "credits_used": 50, "credits_left": 50, "current_month_start":
"2023-10-01T00:00:00Z", "current_month_end": "2023-10-31T23:59:59Z", ...}``. ``credits_max`` is the
limit of the billing period ``[current_month_start, current_month_end)`` (a calendar month when
those are null); ``credits_used`` (fractional) is what the upstream already counted and seeds the
local counter. Credits are counted in thousandths, so fractional costs stay exact. Unknown
workspaces answer 404 with ``error_label: WORKSPACE_404_NOT_FOUND``.

The upstream rate-limits ``/quotas`` itself (as low as 5 per minute): the quota cache asks it once
per project per TTL across all workers, and honours its ``Retry-After``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx

from ..errors import ConfigurationError, SourceInvalid, SourceRejected
from ..quotas import MAX_LIMIT, Limit, Quotas, parse_limit
from ..windows import Period, Window
from .base import DEFAULT_TIMEOUT, HTTPSource
from .bounded import parse_json

#: Store units per credit: fractional costs down to a thousandth of a credit stay exact.
CREDIT_SCALE = 1000
ApiKeys = str | Mapping[str, str] | Callable[[str], "str | None"]


class CaptainDataSource(HTTPSource):
    namespace = "captaindata"

    def __init__(self, base_url: str = "https://api.captaindata.com", *, api_key: ApiKeys,
                 resource: str = "credits", client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, deadline: float | None = None) -> None:
        super().__init__(base_url, client=client, timeout=timeout, deadline=deadline)
        if not api_key:
            raise ConfigurationError("CaptainDataSource needs an api_key (one key, a project->key mapping "
                                     "or a callable)")
        self._api_key = api_key
        #: The rule resource that Captain Data's credits limit.
        self.resource = resource

    def _key_for(self, project: str) -> str | None:
        if isinstance(self._api_key, str):
            return self._api_key
        if isinstance(self._api_key, Mapping):
            return self._api_key.get(project)
        return self._api_key(project)

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        key = self._key_for(project)
        if not key:
            raise SourceRejected(f"no Captain Data workspace is configured for project {project!r}", status_code=403)
        doc = await self.get_json("/v1/quotas", headers={"X-API-Key": key, "Accept": "application/json"})
        return Quotas({self.resource: parse_captaindata(doc)})

    def describe_error(self, response: httpx.Response) -> str:
        try:
            doc = parse_json(response.content)
            return f" ({str(doc['error_label'])[:64]}: {str(doc.get('message', ''))[:200]})"
        except (SourceInvalid, KeyError, TypeError):
            return ""


def parse_captaindata(doc: Any) -> Limit:
    """The credits limit of one workspace, validated against Captain Data's schema."""
    if not isinstance(doc, dict):
        raise SourceInvalid("Captain Data quota document is not an object")
    if "credits_max" not in doc:
        raise SourceInvalid("Captain Data quota document has no credits_max")
    credits_max = parse_limit(doc["credits_max"], "credits_max")
    if credits_max > MAX_LIMIT // CREDIT_SCALE:
        raise SourceInvalid("credits_max is larger than the store can count")
    used = _credits(doc.get("credits_used", 0), "credits_used")
    start, end = _instant(doc.get("current_month_start"), "current_month_start"), \
        _instant(doc.get("current_month_end"), "current_month_end")
    window: Window | Period
    if start is None and end is None:
        window = Period.parse("month")
    elif start is None or end is None or end <= start:
        raise SourceInvalid("Captain Data billing period is incomplete or ends before it starts")
    else:
        window = Window(start, end)
    value = credits_max * CREDIT_SCALE if credits_max >= 0 else credits_max
    return Limit(value, CREDIT_SCALE, window, used, unit="credits")


def _credits(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SourceInvalid(f"{where} must be a number >= 0, got {json.dumps(value)[:40]}")
    units = math.ceil(Decimal(str(value)) * CREDIT_SCALE)
    if units > MAX_LIMIT:
        raise SourceInvalid(f"{where} is larger than the store can count")
    return units


def _instant(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SourceInvalid(f"{where} must be a date-time string or null")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SourceInvalid(f"{where} is not an ISO 8601 date-time: {value[:40]!r}") from None
    if moment.tzinfo is None:
        raise SourceInvalid(f"{where} has no time zone")
    return moment.timestamp()
