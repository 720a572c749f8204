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
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import HOST, Procs, free_port, wait_http, workspace  # bench/procs.py: sys.path[0] is bench/

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROJECTS = [f"bench-project-{i}" for i in range(8)]
BODY = b'{"name": "bench", "payload": "c2VjcmV0"}'
LOAD_MARK = "BENCHJSON "
#: LeasingStore's default block_seconds plus a margin: after this, every block of a phase is settled.
SETTLE_WAIT = 1.4


@dataclass
class Server:
    name: str
    app: str
    env: dict[str, str]
    redis: str | None = None  # the name of its redis-server (guarded servers only)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Target:
    name: str
    server: str
    method: str
    path: str
    expected: int
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

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


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
        Target("bare", "bare", "POST", "/v1/secrets", 201),
        # Calibration: the least any quota middleware does, in process (bench/apps.py).
        Target("minimal", "minimal", "POST", "/v1/secrets", 201, baseline="bare"),
        Target("leases-on", "leases-on", "POST", "/v1/secrets", 201, baseline="bare", goal=0.90),
        Target("leases-off", "leases-off", "POST", "/v1/secrets", 201, baseline="bare", goal=0.75),
        Target("bare-health", "bare", "GET", "/health", 200),
        Target("unguarded", "leases-off", "GET", "/health", 200, baseline="bare-health", goal=0.97),
    ]


# -- processes ------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu(pgid: int) -> float | None:
    """CPU seconds (user + system) used so far by every live process of a process group (Linux /proc)."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # fields[0] is the state, [1] ppid, [2] pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


@dataclass
class Redis:
    name: str
    client: Any
    url: str
    pid: int


def start_redis(procs: Procs, tmp: Path, name: str = "redis") -> Redis:
    import redis  # the sync client that comes with the project's redis dependency

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    workdir = tmp / name
    workdir.mkdir(parents=True, exist_ok=True)
    proc = procs.start([binary, "--port", str(port), "--bind", HOST, "--protected-mode", "yes",
                        "--save", "", "--appendonly", "no", "--daemonize", "no",
                        "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host=HOST, port=port, socket_timeout=5.0)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start on {HOST}:{port} (see {workdir}/redis.log)") from None
            time.sleep(0.05)
    client.flushall()
    return Redis(name, client, f"redis://{HOST}:{port}/0", proc.pid)


def server_impl() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def start_server(procs: Procs, server: Server, workers: int, multiworker: str, env: dict[str, str]) -> None:
    loop, http = server_impl()
    server.port = port = free_port()
    if workers > 1 and multiworker != "uvicorn":
        sockets = "shared" if multiworker == "prefork-shared" else "reuseport"
        argv = [sys.executable, str(Path(__file__).resolve()), "_serve",
                json.dumps({"app": server.app, "port": port, "workers": workers, "loop": loop, "http": http,
                            "sockets": sockets})]
    else:
        argv = [sys.executable, "-m", "uvicorn", f"apps:{server.app}", "--app-dir", str(HERE),
                "--host", HOST, "--port", str(port), "--workers", str(workers),
                "--loop", loop, "--http", http, "--no-access-log", "--log-level", "warning"]
    server.proc = procs.start(argv, cwd=ROOT, env={**env, **server.env})


def _serve(spec: dict[str, Any]) -> None:
    """N uvicorn servers on one port (`throughput.py _serve SPEC`, forks N workers).

    Like `uvicorn --workers N`, with two differences. Sockets are made with proto=IPPROTO_TCP:
    uvicorn's Config.bind_socket leaves proto at 0, so asyncio never sets TCP_NODELAY on accepted
    connections, and with h11 (headers and body written separately) every keep-alive request
    then waits ~40 ms for the client's delayed ACK (uvicorn issue #3149). And by default
    (``reuseport``) every worker listens on its own SO_REUSEPORT socket, so that the kernel spreads
    connections over the workers: on one shared socket (``shared``), asyncio accepts up to 100
    connections per wake-up, and the first worker awake usually takes all of a load generator's
    keep-alive connections while the others idle.
    """
    import uvicorn

    if "app_dir" in spec:  # builds.py: another tree's bench/apps.py
        sys.path.insert(0, spec["app_dir"])

    def listening_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec["sockets"] == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, spec["port"]))
        sock.listen(2048)
        return sock

    shared = listening_socket() if spec["sockets"] == "shared" else None
    children = []
    for _ in range(spec["workers"]):
        pid = os.fork()
        if pid == 0:
            sock = shared if shared is not None else listening_socket()
            config = uvicorn.Config(f"apps:{spec['app']}", host=HOST, port=spec["port"], loop=spec["loop"],
                                    http=spec["http"], access_log=False, log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])
            os._exit(0)
        children.append(pid)
    # The harness stops this whole process group; just wait for the workers.
    for pid in children:
        os.waitpid(pid, 0)


# -- load -----------------------------------------------------------------------------------------

def request_bytes(target: Target, port: int) -> list[bytes]:
    """One request per project (rotating X-Project-Id), the same bytes for bare and guarded."""
    out = []
    for project in PROJECTS:
        lines = [f"{target.method} {target.path} HTTP/1.1", f"Host: {HOST}:{port}", f"X-Project-Id: {project}"]
        body = b""
        if target.method == "POST":
            body = BODY
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return out


WRK_SCRIPT = """
local method, path, body = %(method)s, %(path)s, %(body)s
local projects = {%(projects)s}
local reqs, i, threads = {}, 0, {}
counts = {}

