"""The middleware's own CPU per request, in process, measured the way a uvicorn worker spends it.

    .venv/bin/python bench/overhead.py                       # ~1 min
    .venv/bin/python bench/overhead.py --limit 1000000000    # a finite limit: RateLimit headers sent
    .venv/bin/python bench/overhead.py --server-check        # and the same targets behind a real uvicorn
    .venv/bin/python bench/overhead.py --driver direct       # the app called directly (the former driver)
    PYTHONPATH=/tmp/old .venv/bin/python bench/overhead.py   # the middleware of a worktree at /tmp/old

Drivers (``--driver``):

- ``uvicorn`` (default): what a worker of ``uvicorn --loop uvloop --http httptools`` does, in this
  one process. The app is served by uvicorn's own ``HttpToolsProtocol`` (``uvicorn.Config(...).load()``:
  the scope, ``receive`` and ``send`` the app gets are uvicorn's, behind its ProxyHeadersMiddleware)
  on a uvloop event loop, over 32 real loopback TCP connections, each answered request followed
  by the next one (``wrk``'s requests, 8 rotating projects). An in-process client sends and reads
  them, so the kernel's socket work is interleaved with every request as in a server: measured on
  this 2-CPU machine, it roughly doubles what the same Python code costs in a tight loop (the
  caches and branch predictors are cold when the middleware runs). The client's own CPU is in
  ``us/req`` (the same for every target), not in ``added``.
- ``direct``: the app called directly with a scope dict and trivial ``receive`` / ``send``, on
  asyncio, 32 requests in flight; with a trivial inner app and the Starlette one. Steadiest
  (about 0.1 us), but it sees about half of what the middleware costs a server.

Targets: ``bare`` (bench/apps.py's Starlette app), ``null`` (a pass-through), ``minimal`` (the
calibration middleware), and ``QuotaMiddleware`` with one rule and ``--limit`` on the memory
store (the embedded default), on Redis with local leases and on Redis with batching only (a
redis-server this script starts; its own CPU is not counted). CPU per request is
``time.process_time`` over ``--requests``, the minimum over ``--repeats`` interleaved runs.

``--server-check`` then serves the same targets with real uvicorn workers (uvloop + httptools,
pinned to CPU 0) under ``wrk -t1 -c32`` (CPU 1) in ``--server-rounds`` alternating rounds and
prints the worker's CPU per request (from /proc; ``added``: the median of the per-round
differences to bare) beside the in-process figures. On the 2-CPU machine the uvicorn driver's
``added`` came within 0.75-0.95x of the server's, whose own round-to-round noise is +-3 us. Exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from apps import MinimalCounting, NullMiddleware, build_app
from harness import (
    CREATE,
    PROJECTS,
    environment,
    group_cpu,
    median,
    paired_difference,
    pinned,
    request_bytes,
    run_load,
    serve_and_wait,
    server_kind,
    start_redis,
    workspace,
    wrk_command,
)

from middleware import QuotaMiddleware, RedisStore, Rule, StaticSource

App = Callable[..., Awaitable[None]]
CONNECTIONS = 32
HERE = Path(__file__).resolve().parent
#: target -> bench/apps.py app and environment, for --server-check
SERVED = {"bare": ("bare_app", {}), "null": ("null_app", {}), "minimal": ("minimal_app", {}),
          "memory": ("memory_app", {}), "leases-on": ("guarded_app", {"QUOTA_LOCAL_LEASES": "1"}),
          "leases-off": ("guarded_app", {"QUOTA_LOCAL_LEASES": "0"})}


def guarded(inner: App, limit: int, store: Any = None, leases: bool = False) -> QuotaMiddleware:
    options: dict[str, Any] = {} if store is None else {"store": store, "local_leases": leases}
    return QuotaMiddleware(inner, rules=[Rule("POST", "/v1/secrets", "secrets")],
                           source=StaticSource({"secrets": limit}), **options)


def make_apps(inner: Callable[[], App], limit: int, redis_url: str | None) -> dict[str, App]:
    """bench/apps.py's servers, built here (each with an inner app of its own)."""
    apps: dict[str, App] = {"bare": inner(), "null": NullMiddleware(inner()), "minimal": MinimalCounting(inner()),
                            "memory": guarded(inner(), limit)}
    if redis_url:
        apps["leases-on"] = guarded(inner(), limit, RedisStore(redis_url), leases=True)
        apps["leases-off"] = guarded(inner(), limit, RedisStore(redis_url))
    return apps


# -- the uvicorn driver -----------------------------------------------------------------------------

