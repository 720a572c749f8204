"""ASGI apps served by bench/throughput.py (each in its own uvicorn process).

- ``bare_app``: a tiny Starlette app: ``POST /v1/secrets`` -> 201 with a small JSON body,
  ``GET /health`` -> 200.
- ``guarded_app``: the same app wrapped in QuotaMiddleware, one rule on ``POST /v1/secrets``,
  a limit of -1 (unlimited: every request still reserves and commits in Redis, the limit is
  never reached) and ``RedisStore(REDIS_URL)``; with ``QUOTA_LOCAL_LEASES=1``, local leases on
  (``QuotaMiddleware(local_leases=True)``). Built on first access, so serving ``bare_app``
  needs no REDIS_URL.

Serve with ``uvicorn --app-dir bench apps:bare_app`` (or ``apps:guarded_app``).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from middleware import QuotaMiddleware, RedisStore, Rule, StaticSource

SECRET_REF = "http://127.0.0.1/v1/secrets/0b5a1f6e-3d2c-4f7e-9a8b-1c2d3e4f5a6b"


def build_app() -> Starlette:
    async def create_secret(request: Request) -> Response:
        return JSONResponse({"secret_ref": SECRET_REF}, status_code=201)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[
        Route("/v1/secrets", create_secret, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


def build_guarded_app(redis_url: str) -> QuotaMiddleware:
    return QuotaMiddleware(
        build_app(),
        rules=[Rule("POST", "/v1/secrets", "secrets")],
        source=StaticSource({"secrets": -1}),
        store=RedisStore(redis_url),
        # QUOTA_LOCAL_LEASES=1 serves the guarded app with local leases on.
        local_leases=os.environ.get("QUOTA_LOCAL_LEASES") == "1",
    )


bare_app = build_app()
_guarded: QuotaMiddleware | None = None


def __getattr__(name: str) -> Any:  # PEP 562: build guarded_app only when it is asked for
    global _guarded
    if name != "guarded_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _guarded is None:
        url = os.environ.get("REDIS_URL")
        if not url:
            raise RuntimeError("guarded_app needs REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
        _guarded = build_guarded_app(url)
    return _guarded
