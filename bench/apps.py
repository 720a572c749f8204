"""ASGI apps the benchmarks serve (each in its own uvicorn process) or call in process.

- ``bare_app``: a small Starlette app: ``POST /v1/secrets`` parses its JSON body and answers 201
  with a small JSON body; ``GET /health`` -> 200.
- ``null_app``: the same app behind a pure ASGI pass-through (``await self.app(scope, receive,
  send)`` and nothing else): what merely being wrapped costs.
- ``minimal_app``: the same app behind the least any quota middleware does in process, for
  calibration (not a product: no store, no leases, no validation): match the route, read the
  project header, check and count in a dict, add one header to the answer, watch the status to
  take a failed creation back. Its ratio to bare is about the most a quota middleware can reach.
- ``awaited_app``: the same app behind the least any store awaited per request does, for
  calibration (not a product): every ``POST`` waits for one Redis round trip, a ``PING`` shared by
  all the requests waiting at the time, on one raw connection to ``REDIS_URL`` (no operation, no
  command encoder, no reply parser). Its ratio to bare is about the most Redis without local
  leases can reach: what suspending a request mid-flight, and resuming it, costs in a real server.
- ``memory_app``: the same app in QuotaMiddleware with the embedded default store (MemoryStore),
  one rule on ``POST /v1/secrets`` and ``StaticSource({"secrets": QUOTA_LIMIT})``.
- ``guarded_app``: the same on ``RedisStore(REDIS_URL)``; with ``QUOTA_LOCAL_LEASES=1``, local
  leases on (``QuotaMiddleware(local_leases=True)``).
- ``charges_app``: the same app in bench/charges.py's set-ups (``charged``): ``QUOTA_BUCKETS=1``,
  one rule and a count quota; ``QUOTA_BUCKETS=3``, also a per-minute limit on a second rule and the
  cap of every project's parent, ``org``. ``QUOTA_STORE=memory`` (MemoryStore) or ``redis``
  (``RedisStore(REDIS_URL)``, leases off). Its limit is always -1, as in charges.py.

``QUOTA_LIMIT`` (default -1) is the limit of every project: -1 is unlimited (every request still
reserves and commits; no RateLimit headers are sent), a large number is a limit never reached
that still sends the RateLimit headers, as in production. The guarded apps are built on first
access (PEP 562), so serving ``bare_app`` needs neither REDIS_URL nor the middleware.

Serve with ``uvicorn --app-dir bench apps:bare_app``. builds.py serves this file's
``guarded_app`` / ``memory_app`` with another tree's ``middleware`` first on PYTHONPATH: keep to
the middleware's public API.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

SECRET_REF = "http://127.0.0.1/v1/secrets/0b5a1f6e-3d2c-4f7e-9a8b-1c2d3e4f5a6b"
#: ``minimal_app``'s limit per project: never reached by a benchmark.
MINIMAL_LIMIT = 10**12


def build_app() -> Starlette:
    async def create_secret(request: Request) -> Response:
        try:
            body = await request.json()
        except ClientDisconnect:  # a load generator that stops closes its connections mid-request
            return Response(status_code=499)
        return JSONResponse({"secret_ref": SECRET_REF, "name": body.get("name")}, status_code=201)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[
        Route("/v1/secrets", create_secret, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


class NullMiddleware:
    """See ``null_app`` above."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class MinimalCounting:
    """See ``minimal_app`` above."""

    def __init__(self, app: Any, limit: int = MINIMAL_LIMIT) -> None:
        self.app = app
        self.limit = limit
        self.used: dict[bytes, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/secrets":
            await self.app(scope, receive, send)
            return
        project = next((value for key, value in scope["headers"] if key == b"x-project-id"), b"")
        used = self.used.get(project, 0)
        if used >= self.limit:
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        self.used[project] = used = used + 1
        status = 0

        def send_watching(message: dict[str, Any]) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"ratelimit-remaining", b"%d" % (self.limit - used))]}
            return send(message)

        try:
            await self.app(scope, receive, send_watching)
        finally:
            if not 200 <= status < 300:
                self.used[project] -= 1


