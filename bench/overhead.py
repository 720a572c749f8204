"""The middleware's own cost per request, in process: no server, no load generator, little noise.

    .venv/bin/python bench/overhead.py                  # ~30 s
    .venv/bin/python bench/overhead.py --requests 50000 --repeats 7
    PYTHONPATH=/tmp/old .venv/bin/python bench/overhead.py  # the middleware of a worktree at /tmp/old

Drives ASGI apps directly, with 32 requests in flight (one coroutine per connection, like
keep-alive clients), and reports the worker's CPU per request (``time.process_time``; Redis's own
CPU is not in it), the minimum over the repeats, for:

- ``bare``: the app alone; ``guarded ...``: the same app in ``QuotaMiddleware`` with one rule on
  the route and a limit of -1 (every request still reserves and commits), on the memory store,
  on Redis with local leases, and on Redis with batching only;
- two inner apps: ``trivial`` (sends 201 and a body: the overhead stands out) and ``starlette``
  (``bench/apps.py``, the app throughput.py serves).

Across runs of one build, the trivial app's overheads with the memory store and with leases on
moved by about 0.1 us; leases off (round trips, batch sizes) and the Starlette rows by up to a
few us. Far steadier than throughput.py's req/s: a change to the hot path shows here first, and
throughput.py says what it is worth behind a real server. Starts its own redis-server (Debian's)
on a free loopback port. Exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from apps import build_app
from harness import start_redis, workspace

from middleware import MemoryStore, QuotaMiddleware, RedisStore, Rule, StaticSource

App = Callable[..., Awaitable[None]]
CONNECTIONS = 32
PROJECTS = 8


async def trivial_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"secret_ref": "x"}'})


def scopes() -> list[dict[str, Any]]:
    return [{"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/secrets", "raw_path": b"/v1/secrets", "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"x-project-id", f"p{i}".encode()),
                         (b"content-type", b"application/json"), (b"content-length", b"2")]}
            for i in range(PROJECTS)]


async def drive(app: App, requests: int) -> float:
    """Worker CPU microseconds per request, CONNECTIONS requests in flight."""
    templates = scopes()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    per_connection = requests // CONNECTIONS

    async def connection(c: int) -> None:
        for i in range(per_connection):
            await app(dict(templates[(c + i) % PROJECTS]), receive, send)

    started = time.process_time()
    await asyncio.gather(*(connection(c) for c in range(CONNECTIONS)))
    return (time.process_time() - started) * 1e6 / (per_connection * CONNECTIONS)


def guarded(inner: App, store: Any, leases: bool = False) -> QuotaMiddleware:
    return QuotaMiddleware(inner, rules=[Rule("POST", "/v1/secrets", "secrets")], source=StaticSource({"secrets": -1}),
                           store=store, local_leases=leases)


async def measure(redis_url: str, requests: int, repeats: int) -> None:
    print(f"worker CPU per request, us (min of {repeats} x {requests:,} requests, {CONNECTIONS} in flight); "
          f"overhead = guarded - bare")
    print(f"{'inner app':10s} {'target':28s} {'us/req':>8s} {'overhead':>9s} {'bare/guarded':>13s}")
    for inner_name, inner in (("trivial", trivial_app), ("starlette", build_app())):
        apps: dict[str, Any] = {
            "bare": inner,
            "guarded, memory store": guarded(inner, MemoryStore()),
            "guarded, Redis, leases on": guarded(inner, RedisStore(redis_url), leases=True),
            "guarded, Redis, leases off": guarded(inner, RedisStore(redis_url)),
        }
        best: dict[str, float] = {}
        for app in apps.values():
            await drive(app, requests // 4)  # warm-up: caches filled, blocks leased, scripts loaded
        for _ in range(repeats):  # interleaved, so that a slow moment hits every target alike
            for name, app in apps.items():
                best[name] = min(best.get(name, float("inf")), await drive(app, requests))
        for name, us in best.items():
            overhead = "" if name == "bare" else f"{us - best['bare']:+9.2f}"
            ratio = "" if name == "bare" else f"{best['bare'] / us:12.2f}x"
            print(f"{inner_name:10s} {name:28s} {us:8.2f} {overhead:>9s} {ratio:>13s}")
        for app in apps.values():
            if isinstance(app, QuotaMiddleware):
                await app.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32_000, help="requests per measurement (32000)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per target; the minimum counts (5)")
    args = parser.parse_args()
    if args.requests < CONNECTIONS or args.repeats < 1:
        parser.error(f"--requests must be at least {CONNECTIONS} and --repeats at least 1")
    with workspace("quota-overhead-") as (procs, tmp):
        asyncio.run(measure(start_redis(procs, tmp).url, args.requests, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
