"""Fake quota APIs for tests, all in one place.

- `FakeBarbican` (here): Barbican's quota API in process, through httpx.MockTransport;
- `barbican_server`: the same, as an ASGI app to serve with uvicorn (real workers racing);
- `fault_server`: a Barbican-compatible API that misbehaves on demand (hangs, drips, bombs).

The examples keep their own stand-ins (examples/fake_upstreams.py): the demo needs no tests/.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx


class FakeBarbican:
    """``GET /v1/quotas``: quotas by X-Auth-Token; 401 for an unknown token. Counts its calls."""

    def __init__(self, quotas_by_token: Mapping[str, Mapping[str, Any]]) -> None:
        self.quotas_by_token = dict(quotas_by_token)
        self.calls = 0
        self.seen_tokens: list[str] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if request.url.path != "/v1/quotas":
            return httpx.Response(404, json={"code": 404, "title": "Not Found", "description": "no such path"})
        token = request.headers.get("x-auth-token", "")
        self.seen_tokens.append(token)
        if token not in self.quotas_by_token:
            return httpx.Response(401, json={"code": 401, "title": "Unauthorized",
                                             "description": "Authentication required"})
        return httpx.Response(200, content=json.dumps({"quotas": self.quotas_by_token[token]}).encode(),
                              headers={"Content-Type": "application/json"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport)
