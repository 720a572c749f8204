"""Throughput, worker CPU per request and added latency of QuotaMiddleware behind a real uvicorn,
against the bare app, a null pass-through middleware and a minimal counting middleware, side by
side in one run.

    .venv/bin/python bench/throughput.py                          # 1 worker, ~2.5 min
    .venv/bin/python bench/throughput.py --server h11             # asyncio + h11 instead
    .venv/bin/python bench/throughput.py --targets memory --rounds 3 --duration 2 --latency-rounds 0

Servers (``bench/apps.py``, one uvicorn each, ``--workers`` processes; uvloop + httptools by
default, what ``uvicorn[standard]`` runs in production; ``--server h11`` for asyncio + h11):

    bare        bare_app          the Starlette app: parse the JSON body, answer 201
    null        null_app          the app behind a pure ASGI pass-through
    minimal     minimal_app       the app behind a dict counter, a limit check and one header
    awaited     awaited_app       the app behind one batched Redis round trip per request (a PING)
    memory      memory_app        QuotaMiddleware, the embedded default store (MemoryStore)
    leases-on   guarded_app       QuotaMiddleware, RedisStore + local leases (QUOTA_LOCAL_LEASES=1)
    leases-off  guarded_app       QuotaMiddleware, RedisStore only, batched script calls

and targets, loaded in interleaved rounds whose order rotates, so that a noisy machine hits every
target alike:

    bare         POST /v1/secrets on bare        the baseline
    null         POST /v1/secrets on null        what being wrapped at all costs
    minimal      POST /v1/secrets on minimal     calibration: about the most a quota middleware reaches
    awaited      POST /v1/secrets on awaited     calibration: about the most leases off can reach
    memory       POST /v1/secrets on memory      goal >= 0.90x bare
    leases-on    POST /v1/secrets on leases-on   goal >= 0.90x bare
    leases-off   POST /v1/secrets on leases-off  goal >= 0.70x bare
    bare-health  GET  /health     on bare        baseline of unguarded
    unguarded    GET  /health     on leases-off  no rule matches; goal >= 0.97x bare-health

Phases, per worker count of ``--workers``:

1. throughput: ``wrk -t1 -c32`` (closed loop, saturating) for ``--duration`` s per target and
   round. Per target: median req/s; the worker's CPU per answered request (user + system of the
   server's process group, from /proc); the ratio to the baseline (of the medians, and the median
   of the per-round ratios: ``paired``); the paired ratio to ``minimal``; the paired difference of
   worker CPU to the baseline (``+CPU``: what the middleware costs the worker per request);
2. latency at a fixed, moderate rate (``--rate``): the built-in open-loop generator times every
   request from its *scheduled* send time; p50 / p99 and the latency added versus the baseline.

Redis commands and script calls per guarded request come from ``INFO commandstats`` of each
guarded server's own redis-server, over each phase, divided by the 201 answers of that phase.
Load comes from ``wrk`` when installed, else from the built-in closed-loop client
(``--loader python``; much more CPU). The plumbing (processes, redis-server, uvicorn, load
generators, /proc) is bench/harness/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    median,
    paired_difference,
    paired_ratio,
    percentile,
    pinned,
    ratio_of_medians,
    run_load,
    serve_and_wait,
    server_kind,
    start_redis,
    stats_delta,
    workspace,
    wrk_command,
)

HERE = Path(__file__).resolve().parent
#: LeasingStore's default block_seconds plus a margin: after this, every block of a phase is settled.
SETTLE_WAIT = 1.4
CALIBRATION = "minimal"
#: The floor of a store awaited per request: the Redis targets are also compared with it.
FLOOR = "awaited"


@dataclass
class Server:
    name: str
    app: str
    env: dict[str, str]
    redis: str | None = None  # the name of its redis-server (the servers on Redis only)
    counts: bool = True  # its Redis holds the middleware's usage, checked after each phase
    port: int = 0
    proc: subprocess.Popen[Any] | None = None


@dataclass
class Target:
    name: str
    server: str
    route: Route
    baseline: str | None = None  # the target this one is compared with
    goal: float | None = None  # minimum ratio to the baseline the project asks for
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # worker CPU (user+sys) per answered request
    requests: int = 0
    warm_requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_us: list[int] = field(default_factory=list)  # fixed rate: answer time - scheduled send time
    lag_us: list[int] = field(default_factory=list)  # fixed rate: actual send time - scheduled send time
    latency_requests: int = 0
    latency_seconds: float = 0.0
    latency_errors: Counter[str] = field(default_factory=Counter)


SERVERS = {
    "bare": Server("bare", "bare_app", {}),
    "null": Server("null", "null_app", {}),
    "minimal": Server("minimal", "minimal_app", {}),
    "awaited": Server("awaited", "awaited_app", {}, redis="awaited", counts=False),  # a PING per round trip
    "memory": Server("memory", "memory_app", {}),
    "leases-on": Server("leases-on", "guarded_app", {"QUOTA_LOCAL_LEASES": "1"}, redis="leases-on"),
    "leases-off": Server("leases-off", "guarded_app", {"QUOTA_LOCAL_LEASES": "0"}, redis="leases-off"),
}


def all_targets() -> list[Target]:
    return [
        Target("bare", "bare", CREATE),
        Target("null", "null", CREATE, baseline="bare"),
        Target(CALIBRATION, "minimal", CREATE, baseline="bare"),
        Target("awaited", "awaited", CREATE, baseline="bare"),
        Target("memory", "memory", CREATE, baseline="bare", goal=0.90),
        Target("leases-on", "leases-on", CREATE, baseline="bare", goal=0.90),
        Target("leases-off", "leases-off", CREATE, baseline="bare", goal=0.70),
        Target("bare-health", "bare", HEALTH),
        Target("unguarded", "leases-off", HEALTH, baseline="bare-health", goal=0.97),
    ]


TARGET_NAMES = [t.name for t in all_targets()]


def make_targets(chosen: list[str]) -> list[Target]:
    """The chosen targets, with their baselines and the calibration target, in the usual order."""
    wanted = set(chosen)
    every = {t.name: t for t in all_targets()}
    for name in chosen:
        baseline = every[name].baseline
        if baseline:
            wanted.update((baseline, CALIBRATION))
    return [t for t in all_targets() if t.name in wanted]


# -- the run --------------------------------------------------------------------------------------

def record(target: Target, result: dict[str, Any], cpu: float | None) -> float:
    ok = result["statuses"].get(str(target.route.expected), 0)
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

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


def cpus(args: argparse.Namespace, workers: int) -> tuple[int | None, int | None]:
    """(the servers' CPU, the load generators' CPU) with --pin and one worker; else (None, None)."""
    if args.pin and workers == 1 and (os.cpu_count() or 1) >= 2:
        return 0, 1
    return None, None


def run_phase(procs: Procs, tmp: Path, args: argparse.Namespace, workers: int, redises: dict[str, RedisServer],
              env: dict[str, str]) -> Phase:
    for r in redises.values():
        r.client.flushall()
    targets = make_targets(args.targets)
    servers = {name: Server(**{**SERVERS[name].__dict__}) for name in dict.fromkeys(t.server for t in targets)}
    try:
        for s in servers.values():
            extra = {"REDIS_URL": redises[s.redis].url} if s.redis else {}
            s.proc, s.port = serve_and_wait(procs, s.app, app_dir=HERE, kind=args.kind,
                                            env={**env, **s.env, **extra}, cwd=tmp, workers=workers,
                                            multiworker=args.multiworker, cpu=cpus(args, workers)[0])
        return measure(procs, tmp, args, workers, targets, servers, redises)
    finally:
        for s in servers.values():
            if s.proc is not None:
                procs.stop(s.proc)


def measure(procs: Procs, tmp: Path, args: argparse.Namespace, workers: int, targets: list[Target],
            servers: dict[str, Server], redises: dict[str, RedisServer]) -> Phase:
    guarded = {t.server: t for t in targets if SERVERS[t.server].redis and t.route == CREATE}
    meters = {name: RedisMeter(redises[name]) for name in guarded}
    server_cpu, load_cpu = cpus(args, workers)
    pins = "" if server_cpu is None else f"; servers on CPU {server_cpu}, load generators on CPU {load_cpu}"
    print(f"\n== {workers} worker{'s' if workers > 1 else ''} per server{pins}: ports "
          + ", ".join(f"{s.name} {s.port}" for s in servers.values()), flush=True)

    def throughput_round(t: Target, duration: int) -> dict[str, Any]:
        port = servers[t.server].port
        if args.loader == "wrk":
            argv = wrk_command(t.route, port, args.connections, duration, tmp)
        else:
            argv = closed_loop_command(t.route, port, args.connections, duration)
        return run_load(procs, pinned(argv, load_cpu), duration)

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
            watch = redises.get(server.redis) if t.name == "unguarded" and server.redis else None
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
            rps = record(t, result, cpu)
            line.append(f"{t.name} {fmt(rps)}" + (f"/{t.cpu_us[-1]:.0f}us" if t.cpu_us else ""))
        print(f"  throughput round {r + 1}/{args.rounds} (req/s / worker CPU per request): " + ", ".join(line),
              flush=True)

    time.sleep(SETTLE_WAIT)  # the last local-lease blocks close and settle
    redis_phases: dict[str, dict[str, RedisPhase]] = {
        name: {"saturated": meters[name].take(t.requests + t.warm_requests)} for name, t in guarded.items()}

    for r in range(args.latency_rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        line = []
        for t in order:
            argv = fixed_rate_command(t.route, servers[t.server].port, args.rate, args.latency_connections,
                                      args.latency_duration)
            result = run_load(procs, pinned(argv, load_cpu), args.latency_duration)
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
        if not SERVERS[name].counts:
            continue
        client = redises[name].client
        used = sum(int(client.get(k) or 0) for k in client.scan_iter(match="quota:*:used", count=1000))
        committed[name] = (used, t.requests + t.warm_requests + t.latency_requests)
    return Phase(workers, targets, redis_phases, other_redis, committed)


# -- the report -----------------------------------------------------------------------------------

@dataclass
class Row:
    """One target's throughput figures against its baseline and the calibration target."""

    rps: float
    cpu: float  # worker CPU us per request (median over rounds)
    ratio: float | None = None  # ratio of medians to the baseline
    paired: float | None = None  # median of per-round ratios to the baseline
    added_cpu: float | None = None  # median of per-round worker CPU differences to the baseline
    vs_minimal: float | None = None  # median of per-round ratios to minimal
    vs_floor: float | None = None  # median of per-round ratios to awaited (the Redis targets)