function setup(thread) table.insert(threads, thread) end

function init(args)
  for k, p in ipairs(projects) do
    local h = {["X-Project-Id"] = p}
    if body then h["Content-Type"] = "application/json" end
    reqs[k] = wrk.format(method, path, h, body)
  end
end

function request()
  i = i %% #reqs + 1
  return reqs[i]
end

function response(status, headers, _)
  local s = tostring(status)
  counts[s] = (counts[s] or 0) + 1
end

function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    for s, n in pairs(t:get("counts")) do parts[#parts + 1] = string.format('"%%s": %%d', s, n) end
  end
  local e = summary.errors
  io.write(string.format('%(mark)s{"requests": %%d, "seconds": %%f, "statuses": [{%%s}], '
    .. '"socket_errors": {"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}}\\n',
    summary.requests, summary.duration / 1e6, table.concat(parts, "}, {"),
    e.connect, e.read, e.write, e.timeout))
end
"""


def lua_str(value: str | bytes | None) -> str:
    if value is None:
        return "nil"
    text = value.decode() if isinstance(value, bytes) else value
    return json.dumps(text)  # a JSON string of ASCII text is a valid Lua string literal


def wrk_command(target: Target, port: int, connections: int, duration: int, tmp: Path) -> list[str]:
    script = tmp / f"{target.name}.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % {
            "method": lua_str(target.method), "path": lua_str(target.path),
            "body": lua_str(BODY if target.method == "POST" else None),
            "projects": ", ".join(lua_str(p) for p in PROJECTS), "mark": LOAD_MARK})
    return ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "-s", str(script),
            f"http://{HOST}:{port}{target.path}"]


def python_load_command(target: Target, port: int, connections: int, duration: int) -> list[str]:
    spec = {"port": port, "connections": connections, "duration": duration,
            "requests": [r.decode("latin-1") for r in request_bytes(target, port)]}
    return [sys.executable, str(Path(__file__).resolve()), "_load", json.dumps(spec)]


def fixed_rate_command(target: Target, port: int, rate: float, connections: int, duration: float) -> list[str]:
    spec = {"port": port, "connections": connections, "duration": duration, "rate": rate,
            "requests": [r.decode("latin-1") for r in request_bytes(target, port)]}
    return [sys.executable, str(Path(__file__).resolve()), "_fixed", json.dumps(spec)]


def run_load(procs: Procs, argv: list[str], duration: float) -> dict[str, Any]:
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=duration + 20)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise SystemExit(f"load generator did not finish within {duration + 20}s: {argv[0]}") from None
    procs.procs.remove(proc)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(LOAD_MARK):
            result: dict[str, Any] = json.loads(line[len(LOAD_MARK):])
            merged: Counter[str] = Counter()
            for part in result["statuses"]:
                merged.update(part)
            result["statuses"] = merged
            return result
    raise SystemExit(f"load generator failed (exit {proc.returncode}):\n{out.decode()}\n{err.decode()}")


# The Python load generators (separate processes: `throughput.py _load SPEC`, `throughput.py _fixed SPEC`).

async def _read_response(reader: asyncio.StreamReader) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return head[9:12].decode("latin-1")


async def _connection(port: int, requests: list[bytes], first: int, deadline: float, statuses: Counter[str],
                      errors: Counter[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        errors["connect"] += 1
        return
    i = first
    try:
        while time.monotonic() < deadline:
            writer.write(requests[i % len(requests)])
            i += 1
            statuses[await _read_response(reader)] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        errors["read"] += 1
    finally:
        writer.close()


async def _load(spec: dict[str, Any]) -> None:
    """Closed loop: every connection sends its next request as soon as the previous one is answered."""
    requests = [r.encode("latin-1") for r in spec["requests"]]
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    start = time.monotonic()
    deadline = start + spec["duration"]
    tasks = [asyncio.create_task(_connection(spec["port"], requests, n, deadline, statuses, errors))
             for n in range(spec["connections"])]
    done, pending = await asyncio.wait(tasks, timeout=spec["duration"] + 10)
    for task in pending:
        task.cancel()
        errors["timeout"] += 1
    seconds = time.monotonic() - start
    result = {"requests": sum(statuses.values()), "seconds": seconds, "statuses": [dict(statuses)],
              "socket_errors": {k: errors[k] for k in ("connect", "read", "write", "timeout")}}
    print(LOAD_MARK + json.dumps(result), flush=True)


async def _fixed(spec: dict[str, Any]) -> None:
    """Open loop at a fixed rate: request i is due at start + i/rate, whatever came back before.

    Each of the keep-alive connections, whenever it is idle, takes the next due request, waits for
    its scheduled time and sends it. A request that finds every connection busy is sent late, and
    its latency still counts from its scheduled time (no coordinated omission). Reports, per
    request, answer time - scheduled time, and the generator's own lateness (send - scheduled).
    """
    requests = [r.encode("latin-1") for r in spec["requests"]]
    rate, total = float(spec["rate"]), int(spec["rate"] * spec["duration"])
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latency: list[int] = []
    lag: list[int] = []
    conns = []
    for k in range(spec["connections"]):
        try:
            reader, writer = await asyncio.open_connection(HOST, spec["port"])
            writer.write(requests[k % len(requests)])  # one unmeasured request: the connection is warm
            await _read_response(reader)
            conns.append((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors["connect"] += 1
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.02
    next_i = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal next_i
        try:
            while next_i < total:
                i = next_i
                next_i += 1
                due = start + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = loop.time()
                writer.write(requests[i % len(requests)])
                status = await _read_response(reader)
                latency.append(int((loop.time() - due) * 1e6))
                lag.append(int((sent - due) * 1e6))
                statuses[status] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            errors["read"] += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection(r, w)) for r, w in conns]
    done, pending = await asyncio.wait(tasks, timeout=spec["duration"] + 10) if tasks else (set(), set())
    for task in pending:
        task.cancel()
        errors["timeout"] += 1
    result = {"requests": sum(statuses.values()), "seconds": loop.time() - start, "statuses": [dict(statuses)],
              "socket_errors": {k: errors[k] for k in ("connect", "read", "write", "timeout")},
              "latency_us": latency, "lag_us": lag}
    print(LOAD_MARK + json.dumps(result), flush=True)


# -- Redis accounting -----------------------------------------------------------------------------

def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in info.items()}


def stats_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for name, (calls, usec) in after.items():
        b_calls, b_usec = before.get(name, (0, 0))
        if name != "info" and calls > b_calls:  # INFO is this script's own probe
            out[name] += calls - b_calls
            out[name + ":usec"] += usec - b_usec
    return out


@dataclass
class RedisPhase:
    """What one guarded server's redis-server did during one phase."""

    requests: int  # 201 answers of the guarded target in the phase (warm-up included)
    delta: Counter[str]
    cpu: float | None  # redis-server CPU seconds

    @property
    def commands(self) -> int:
        return sum(v for k, v in self.delta.items() if not k.endswith(":usec"))

    @property
    def scripts(self) -> int:
        return self.delta["evalsha"] + self.delta["eval"]


class RedisMeter:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.mark()

    def mark(self) -> None:
        self.stats, self.cpu = commandstats(self.redis.client), group_cpu(self.redis.pid)

    def take(self, requests: int) -> RedisPhase:
        before, cpu_before = self.stats, self.cpu
        self.mark()
        cpu = None if cpu_before is None or self.cpu is None else self.cpu - cpu_before
        return RedisPhase(requests, stats_delta(before, self.stats), cpu)


# -- the run --------------------------------------------------------------------------------------

def record(target: Target, result: dict[str, Any], cpu: float | None) -> float:
    statuses: Counter[str] = result["statuses"]
    ok = statuses.get(str(target.expected), 0)
    rps = ok / result["seconds"]
    target.rps.append(rps)
    if cpu is not None and ok:
        target.cpu_us.append(cpu * 1e6 / ok)
    target.requests += ok
    count_errors(target.errors, target, result)
    return rps


def record_latency(target: Target, result: dict[str, Any]) -> None:
    target.latency_us += result["latency_us"]
    target.lag_us += result["lag_us"]
    target.latency_requests += result["statuses"].get(str(target.expected), 0)
    target.latency_seconds += result["seconds"]
    count_errors(target.latency_errors, target, result)


def count_errors(errors: Counter[str], target: Target, result: dict[str, Any]) -> None:
    for status, n in result["statuses"].items():
        if status != str(target.expected):
            errors[f"HTTP {status}"] += n
    for kind, n in result["socket_errors"].items():
        if n:
            errors[f"socket {kind}"] += n


def percentile(values: list[int], q: float) -> float:
    """Nearest-rank percentile (values need not be sorted)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))])


@dataclass
class Phase:
    workers: int
    targets: list[Target]
    redis: dict[str, dict[str, RedisPhase]]  # server -> {"saturated": ..., "fixed": ...}
    other_redis: int  # Redis commands sent while the unguarded target was loaded
    committed: dict[str, tuple[int, int]]  # server -> (usage committed in Redis, 201 answers incl. warm-up)

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)


def run_phase(procs: Procs, tmp: Path, args: argparse.Namespace, workers: int, redises: dict[str, Redis],
              env: dict[str, str]) -> Phase:
    for r in redises.values():
        r.client.flushall()
    servers = {s.name: s for s in make_servers({name: r.url for name, r in redises.items()})}
    for s in servers.values():
        start_server(procs, s, workers, args.multiworker, env)
    try:
        for s in servers.values():
            assert s.proc is not None
            wait_http(s.port, s.proc, "/health", 200)
        return measure(procs, tmp, args, workers, servers, redises)
    finally:
        for s in servers.values():
            if s.proc is not None:
                procs.stop(s.proc)


def measure(procs: Procs, tmp: Path, args: argparse.Namespace, workers: int, servers: dict[str, Server],
            redises: dict[str, Redis]) -> Phase:
    targets = make_targets()
    guarded = {t.server: t for t in targets if t.server in redises and t.method == "POST"}
    meters = {name: RedisMeter(r) for name, r in redises.items()}
    print(f"\n== {workers} worker{'s' if workers > 1 else ''} per server: ports "
          + ", ".join(f"{s.name} {s.port}" for s in servers.values()), flush=True)

    def throughput_round(t: Target, duration: int) -> dict[str, Any]:
        port = servers[t.server].port
        if args.loader == "wrk":
            return run_load(procs, wrk_command(t, port, args.connections, duration, tmp), duration)
        return run_load(procs, python_load_command(t, port, args.connections, duration), duration)

    if args.warmup:
        for t in targets:
            result = throughput_round(t, args.warmup)
            t.warm_requests += result["statuses"].get(str(t.expected), 0)

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
            argv = fixed_rate_command(t, servers[t.server].port, args.rate, args.latency_connections,
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

def fmt(n: float) -> str:
    return f"{n:,.0f}"


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
        print(f"{t.name:<12} {t.route:<17} {t.server:<11} {fmt(statistics.median(t.rps)):>7} {fmt(min(t.rps)):>7} "
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
        print(f"{t.name:<12} {t.route:<17} {t.latency_requests:>8,} {rate:>6.0f} {p50:>6.2f} {p90:>6.2f} {p99:>6.2f} "
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
        row = f"{t0.name:<12} {t0.route:<17} {t0.baseline or '':<12}"
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
        row = f"{t0.name:<12} {t0.route:<17} {t0.baseline or '':<12}"
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


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "middleware"],
                               capture_output=True, text=True, timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or '?'}" + (f" + uncommitted changes in {len(dirty)} middleware file(s)" if dirty else " (clean)")


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
    loop, http = server_impl()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("uvicorn", "starlette", "redis"))
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    print(f"python {platform.python_version()}, {versions}; {os.cpu_count()} CPUs; "
          f"redis-server {next((w[2:] for w in redis_version if w.startswith('v=')), '?')}; "
          f"middleware at {git_state()}")
    multi = {"prefork": "prefork launcher (uvicorn.Server per worker, each on its own SO_REUSEPORT socket)",
             "prefork-shared": "prefork launcher (uvicorn.Server per worker, one shared socket)",
             "uvicorn": "uvicorn CLI --workers"}[args.multiworker]
    print(f"uvicorn --loop {loop} --http {http} (uvloop/httptools "
          f"{'used where installed' if 'uvloop' in loop or 'httptools' in http else 'not installed'}); "
          f"workers {','.join(map(str, args.workers))}: 1 via the uvicorn CLI, more via {multi}")
    print(f"throughput: {'wrk -t1' if args.loader == 'wrk' else 'built-in asyncio client (separate process)'}, "
          f"{args.connections} keep-alive connections, {args.rounds} rounds x {args.duration} s per target; "
          f"latency: built-in open-loop generator at {fmt(args.rate)} req/s, {args.latency_connections} connections, "
          f"{args.latency_rounds} rounds x {args.latency_duration:g} s per target")

    redises = {name: start_redis(procs, tmp, name) for name in ("leases-on", "leases-off")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("QUOTA_LOCAL_LEASES", None)
    phases = []
    for workers in args.workers:
        phase = run_phase(procs, tmp, args, workers, redises, env)
        report_phase(phase, args)
        phases.append(phase)
    report_summary(phases, args)
    print(f"\n(run took {time.monotonic() - started:.0f} s)")
    for r in redises.values():
        r.client.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_load":
        asyncio.run(_load(json.loads(sys.argv[2])))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "_fixed":
        asyncio.run(_fixed(json.loads(sys.argv[2])))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":
        _serve(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
