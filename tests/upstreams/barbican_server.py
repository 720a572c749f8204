"""A Barbican quota API to run under uvicorn: ``GET /v1/quotas`` answers FAKE_BARBICAN_QUOTAS.

Any non-empty X-Auth-Token is accepted; a missing one gets Barbican's 401.
"""

from __future__ import annotations

import json
import os
from typing import Any

QUOTAS = json.loads(os.environ.get("FAKE_BARBICAN_QUOTAS", "{}"))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    if scope["path"] == "/v1/quotas" and headers.get(b"x-auth-token"):
        status, body = 200, json.dumps({"quotas": QUOTAS}).encode()
    elif scope["path"] == "/v1/quotas":
        status, body = 401, b'{"code": 401, "title": "Unauthorized", "description": "Authentication required"}'
    else:
        status, body = 200, b"{}"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