def row(phase: Phase, t: Target) -> Row:
    out = Row(median(t.rps), median(t.cpu_us))
    base = phase.target(t.baseline) if t.baseline else None
    if base is not None:
        out.ratio, out.paired = ratio_of_medians(t.rps, base.rps), paired_ratio(t.rps, base.rps)
        if t.cpu_us and base.cpu_us:
            out.added_cpu = paired_difference(t.cpu_us, base.cpu_us)
    calibration = phase.target(CALIBRATION)
    if calibration is not None and t.route == calibration.route and t is not calibration:
        out.vs_minimal = paired_ratio(t.rps, calibration.rps)
    floor = phase.target(FLOOR)
    if floor is not None and SERVERS[t.server].redis and t.route == floor.route and t is not floor:
        out.vs_floor = paired_ratio(t.rps, floor.rps)
    return out


def met(goal: float, ratio: float, paired: float) -> str:
    if ratio >= goal and paired >= goal:
        return "yes"
    if ratio < goal and paired < goal:
        return "NO"
    return "~"  # one of the two ratios meets the goal


def opt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def load_label(load: str, args: argparse.Namespace) -> str:
    if load == "saturated":
        return f"saturated ({'wrk' if args.loader == 'wrk' else 'python'} -c{args.connections})"
    return f"{fmt(args.rate)} req/s"


