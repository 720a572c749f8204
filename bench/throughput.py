"""Throughput and added latency of QuotaMiddleware: bare app, guarded route (local leases on and
off), unguarded route, and a minimal counting middleware for calibration, side by side, at 1 and
2 uvicorn workers, in one run.

One run starts two redis-servers on free loopback ports (one per guarded server, so that each
server's Redis commands are counted apart), and then, for each worker count of ``--workers``
(default ``1,2``), serves ``bench/apps.py`` with four uvicorn servers:

    bare        bare_app                                 no Redis
    minimal     minimal_app                              a dict in process (calibration)
    leases-on   guarded_app, QUOTA_LOCAL_LEASES=1         RedisStore + LeasingStore (local leases)
    leases-off  guarded_app, QUOTA_LOCAL_LEASES=0         RedisStore only (batched script calls)

and measures six targets:

    bare         POST /v1/secrets on bare                 baseline of the guarded targets
    minimal      POST /v1/secrets on minimal              the most any middleware reaches here
    leases-on    POST /v1/secrets on leases-on            goal >= 0.90x bare
    leases-off   POST /v1/secrets on leases-off           goal >= 0.75x bare
    bare-health  GET  /health     on bare                 baseline of unguarded
    unguarded    GET  /health     on leases-off           no rule matches; goal >= 0.97x bare-health

in two phases, each in interleaved rounds whose order rotates, so that a noisy machine hits every
target alike:

1. throughput: ``wrk -t1 -c32`` (closed loop, saturating) for ``--duration`` s per target and
   round: median req/s, the ratio of medians to the baseline and the median of per-round ratios
   (paired), and the server's CPU time per request (user+sys of its processes, from /proc);
2. latency at a fixed, moderate rate (``--rate``, default 500 req/s: open loop, well below what
   the bare app serves): a built-in asyncio generator in its own process sends on a fixed
   schedule over ``--latency-connections`` keep-alive connections and times every request from
   its *scheduled* send time (so a stalled server is not hidden by the generator waiting for it);
   p50 / p99 per target and the latency added versus the baseline.

Redis commands and script calls per guarded request come from ``INFO commandstats`` of each
guarded server's own redis-server, over each phase (warm-up included, after the last local-lease
block was settled), divided by the 201 answers of that phase.

With more than one worker the servers are N forked ``uvicorn.Server`` processes sharing one
listening socket, made with proto=IPPROTO_TCP. Plain ``uvicorn --workers N``
(``--multiworker uvicorn``) binds its socket with proto 0, so asyncio never sets TCP_NODELAY on
accepted connections and, with h11, every keep-alive request waits ~40 ms for a delayed ACK
(uvicorn issue #3149): every target then measures ~700 req/s, whatever the middleware does.

Throughput load comes from ``wrk`` when it is installed (``apt-get install wrk``), otherwise from
a small asyncio HTTP/1.1 keep-alive client in a subprocess (``--loader python``); it is slower, so
on a small machine it takes CPU from the server and lowers every number alike.

    .venv/bin/python bench/throughput.py [--workers 1,2] [--rounds N] [--duration S] [--rate R]

The plumbing (processes, redis-server, uvicorn, load generators, /proc) is bench/harness/.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from harness import (
    CREATE,
    HEALTH,
    SERVER_KINDS,
    Procs,
    RedisMeter,
    RedisPhase,
    RedisServer,
    Route,
    closed_loop_command,
    commandstats,
    count_errors,
    environment,
    fixed_rate_command,
    fmt,
    group_cpu,
    percentile,
    run_load,
    serve_and_wait,
    start_redis,
    stats_delta,
    workspace,
    wrk_command,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: LeasingStore's default block_seconds plus a margin: after this, every block of a phase is settled.
SETTLE_WAIT = 1.4


@dataclass
class Server:
    name: str
    app: str
    env: dict[str, str]
    redis: str | None = None  # the name of its redis-server (guarded servers only)
    port: int = 0
    proc: subprocess.Popen[Any] | None = None


@dataclass
class Target:
    name: str
    server: str
    route: Route
    baseline: str | None = None  # the target this one is compared with
    goal: float | None = None  # minimum ratio to the baseline the issue asks for
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU (user+sys) per answered request
    requests: int = 0
    warm_requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_us: list[int] = field(default_factory=list)  # fixed rate: answer time - scheduled send time
    lag_us: list[int] = field(default_factory=list)  # fixed rate: actual send time - scheduled send time
    latency_requests: int = 0
    latency_seconds: float = 0.0
    latency_errors: Counter[str] = field(default_factory=Counter)


def make_servers(redis_urls: dict[str, str]) -> list[Server]:
    return [
        Server("bare", "bare_app", {}),
        Server("minimal", "minimal_app", {}),
        Server("leases-on", "guarded_app", {"QUOTA_LOCAL_LEASES": "1", "REDIS_URL": redis_urls["leases-on"]},
               redis="leases-on"),
        Server("leases-off", "guarded_app", {"QUOTA_LOCAL_LEASES": "0", "REDIS_URL": redis_urls["leases-off"]},
               redis="leases-off"),
    ]


def make_targets() -> list[Target]:
    return [
        Target("bare", "bare", CREATE),
        # Calibration: the least any quota middleware does, in process (bench/apps.py).
        Target("minimal", "minimal", CREATE, baseline="bare"),
        Target("leases-on", "leases-on", CREATE, baseline="bare", goal=0.90),
        Target("leases-off", "leases-off", CREATE, baseline="bare", goal=0.75),
        Target("bare-health", "bare", HEALTH),
        Target("unguarded", "leases-off", HEALTH, baseline="bare-health", goal=0.97),
    ]


# -- the run --------------------------------------------------------------------------------------

def record(target: Target, result: dict[str, Any], cpu: float | None) -> float:
    statuses: Counter[str] = result["statuses"]
    ok = statuses.get(str(target.route.expected), 0)
    rps = ok / result["seconds"]
    target.rps.append(rps)
    if cpu is not None and ok:
        target.cpu_us.append(cpu * 1e6 / ok)
    target.requests += ok
    count_errors(target.errors, target.route.expected, result)
    return rps


def record_latency(target: Target, result: dict[str, Any]) -> None:
    target.latency_us += result["latency_us"]
    target.lag_us += result["lag_us"]
    target.latency_requests += result["statuses"].get(str(target.route.expected), 0)
    target.latency_seconds += result["seconds"]
    count_errors(target.latency_errors, target.route.expected, result)


@dataclass
class Phase:
    workers: int
    targets: list[Target]
    redis: dict[str, dict[str, RedisPhase]]  # server -> {"saturated": ..., "fixed": ...}
    other_redis: int  # Redis commands sent while the unguarded target was loaded
    committed: dict[str, tuple[int, int]]  # server -> (usage committed in Redis, 201 answers incl. warm-up)

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)


def run_phase(procs: Procs, tmp: Path, args: argparse.Namespace, workers: int, redises: dict[str, RedisServer],
              env: dict[str, str]) -> Phase:
    for r in redises.values():
        r.client.flushall()
    servers = {s.name: s for s in make_servers({name: r.url for name, r in redises.items()})}
    try:
        for s in servers.values():
            s.proc, s.port = serve_and_wait(procs, s.app, app_dir=HERE, kind=args.kind, env={**env, **s.env},
                                            cwd=tmp, workers=workers, multiworker=args.multiworker)
        return measure(procs, tmp, args, workers, servers, redises)
    finally:
        for s in servers.values():
            if s.proc is not None:
                procs.stop(s.proc)


def measure(procs: Procs, tmp: Path, args: argparse.Namespace, workers: int, servers: dict[str, Server],
            redises: dict[str, RedisServer]) -> Phase:
    targets = make_targets()
    guarded = {t.server: t for t in targets if t.server in redises and t.route == CREATE}
    meters = {name: RedisMeter(r) for name, r in redises.items()}
    print(f"\n== {workers} worker{'s' if workers > 1 else ''} per server: ports "
          + ", ".join(f"{s.name} {s.port}" for s in servers.values()), flush=True)

    def throughput_round(t: Target, duration: int) -> dict[str, Any]:
        port = servers[t.server].port
        if args.loader == "wrk":
            return run_load(procs, wrk_command(t.route, port, args.connections, duration, tmp), duration)
        return run_load(procs, closed_loop_command(t.route, port, args.connections, duration), duration)

    if args.warmup:
        for t in targets:
            result = throughput_round(t, args.warmup)
            t.warm_requests += result["statuses"].get(str(t.route.expected), 0)

    other_redis = 0
    for r in range(args.rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        line = []
        for t in order:
            server = servers[t.server]
            assert server.proc is not None
            watch = redises.get(t.server) if t.name == "unguarded" else None
            before = commandstats(watch.client) if watch else None
            cpu_before = group_cpu(server.proc.pid)
            result = throughput_round(t, args.duration)
            # Commits are handed over without waiting; let the last batch land before counting.
            time.sleep(0.05)
            cpu_after = group_cpu(server.proc.pid)
            if watch and before is not None:
                other_redis += sum(v for k, v in stats_delta(before, commandstats(watch.client)).items()
                                   if not k.endswith(":usec"))
            cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            line.append(f"{t.name} {fmt(record(t, result, cpu))}")
        print(f"  throughput round {r + 1}/{args.rounds}: " + ", ".join(line) + " req/s", flush=True)

    time.sleep(SETTLE_WAIT)  # the last local-lease blocks close and settle
    redis_phases: dict[str, dict[str, RedisPhase]] = {
        name: {"saturated": meters[name].take(t.requests + t.warm_requests)} for name, t in guarded.items()}

    for r in range(args.latency_rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        line = []
        for t in order:
            argv = fixed_rate_command(t.route, servers[t.server].port, args.rate, args.latency_connections,
                                      args.latency_duration)
            result = run_load(procs, argv, args.latency_duration)
            record_latency(t, result)
            line.append(f"{t.name} {percentile(result['latency_us'], 50) / 1000:.2f}/"
                        f"{percentile(result['latency_us'], 99) / 1000:.2f}")
        print(f"  latency round {r + 1}/{args.latency_rounds} at {fmt(args.rate)} req/s (p50/p99 ms): "
              + ", ".join(line), flush=True)
    if args.latency_rounds:
        time.sleep(SETTLE_WAIT)
        for name, t in guarded.items():
            redis_phases[name]["fixed"] = meters[name].take(t.latency_requests)

    committed = {}
    for name, t in guarded.items():
        client = redises[name].client
        used = sum(int(client.get(k) or 0) for k in client.scan_iter(match="quota:*:used", count=1000))
        committed[name] = (used, t.requests + t.warm_requests + t.latency_requests)
    return Phase(workers, targets, redis_phases, other_redis, committed)


# -- the report -----------------------------------------------------------------------------------

def ratios(phase: Phase, t: Target) -> tuple[float, float] | None:
    if not t.baseline:
        return None
    base = phase.target(t.baseline)
    return (statistics.median(t.rps) / statistics.median(base.rps),
            statistics.median(a / b for a, b in zip(t.rps, base.rps)))


def met(goal: float, ratio: float, paired: float) -> str:
    if ratio >= goal and paired >= goal:
        return "yes"
    if ratio < goal and paired < goal:
        return "NO"
    return "~"  # one of the two ratios meets the goal


def load_label(load: str, args: argparse.Namespace) -> str:
    if load == "saturated":
        return f"saturated ({'wrk' if args.loader == 'wrk' else 'python'} -c{args.connections})"
    return f"{fmt(args.rate)} req/s"


def report_phase(phase: Phase, args: argparse.Namespace) -> None:
    w = phase.workers
    print(f"\n-- {w} worker{'s' if w > 1 else ''}: throughput (req/s over {args.rounds} rounds x {args.duration} s) --")
    print(f"{'target':<12} {'route':<17} {'server':<11} {'median':>7} {'min':>7} {'max':>7} {'vs':<12} "
          f"{'ratio':>6} {'paired':>6} {'goal':>7} {'met':>4} {'CPU us/req':>10}  errors")
    for t in phase.targets:
        ratio = paired = goal = ok = vs = ""
        r = ratios(phase, t)
        if r is not None:
            vs, ratio, paired = t.baseline or "", f"{r[0]:.2f}x", f"{r[1]:.2f}x"
        if r is not None and t.goal is not None:
            goal, ok = f">={t.goal:.2f}", met(t.goal, *r)
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(t.errors.items())) or "0"
        cpu = f"{statistics.median(t.cpu_us):.0f}" if t.cpu_us else "n/a"
        print(f"{t.name:<12} {str(t.route):<17} {t.server:<11} {fmt(statistics.median(t.rps)):>7} {fmt(min(t.rps)):>7} "
              f"{fmt(max(t.rps)):>7} {vs:<12} {ratio:>6} {paired:>6} {goal:>7} {ok:>4} {cpu:>10}  {errors}")

    if args.latency_rounds:
        report_latency(phase, args)
    report_redis(phase, args)


def report_latency(phase: Phase, args: argparse.Namespace) -> None:
    w = phase.workers
    print(f"\n-- {w} worker{'s' if w > 1 else ''}: latency at {fmt(args.rate)} req/s, open loop "
          f"({args.latency_rounds} rounds x {args.latency_duration:g} s, {args.latency_connections} connections; "
          f"ms from the scheduled send time) --")
    print(f"{'target':<12} {'route':<17} {'answered':>8} {'req/s':>6} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>7} "
          f"{'vs':<12} {'+p50':>6} {'+p99':>6}  {'gen lag p50/p99':>15}  errors")
    for t in phase.targets:
        lat = t.latency_us
        p50, p90, p99 = (percentile(lat, q) / 1000 for q in (50, 90, 99))
        vs = add50 = add99 = ""
        if t.baseline:
            base = phase.target(t.baseline).latency_us
            vs = t.baseline
            add50 = f"{p50 - percentile(base, 50) / 1000:+.2f}"
            add99 = f"{p99 - percentile(base, 99) / 1000:+.2f}"
        lag = f"{percentile(t.lag_us, 50) / 1000:.2f}/{percentile(t.lag_us, 99) / 1000:.2f}"
        rate = t.latency_requests / t.latency_seconds if t.latency_seconds else 0.0
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(t.latency_errors.items())) or "0"
        print(f"{t.name:<12} {str(t.route):<17} {t.latency_requests:>8,} {rate:>6.0f} {p50:>6.2f} {p90:>6.2f} {p99:>6.2f} "
              f"{max(lat, default=0) / 1000:>7.2f} {vs:<12} {add50:>6} {add99:>6}  {lag:>15}  {errors}")


def report_redis(phase: Phase, args: argparse.Namespace) -> None:
    w = phase.workers
    print(f"\n-- {w} worker{'s' if w > 1 else ''}: Redis per guarded request (each guarded server has its own "
          f"redis-server; over the phase, warm-up included) --")
    print(f"{'target':<12} {'load':<22} {'answered':>9} {'cmds/req':>8} {'scripts/req':>11} {'req/script':>10} "
          f"{'script us/req':>13} {'redis CPU us/req':>16}  by command (per request)")
    for name, by_load in phase.redis.items():
        for load, rp in by_load.items():
            n = max(rp.requests, 1)
            label = load_label(load, args)
            usec = rp.delta["evalsha:usec"] + rp.delta["eval:usec"]
            cpu = f"{rp.cpu * 1e6 / n:.1f}" if rp.cpu is not None else "n/a"
            per_script = f"{rp.requests / rp.scripts:.1f}" if rp.scripts else "-"
            by_command = ", ".join(f"{k} {v / n:.3f}" for k, v in sorted(rp.delta.items()) if not k.endswith(":usec"))
            print(f"{name:<12} {label:<22} {rp.requests:>9,} {rp.commands / n:>8.3f} {rp.scripts / n:>11.4f} "
                  f"{per_script:>10} {usec / n:>13.2f} {cpu:>16}  {by_command}")
    checks = "; ".join(f"{name}: {used:,} committed / {answered:,} answered 201"
                       for name, (used, answered) in phase.committed.items())
    print(f"Redis commands while 'unguarded' was loaded: {phase.other_redis}. Usage in Redis after the phase: {checks} "
          f"(a few requests in flight when a load generator stopped are committed but not counted as answered)")


def report_summary(phases: list[Phase], args: argparse.Namespace) -> None:
    cols = [f"{p.workers} worker{'s' if p.workers > 1 else ''}" for p in phases]
    print("\n== Summary, side by side ==")
    print(f"Throughput: median req/s over {args.rounds} rounds x {args.duration} s; ratio of medians / median of "
          f"per-round (paired) ratios to the baseline")
    head = f"{'target':<12} {'route':<17} {'baseline':<12}"
    for c in cols:
        head += f" | {c + ' req/s':>15} {'ratio':>6} {'paired':>6} {'met':>4}"
    print(head + " | goal")
    for t0 in phases[0].targets:
        row = f"{t0.name:<12} {str(t0.route):<17} {t0.baseline or '':<12}"
        for p in phases:
            t = p.target(t0.name)
            r = ratios(p, t)
            if r is None:
                row += f" | {fmt(statistics.median(t.rps)):>15} {'':>6} {'':>6} {'':>4}"
            else:
                ok = met(t.goal, *r) if t.goal is not None else ""
                row += f" | {fmt(statistics.median(t.rps)):>15} {r[0]:>5.2f}x {r[1]:>5.2f}x {ok:>4}"
        print(row + (f" | >= {t0.goal:.2f}x {t0.baseline}" if t0.goal else
                     " | (calibration: no middleware can do less)" if t0.name == "minimal" else " |"))

    if args.latency_rounds:
        summary_latency(phases, args, cols)
    summary_redis(phases, args, cols)


def summary_latency(phases: list[Phase], args: argparse.Namespace, cols: list[str]) -> None:
    print(f"\nAdded latency at {fmt(args.rate)} req/s (open loop): p50 and p99 in ms, "
          f"and the difference to the baseline")
    head = f"{'target':<12} {'route':<17} {'baseline':<12}"
    for c in cols:
        head += f" | {c + ' p50':>13} {'p99':>6} {'+p50':>6} {'+p99':>6}"
    print(head)
    for t0 in phases[0].targets:
        row = f"{t0.name:<12} {str(t0.route):<17} {t0.baseline or '':<12}"
        for p in phases:
            t = p.target(t0.name)
            p50, p99 = percentile(t.latency_us, 50) / 1000, percentile(t.latency_us, 99) / 1000
            if t.baseline:
                base = p.target(t.baseline).latency_us
                add = (f"{p50 - percentile(base, 50) / 1000:>+6.2f} {p99 - percentile(base, 99) / 1000:>+6.2f}")
            else:
                add = f"{'':>6} {'':>6}"
            row += f" | {p50:>13.2f} {p99:>6.2f} {add}"
        print(row)


def summary_redis(phases: list[Phase], args: argparse.Namespace, cols: list[str]) -> None:
    print("\nRedis per guarded request: commands (incl. those run inside the Lua script) / script calls (EVALSHA)")
    head = f"{'target':<12} {'load':<22}"
    for c in cols:
        head += f" | {c + ' cmds/req':>18} {'scripts/req':>11}"
    print(head)
    for name in phases[0].redis:
        for load in phases[0].redis[name]:
            label = load_label(load, args)
            row = f"{name:<12} {label:<22}"
            for p in phases:
                rp = p.redis[name][load]
                n = max(rp.requests, 1)
                row += f" | {rp.commands / n:>18.3f} {rp.scripts / n:>11.4f}"
            print(row)


def parse_workers(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,2; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts must be at least 1")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=parse_workers, default=[1, 2],
                        help="uvicorn worker processes per server, one phase per count (1,2)")
    parser.add_argument("--connections", type=int, default=32, help="throughput: keep-alive connections (32)")
    parser.add_argument("--duration", type=int, default=2, help="throughput: seconds per round and target (2)")
    parser.add_argument("--rounds", type=int, default=6, help="throughput: rounds; each loads every target once (6)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load per target first (1)")
    parser.add_argument("--rate", type=float, default=500.0, help="latency: requests per second, fixed (500)")
    parser.add_argument("--latency-duration", type=float, default=3.0, help="latency: seconds per round and target (3)")
    parser.add_argument("--latency-rounds", type=int, default=2, help="latency: rounds (2); 0 skips the latency phase")
    parser.add_argument("--latency-connections", type=int, default=8, help="latency: keep-alive connections (8)")
    parser.add_argument("--multiworker", choices=["prefork", "prefork-shared", "uvicorn"], default="prefork",
                        help="with more than one worker: fork N uvicorn servers, each on its own SO_REUSEPORT "
                             "socket made with IPPROTO_TCP (prefork); the same on one shared socket, where one "
                             "worker tends to accept every connection (prefork-shared); or plain "
                             "`uvicorn --workers N`, which also loses TCP_NODELAY (uvicorn #3149)")
    parser.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto",
                        help="throughput load generator: wrk if installed (auto), or the built-in asyncio client")
    args = parser.parse_args()
    if min(args.connections, args.duration, args.rounds, args.latency_connections) < 1 or args.warmup < 0 \
            or args.latency_rounds < 0 or args.rate <= 0 or args.latency_duration <= 0:
        parser.error("--connections, --duration, --rounds, --latency-connections must be at least 1; "
                     "--rate and --latency-duration positive")
    if args.loader == "auto":
        args.loader = "wrk" if shutil.which("wrk") else "python"
    elif args.loader == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk); use --loader python")
    # uvloop and httptools where installed (uvicorn[standard], the bench extra), as uvicorn itself picks.
    standard = all(importlib.util.find_spec(m) for m in ("uvloop", "httptools"))
    args.kind = SERVER_KINDS["httptools" if standard else "h11"]

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both unwind through the finally below.
    signal.signal(signal.SIGTERM, terminated)
    try:
        with workspace("quota-bench-") as (procs, tmp):
            return run(procs, tmp, args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


def run(procs: Procs, tmp: Path, args: argparse.Namespace) -> int:
    started = time.monotonic()
    print(environment("uvicorn", "uvloop", "httptools", "starlette", "redis"))
    multi = {"prefork": "prefork launcher (uvicorn.Server per worker, each on its own SO_REUSEPORT socket)",
             "prefork-shared": "prefork launcher (uvicorn.Server per worker, one shared socket)",
             "uvicorn": "uvicorn CLI --workers"}[args.multiworker]
    print(f"{args.kind.describe()}; workers {','.join(map(str, args.workers))}: 1 via the uvicorn CLI, more via {multi}")
    print(f"throughput: {'wrk -t1' if args.loader == 'wrk' else 'built-in asyncio client (separate process)'}, "
          f"{args.connections} keep-alive connections, {args.rounds} rounds x {args.duration} s per target; "
          f"latency: built-in open-loop generator at {fmt(args.rate)} req/s, {args.latency_connections} connections, "
          f"{args.latency_rounds} rounds x {args.latency_duration:g} s per target")

    redises = {name: start_redis(procs, tmp, name) for name in ("leases-on", "leases-off")}
    # The servers import the middleware Python finds first: PYTHONPATH's, else this tree's editable
    # install (they run in the scratch directory, so that no tree's working directory comes first).
    env = dict(os.environ)
    env.pop("QUOTA_LOCAL_LEASES", None)
    phases = []
    for workers in args.workers:
        phase = run_phase(procs, tmp, args, workers, redises, env)
        report_phase(phase, args)
        phases.append(phase)
    report_summary(phases, args)
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    for r in redises.values():
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
