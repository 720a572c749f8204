"""Load on a server: the request bytes, wrk (closed loop, saturating) and the built-in generators.

Every load generator is a process of its own that prints one line, ``BENCHJSON {...}``: answers by
status, socket errors, seconds, and for the fixed-rate generator every request's latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import HOST, Procs

LOADGEN = Path(__file__).resolve().with_name("loadgen.py")
#: Requests rotate over these X-Project-Id values.
PROJECTS = [f"bench-project-{i}" for i in range(8)]
BODY = b'{"name": "bench", "payload": "c2VjcmV0"}'
LOAD_MARK = "BENCHJSON "


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    expected: int  # the answer that counts as served

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


CREATE = Route("POST", "/v1/secrets", 201)
HEALTH = Route("GET", "/health", 200)


def request_bytes(route: Route, port: int) -> list[bytes]:
    """One request per project (rotating X-Project-Id); the same bytes whichever server is loaded."""
    out = []
    for project in PROJECTS:
        lines = [f"{route.method} {route.path} HTTP/1.1", f"Host: {HOST}:{port}", f"X-Project-Id: {project}"]
        body = b""
        if route.method == "POST":
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


def _lua_str(value: str | bytes | None) -> str:
    if value is None:
        return "nil"
    text = value.decode() if isinstance(value, bytes) else value
    return json.dumps(text)  # a JSON string of ASCII text is a valid Lua string literal


def wrk_command(route: Route, port: int, connections: int, duration: float, tmp: Path) -> list[str]:
    """``wrk -t1 -cN``: one thread (one CPU at most), the same bytes as ``request_bytes``."""
    script = tmp / f"wrk-{route.method}-{route.path.strip('/').replace('/', '-')}.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % {
            "method": _lua_str(route.method), "path": _lua_str(route.path),
            "body": _lua_str(BODY if route.method == "POST" else None),
            "projects": ", ".join(_lua_str(p) for p in PROJECTS), "mark": LOAD_MARK})
    return ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "-s", str(script),
            f"http://{HOST}:{port}{route.path}"]


def closed_loop_command(route: Route, port: int, connections: int, duration: float) -> list[str]:
    """The built-in closed-loop client (when wrk is missing): needs far more CPU than wrk."""
    return _loadgen("closed", {"port": port, "connections": connections, "duration": duration,
                               "requests": [r.decode("latin-1") for r in request_bytes(route, port)]})


def fixed_rate_command(route: Route, port: int, rate: float, connections: int, duration: float) -> list[str]:
    """The built-in open-loop generator: request i due at start + i/rate (see loadgen.py)."""
    return _loadgen("fixed", {"port": port, "connections": connections, "duration": duration, "rate": rate,
                              "requests": [r.decode("latin-1") for r in request_bytes(route, port)]})


def _loadgen(mode: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(LOADGEN), mode, json.dumps(spec)]


def run_load(procs: Procs, argv: list[str], duration: float) -> dict[str, Any]:
    """Run one load generator to its end; its result, with ``statuses`` merged into one Counter."""
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=duration + 20)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise SystemExit(f"load generator did not finish within {duration + 20}s: {argv[0]}") from None
    procs.forget(proc)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(LOAD_MARK):
            result: dict[str, Any] = json.loads(line[len(LOAD_MARK):])
            merged: Counter[str] = Counter()
            for part in result["statuses"]:
                merged.update(part)
            result["statuses"] = merged
            return result
    raise SystemExit(f"load generator failed (exit {proc.returncode}):\n{out.decode()}\n{err.decode()}")


def count_errors(errors: Counter[str], expected: int, result: dict[str, Any]) -> None:
    """Answers other than ``expected`` and socket errors of one load, into ``errors``."""
    for status, n in result["statuses"].items():
        if status != str(expected):
            errors[f"HTTP {status}"] += n
    for kind, n in result["socket_errors"].items():
        if n:
            errors[f"socket {kind}"] += n