def report_phase(phase: Phase, args: argparse.Namespace) -> None:
    w = phase.workers
    print(f"\n-- {w} worker{'s' if w > 1 else ''}: throughput (req/s over {args.rounds} rounds x {args.duration} s; "
          f"worker CPU us per request; ratios to the baseline: of the medians, and paired per round) --")
    print(f"{'target':<12} {'route':<17} {'median':>7} {'min':>7} {'max':>7} {'CPU us':>7} {'+CPU':>6} "
          f"{'vs':<12} {'ratio':>6} {'paired':>6} {'/minimal':>8} {'goal':>6} {'met':>4}  errors")
    for t in phase.targets:
        r = row(phase, t)
        goal = ok = ""
        if t.goal is not None and r.ratio is not None and r.paired is not None:
            goal, ok = f">={t.goal:.2f}", met(t.goal, r.ratio, r.paired)
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(t.errors.items())) or "0"
        print(f"{t.name:<12} {str(t.route):<17} {fmt(r.rps):>7} {fmt(min(t.rps)):>7} {fmt(max(t.rps)):>7} "
              f"{r.cpu:>7.1f} {opt(r.added_cpu, '+6.1f'):>6} {t.baseline or '':<12} {opt(r.ratio, '.2f', 'x'):>6} "
              f"{opt(r.paired, '.2f', 'x'):>6} {opt(r.vs_minimal, '.2f', 'x'):>8} {goal:>6} {ok:>4}  {errors}")
    if args.latency_rounds:
        report_latency(phase, args)
    if phase.redis:
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
        base = phase.target(t.baseline) if t.baseline else None
        if base is not None:
            vs = base.name
            add50 = f"{p50 - percentile(base.latency_us, 50) / 1000:+.2f}"
            add99 = f"{p99 - percentile(base.latency_us, 99) / 1000:+.2f}"
        lag = f"{percentile(t.lag_us, 50) / 1000:.2f}/{percentile(t.lag_us, 99) / 1000:.2f}"
        rate = t.latency_requests / t.latency_seconds if t.latency_seconds else 0.0
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(t.latency_errors.items())) or "0"
        print(f"{t.name:<12} {str(t.route):<17} {t.latency_requests:>8,} {rate:>6.0f} {p50:>6.2f} {p90:>6.2f} "
              f"{p99:>6.2f} {max(lat, default=0) / 1000:>7.2f} {vs:<12} {add50:>6} {add99:>6}  {lag:>15}  {errors}")


