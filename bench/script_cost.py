"""Redis's own cost per guarded request with leases off: the batch script, by batch size.

    .venv/bin/python bench/script_cost.py                    # ~20 s
    .venv/bin/python bench/script_cost.py --batch 1,6,14,32 --calls 4000

Each call carries what throughput.py's guarded route sends at saturation: ``B`` reservations
(distinct buckets, 8 projects in rotation, like the load generator) and the commits of the ``B``
requests before them. It reports, from redis-server's own counters (``INFO commandstats`` and
``INFO cpu``), the time Redis spent in the script per call and per request, and redis-server's
CPU per request (script, protocol and socket work together). Redis is single-threaded: one
core's worth of that CPU is the most guarded requests per second one Redis serves with leases
off. Little noise (no HTTP server, no load generator): a change to ``batch.lua`` shows here
first. Starts its own redis-server (Debian's) on a free loopback port. Exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from harness import start_redis, workspace

from middleware import RedisStore
from middleware.stores.base import Bucket, Reservation

PROJECTS = 8


async def measure(url: str, client: Any, batch: int, calls: int) -> tuple[float, float]:
    """Redis script us per request, redis-server CPU us per request, for ``calls`` calls of ``batch``."""
    store = RedisStore(url)
    buckets = [Bucket(f"project-{i}", "secrets") for i in range(PROJECTS)]
    held: list[Reservation] = []

    async def one_call(first: int) -> list[Reservation]:
        # The reservations' tasks are scheduled before the store's sender (started by the first
        # commit), so all of them, and the commits, travel in one call.
        reserving = asyncio.gather(*(store.reserve(buckets[(first + i) % PROJECTS], 1, -1, 30_000)
                                     for i in range(batch)))
        for reservation in held:
            store.settle_nowait(reservation, True)
        return [d.reservation for d in await reserving if d.reservation is not None]

    for i in range(50):  # warm-up: script loaded, keys created
        held = await one_call(i * batch)
    client.config_resetstat()
    cpu = client.info("cpu")
    before = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
    for i in range(calls):
        held = await one_call(i * batch)
    for reservation in held:
        store.settle_nowait(reservation, True)
    await store.aclose()
    cpu = client.info("cpu")
    stats = client.info("commandstats")["cmdstat_evalsha"]
    requests = calls * batch
    if stats["calls"] > calls + 1:  # + the last commits
        raise SystemExit(f"{stats['calls']} script calls for {calls} batches: the batches were split")
    return stats["usec"] / requests, (cpu["used_cpu_user"] + cpu["used_cpu_sys"] - before) * 1e6 / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,6,14,32", help="requests per script call, comma-separated (1,6,14,32)")
    parser.add_argument("--calls", type=int, default=3000, help="script calls per batch size (3000)")
    args = parser.parse_args()
    try:
        sizes = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error("--batch takes comma-separated integers")
    if min(sizes) < 1 or args.calls < 1:
        parser.error("--batch sizes and --calls must be at least 1")
    with workspace("quota-script-cost-") as (procs, tmp):
        redis = start_redis(procs, tmp)
        print(f"leases off; each call: B reservations + the commits of the B requests before; {args.calls} calls")
        print(f"{'B':>4s} {'script us/call':>15s} {'script us/req':>14s} {'redis CPU us/req':>17s} "
              f"{'req/s per Redis core':>21s}")
        for batch in sizes:
            script, cpu = asyncio.run(measure(redis.url, redis.client, batch, args.calls))
            print(f"{batch:4d} {script * batch:15.1f} {script:14.2f} {cpu:17.2f} {1e6 / cpu:21,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
