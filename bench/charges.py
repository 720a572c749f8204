"""What several limits on one request cost: 3 buckets against 1, measured side by side in one run.

    .venv/bin/python bench/charges.py                  # ~40 s
    .venv/bin/python bench/charges.py --requests 20000 --rounds 5

Drives the middleware in process (32 requests in flight, the worker's CPU by
``time.process_time``; Redis's own CPU is not in it; no HTTP server, whose own cost per request
would lower every ratio) around two inner apps: ``trivial`` (the middleware's cost stands out) and
``starlette`` (what throughput.py serves: parse JSON, answer 201). In alternating rounds, two
set-ups on the same store:

- ``1 bucket``: one rule, a count quota;
- ``3 buckets``: a count quota, a per-minute limit written on a second rule, and the project's
  parent's cap (every request charges all three, decided in one atomic step).

Each store (the memory store; Redis, batched, no local leases; Redis Cluster is left to the test
suite) reports CPU per request of each, the ratio of medians (the target: 3 buckets at most
1.2x), and for Redis the script calls per request (``INFO commandstats``): one call decides all
three buckets. Starts its own redis-server (Debian's) on a free loopback port. Exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))
from middleware import MemoryStore, QuotaEngine, QuotaMiddleware, RedisStore, Rule, StaticSource, Store  # noqa: E402

CONNECTIONS = 32
PROJECTS = 8


async def trivial_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"secret_ref": "x"}'})


def starlette_app() -> Any:
    """What throughput.py serves: parse the JSON body, answer 201 with JSON."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create(request: Request) -> JSONResponse:
        await request.json()
        return JSONResponse({"secret_ref": "x"}, status_code=201)

    return Starlette(routes=[Route("/v1/secrets", create, methods=["POST"])])


APPS = {"trivial": lambda: trivial_app, "starlette": starlette_app}


def scope_of(project: int) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/secrets", "raw_path": b"/v1/secrets", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"bench"), (b"x-project-id", f"p{project}".encode()),
                        (b"content-length", b"2")]}


def guarded(store: Store, buckets: int, inner: str) -> QuotaMiddleware:
    rules = [Rule("POST", "/v1/secrets", "secrets")]
    parent = None
    if buckets == 3:
        rules.append(Rule("POST", "/v1/secrets", "secrets:rate", limit=f"{10**12}/minute"))
        parent = {f"p{i}": "org" for i in range(PROJECTS)}.get
    engine = QuotaEngine(source=StaticSource({"secrets": -1}), store=store, parent=parent)
    return QuotaMiddleware(APPS[inner](), rules=rules, engine=engine)


async def drive(app: Any, requests: int) -> float:
    """Worker CPU microseconds per request, CONNECTIONS requests in flight."""
    body = {"type": "http.request", "body": b"{}", "more_body": False}

    async def receive() -> dict[str, Any]:
        return body

    async def send(message: dict[str, Any]) -> None:
        return None

    async def connection(first: int) -> None:
        for i in range(first, requests, CONNECTIONS):
            await app(scope_of(i % PROJECTS), receive, send)

    started = time.process_time()
    await asyncio.gather(*(connection(c) for c in range(CONNECTIONS)))
    await app.engine.store.flush()
    return (time.process_time() - started) / requests * 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def script_calls(url: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    finally:
        await client.aclose()


async def measure(name: str, make_store: Any, args: argparse.Namespace, url: str | None, inner: str) -> None:
    apps = {n: guarded(make_store(), n, inner) for n in (1, 3)}
    for app in apps.values():
        await drive(app, 2000)  # warm: caches, scripts, connections
    cpu: dict[int, list[float]] = {1: [], 3: []}
    calls: dict[int, list[float]] = {1: [], 3: []}
    for round_ in range(args.rounds):
        for n in ((1, 3) if round_ % 2 == 0 else (3, 1)):
            before = await script_calls(url) if url else 0
            cpu[n].append(await drive(apps[n], args.requests))
            if url:
                calls[n].append((await script_calls(url) - before) / args.requests)
    one, three = statistics.median(cpu[1]), statistics.median(cpu[3])
    print(f"{name + ', ' + inner:<32} 1 bucket {one:6.1f} us   3 buckets {three:6.1f} us   ratio {three / one:4.2f}x"
          + (f"   script calls per request {statistics.median(calls[1]):.3f} / {statistics.median(calls[3]):.3f}"
             if url else ""))
    for app in apps.values():
        await app.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.rounds} alternating rounds of {args.requests} requests; worker CPU per request, median\n")
    for inner in APPS:
        await measure("memory store", MemoryStore, args, None, inner)
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not installed: Redis not measured")
        return
    port, workdir = free_port(), tempfile.mkdtemp(prefix="bench-charges-")
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                await script_calls(url)
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.05)
        for inner in APPS:
            await measure("Redis (leases off)", lambda: RedisStore(url), args, url, inner)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\npython {sys.version.split()[0]}, pid {os.getpid()}")


if __name__ == "__main__":
    asyncio.run(main())