def report_redis(phase: Phase, args: argparse.Namespace) -> None:
    w = phase.workers
    print(f"\n-- {w} worker{'s' if w > 1 else ''}: Redis per guarded request (each guarded server has its own "
          f"redis-server; over the phase, warm-up included) --")
    print(f"{'target':<12} {'load':<22} {'answered':>9} {'cmds/req':>8} {'scripts/req':>11} {'req/script':>10} "
          f"{'script us/req':>13} {'redis CPU us/req':>16}  by command (per request)")
    for name, by_load in phase.redis.items():
        for load, rp in by_load.items():
            n = max(rp.requests, 1)
            usec = rp.delta["evalsha:usec"] + rp.delta["eval:usec"]
            cpu = f"{rp.cpu * 1e6 / n:.1f}" if rp.cpu is not None else "n/a"
            per_script = f"{rp.requests / rp.scripts:.1f}" if rp.scripts else "-"
            by_command = ", ".join(f"{k} {v / n:.3f}" for k, v in sorted(rp.delta.items()) if not k.endswith(":usec"))
            print(f"{name:<12} {load_label(load, args):<22} {rp.requests:>9,} {rp.commands / n:>8.3f} "
                  f"{rp.scripts / n:>11.4f} {per_script:>10} {usec / n:>13.2f} {cpu:>16}  {by_command}")
    checks = "; ".join(f"{name}: {used:,} committed / {answered:,} answered 201"
                       for name, (used, answered) in phase.committed.items())
    if phase.target("unguarded") is not None:
        print(f"Redis commands while 'unguarded' was loaded: {phase.other_redis}.", end=" ")
    if checks:  # none when only awaited ran on Redis
        print(f"Usage in Redis after the phase: {checks} (a few requests in flight when a load generator stopped "
              f"are committed but not counted as answered)")
    else:
        print()