class AwaitingRoundTrip:
    """See ``awaited_app`` above."""

    def __init__(self, app: Any, redis_url: str) -> None:
        self.app = app
        url = urlsplit(redis_url)
        self.address = (url.hostname or "127.0.0.1", url.port or 6379)
        self.waiting: list[asyncio.Future[None]] = []
        self.drain: asyncio.Task[None] | None = None
        self.connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append(future)
        if self.drain is None or self.drain.done():
            self.drain = loop.create_task(self._drain())
        await future
        await self.app(scope, receive, send)

    async def _drain(self) -> None:
        # As RedisStore batches: what waits when a round trip starts shares it.
        while self.waiting:
            batch, self.waiting = self.waiting, []
            try:
                if self.connection is None:
                    self.connection = await asyncio.open_connection(*self.address)
                reader, writer = self.connection
                writer.write(b"PING\r\n")
                if await reader.readexactly(7) != b"+PONG\r\n":
                    raise ConnectionError("Redis did not answer PING with +PONG")
            except (OSError, asyncio.IncompleteReadError) as exc:  # every waiting request hears of it
                if self.connection is not None:
                    self.connection[1].close()
                    self.connection = None
                for future in batch:
                    if not future.done():  # (a request cancelled meanwhile is not answered)
                        future.set_exception(ConnectionError(f"Redis round trip failed: {exc!r}"))
                continue
            for future in batch:
                if not future.done():
                    future.set_result(None)

    async def aclose(self) -> None:
        """Close the connection (a server process just exits; a test closes it)."""
        if self.connection is not None:
            writer, self.connection = self.connection[1], None
            writer.close()
            await writer.wait_closed()


def _limit() -> int:
    return int(os.environ.get("QUOTA_LIMIT", "-1"))


def build_memory_app() -> Any:
    from middleware import QuotaMiddleware, Rule, StaticSource

    return QuotaMiddleware(build_app(), rules=[Rule("POST", "/v1/secrets", "secrets")],
                           source=StaticSource({"secrets": _limit()}))


def build_guarded_app(redis_url: str) -> Any:
    from middleware import QuotaMiddleware, RedisStore, Rule, StaticSource

    return QuotaMiddleware(
        build_app(),
        rules=[Rule("POST", "/v1/secrets", "secrets")],
        source=StaticSource({"secrets": _limit()}),
        store=RedisStore(redis_url),
        # QUOTA_LOCAL_LEASES=1 serves the guarded app with local leases on.
        local_leases=os.environ.get("QUOTA_LOCAL_LEASES") == "1",
    )


def charged(app: Any, store: Any, buckets: int, projects: Iterable[str], limit: int = -1) -> Any:
    """``app`` guarded by 1 bucket (a count quota of ``limit``) or 3 (also a per-minute limit on a
    second rule, and the cap of ``projects``' parent, ``org``): every request charges all of them."""
    from middleware import QuotaEngine, QuotaMiddleware, Rule, StaticSource

    rules = [Rule("POST", "/v1/secrets", "secrets")]
    parent = None
    if buckets == 3:
        # A limit never reached: the per-minute bucket is charged on every request, never refuses.
        rules.append(Rule("POST", "/v1/secrets", "secrets:rate", limit=f"{10**12}/minute"))
        parent = dict.fromkeys(projects, "org").get
    engine = QuotaEngine(source=StaticSource({"secrets": limit}), store=store, parent=parent)
    return QuotaMiddleware(app, rules=rules, engine=engine)


def build_charges_app() -> Any:
    from harness import PROJECTS  # the X-Project-Id values wrk sends: all of them get the parent

    from middleware import MemoryStore, RedisStore

    buckets, store = os.environ.get("QUOTA_BUCKETS", "1"), os.environ.get("QUOTA_STORE", "memory")
    if buckets not in ("1", "3") or store not in ("memory", "redis"):
        raise RuntimeError(f"charges_app needs QUOTA_BUCKETS=1|3 and QUOTA_STORE=memory|redis, "
                           f"got {buckets!r} and {store!r}")
    return charged(build_app(), MemoryStore() if store == "memory" else RedisStore(_redis_url("charges_app")),
                   int(buckets), PROJECTS, _limit())


def _redis_url(app: str) -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        raise RuntimeError(f"{app} needs REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    return url


bare_app = build_app()
null_app = NullMiddleware(build_app())
minimal_app = MinimalCounting(build_app())
_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:  # PEP 562: build the guarded apps only when asked for
    builders = {"guarded_app": lambda: build_guarded_app(_redis_url(name)), "memory_app": build_memory_app,
                "awaited_app": lambda: AwaitingRoundTrip(build_app(), _redis_url(name)),
                "charges_app": build_charges_app}
    if name not in builders:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        _built[name] = builders[name]()
    return _built[name]
