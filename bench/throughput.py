"""Throughput of QuotaMiddleware: bare app vs guarded route vs unguarded route, side by side.

One run starts its own redis-server on a free loopback port, serves ``bench/apps.py`` with
uvicorn (one process for the bare app, one for the guarded app), and loads four targets from a
separate process, in interleaved rounds (the order rotates each round), so that a noisy machine
hits every target alike:

    bare       POST /v1/secrets on the bare app        baseline for "guarded"
    guarded    POST /v1/secrets on the guarded app     reserve + commit in Redis per request
    bare       GET  /health     on the bare app        baseline for "unguarded"
    unguarded  GET  /health     on the guarded app     no rule matches: straight to the app

It prints the median requests/s of each target, the ratio to its bare baseline, the server's
CPU time per request (user+sys of its processes, from /proc: steadier than req/s on a shared
machine), and Redis commands and script calls per guarded request (INFO commandstats taken
around the guarded rounds).

With ``--workers N > 1`` the servers are N forked ``uvicorn.Server`` processes sharing one
listening socket, made with proto=IPPROTO_TCP. Plain ``uvicorn --workers N``
(``--multiworker uvicorn``) binds its socket with proto 0, so asyncio never sets TCP_NODELAY on
accepted connections and, with h11, every keep-alive request waits ~40 ms for a delayed ACK
(uvicorn issue #3149): every target then measures ~700 req/s, whatever the middleware does.

Load comes from ``wrk`` when it is installed (``apt-get install wrk``), otherwise from a small
asyncio HTTP/1.1 keep-alive client in a subprocess (``--loader python``); it is slower, so on a
small machine it takes CPU from the server and lowers every number alike.

    .venv/bin/python bench/throughput.py [--workers N] [--connections N] [--duration S] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
PROJECTS = [f"bench-project-{i}" for i in range(8)]
BODY = b'{"name": "bench", "payload": "c2VjcmV0"}'
LOAD_MARK = "BENCHJSON "


@dataclass
class Target:
    name: str
    server: str  # "bare" or "guarded"
    method: str
    path: str
    expected: int
    baseline: str | None = None  # the target this one is compared with
    uses_redis: bool = False
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU (user+sys) per answered request
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


def make_targets() -> list[Target]:
    return [
        Target("bare", "bare", "POST", "/v1/secrets", 201),
        Target("guarded", "guarded", "POST", "/v1/secrets", 201, baseline="bare", uses_redis=True),
        Target("bare-health", "bare", "GET", "/health", 200),
        Target("unguarded", "guarded", "GET", "/health", 200, baseline="bare-health"),
    ]


# -- processes ------------------------------------------------------------------------------------

class Procs:
    """Every subprocess this run started, each in its own process group; all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)  # whatever is left of the group (uvicorn workers)
        if proc.poll() is None:
            proc.wait(grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this run created with start_new_session (pgid == pid)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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


def wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode} before answering")
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as s:
                s.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not answer GET /health within {timeout:.0f}s")