class _Client(asyncio.Protocol):
    """One keep-alive connection: sends the next request as soon as an answer is complete."""

    def __init__(self, driver: _Run, first: int) -> None:
        self.driver, self.next, self.buffer = driver, first, b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_next(self) -> None:
        assert self.transport is not None
        run = self.driver
        if run.sent < run.total:
            run.sent += 1
            self.transport.write(run.requests[self.next % len(run.requests)])
            self.next += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (head_end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.driver.answered(self.buffer[9:12])
            self.buffer = self.buffer[end:]
            self.send_next()


class _Run:
    def __init__(self, requests: list[bytes], total: int, done: asyncio.Future[None]) -> None:
        self.requests, self.total, self.done = requests, total, done
        self.sent = self.count = 0
        self.unexpected: dict[bytes, int] = {}

    def answered(self, status: bytes) -> None:
        self.count += 1
        if status != b"201":
            self.unexpected[status] = self.unexpected.get(status, 0) + 1
        if self.count >= self.total and not self.done.done():
            self.done.set_result(None)


async def uvicorn_driver(app: App, requests: int) -> float:
    """Process CPU us per request: the app behind uvicorn's HttpToolsProtocol over loopback TCP."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    loop = asyncio.get_running_loop()
    config = Config(app=app, http="httptools", loop="none", lifespan="off", access_log=False, log_level="warning")
    config.load()
    state = ServerState()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen(CONNECTIONS)
    port = listener.getsockname()[1]
    run = _Run(request_bytes(CREATE, port), requests, loop.create_future())
    clients: list[_Client] = []
    server_transports = []
    for c in range(CONNECTIONS):
        client_sock = socket.create_connection(("127.0.0.1", port))
        server_sock, _ = listener.accept()
        for sock in (client_sock, server_sock):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn's and wrk's sockets
            sock.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(
            lambda: HttpToolsProtocol(config=config, server_state=state, app_state={}, _loop=loop), server_sock)
        server_transports.append(transport)
        _, client = await loop.create_connection(lambda c=c: _Client(run, c), sock=client_sock)  # type: ignore[misc]
        clients.append(client)
    listener.close()
    started = time.process_time()
    for client in clients:
        client.send_next()
    await asyncio.wait_for(run.done, timeout=120)
    spent = time.process_time() - started
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    for transport in server_transports:
        transport.close()
    await asyncio.sleep(0.01)
    if run.unexpected:
        raise SystemExit(f"unexpected answers: {run.unexpected}")
    return spent * 1e6 / run.count


# -- the direct driver ------------------------------------------------------------------------------

async def trivial_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"secret_ref": "x"}'})


def scopes() -> list[dict[str, Any]]:
    return [{"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/secrets", "raw_path": b"/v1/secrets", "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"x-project-id", project.encode()),
                         (b"content-type", b"application/json"), (b"content-length", b"41")]}
            for project in PROJECTS]


async def direct_driver(app: App, requests: int) -> float:
    """Process CPU us per request, the app called directly, CONNECTIONS requests in flight."""
    templates = scopes()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"name": "bench", "payload": "c2VjcmV0"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    per_connection = requests // CONNECTIONS

    async def connection(c: int) -> None:
        for i in range(per_connection):
            await app(dict(templates[(c + i) % len(templates)]), receive, send)

    started = time.process_time()
    await asyncio.gather(*(connection(c) for c in range(CONNECTIONS)))
    return (time.process_time() - started) * 1e6 / (per_connection * CONNECTIONS)


# -- measuring --------------------------------------------------------------------------------------

async def measure(apps: dict[str, App], driver: Callable[[App, int], Awaitable[float]], requests: int,
                  repeats: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for app in apps.values():
        await driver(app, max(CONNECTIONS * 4, requests // 10))  # warm-up: caches filled, blocks leased
    for _ in range(repeats):  # interleaved, so that a slow moment hits every target alike
        for name, app in apps.items():
            best[name] = min(best.get(name, float("inf")), await driver(app, requests))
    for app in apps.values():
        if isinstance(app, QuotaMiddleware):
            await app.aclose()
    return best


def print_table(title: str, best: dict[str, float], server: dict[str, tuple[float, float]] | None = None) -> None:
    print(f"\n{title}")
    head = f"{'target':<12} {'us/req':>8} {'added':>7}"
    if server:
        head += f" | {'server us/req':>13} {'added':>7} {'in process / server added':>26}"
    print(head)
    for name, us in best.items():
        added = us - best["bare"]
        line = f"{name:<12} {us:8.2f} {'' if name == 'bare' else f'{added:+7.2f}':>7}"
        if server and name in server:
            s_us, s_added = server[name]
            ratio = f"{added / s_added:.2f}" if name != "bare" and abs(s_added) >= 0.5 else ""
            line += f" | {s_us:13.2f} {'' if name == 'bare' else f'{s_added:+7.2f}':>7} {ratio:>26}"
        print(line)


def server_check(procs: Any, tmp: Path, targets: list[str], args: argparse.Namespace,
                 redis_url: str | None) -> dict[str, tuple[float, float]]:
    """Worker CPU us per request of real uvicorn workers (uvloop + httptools): (median over rounds,
    median of the per-round differences to bare)."""
    kind = server_kind("httptools")
    two = (os.cpu_count() or 1) >= 2
    server_cpu, load_cpu = (0, 1) if two else (None, None)
    env = {**os.environ, "QUOTA_LIMIT": str(args.limit)}
    servers = {}
    for name in targets:
        app, extra = SERVED[name]
        extra = {**extra, "REDIS_URL": redis_url} if name.startswith("leases") and redis_url else extra
        servers[name] = serve_and_wait(procs, app, app_dir=HERE, kind=kind, env={**env, **extra}, cwd=tmp,
                                       cpu=server_cpu)
    cpu_us: dict[str, list[float]] = {name: [] for name in targets}
    for name in targets:
        run_load(procs, pinned(wrk_command(CREATE, servers[name][1], CONNECTIONS, 1, tmp), load_cpu), 1)
    for r in range(args.server_rounds):
        for name in (targets if r % 2 == 0 else targets[::-1]):
            proc, port = servers[name]
            before = group_cpu(proc.pid)
            result = run_load(procs, pinned(wrk_command(CREATE, port, CONNECTIONS, args.server_duration, tmp),
                                            load_cpu), args.server_duration)
            after = group_cpu(proc.pid)
            answered = result["statuses"].get("201", 0)
            if before is not None and after is not None and answered:
                cpu_us[name].append((after - before) * 1e6 / answered)
    for proc, _ in servers.values():
        procs.stop(proc)
    return {name: (median(values), paired_difference(values, cpu_us["bare"])) for name, values in cpu_us.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=["uvicorn", "direct", "both"], default="uvicorn",
                        help="uvicorn's protocol over loopback TCP (uvicorn), the app called directly (direct), "
                             "or both")
    parser.add_argument("--limit", type=int, default=-1,
                        help="the guarded targets' limit (-1: unlimited, no RateLimit headers; a large number: "
                             "never reached, RateLimit headers sent)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement (20000)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per target; the minimum counts (5)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis targets")
    parser.add_argument("--server-check", action="store_true",
                        help="also measure the same targets behind real uvicorn workers under wrk")
    parser.add_argument("--server-rounds", type=int, default=6, help="--server-check: rounds (6)")
    parser.add_argument("--server-duration", type=int, default=3, help="--server-check: seconds per round (3)")
    args = parser.parse_args()
    if args.requests < CONNECTIONS * 4 or args.repeats < 1:
        parser.error(f"--requests must be at least {CONNECTIONS * 4} and --repeats at least 1")
    if args.server_check and shutil.which("wrk") is None:
        raise SystemExit("--server-check needs wrk (apt-get install wrk)")
    print(environment("uvicorn", "uvloop", "httptools", "starlette"))
    print(f"process CPU per request, us (min of {args.repeats} x {args.requests:,} requests, {CONNECTIONS} "
          f"connections or requests in flight); added = target - bare; guarded limit {args.limit}")
    with workspace("quota-overhead-") as (procs, tmp):
        redis_url = None if args.no_redis else start_redis(procs, tmp).url
        results: dict[str, dict[str, float]] = {}
        if args.driver in ("uvicorn", "both"):
            results["uvicorn"] = uvloop.run(measure(make_apps(build_app, args.limit, redis_url), uvicorn_driver,
                                                    args.requests, args.repeats))
        if args.driver in ("direct", "both"):
            for inner_name, inner in (("trivial", lambda: trivial_app), ("starlette", build_app)):
                results[f"direct, {inner_name}"] = asyncio.run(
                    measure(make_apps(inner, args.limit, redis_url), direct_driver, args.requests, args.repeats))
        server = server_check(procs, tmp, list(next(iter(results.values()))), args, redis_url) \
            if args.server_check else None
        for name, best in results.items():
            title = {"uvicorn": "in process, uvicorn's HttpToolsProtocol on uvloop over loopback TCP (client "
                                "included in us/req)"}.get(name, f"in process, the app called directly ({name} "
                                                                 f"inner app)")
            if server is not None and name == "uvicorn":
                title += f"; beside it, a real uvicorn worker under wrk (worker CPU from /proc: median of " \
                         f"{args.server_rounds} rounds x {args.server_duration} s; added: median of the per-round " \
                         f"differences)"
            print_table(title, best, server if name == "uvicorn" else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
