"""Memory of one QuotaMiddleware instance as a million distinct projects pass through it.

Each configuration runs in its own Python process: one QuotaMiddleware, called directly (in-process
ASGI calls with a minimal scope, receive and send; no HTTP server) for ``--projects`` distinct
``X-Project-Id`` values, one ``POST /v1/secrets`` each, ``--concurrency`` requests in flight at a
time (so that RedisStore batches as it does under load). At 1%, 10%, 50% and 100% of the projects
it reports the process's RSS (after ``gc.collect()``), optionally tracemalloc's traced memory, and
the size of every in-process structure that could grow with projects; at the end, the peak RSS
(``resource.getrusage`` ``ru_maxrss``; Linux updates it lazily, so it may trail the current RSS
by a few hundred KB).

Configurations (``--configs``, default ``redis,leases,memory``):

    redis         RedisStore on a redis-server this script starts; StaticSource
    leases        the same with local leases (QuotaMiddleware(local_leases=True): LeasingStore)
    memory        MemoryStore; a cacheable StaticSource, so that the quota cache fills up
    redis-cached  RedisStore with the cacheable source (slow: a cold project costs five Redis
                  round trips for the shared quota copy and its lock; not in the default set)

``StaticSource`` is not cacheable (``cacheable = False``): the middleware then asks it on every
request and the quota cache stays empty. The ``memory`` configuration uses a subclass that is
cacheable, which exercises the quota cache (a cachetools LRU of ``cache_size`` entries).
MemoryStore's counters grow with projects by design (they are the usage data, which RedisStore
keeps in Redis), so its row shows them apart from the caches.

The limit is ``--limit`` (default 1,000,000: each project uses 1). With a finite limit a project's
first request is decided in the store one by one (LeasingStore leases blocks only once it knows
where a project stands); ``--limit -1`` (unlimited, like bench/apps.py) makes the leases
configuration open a block per project too, at about half the speed.

    .venv/bin/python bench/memory.py [--projects 1000000] [--configs redis,leases,memory] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import Procs, git_state, start_redis, workspace

ROOT = Path(__file__).resolve().parent.parent
MARK = "MEMJSON "
CONFIGS = {
    "redis": "RedisStore, StaticSource",
    "leases": "RedisStore + local leases (LeasingStore), StaticSource",
    "memory": "MemoryStore, cacheable StaticSource (quota cache used)",
    "redis-cached": "RedisStore, cacheable StaticSource (quota cache + shared copy in Redis)",
}
NEEDS_REDIS = {"redis", "leases", "redis-cached"}
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- one configuration (a separate process: `memory.py _run SPEC`) ---------------------------------

def _size(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    return None if value is None else len(value)


def structures(mw: Any) -> dict[str, Any]:
    """Entries in every in-process structure of the middleware that is keyed by project or bucket."""
    from middleware.stores import leasing as leasing_mod
    from middleware.stores import memory as memory_mod
    from middleware.stores import redis as redis_mod

    out: dict[str, Any] = {}
    cache = mw.cache
    out["quota cache"] = _size(cache, "_local")
    out["quota cache max"] = getattr(getattr(cache, "_local", None), "maxsize", None)
    out["cache backoff"] = _size(cache, "_backoff")
    out["cache in flight"] = _size(cache, "_inflight")
    store = mw.store
    if isinstance(store, leasing_mod.LeasingStore):
        for name in ("_last_used", "_open", "_unsettled", "_granting", "_settling", "_tasks"):
            out[f"leasing {name}"] = _size(store, name)
        store = store.inner
    if isinstance(store, redis_mod.RedisStore):
        keys = getattr(redis_mod, "_keys", None)
        if keys is not None and hasattr(keys, "cache_info"):
            info = keys.cache_info()
            out["redis key cache"] = info.currsize
            out["redis key cache max"] = info.maxsize
        out["redis queue"] = _size(store, "_queue")
        out["redis retry"] = _size(store, "_retry")
    if isinstance(store, memory_mod.MemoryStore):
        for name in ("_used", "_leases", "_expired"):
            out[f"memory {name}"] = _size(store, name)
    return out


async def _run(spec: dict[str, Any]) -> None:
    if spec["tracemalloc"]:
        import tracemalloc
        tracemalloc.start()
    from middleware import MemoryStore, QuotaMiddleware, RedisStore, Rule, StaticSource

    class CachedStaticSource(StaticSource):
        """StaticSource, but cacheable: the middleware keeps its answers in the quota cache."""

        cacheable = True
        namespace = "bench-static"

    config = spec["config"]
    source_cls = CachedStaticSource if config in ("memory", "redis-cached") else StaticSource
    store = MemoryStore() if config == "memory" else RedisStore(spec["redis_url"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"secret_ref": "x"}'})

    mw = QuotaMiddleware(app, rules=[Rule("POST", "/v1/secrets", "secrets")],
                         source=source_cls({"secrets": spec["limit"]}), store=store,
                         local_leases=config == "leases")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: dict[int, int] = {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    def scope(project: bytes) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": "/v1/secrets", "raw_path": b"/v1/secrets", "query_string": b"",
                "root_path": "", "headers": [(b"host", b"bench"), (b"x-project-id", project)],
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    def emit(projects: int, seconds: float) -> None:
        gc.collect()
        row: dict[str, Any] = {"projects": projects, "seconds": seconds, "rss_mb": rss_mb(),
                               "peak_rss_mb": peak_rss_mb(), "structures": structures(mw),
                               "statuses": dict(statuses)}
        if spec["tracemalloc"]:
            import tracemalloc
            row["traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        print(MARK + json.dumps(row), flush=True)

    await mw(scope(b"warm-up"), receive, send)  # imports, Redis connection, script load
    emit(0, 0.0)
    next_project = 0
    started = time.perf_counter()

    async def worker(until: int) -> None:
        nonlocal next_project
        while next_project < until:
            i = next_project
            next_project += 1
            await mw(scope(b"project-%08d" % i), receive, send)

    for checkpoint in spec["checkpoints"]:
        await asyncio.gather(*(worker(checkpoint) for _ in range(spec["concurrency"])))
        emit(checkpoint, time.perf_counter() - started)
    await mw.aclose()
    emit(-1, time.perf_counter() - started)  # after aclose: settlements applied, blocks settled


# -- the harness ----------------------------------------------------------------------------------

def start_config(procs: Procs, spec: dict[str, Any]) -> subprocess.Popen[str]:
    # The same environment: the child imports the middleware this process would (PYTHONPATH's first).
    argv = [sys.executable, str(Path(__file__).resolve()), "_run", json.dumps(spec)]
    proc: subprocess.Popen[str] = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              cwd=ROOT)
    return proc


def collect(proc: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise SystemExit(f"a configuration did not finish within {timeout:.0f}s:\n{err[-2000:]}") from None
    rows = [json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"a configuration failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return rows


def fmt_count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def report(config: str, rows: list[dict[str, Any]], redis_info: dict[str, Any] | None, tracemalloc: bool) -> None:
    print(f"\n-- {config}: {CONFIGS[config]} --")
    keys = [k for k in rows[0]["structures"] if not k.endswith(" max")]
    caps = {k: rows[0]["structures"].get(k + " max") for k in keys}
    names = [k + (f" (max {caps[k]:,})" if caps.get(k) else "") for k in keys]
    head = f"{'projects':>10} {'seconds':>7} {'RSS MB':>7} {'peak MB':>7}"
    head += f" {'traced MB':>9}" if tracemalloc else ""
    print(head + "".join(f"  {n}" for n in names))
    widths = [len(n) for n in names]
    for row in rows:
        label = "after aclose" if row["projects"] < 0 else f"{row['projects']:,}"
        line = f"{label:>10} {row['seconds']:>7.1f} {row['rss_mb']:>7.1f} {row['peak_rss_mb']:>7.1f}"
        if tracemalloc:
            line += f" {row.get('traced_mb', 0.0):>9.1f}"
        line += "".join(f"  {fmt_count(row['structures'].get(k)):>{w}}" for k, w in zip(keys, widths, strict=True))
        print(line)
    last = rows[-1]
    done = max(r["projects"] for r in rows)
    rate = done / last["seconds"] if last["seconds"] else 0.0
    first = next((r for r in rows if r["projects"] > 0), rows[0])
    further = done - first["projects"]
    growth = (last["rss_mb"] - first["rss_mb"]) * 2**20 / further if further > 0 else 0.0
    print(f"peak RSS {last['peak_rss_mb']:.1f} MB; RSS {first['rss_mb']:.1f} MB at {first['projects']:,} projects -> "
          f"{last['rss_mb']:.1f} MB at the end ({growth:+.0f} bytes per further project); {rate:,.0f} projects/s; "
          f"answers {last['statuses']}")
    if redis_info:
        print(f"redis-server (not this process): {redis_info['keys']:,} keys, used_memory "
              f"{redis_info['used_memory'] / 2**20:.1f} MB (the usage data: it grows with projects by design)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--projects", type=int, default=1_000_000,
                        help="distinct projects per configuration (1,000,000)")
    parser.add_argument("--configs", default="redis,leases,memory",
                        help=f"comma-separated, from {', '.join(CONFIGS)} (redis,leases,memory)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at a time (64)")
    parser.add_argument("--limit", type=int, default=1_000_000,
                        help="the static limit of every project (1,000,000; -1 unlimited)")
    parser.add_argument("--jobs", type=int, default=2, help="configurations run at the same time (2), each in its own "
                        "process with its own redis-server; 1 runs them one after the other")
    parser.add_argument("--tracemalloc", action="store_true", help="also report tracemalloc's traced memory (slower)")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.projects < 1 or args.concurrency < 1 or args.jobs < 1:
        parser.error("--projects, --concurrency and --jobs must be at least 1")

    checkpoints = sorted({max(1, args.projects // 100), max(1, args.projects // 10), max(1, args.projects // 2),
                          args.projects})
    print(f"python {platform.python_version()}; {os.cpu_count()} CPUs; middleware from {git_state()}")
    print(f"{args.projects:,} distinct projects per configuration through one QuotaMiddleware (in-process ASGI calls, "
          f"{args.concurrency} in flight), limit {args.limit}; checkpoints {', '.join(f'{c:,}' for c in checkpoints)}; "
          f"{args.jobs} configuration(s) at a time")
    started = time.monotonic()
    try:
        with workspace("quota-mem-") as (procs, tmp):
            redises = {c: start_redis(procs, tmp, c) for c in configs if c in NEEDS_REDIS}
            pending = list(configs)
            running: list[tuple[str, subprocess.Popen[str]]] = []
            results: dict[str, list[dict[str, Any]]] = {}
            while pending or running:
                while pending and len(running) < args.jobs:
                    config = pending.pop(0)
                    spec = {"config": config, "checkpoints": checkpoints, "concurrency": args.concurrency,
                            "limit": args.limit, "tracemalloc": args.tracemalloc,
                            "redis_url": redises[config].url if config in redises else None}
                    running.append((config, start_config(procs, spec)))
                config, proc = running.pop(0)
                results[config] = collect(proc, timeout=3600)
                procs.forget(proc)
                print(f"  {config}: done after {time.monotonic() - started:.0f} s", flush=True)
            for config in configs:
                info = None
                if config in redises:
                    client = redises[config].client
                    info = {"keys": client.dbsize(), "used_memory": int(client.info("memory")["used_memory"])}
                report(config, results[config], info, args.tracemalloc)
            print(f"\n(run took {time.monotonic() - started:.0f} s)")
            return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_run":
        asyncio.run(_run(json.loads(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
