"""OpenStack Barbican: ``GET {base}/v1/quotas`` with the caller's ``X-Auth-Token``.

Body: ``{"quotas": {"secrets": 1000, "orders": 0, "containers": 1000, "consumers": 1000,
"cas": 0}}``; 401 for a bad token. The effective quotas are those of the token's project.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import httpx

from ..errors import SourceInvalid, SourceRejected
from ..quotas import Limit, Quotas, parse_limit
from .base import DEFAULT_TIMEOUT, HTTPSource

BARBICAN_RESOURCES = ("secrets", "orders", "containers", "consumers", "cas")


class BarbicanSource(HTTPSource):
    namespace = "barbican"
    forward_headers = ("x-auth-token",)

    def __init__(self, base_url: str, *, client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, deadline: float | None = None,
                 resources: Iterable[str] = BARBICAN_RESOURCES) -> None:
        super().__init__(base_url, client=client, timeout=timeout, deadline=deadline)
        #: Only these keys of the quotas object are read; any other field is ignored.
        self.resources = tuple(resources)

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        token = headers.get("x-auth-token")
        if not token:
            # Barbican would answer 401; say so without a round trip.
            raise SourceRejected("No X-Auth-Token to ask the quota API with", status_code=401)
        doc = await self.get_json("/v1/quotas", headers={"X-Auth-Token": token, "Accept": "application/json"})
        return parse_barbican(doc, self.resources)


def parse_barbican(doc: object, resources: Iterable[str] = BARBICAN_RESOURCES) -> Quotas:
    if not isinstance(doc, dict) or not isinstance(doc.get("quotas"), dict):
        raise SourceInvalid("Barbican quota document has no 'quotas' object")
    quotas = doc["quotas"]
    return Quotas({name: Limit(parse_limit(quotas[name], f"quotas.{name}")) for name in resources if name in quotas})
