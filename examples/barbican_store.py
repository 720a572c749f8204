"""A Barbican-compatible mini secret store, guarded by QuotaMiddleware.

It implements the parts of Barbican's API reference that quotas touch: the version document at
``/``, secrets, containers, orders and consumers. Every error is JSON with ``code``, ``title`` and
``description``, like Barbican's. The project comes from ``X-Project-Id``.

Configured by environment:

- ``QUOTA_SOURCE_URL``: a Barbican-compatible quota API (``GET {url}/v1/quotas``); unset -> the
  static quotas below.
- ``REDIS_URL``: where usage lives, shared by every worker; unset -> in-memory (one process).
- ``QUOTA_LOCAL_LEASES=1``: admit from locally leased blocks of quota (see the README).
- ``QUOTA_SECRETS_PER_MINUTE``: how many secrets a project may create per minute, beside its
  secrets quota (default 6000): a rate limit written on a rule, decided with the quota in one step.

Run it: ``uvicorn examples.barbican_store:app``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware import BarbicanSource, MemoryStore, QuotaMiddleware, QuotaSource, RedisStore, Rule, StaticSource, Store

#: What a project may create when no quota API is configured.
DEMO_QUOTAS = {"secrets": 5, "containers": 5, "orders": 2, "consumers": 10, "cas": 0}
SECRETS_PER_MINUTE = 6000

RULES = [
    Rule("POST", "/v1/secrets", "secrets"),
    Rule("DELETE", "/v1/secrets/{id}", "secrets", action="release"),
    Rule("POST", "/v1/containers", "containers"),
    Rule("DELETE", "/v1/containers/{id}", "containers", action="release"),
    Rule("POST", "/v1/orders", "orders"),
    Rule("DELETE", "/v1/orders/{id}", "orders", action="release"),
    Rule("POST", "/v1/containers/{id}/consumers", "consumers"),
    Rule("POST", "/v1/secrets/{id}/consumers", "consumers"),
    Rule("DELETE", "/v1/containers/{id}/consumers", "consumers", action="release"),
    Rule("DELETE", "/v1/secrets/{id}/consumers", "consumers", action="release"),
]


def error(status: int, title: str, description: str) -> JSONResponse:
    return JSONResponse({"code": status, "title": title, "description": description}, status_code=status)


class Vault:
    """Everything the store holds, per project."""

    def __init__(self) -> None:
        self.entities: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}

    def of(self, request: Request, kind: str) -> dict[str, dict[str, Any]]:
        project = request.headers.get("x-project-id")
        if not project:
            raise HTTPException(401, "No project: the X-Project-Id header is missing.")
        return self.entities.setdefault(project, {}).setdefault(kind, {})


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "Request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "Request body must be a JSON object.")
    return body


def ref(request: Request, kind: str, entity_id: str) -> str:
    return str(request.url_for("root")).rstrip("/") + f"/v1/{kind}/{entity_id}"


def create_app(source: QuotaSource, store: Store | None = None, *, secrets_per_minute: int = SECRETS_PER_MINUTE,
               **options: Any) -> Starlette:
    """The store; ``options`` go to the middleware (its engine's options: local_leases, ...)."""
    vault = Vault()
    # Both rules apply to a create: the quota from the source, and a rate written on the rule.
    rules = [*RULES, Rule("POST", "/v1/secrets", "secrets:per-minute", limit=f"{secrets_per_minute}/minute")]

    async def root(request: Request) -> Response:
        href = str(request.url_for("root")).rstrip("/") + "/v1/"
        return JSONResponse({"versions": {"values": [{"id": "v1", "status": "stable",
                                                      "links": [{"rel": "self", "href": href}]}]}},
                            status_code=300)

    async def create(request: Request, kind: str, status: int) -> Response:
        body = await json_body(request)
        entity_id = str(uuid.uuid4())
        location = ref(request, kind, entity_id)
        vault.of(request, kind)[entity_id] = {**body, "consumers": []}
        field = kind[:-1] + "_ref"
        return JSONResponse({field: location}, status_code=status, headers={"Location": location})

    async def create_secret(request: Request) -> Response:
        return await create(request, "secrets", 201)

    async def create_container(request: Request) -> Response:
        return await create(request, "containers", 201)

    async def create_order(request: Request) -> Response:
        return await create(request, "orders", 202)

    def lookup(request: Request, kind: str) -> dict[str, Any]:
        entity = vault.of(request, kind).get(request.path_params["id"])
        if entity is None:
            raise HTTPException(404, f"Not Found. Sorry but your {kind[:-1]} is in another castle.")
        return entity

    async def get_secret(request: Request) -> Response:
        entity = lookup(request, "secrets")
        return JSONResponse({"secret_ref": ref(request, "secrets", request.path_params["id"]),
                             "name": entity.get("name"), "status": "ACTIVE"})

    async def delete_entity(request: Request) -> Response:
        kind = request.url.path.split("/")[2]
        lookup(request, kind)
        del vault.of(request, kind)[request.path_params["id"]]
        return Response(status_code=204)

    async def consumers(request: Request) -> Response:
        kind = request.url.path.split("/")[2]
        entity = lookup(request, kind)
        body = await json_body(request)
        if not isinstance(body.get("name"), str) or not isinstance(body.get("URL"), str):
            raise HTTPException(400, "Provided object does not match schema 'Consumer': 'name' and 'URL' are required.")
        consumer = {"name": body["name"], "URL": body["URL"]}
        if request.method == "POST":
            entity["consumers"].append(consumer)
        elif consumer in entity["consumers"]:
            entity["consumers"].remove(consumer)
        else:
            raise HTTPException(404, "Consumer not found.")
        return JSONResponse({f"{kind[:-1]}_ref": ref(request, kind, request.path_params["id"]),
                             "consumers": entity["consumers"]}, status_code=200)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        phrase = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
        return error(exc.status_code, phrase.get(exc.status_code, "Error"), exc.detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(500, "Internal Server Error", "The server could not complete the request.")

    def collection(path: str, endpoint: Any, methods: list[str]) -> list[Route]:
        # Barbican answers collection paths with or without a trailing slash; no redirect.
        return [Route(path, endpoint, methods=methods), Route(path + "/", endpoint, methods=methods)]

    routes = [
        Route("/", root, name="root"),
        *collection("/v1/secrets", create_secret, ["POST"]),
        *collection("/v1/containers", create_container, ["POST"]),
        *collection("/v1/orders", create_order, ["POST"]),
        Route("/v1/secrets/{id}", get_secret, methods=["GET"]),
        Route("/v1/secrets/{id}", delete_entity, methods=["DELETE"]),
        Route("/v1/containers/{id}", delete_entity, methods=["DELETE"]),
        Route("/v1/orders/{id}", delete_entity, methods=["DELETE"]),
        *collection("/v1/secrets/{id}/consumers", consumers, ["POST", "DELETE"]),
        *collection("/v1/containers/{id}/consumers", consumers, ["POST", "DELETE"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(QuotaMiddleware, rules=rules, source=source, store=store, **options)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def from_env(env: Mapping[str, str] = os.environ) -> Starlette:
    """The app as configured by QUOTA_SOURCE_URL and REDIS_URL."""
    url = env.get("QUOTA_SOURCE_URL")
    source: QuotaSource = BarbicanSource(url) if url else StaticSource(DEMO_QUOTAS)
    redis_url = env.get("REDIS_URL")
    store: Store = RedisStore(redis_url) if redis_url else MemoryStore()
    return create_app(source, store, local_leases=env.get("QUOTA_LOCAL_LEASES") == "1",
                      secrets_per_minute=int(env.get("QUOTA_SECRETS_PER_MINUTE", SECRETS_PER_MINUTE)))


app = from_env()
