"""A guarded app for crash tests, configured by environment; serve it with uvicorn.

- ``REDIS_URL`` (required): the shared store.
- ``LEASE_SECONDS`` (default 1): how long an unsettled reservation lives.
- ``LIMIT`` (default 2): the ``things`` quota of every project.
- ``HOLD_DIR``: where ``POST /hold`` writes the pid of the worker serving it.

Routes: ``GET /`` -> 200; ``POST /things`` -> 201 (guarded); ``POST /hold`` (guarded, same resource)
writes ``<HOLD_DIR>/<X-Hold-Id>`` containing the worker's pid, then sleeps ``HOLD_SECONDS`` (default
60) before answering 201: a request that holds its reservation until the worker dies.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from middleware import QuotaMiddleware, RedisStore, Rule, StaticSource


async def root(request: Request) -> Response:
    return PlainTextResponse("ok")


async def create(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()}, status_code=201)


async def hold(request: Request) -> Response:
    hold_dir = os.environ.get("HOLD_DIR")
    if hold_dir:
        name = request.headers.get("x-hold-id", "hold")
        tmp = Path(hold_dir) / f".{name}"
        tmp.write_text(str(os.getpid()))
        tmp.rename(Path(hold_dir) / name)  # appears whole
    await asyncio.sleep(float(os.environ.get("HOLD_SECONDS", "60")))
    return JSONResponse({"pid": os.getpid()}, status_code=201)


def build() -> QuotaMiddleware:
    inner = Starlette(routes=[Route("/", root), Route("/things", create, methods=["POST"]),
                              Route("/hold", hold, methods=["POST"])])
    return QuotaMiddleware(
        inner,
        rules=[Rule("POST", "/things", "things"), Rule("POST", "/hold", "things")],
        source=StaticSource({"things": int(os.environ.get("LIMIT", "2"))}),
        store=RedisStore(os.environ["REDIS_URL"]),
        lease_seconds=float(os.environ.get("LEASE_SECONDS", "1")),
    )


app = build()