def report_summary(phases: list[Phase], args: argparse.Namespace) -> None:
    cols = [f"{p.workers} worker{'s' if p.workers > 1 else ''}" for p in phases]
    print("\n== Summary ==")
    print(f"{args.kind.describe()}; median req/s and worker CPU us/request over {args.rounds} rounds x "
          f"{args.duration} s; ratio to the baseline (of the medians / paired), paired ratio to {CALIBRATION}")
    head = f"{'target':<12} {'baseline':<12}"
    for c in cols:
        head += (f" | {c + ' req/s':>15} {'CPU us':>7} {'+CPU':>6} {'ratio':>6} {'paired':>6} {'/minimal':>8}"
                 f" {'/awaited':>8} {'met':>4}")
    print(head + " | goal")
    for t0 in phases[0].targets:
        line = f"{t0.name:<12} {t0.baseline or '':<12}"
        for p in phases:
            t = p.target(t0.name)
            assert t is not None
            r = row(p, t)
            ok = met(t.goal, r.ratio, r.paired) if t.goal is not None and r.ratio and r.paired else ""
            line += (f" | {fmt(r.rps):>15} {r.cpu:>7.1f} {opt(r.added_cpu, '+6.1f'):>6} {opt(r.ratio, '.2f', 'x'):>6} "
                     f"{opt(r.paired, '.2f', 'x'):>6} {opt(r.vs_minimal, '.2f', 'x'):>8} "
                     f"{opt(r.vs_floor, '.2f', 'x'):>8} {ok:>4}")
        print(line + (f" | >= {t0.goal:.2f}x {t0.baseline}" if t0.goal else
                      " | (calibration)" if t0.name in (CALIBRATION, FLOOR) else " |"))
    if args.latency_rounds:
        print(f"\nAdded latency at {fmt(args.rate)} req/s (open loop): p50 and p99 in ms, and the difference to the "
              f"baseline")
        head = f"{'target':<12} {'baseline':<12}"
        for c in cols:
            head += f" | {c + ' p50':>13} {'p99':>6} {'+p50':>6} {'+p99':>6}"
        print(head)
        for t0 in phases[0].targets:
            line = f"{t0.name:<12} {t0.baseline or '':<12}"
            for p in phases:
                t = p.target(t0.name)
                assert t is not None
                p50, p99 = percentile(t.latency_us, 50) / 1000, percentile(t.latency_us, 99) / 1000
                base = p.target(t.baseline) if t.baseline else None
                add = f"{'':>6} {'':>6}"
                if base is not None:
                    b50, b99 = percentile(base.latency_us, 50) / 1000, percentile(base.latency_us, 99) / 1000
                    add = f"{p50 - b50:>+6.2f} {p99 - b99:>+6.2f}"
                line += f" | {p50:>13.2f} {p99:>6.2f} {add}"
            print(line)


