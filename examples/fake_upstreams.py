"""Local stand-ins for the Captain Data and Latitude.sh quota APIs.

They serve the seed documents' example bodies byte for byte (``examples/fixtures/``), with the
same media types and authentication headers, so the examples run with no network. Serve them with
uvicorn (``uvicorn examples.fake_upstreams:captaindata``) or pass them to a source in process
through ``httpx.ASGITransport``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _serve(path: str, body: bytes, media_type: bytes, auth_header: bytes,
           errors: dict[int, tuple[bytes, bytes]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        if scope["path"] != path:
            status, payload, kind = 404, *errors[404]
        elif not headers.get(auth_header):
            status, payload, kind = 401, *errors[401]
        else:
            status, payload, kind = 200, body, media_type
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    return app


captaindata = _serve(
    "/v1/quotas", (FIXTURES / "captaindata_quotas.json").read_bytes(), b"application/json", b"x-api-key",
    {404: ((FIXTURES / "captaindata_workspace_404.json").read_bytes(), b"application/json"),
     401: (b'{"message": "Invalid API key", "error_label": "UNAUTHORIZED"}', b"application/json")})

latitude = _serve(
    "/traffic/quota", (FIXTURES / "latitude_traffic_quota.json").read_bytes(), b"application/vnd.api+json",
    b"authorization",
    {404: (b'{"errors": [{"status": "404", "title": "Not Found"}]}', b"application/vnd.api+json"),
     401: (b'{"errors": [{"status": "401", "title": "Unauthorized", "detail": "Missing API key"}]}',
           b"application/vnd.api+json")})