def start_redis(procs: Procs, tmp: Path) -> tuple[Any, str, int]:
    import redis  # the sync client that comes with the project's redis dependency

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    proc = procs.start([binary, "--port", str(port), "--bind", HOST, "--protected-mode", "yes",
                        "--save", "", "--appendonly", "no", "--daemonize", "no",
                        "--dir", str(tmp), "--logfile", str(tmp / "redis.log")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host=HOST, port=port, socket_timeout=5.0)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start on {HOST}:{port} (see {tmp}/redis.log)") from None
            time.sleep(0.05)
    client.flushall()
    return client, f"redis://{HOST}:{port}/0", proc.pid


def server_impl() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def start_server(procs: Procs, app: str, args: argparse.Namespace, env: dict[str, str]
                 ) -> tuple[int, subprocess.Popen[bytes]]:
    loop, http = server_impl()
    port = free_port()
    if args.workers > 1 and args.multiworker == "prefork":
        argv = [sys.executable, str(Path(__file__).resolve()), "_serve",
                json.dumps({"app": app, "port": port, "workers": args.workers, "loop": loop, "http": http})]
    else:
        argv = [sys.executable, "-m", "uvicorn", f"apps:{app}", "--app-dir", str(HERE),
                "--host", HOST, "--port", str(port), "--workers", str(args.workers),
                "--loop", loop, "--http", http, "--no-access-log", "--log-level", "warning"]
    return port, procs.start(argv, cwd=ROOT, env=env)


def _serve(spec: dict[str, Any]) -> None:
    """N uvicorn servers sharing one listening socket (`throughput.py _serve SPEC`, forks N workers).

    What `uvicorn --workers N` does, except that the socket is made with proto=IPPROTO_TCP:
    uvicorn's Config.bind_socket leaves proto at 0, so asyncio never sets TCP_NODELAY on accepted
    connections, and with h11 (headers and body written separately) every keep-alive request
    then waits ~40 ms for the client's delayed ACK (uvicorn issue #3149).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, spec["port"]))
    sock.listen(2048)
    children = []
    for _ in range(spec["workers"]):
        pid = os.fork()
        if pid == 0:
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


def run_load(procs: Procs, argv: list[str], duration: int) -> dict[str, Any]:
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


# The Python load generator (a separate process: `throughput.py _load SPEC`).

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
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            statuses[head[9:12].decode("latin-1")] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        errors["read"] += 1
    finally:
        writer.close()


async def _load(spec: dict[str, Any]) -> None:
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


# -- the run --------------------------------------------------------------------------------------

def one_round(procs: Procs, target: Target, port: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.loader == "wrk":
        argv = wrk_command(target, port, args.connections, args.duration, tmp)
    else:
        argv = python_load_command(target, port, args.connections, args.duration)
    return run_load(procs, argv, args.duration)


def record(target: Target, result: dict[str, Any], cpu: float | None) -> float:
    statuses: Counter[str] = result["statuses"]
    ok = statuses.get(str(target.expected), 0)
    rps = ok / result["seconds"]
    target.rps.append(rps)
    if cpu is not None and ok:
        target.cpu_us.append(cpu * 1e6 / ok)
    target.requests += ok
    for status, n in statuses.items():
        if status != str(target.expected):
            target.errors[f"HTTP {status}"] += n
    for kind, n in result["socket_errors"].items():
        if n:
            target.errors[f"socket {kind}"] += n
    return rps


def fmt(n: float) -> str:
    return f"{n:,.0f}"


def report(targets: list[Target], redis_delta: Counter[str], other_redis: Counter[str], guarded_ok: int,
           committed: int, warm_guarded: int, redis_cpu: float) -> None:
    by_name = {t.name: t for t in targets}
    goals = {"guarded": 0.5, "unguarded": 0.95}
    print()
    print(f"{'target':<12} {'route':<18} {'server':<8} {'req/s median':>13} {'min':>8} {'max':>8} "
          f"{'vs bare':>8} {'paired':>7} {'goal':>6} {'CPU us/req':>10}  errors")
    for t in targets:
        med = statistics.median(t.rps)
        ratio = paired = goal = ""
        if t.baseline:
            base = by_name[t.baseline]
            ratio = f"{med / statistics.median(base.rps):.2f}x"
            paired = f"{statistics.median(a / b for a, b in zip(t.rps, base.rps)):.2f}x"
            goal = f">={goals[t.name]:.2f}"
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(t.errors.items())) or "0"
        cpu = f"{statistics.median(t.cpu_us):.0f}" if t.cpu_us else "n/a"
        print(f"{t.name:<12} {t.route:<18} {t.server:<8} {fmt(med):>13} {fmt(min(t.rps)):>8} {fmt(max(t.rps)):>8} "
              f"{ratio:>8} {paired:>7} {goal:>6} {cpu:>10}  {errors}")
    print("(vs bare: ratio of medians; paired: median of per-round ratios; bare-health is the baseline of unguarded;\n"
          " CPU us/req: median over rounds of the server processes' user+sys CPU per answered request)")
    print()
    scripts = redis_delta["evalsha"] + redis_delta["eval"]
    total = sum(v for k, v in redis_delta.items() if not k.endswith(":usec"))
    script_usec = redis_delta["evalsha:usec"] + redis_delta["eval:usec"]
    n = max(guarded_ok, 1)
    print(f"Redis, during the guarded rounds ({guarded_ok:,} requests answered 201):")
    print(f"  commands per guarded request (incl. those run inside the Lua script): {total / n:.2f}")
    print(f"  script calls (EVALSHA) per guarded request: {scripts / n:.3f}"
          f"  -> {2 * n / max(scripts, 1):.1f} operations (reserve or commit) per script call on average")
    print(f"  Redis time in scripts per guarded request: {script_usec / n:.1f} us; "
          f"redis-server CPU per guarded request: {redis_cpu * 1e6 / n:.0f} us")
    print("  by command: " + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(redis_delta.items())
                                       if not k.endswith(":usec")))
    print(f"  Redis commands during bare and unguarded rounds: {sum(v for k, v in other_redis.items() if not k.endswith(':usec'))}")
    print(f"  usage committed in Redis, all projects: {committed:,} (requests answered 201 incl. warm-up: "
          f"{guarded_ok + warm_guarded:,}; the difference is requests in flight when a round stopped)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes per server (1)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections (32)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per round and target (3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each loads every target once (5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load per target first (1)")
    parser.add_argument("--multiworker", choices=["prefork", "uvicorn"], default="prefork",
                        help="with --workers > 1: fork N uvicorn servers on one TCP_NODELAY-capable socket "
                             "(prefork), or plain `uvicorn --workers N`, which loses TCP_NODELAY (uvicorn #3149)")
    parser.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator: wrk if installed (auto), or the built-in asyncio client")
    args = parser.parse_args()
    if min(args.workers, args.connections, args.duration, args.rounds) < 1 or args.warmup < 0:
        parser.error("--workers, --connections, --duration and --rounds must be at least 1")
    if args.loader == "auto":
        args.loader = "wrk" if shutil.which("wrk") else "python"
    elif args.loader == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk); use --loader python")

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both unwind through the finally below.
    signal.signal(signal.SIGTERM, terminated)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="quota-bench-"))
    try:
        return run(procs, tmp, args)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def run(procs: Procs, tmp: Path, args: argparse.Namespace) -> int:
    loop, http = server_impl()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("uvicorn", "starlette", "redis"))
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    print(f"python {platform.python_version()}, {versions}; {os.cpu_count()} CPUs; "
          f"redis-server {next((w[2:] for w in redis_version if w.startswith('v=')), '?')}")
    how = ("uvicorn CLI" if args.workers == 1 or args.multiworker == "uvicorn"
           else "prefork launcher running uvicorn.Server per worker on a shared socket")
    print(f"uvicorn --loop {loop} --http {http} --workers {args.workers} via {how} (uvloop/httptools "
          f"{'used where installed' if 'uvloop' in loop or 'httptools' in http else 'not installed'}); "
          f"loader: {'wrk -t1' if args.loader == 'wrk' else 'built-in asyncio client (separate process)'}, "
          f"{args.connections} keep-alive connections; {args.rounds} rounds x {args.duration}s per target")

    client, redis_url, redis_pid = start_redis(procs, tmp)
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    servers = {name: start_server(procs, app, args, env)
               for name, app in (("bare", "bare_app"), ("guarded", "guarded_app"))}
    for port, proc in servers.values():
        wait_http(port, proc)

    targets = make_targets()
    warm_guarded = 0  # requests the guarded app answered while warming up (they count in Redis too)
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
        for t in targets:
            result = one_round(procs, t, servers[t.server][0], warm, tmp)
            if t.uses_redis:
                warm_guarded += result["statuses"].get(str(t.expected), 0)

    redis_delta: Counter[str] = Counter()
    other_redis: Counter[str] = Counter()
    redis_cpu = 0.0
    for r in range(args.rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        line = []
        for t in order:
            pgid = servers[t.server][1].pid
            before, cpu_before, redis_cpu_before = commandstats(client), group_cpu(pgid), group_cpu(redis_pid)
            result = one_round(procs, t, servers[t.server][0], args, tmp)
            # Settlements are handed over without waiting; let the last batch land before counting.
            time.sleep(0.05)
            cpu_after, redis_cpu_after = group_cpu(pgid), group_cpu(redis_pid)
            delta = stats_delta(before, commandstats(client))
            (redis_delta if t.uses_redis else other_redis).update(delta)
            cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            line.append(f"{t.name} {fmt(record(t, result, cpu))}")
            if t.uses_redis and redis_cpu_before is not None and redis_cpu_after is not None:
                redis_cpu += redis_cpu_after - redis_cpu_before
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(line) + " req/s", flush=True)

    guarded = next(t for t in targets if t.name == "guarded")
    committed = sum(int(client.get(k) or 0) for k in client.scan_iter(match="quota:*:used", count=1000))
    report(targets, redis_delta, other_redis, guarded.requests, committed, warm_guarded, redis_cpu)
    client.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_load":
        asyncio.run(_load(json.loads(sys.argv[2])))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":
        _serve(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
