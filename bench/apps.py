"""ASGI apps served by bench/throughput.py (each in its own uvicorn process).

- ``bare_app``: a tiny Starlette app: ``POST /v1/secrets`` -> 201 with a small JSON body,
  ``GET /health`` -> 200.
- ``minimal_app``: the same app behind the least any quota middleware does in process, for
  calibration (not a product: no limits, no store, no validation): match the route, read the
  project header, count in a dict, watch the status to take a failed creation back. Its ratio to
  bare is the most a middleware can reach on the machine, measured in the same run.
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


class MinimalCounting:
    """See ``minimal_app`` above."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.used: dict[bytes, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/secrets":
            await self.app(scope, receive, send)
            return
        project = next((value for key, value in scope["headers"] if key == b"x-project-id"), b"")
        self.used[project] = self.used.get(project, 0) + 1
        status = 0

        def send_watching(message: dict[str, Any]) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_watching)
        finally:
            if not 200 <= status < 300:
                self.used[project] -= 1


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
minimal_app = MinimalCounting(build_app())
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
