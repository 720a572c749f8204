"""What several limits on one request cost: 3 buckets against 1, measured side by side in one run.

    .venv/bin/python bench/charges.py                  # in process, ~40 s
    .venv/bin/python bench/charges.py --requests 20000 --rounds 5
    .venv/bin/python bench/charges.py --server         # behind real uvicorn workers, ~1.5 min
    .venv/bin/python bench/charges.py --server --rounds 8 --duration 5

Two set-ups of QuotaMiddleware on the same store (bench/apps.py's ``charged``):

- ``1 bucket``: one rule, a count quota;
- ``3 buckets``: a count quota, a per-minute limit written on a second rule, and the project's
  parent's cap (every request charges all three, decided in one atomic step).

Every limit is 10**12 (``--limit``), never reached: each request is admitted, and every policy it
meets is in its RateLimit headers, as a finite quota's is in production (``--limit -1`` makes the
count quotas unlimited: they then send no headers, and only the 3-bucket set-up's per-minute
limit does).

Each store (the memory store; Redis, batched, no local leases; Redis Cluster is left to the test
suite) reports CPU per request of each, the ratio 3 buckets / 1 bucket (the target: at most
1.2x), and for Redis the script calls per request (``INFO commandstats`` evalsha + eval): one
call decides all three buckets. Redis's own CPU is in neither mode. Starts its own redis-servers
(Debian's) on free loopback ports. Exits 0 whatever the numbers.

In process (the default): drives the middleware with 32 requests in flight, the worker's CPU by
``time.process_time``, with no HTTP server (whose own cost per request would lower every ratio),
around two inner apps: ``trivial`` (the middleware's cost stands out) and ``starlette`` (what
throughput.py serves: parse JSON, answer 201). ``--rounds`` alternating rounds of
``--requests``; the ratio of medians.

``--server``: what a worker pays. bench/apps.py's ``charges_app`` in one uvicorn worker each
(uvloop + httptools) for memory / Redis x 1 / 3 buckets, and ``bare_app`` for reference, on CPU 0;
``wrk -t1 -c32`` (the request bytes of throughput.py, 8 projects) and the redis-servers (one per
Redis set-up, so that each one's script calls are its own) on CPU 1. ``--rounds`` rounds of
``--duration`` s per server in rotating order, after 1 s of warm-up each. The worker CPU per
answered request is user + system of the server's process group (/proc); per store: the medians
of 1 bucket, 3 buckets and bare, the ratio 3/1 of the medians and the median of the per-round
ratios (``paired``), and req/s. Script calls per request are over the whole run, warm-up included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps import charged
from harness import (
    CREATE,
    Procs,
    RedisMeter,
    RedisPhase,
    RedisServer,
    count_errors,
    environment,
    fmt,
    group_cpu,
    median,
    paired_ratio,
    pinned,
    ratio_of_medians,
    run_load,
    serve_and_wait,
    server_kind,
    start_redis,
    workspace,
    wrk_command,
)

sys.path.append(str(Path(__file__).resolve().parent.parent))
from middleware import MemoryStore, QuotaMiddleware, RedisStore, Store  # noqa: E402

HERE = Path(__file__).resolve().parent
CONNECTIONS = 32
#: Every bucket's limit: never reached, so that each one is charged and states its policy.
LIMIT = 10**12
PROJECTS = 8
GOAL = 1.2  # 3 buckets cost at most this many times 1 bucket
STORES = {"memory": "memory store", "redis": "Redis (leases off)"}


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


def guarded(store: Store, buckets: int, inner: str, limit: int) -> QuotaMiddleware:
    return charged(APPS[inner](), store, buckets, [f"p{i}" for i in range(PROJECTS)], limit)


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


async def script_calls(url: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    finally:
        await client.aclose()


async def measure(name: str, make_store: Any, args: argparse.Namespace, url: str | None, inner: str) -> None:
    apps = {n: guarded(make_store(), n, inner, args.limit) for n in (1, 3)}
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


async def in_process(args: argparse.Namespace) -> None:
    print(f"{args.rounds} alternating rounds of {args.requests} requests; worker CPU per request, median\n")
    for inner in APPS:
        await measure("memory store", MemoryStore, args, None, inner)
    if shutil.which("redis-server") is None:
        print("redis-server not installed: Redis not measured")
        return
    with workspace("bench-charges-") as (procs, tmp):
        url = start_redis(procs, tmp).url
        for inner in APPS:
            await measure("Redis (leases off)", lambda: RedisStore(url), args, url, inner)
    print(f"\npython {sys.version.split()[0]}, pid {os.getpid()}")


# -- --server: the same set-ups, each in a uvicorn worker under wrk ------------------------------

@dataclass
class Server:
    name: str
    app: str
    store: str | None = None  # memory / redis; None: the bare app
    buckets: int = 0
    redis: RedisServer | None = None
    proc: subprocess.Popen[Any] | None = None
    port: int = 0
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # worker CPU (user+sys) per 201 answer
    answered: int = 0  # 201 answers, warm-up included: what the script calls are divided by
    errors: Counter[str] = field(default_factory=Counter)


def load(procs: Procs, tmp: Path, server: Server, duration: int, cpu: int | None, measured: bool) -> None:
    assert server.proc is not None
    before = group_cpu(server.proc.pid)
    result = run_load(procs, pinned(wrk_command(CREATE, server.port, CONNECTIONS, duration, tmp), cpu), duration)
    time.sleep(0.05)  # Redis commits are handed over without waiting: let the last batch land
    after = group_cpu(server.proc.pid)
    ok = result["statuses"].get("201", 0)
    server.answered += ok
    if not measured:
        return
    if not ok:
        raise SystemExit(f"{server.name} answered no 201 (statuses {dict(result['statuses'])})")
    server.rps.append(ok / result["seconds"])
    if before is not None and after is not None:
        server.cpu_us.append((after - before) * 1e6 / ok)
    count_errors(server.errors, 201, result)


def in_server(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("--server needs wrk (apt-get install wrk)")
    kind = server_kind("httptools")
    # The worker alone on CPU 0, so that wrk and Redis never preempt it (throughput.py --pin).
    server_cpu, load_cpu = (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)
    stores = [s for s in STORES if s != "redis" or shutil.which("redis-server")]
    print(environment("uvicorn", "uvloop", "httptools", "starlette", "redis"))
    print(f"{kind.describe()}, 1 worker on CPU {server_cpu}; wrk -t1 -c{CONNECTIONS} and redis-server on CPU "
          f"{load_cpu}; {args.rounds} rounds x {args.duration} s per server, order rotating, 1 s warm-up each")
    servers = [Server("bare", "bare_app")] + [Server(f"{store} {n}", "charges_app", store, n)
                                              for store in stores for n in (1, 3)]
    with workspace("bench-charges-") as (procs, tmp):
        for s in servers:
            env = {**os.environ, "QUOTA_LIMIT": str(args.limit),
                   **({"QUOTA_STORE": s.store, "QUOTA_BUCKETS": str(s.buckets)} if s.store else {})}
            if s.store == "redis":
                s.redis = start_redis(procs, tmp, s.name.replace(" ", "-"), cpu=load_cpu)
                env["REDIS_URL"] = s.redis.url
            # The scratch directory as working directory: PYTHONPATH's middleware, else the editable install.
            s.proc, s.port = serve_and_wait(procs, s.app, app_dir=HERE, kind=kind, env=env, cwd=tmp, cpu=server_cpu)
        meters = {s.name: RedisMeter(s.redis) for s in servers if s.redis}
        for s in servers:
            load(procs, tmp, s, 1, load_cpu, measured=False)
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for s in order:
                load(procs, tmp, s, args.duration, load_cpu, measured=True)
            print(f"  round {r + 1}/{args.rounds} (req/s / worker CPU per request): "
                  + ", ".join(f"{s.name} {fmt(s.rps[-1])}/{s.cpu_us[-1]:.0f}us" for s in order), flush=True)
        redis = {s.name: meters[s.name].take(s.answered) for s in servers if s.redis}
        for s in servers:
            if s.redis:
                s.redis.close()
    report(servers, redis, args)
    if "redis" not in stores:
        print("redis-server not installed: Redis not measured")
    return 0


def report(servers: list[Server], redis: dict[str, RedisPhase], args: argparse.Namespace) -> None:
    by_name = {s.name: s for s in servers}
    bare = by_name["bare"]
    print(f"\nworker CPU us per request, median over {args.rounds} rounds; 3/1: ratio of the medians and paired "
          f"(median of per-round ratios); goal 3/1 <= {GOAL:.1f}x (met: yes both, ~ one, NO neither)")
    print(f"{'store':<20} {'1 bucket':>8} {'3 buckets':>9} {'bare':>6} {'3/1':>6} {'paired':>6} {'met':>4}  "
          f"{'req/s 1 / 3 / bare':>24}  script calls per request 1 / 3")
    for store, label in STORES.items():
        one, three = by_name.get(f"{store} 1"), by_name.get(f"{store} 3")
        if one is None or three is None:
            continue
        ratio = ratio_of_medians(three.cpu_us, one.cpu_us)
        paired = paired_ratio(three.cpu_us, one.cpu_us)
        met = "yes" if max(ratio, paired) <= GOAL else "NO" if min(ratio, paired) > GOAL else "~"
        rps = " / ".join(fmt(median(s.rps)) for s in (one, three, bare))
        calls = " / ".join(f"{redis[s.name].scripts / max(redis[s.name].requests, 1):.3f}"
                           for s in (one, three) if s.name in redis)
        print(f"{label:<20} {median(one.cpu_us):>8.1f} {median(three.cpu_us):>9.1f} {median(bare.cpu_us):>6.1f} "
              f"{ratio:>5.2f}x {paired:>5.2f}x {met:>4}  {rps:>24}  {calls}")
    errors = {s.name: s.errors for s in servers if s.errors}
    if errors:
        print("answers other than 201, socket errors: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(e.items())) for name, e in errors.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="store_true",
                        help="measure uvicorn workers under wrk instead of the middleware in process")
    parser.add_argument("--requests", type=int, default=10_000, help="in process: requests per round (10000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--limit", type=int, default=LIMIT,
                        help="the count quota of each project and of the parent (10**12: never reached, and every "
                             "policy sends its RateLimit headers, as a finite quota does in production; -1: unlimited, "
                             "no headers from the count quotas)")
    parser.add_argument("--duration", type=int, default=3, help="--server: seconds per round and server (3)")
    args = parser.parse_args()
    if min(args.requests, args.rounds, args.duration) < 1:
        parser.error("--requests, --rounds and --duration must be at least 1")
    if not args.server:
        asyncio.run(in_process(args))
        return 0

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)  # unwinds through workspace: every server stopped
    try:
        return in_server(args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
