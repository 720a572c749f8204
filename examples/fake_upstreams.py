"""Local stand-ins for the Captain Data and Latitude.sh quota APIs.

They serve the seed documents' example bodies byte for byte (``examples/fixtures/``), with the
same media types and authentication headers, so the examples run with no network. Serve them with
uvicorn (``uvicorn examples.fake_upstreams:captaindata``) or pass them to a source in process
through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import json
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


class FakeKeystone:
    """Keystone's unified limits and project API, from what you give it (an ASGI app).

    ``registered``: [(service_id, region_id or None, resource, default)]; ``limits``: [(project,
    service_id, region_id or None, resource, limit)]; ``parents``: project -> parent project;
    every project belongs to the domain ``default``. Answers 401 without the service ``token``,
    404 for an unknown project, as Keystone does.
    """

    def __init__(self, *, token: str, model: str = "strict-two-level",
                 registered: list[tuple[str, str | None, str, int]] | None = None,
                 limits: list[tuple[str, str, str | None, str, int]] | None = None,
                 parents: dict[str, str] | None = None) -> None:
        self.token, self.model = token, model
        self.registered, self.limits = list(registered or []), list(limits or [])
        self.parents = dict(parents or {})
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls.append(scope["path"])
        query = dict(pair.split("=", 1) for pair in scope["query_string"].decode().split("&") if "=" in pair)
        status, doc = self._answer(scope["path"], query, dict(scope["headers"]).get(b"x-auth-token"))
        body = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _answer(self, path: str, query: dict[str, str], token: bytes | None) -> tuple[int, Any]:
        if token != self.token.encode():
            return 401, {"error": {"code": 401, "title": "Unauthorized", "message": "The request you have made "
                                                                                   "requires authentication."}}

        def scoped(service: str, region: str | None) -> bool:
            return service == query.get("service_id", service) and region == query.get("region_id", region)

        if path == "/v3/limits/model":
            return 200, {"model": {"name": self.model, "description": "the enforcement model"}}
        if path == "/v3/registered_limits":
            return 200, {"registered_limits": [
                {"id": f"r{i}", "service_id": s, "region_id": r, "resource_name": name, "default_limit": value}
                for i, (s, r, name, value) in enumerate(self.registered) if scoped(s, r)]}
        if path == "/v3/limits":
            return 200, {"limits": [
                {"id": f"l{i}", "project_id": p, "domain_id": None, "service_id": s, "region_id": r,
                 "resource_name": name, "resource_limit": value}
                for i, (p, s, r, name, value) in enumerate(self.limits)
                if scoped(s, r) and p == query.get("project_id", p)]}
        if path.startswith("/v3/projects/"):
            project = path.rsplit("/", 1)[1]
            known = {*self.parents, *self.parents.values(), *(entry[0] for entry in self.limits)}
            if project not in known:
                return 404, {"error": {"code": 404, "title": "Not Found",
                                       "message": f"Could not find project: {project}."}}
            return 200, {"project": {"id": project, "domain_id": "default", "is_domain": False,
                                     "parent_id": self.parents.get(project, "default")}}
        return 404, {"error": {"code": 404, "title": "Not Found", "message": "no such path"}}