def save_results(path: Path, phases: list[Phase], args: argparse.Namespace) -> None:
    """Add this run to ``path`` in the format bench/plots.py reads (ratios to each target's baseline)."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {
        "about": "bench/throughput.py --json: each run's ratios to its baseline, [ratio of the medians, paired]",
        "runs": []}
    results["benchmark"] = (f"bench/throughput.py: {args.kind.describe()}, wrk with {args.connections} keep-alive "
                            f"connections, limit {args.limit}, {args.rounds} rounds x {args.duration} s")
    results["machine"] = f"{os.cpu_count()} cores, shared"
    targets = [t for t in phases[0].targets if t.baseline]
    results["targets"] = {t.name: t.name for t in targets}
    results["goals"] = {t.name: t.goal for t in targets if t.goal is not None}
    run: dict[str, Any] = {"label": f"{git_revision()} {time.strftime('%m-%d %H:%M')}",
                           "date": time.strftime("%Y-%m-%d"), "bare_rps": {}, "ratios": {}, "cpu_us": {}}
    for phase in phases:
        workers = str(phase.workers)
        bare = phase.target("bare")
        if bare is not None:
            run["bare_rps"][workers] = round(row(phase, bare).rps)
        for t in targets:
            r = row(phase, t)
            if r.ratio is not None and r.paired is not None:
                run["ratios"].setdefault(t.name, {})[workers] = [round(r.ratio, 3), round(r.paired, 3)]
            run["cpu_us"].setdefault(t.name, {})[workers] = round(r.cpu, 1)
    results["runs"].append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results added to {path} (bench/plots.py {path} --out docs/img draws them)")


def git_revision() -> str:
    done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def parse_list(text: str, allowed: list[str] | None = None) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items or (allowed is not None and any(i not in allowed for i in items)):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {', '.join(allowed or [])}; "
                                         f"got {text!r}")
    return items


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
    parser.add_argument("--server", choices=sorted(SERVER_KINDS), default="httptools",
                        help="uvicorn with uvloop + httptools, as uvicorn[standard] runs in production (httptools), "
                             "or with asyncio + h11 (h11)")
    parser.add_argument("--targets", type=lambda s: parse_list(s, TARGET_NAMES), default=TARGET_NAMES,
                        help="comma-separated targets (all); their baselines and minimal are added")
    parser.add_argument("--limit", type=int, default=-1,
                        help="every project's limit on the guarded servers (-1: unlimited, no RateLimit headers; "
                             "a large number: never reached, RateLimit headers sent)")
    parser.add_argument("--workers", type=parse_workers, default=[1],
                        help="uvicorn worker processes per server, one phase per count (1; e.g. 1,2)")
    parser.add_argument("--connections", type=int, default=32, help="throughput: keep-alive connections (32)")
    parser.add_argument("--duration", type=int, default=3, help="throughput: seconds per round and target (3)")
    parser.add_argument("--rounds", type=int, default=5, help="throughput: rounds; each loads every target once (5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load per target first (1)")
    parser.add_argument("--rate", type=float, default=500.0, help="latency: requests per second, fixed (500)")
    parser.add_argument("--latency-duration", type=float, default=2.0, help="latency: seconds per round and target (2)")
    parser.add_argument("--latency-rounds", type=int, default=1, help="latency: rounds (1); 0 skips the latency phase")
    parser.add_argument("--latency-connections", type=int, default=8, help="latency: keep-alive connections (8)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="with one worker: the servers on CPU 0, wrk, the latency generator and redis-server on "
                             "CPU 1 (taskset), so that the worker is never preempted by its own load (on)")
    parser.add_argument("--multiworker", choices=["prefork", "prefork-shared", "uvicorn"], default="prefork",
                        help="with more than one worker: fork N uvicorn servers, each on its own SO_REUSEPORT "
                             "socket made with IPPROTO_TCP (prefork); the same on one shared socket, where one "
                             "worker tends to accept every connection (prefork-shared); or plain "
                             "`uvicorn --workers N`, which also loses TCP_NODELAY (uvicorn #3149)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also add this run to a results file (created if missing) that bench/plots.py draws "
                             "the documentation's plots from")
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
    args.kind = server_kind(args.server)

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
    print(f"{args.kind.describe()}; workers {','.join(map(str, args.workers))}: 1 via the uvicorn CLI, more via "
          f"{multi}; guarded limit {args.limit}")
    print(f"throughput: {'wrk -t1' if args.loader == 'wrk' else 'built-in asyncio client (separate process)'}, "
          f"{args.connections} keep-alive connections, {args.rounds} rounds x {args.duration} s per target; "
          f"latency: built-in open-loop generator at {fmt(args.rate)} req/s, {args.latency_connections} connections, "
          f"{args.latency_rounds} rounds x {args.latency_duration:g} s per target")

    needed = {SERVERS[t.server].redis for t in make_targets(args.targets)} - {None}
    redis_cpu = cpus(args, max(args.workers))[1]
    redises = {name: start_redis(procs, tmp, name, cpu=redis_cpu) for name in sorted(n for n in needed if n)}
    # The servers import the middleware Python finds first: PYTHONPATH's, else this tree's editable
    # install (they run in the scratch directory, so that no tree's working directory comes first).
    env = {**os.environ, "QUOTA_LIMIT": str(args.limit)}
    env.pop("QUOTA_LOCAL_LEASES", None)
    phases = []
    for workers in args.workers:
        phase = run_phase(procs, tmp, args, workers, redises, env)
        report_phase(phase, args)
        phases.append(phase)
    report_summary(phases, args)
    if args.json is not None:
        save_results(args.json, phases, args)
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    for r in redises.values():
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
