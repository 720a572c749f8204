"""Instructions per request of a real uvicorn worker, counted by callgrind: a figure that does not
move with whatever else the machine is doing, so that a change of a few hundred instructions
shows, and the ratios of throughput.py and charges.py can be read without their noise.

    .venv/bin/python bench/instructions.py                  # throughput.py's targets, ~1.5 min
    .venv/bin/python bench/instructions.py --charges        # charges.py's set-ups: 3 buckets / 1
    .venv/bin/python bench/instructions.py --targets bare,memory --requests 6400
    PYTHONPATH=/tmp/old .venv/bin/python bench/instructions.py --targets bare,memory   # another tree

Each target is one uvicorn worker (uvloop + httptools, an app of bench/apps.py) run under
``valgrind --tool=callgrind`` with instrumentation off while it starts and takes 1,024 warm-up
requests (uninstrumented, valgrind runs it only a few times slower). Then instrumentation is switched on
(``callgrind_control -i on``), ``--requests`` more requests are sent (32 keep-alive connections, the
request bytes of throughput.py: 8 rotating projects) and the count is dumped. Reported: the
worker's instructions per request (every instruction of the process: uvloop, httptools, the
interpreter, Starlette, ours; the kernel's are not counted), and the ratio bare / target, which
is what a CPU-bound worker's req/s ratio would be if every instruction cost the same. The same
build gives the same figure to about 0.3% run after run, busy machine or not.

What it does not see:

- time: cache misses, branch mispredictions, the kernel's share of each request. A worker's CPU
  per request (throughput.py) stays the figure a target is met by; this one says where a change
  moved it, and by how much, without the noise;
- what depends on time. Under callgrind the worker runs about 50 times slower, so whatever
  happens per interval covers fewer requests: local leases take a block from Redis per bucket
  and second (the ``leases-on`` figure pays Redis round trips many times more often than a
  real server does) and batched script calls gather fewer requests each (``leases-off``).

Targets (``--targets``): ``bare``, ``null``, ``minimal``, ``awaited``, ``memory``, ``leases-on``, ``leases-off``
(POST /v1/secrets on throughput.py's servers, limit -1), ``bare-health`` and ``unguarded`` (GET
/health on bare and on leases-off). ``--charges``: charges.py's ``charges_app`` on the memory
store and on Redis (leases off), 1 and 3 buckets, limit 10**12. Needs valgrind (Debian's
``valgrind`` package). Starts its own redis-server when a target needs one. Exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    CREATE,
    HEALTH,
    HOST,
    Route,
    environment,
    free_port,
    request_bytes,
    start_redis,
    wait_http,
    workspace,
)

HERE = Path(__file__).resolve().parent
WARM_UP = 1024
CONNECTIONS = 32
CHARGES_LIMIT = 10**12


@dataclass
class Target:
    name: str
    app: str
    route: Route = CREATE
    env: dict[str, str] = field(default_factory=dict)
    redis: bool = False
    #: The target its ratio is to.
    baseline: str = "bare"


TARGETS = {t.name: t for t in [
    Target("bare", "bare_app"),
    Target("null", "null_app"),
    Target("minimal", "minimal_app"),
    Target("awaited", "awaited_app", redis=True),
    Target("memory", "memory_app"),
    Target("leases-on", "guarded_app", env={"QUOTA_LOCAL_LEASES": "1"}, redis=True),
    Target("leases-off", "guarded_app", env={"QUOTA_LOCAL_LEASES": "0"}, redis=True),
    Target("bare-health", "bare_app", HEALTH, baseline="bare-health"),
    Target("unguarded", "guarded_app", HEALTH, env={"QUOTA_LOCAL_LEASES": "0"}, redis=True, baseline="bare-health"),
]}
CHARGES = {t.name: t for t in [
    Target(f"{store} {n}", "charges_app", env={"QUOTA_STORE": store, "QUOTA_BUCKETS": str(n),
                                               "QUOTA_LIMIT": str(CHARGES_LIMIT)},
           redis=store == "redis", baseline=f"{store} 1")
    for store in ("memory", "redis") for n in (1, 3)
]}


async def _connection(port: int, requests: list[bytes], count: int, offset: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for i in range(count):
            writer.write(requests[(offset + i) % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            if status not in (b"200", b"201"):
                raise SystemExit(f"the server answered {head.decode(errors='replace')!r}")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if length is None:
                raise SystemExit("an answer without content-length: this client reads no chunked bodies")
            await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()


def send(port: int, route: Route, total: int) -> int:
    """``total`` requests (rounded down to whole rounds of the connections); returns how many."""
    each = total // CONNECTIONS
    requests = request_bytes(route, port)

    async def run() -> None:
        await asyncio.gather(*(_connection(port, requests, each, i) for i in range(CONNECTIONS)))

    asyncio.run(run())
    return each * CONNECTIONS


def control(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def count(target: Target, requests: int, tmp: Path, redis_url: str | None) -> float:
    """The worker's instructions per request over ``requests`` warm requests."""
    port = free_port()
    out = tmp / f"{target.name.replace(' ', '-')}.callgrind"
    env = {**os.environ, **target.env, "PYTHONHASHSEED": "0"}
    env.setdefault("QUOTA_LIMIT", "-1")
    if redis_url:
        env["REDIS_URL"] = redis_url
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "uvicorn", f"apps:{target.app}", "--app-dir", str(HERE), "--host", HOST,
            "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning"]
    # The working directory is the scratch one: `-m` puts it first on the path, and the middleware
    # measured must be PYTHONPATH's (or the editable install's), as in every other script here.
    proc = subprocess.Popen(argv, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, proc, "/health", 200, timeout=120)  # valgrind starts it slowly
        send(port, target.route, WARM_UP)
        control(proc.pid, "-i", "on")
        sent = send(port, target.route, requests)
        control(proc.pid, "-d")
    finally:
        proc.terminate()
        proc.wait(30)
    dumps = sorted(tmp.glob(f"{out.name}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise SystemExit(f"callgrind wrote no dump for {target.name}")
    text = dumps[0].read_text(errors="replace")
    total = re.search(r"^(?:summary|totals): *(\d+)", text, re.MULTILINE)
    if total is None:
        raise SystemExit(f"no instruction count in {dumps[0]}")
    for dump in tmp.glob(f"{out.name}*"):
        dump.unlink()
    return int(total.group(1)) / sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--charges", action="store_true", help="charges.py's set-ups instead of throughput.py's")
    parser.add_argument("--targets", help="comma-separated, in order (default: all of the mode's)")
    parser.add_argument("--requests", type=int, default=3200, help="measured requests per target (3200)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind: apt-get install -y valgrind", file=sys.stderr)
        return 2
    table = CHARGES if args.charges else TARGETS
    names = args.targets.split(",") if args.targets else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown targets {unknown}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    print(environment("uvicorn", "uvloop", "httptools", "starlette", "redis"))
    print(f"callgrind; {args.requests} requests per target after {WARM_UP} of warm-up; "
          f"{CONNECTIONS} connections; instructions of the worker process per request")
    print(f"  {'target':12s} {'instr/req':>11s}  {'added':>9s}  {'ratio':>6s}  (ratio: its baseline's count / its own;"
          f" added: over the baseline)")
    counted: dict[str, float] = {}
    with workspace("instructions-") as (procs, tmp):
        redis = start_redis(procs, tmp) if any(table[n].redis for n in names) else None
        for name in names:
            target = table[name]
            if redis is not None:
                redis.client.flushall()
            counted[name] = count(target, args.requests, tmp, redis.url if redis else None)
            base = counted.get(target.baseline)
            ratio = f"{base / counted[name]:.3f}" if base and name != target.baseline else ""
            extra = f"{counted[name] - base:+,.0f}" if base and name != target.baseline else ""
            calibration = name in ("bare", "null", "minimal", "awaited") or target.route is not CREATE
            minimal = None if calibration else counted.get("minimal")
            print(f"  {name:12s} {counted[name]:>11,.0f}  {extra:>9s}  {ratio:>6s}"
                  f"{f'  ({minimal / counted[name]:.3f} of minimal)' if minimal else ''}", flush=True)
    if args.charges:
        for store in ("memory", "redis"):
            one, three = counted.get(f"{store} 1"), counted.get(f"{store} 3")
            if one and three:
                print(f"{store}: 3 buckets / 1 bucket = {three / one:.3f} (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
