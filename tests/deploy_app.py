"""One guarded app in the shapes users deploy it in, configured by environment; serve it with uvicorn
or gunicorn (tests/test_deployments.py).

Like a user's module, it builds its store and middleware when it is imported: under
``gunicorn --preload`` that happens once, in the arbiter, before the workers fork.

- ``REDIS_URL`` (required): the store's Redis; the app also records there what it created.
- ``LIMIT`` (default 10): the ``things`` quota of every project (static).
- ``LEASE_SECONDS`` (default 120, the library's default).
- ``SHAPE``: where the guarded app sits.
  - ``root`` (default): ``app`` is the guarded app (``uvicorn --root-path /api`` serves this one);
  - ``mount``: a Starlette app with ``Mount("/api", app=guarded)``;
  - ``fastapi``: a FastAPI app with ``app.mount("/sub", sub)``, the middleware added on ``sub``.
- ``GATE_FILE``: requests sent with ``X-Hold: 1`` wait (at most 10 s) until this file exists.

Routes of the guarded app (under ``/api`` or ``/sub`` in the mounted shapes):

- ``POST /things`` (consumes 1 ``things``): adds a new id to the Redis set ``deploy:live:<project>``
  (the resources that really exist), then answers 201 ``{"id": ...}``; 500 if Redis refused the record;
- ``DELETE /things/{id}`` (release rule): removes the id: 204, or 404 when it was not live;
- ``POST /fail`` (consumes 1 ``things``): admitted, then fails with 500: its reservation must be refunded.

``GET /`` answers 200 ``{"pid": ...}`` at the root of every shape (readiness; which worker answered).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from middleware import QuotaMiddleware, RedisStore, Rule, StaticSource

REDIS_URL = os.environ["REDIS_URL"]
GATE_FILE = os.environ.get("GATE_FILE", "")
HOLD_AT_MOST = 10.0

RULES = [
    Rule("POST", "/things", "things"),
    Rule("POST", "/fail", "things"),
    Rule("DELETE", "/things/{id}", "things", action="release"),
]


def live_key(project: str) -> str:
    return f"deploy:live:{project}"


# The app's own records use a client of each worker's own (made on its first request), which
# checks and re-opens idle connections: whatever fails in a test is the middleware's, not this.
_records: dict[int, aioredis.Redis] = {}


def records() -> aioredis.Redis:
    client = _records.get(os.getpid())
    if client is None:
        client = _records[os.getpid()] = aioredis.Redis.from_url(
            REDIS_URL, socket_timeout=2, socket_connect_timeout=2, health_check_interval=1,
            retry=Retry(ConstantBackoff(0.05), 5))
    return client


def error(status: int, description: str) -> JSONResponse:
    return JSONResponse({"code": status, "title": "Error", "description": description}, status_code=status)


async def hold(request: Request) -> None:
    if GATE_FILE and request.headers.get("x-hold") == "1":
        deadline = time.monotonic() + HOLD_AT_MOST
        while not os.path.exists(GATE_FILE) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


async def root(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})  # which worker answered


async def create(request: Request) -> Response:
    project = request.headers.get("x-project-id", "")
    thing = uuid.uuid4().hex
    try:
        await records().sadd(live_key(project), thing)
    except redis_errors.RedisError as exc:
        return error(500, f"could not record the new thing: {exc}")
    await hold(request)
    return JSONResponse({"id": thing, "pid": os.getpid()}, status_code=201)


async def delete(request: Request) -> Response:
    project = request.headers.get("x-project-id", "")
    try:
        removed = await records().srem(live_key(project), request.path_params["id"])
    except redis_errors.RedisError as exc:
        return error(500, f"could not delete: {exc}")
    return Response(status_code=204) if removed else error(404, "no such thing")


async def fail(request: Request) -> Response:
    await hold(request)
    return error(500, "the app failed after admission")


ROUTES = [Route("/things", create, methods=["POST"]), Route("/things/{id}", delete, methods=["DELETE"]),
          Route("/fail", fail, methods=["POST"])]

STORE = RedisStore(REDIS_URL)
SOURCE = StaticSource({"things": int(os.environ.get("LIMIT", "10"))})
OPTIONS: dict[str, Any] = {"rules": RULES, "source": SOURCE, "store": STORE,
           "lease_seconds": float(os.environ.get("LEASE_SECONDS", "120"))}


def build(shape: str) -> Any:
    if shape == "root":
        return QuotaMiddleware(Starlette(routes=[Route("/", root), *ROUTES]), **OPTIONS)
    if shape == "mount":
        guarded = QuotaMiddleware(Starlette(routes=ROUTES), **OPTIONS)
        return Starlette(routes=[Route("/", root), Mount("/api", app=guarded)])
    if shape == "fastapi":
        from fastapi import FastAPI

        sub = FastAPI()
        sub.add_api_route("/things", create, methods=["POST"])
        sub.add_api_route("/things/{id}", delete, methods=["DELETE"])
        sub.add_api_route("/fail", fail, methods=["POST"])
        sub.add_middleware(QuotaMiddleware, **OPTIONS)
        parent = FastAPI()
        parent.add_api_route("/", root, methods=["GET"])
        parent.mount("/sub", sub)
        return parent
    raise ValueError(f"SHAPE must be root, mount or fastapi, got {shape!r}")


app = build(os.environ.get("SHAPE", "root"))
