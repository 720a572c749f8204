"""Two builds of the middleware side by side: is a change faster, measured in one run.

    .venv/bin/python bench/builds.py BASE [CHANGED]      # CHANGED defaults to the working tree
    .venv/bin/python bench/builds.py 7533524 HEAD --leases on --rounds 8
    .venv/bin/python bench/builds.py HEAD --store memory --limit 1000000000

Each revision is checked out in a temporary git worktree (the working tree is used as it is);
its ``middleware`` package serves this tree's ``bench/apps.py`` ``guarded_app`` (``--store
redis``, the guarded route of throughput.py, with its own redis-server) or ``memory_app``
(``--store memory``), so that only the middleware differs. One uvicorn worker (uvloop + httptools;
``--server h11`` for asyncio + h11) on CPU 0 with wrk on CPU 1, or ``--workers N`` through the
harness's prefork launcher, unpinned. wrk loads the two in interleaved rounds whose order alternates, so that a machine
whose speed drifts hits both alike. It prints, per round and as
medians over the rounds, req/s and the server's CPU per answered request, and the ratio
CHANGED / BASE (of the medians, and the median of the per-round ratios). It exits 0 whatever
the numbers. Needs git, wrk and Debian's redis-server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    CREATE,
    SERVER_KINDS,
    Procs,
    group_cpu,
    pinned,
    run_load,
    serve_and_wait,
    server_kind,
    start_redis,
    workspace,
    wrk_command,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Build:
    name: str
    rev: str | None  # None: the working tree
    tree: Path
    port: int = 0
    proc: subprocess.Popen[Any] | None = None
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def checkout(name: str, rev: str, tmp: Path) -> Path:
    tree = tmp / f"tree-{name}"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), rev],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not check out {rev!r}: {done.stderr.strip()}")
    return tree


def serve(procs: Procs, build: Build, redis_url: str | None, args: argparse.Namespace) -> None:
    # The build's own package first: the tree is the working directory and on PYTHONPATH.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(build.tree), "REDIS_URL": redis_url or "",
           "QUOTA_LOCAL_LEASES": "1" if args.leases == "on" else "0", "QUOTA_LIMIT": str(args.limit)}
    app = "memory_app" if args.store == "memory" else "guarded_app"
    build.proc, build.port = serve_and_wait(procs, app, app_dir=HERE, kind=args.kind, env=env, cwd=build.tree,
                                            workers=args.workers, cpu=args.cpus[0])


def load(procs: Procs, tmp: Path, build: Build, args: argparse.Namespace, measured: bool) -> None:
    assert build.proc is not None
    before = group_cpu(build.proc.pid)
    duration = args.duration if measured else args.warmup
    result = run_load(procs, pinned(wrk_command(CREATE, build.port, args.connections, duration, tmp), args.cpus[1]),
                      duration)
    after = group_cpu(build.proc.pid)
    answered = result["statuses"].get("201", 0)
    if not measured:
        return
    if answered == 0:
        raise SystemExit(f"{build.name} answered no 201 (statuses {dict(result['statuses'])})")
    build.rps.append(answered / result["seconds"])
    if before is not None and after is not None:
        build.cpu_us.append((after - before) * 1e6 / answered)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the revision to compare against (any git revision)")
    parser.add_argument("changed", nargs="?", help="the revision to measure (default: the working tree)")
    parser.add_argument("--store", choices=["redis", "memory"], default="redis",
                        help="guarded_app on Redis (redis), or memory_app on the embedded store (memory)")
    parser.add_argument("--leases", choices=["on", "off"], default="off", help="--store redis: local leases (off)")
    parser.add_argument("--limit", type=int, default=-1, help="every project's limit (-1: unlimited, no headers)")
    parser.add_argument("--server", choices=sorted(SERVER_KINDS), default="httptools",
                        help="uvicorn with uvloop + httptools (httptools) or asyncio + h11 (h11)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each loads both builds once (6)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per round and build (3)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load per build first (1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections (32)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per build (1)")
    args = parser.parse_args()
    if min(args.rounds, args.duration, args.connections, args.workers) < 1 or args.warmup < 1:
        parser.error("--rounds, --duration, --warmup, --connections and --workers must be at least 1")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    args.kind = server_kind(args.server)
    args.cpus = (0, 1) if args.workers == 1 and (os.cpu_count() or 1) >= 2 else (None, None)
    with workspace("quota-builds-") as (procs, tmp):
        return compare(procs, tmp, args)


def compare(procs: Procs, tmp: Path, args: argparse.Namespace) -> int:
    trees: list[Path] = []
    try:
        builds = []
        for name, rev in (("base", args.base), ("changed", args.changed)):
            tree = ROOT if rev is None else checkout(name, rev, tmp)
            if rev is not None:
                trees.append(tree)
            builds.append(Build(name, rev, tree))
        for build in builds:
            redis = start_redis(procs, tmp, build.name, cpu=args.cpus[1]).url if args.store == "redis" else None
            serve(procs, build, redis, args)
            load(procs, tmp, build, args, measured=False)
        labels = {b.name: b.rev or "working tree" for b in builds}
        store = f"Redis, leases {args.leases}" if args.store == "redis" else "memory store"
        print(f"base {labels['base']} vs changed {labels['changed']}; {store}; limit {args.limit}; "
              f"{args.kind.describe()}; "
              f"{args.workers} worker{'s' if args.workers > 1 else ''}; "
              f"wrk -t1 -c{args.connections}; {args.rounds} rounds x {args.duration} s, order alternating")
        for i in range(args.rounds):
            order = builds if i % 2 == 0 else builds[::-1]
            for build in order:
                load(procs, tmp, build, args, measured=True)
            print(f"  round {i + 1}: " + ", ".join(
                f"{b.name} {b.rps[-1]:,.0f} req/s {b.cpu_us[-1] if b.cpu_us else float('nan'):.0f} us/req"
                for b in order))
        base, changed = builds
        paired = statistics.median(c / b for b, c in zip(base.rps, changed.rps, strict=True))
        for build in builds:
            cpu = f"{statistics.median(build.cpu_us):.0f}" if build.cpu_us else "?"
            print(f"{build.name:8s} {labels[build.name]:>14s}: median {statistics.median(build.rps):,.0f} req/s, "
                  f"server CPU {cpu} us/req")
        print(f"changed / base: {statistics.median(changed.rps) / statistics.median(base.rps):.2f}x "
              f"(medians), {paired:.2f}x (paired)")
        return 0
    finally:
        procs.stop_all()  # the servers first: they run from the worktrees
        for tree in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
