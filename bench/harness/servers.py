"""uvicorn servers of a run: which event loop and HTTP parser, one worker or several."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import HOST, Procs, free_port, pinned, wait_http

PREFORK = Path(__file__).resolve().with_name("prefork.py")


@dataclass(frozen=True)
class ServerKind:
    """A uvicorn configuration: ``--loop`` and ``--http``."""

    name: str
    loop: str
    http: str

    def describe(self) -> str:
        return f"uvicorn --loop {self.loop} --http {self.http}"


#: ``httptools``: what ``pip install uvicorn[standard]`` runs in production (uvloop's event loop and
#: the httptools parser). ``h11``: uvicorn with nothing but its required dependencies.
SERVER_KINDS = {
    "httptools": ServerKind("httptools", "uvloop", "httptools"),
    "h11": ServerKind("h11", "asyncio", "h11"),
}


def server_kind(name: str) -> ServerKind:
    kind = SERVER_KINDS[name]
    missing = [m for m in (kind.loop, kind.http) if m != "asyncio" and importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"--server {name} needs {' and '.join(missing)}: .venv/bin/pip install -e '.[bench]' "
                         f"(uvicorn[standard]), or use --server h11")
    return kind


def start_uvicorn(procs: Procs, app: str, *, app_dir: Path, kind: ServerKind, env: dict[str, str],
                  cwd: Path, workers: int = 1, multiworker: str = "prefork", cpu: int | None = None,
                  **popen: Any) -> tuple[subprocess.Popen[Any], int]:
    """Serve ``apps:<app>`` from ``app_dir`` on a free port; returns the process (its own group) and the port.

    One worker: the uvicorn CLI (one process). More: the prefork launcher (``prefork.py``: N
    ``uvicorn.Server`` processes, each on its own SO_REUSEPORT socket; ``multiworker="prefork-shared"``:
    one shared socket) or plain ``uvicorn --workers N`` (``multiworker="uvicorn"``). ``cpu``: every
    process of the server on that CPU only.
    """
    port = free_port()
    if workers > 1 and multiworker != "uvicorn":
        spec = {"app": f"apps:{app}", "app_dir": str(app_dir), "host": HOST, "port": port, "workers": workers,
                "loop": kind.loop, "http": kind.http,
                "sockets": "shared" if multiworker == "prefork-shared" else "reuseport"}
        argv = [sys.executable, str(PREFORK), json.dumps(spec)]
    else:
        argv = [sys.executable, "-m", "uvicorn", f"apps:{app}", "--app-dir", str(app_dir), "--host", HOST,
                "--port", str(port), "--workers", str(workers), "--loop", kind.loop, "--http", kind.http,
                "--no-access-log", "--log-level", "warning"]
    return procs.start(pinned(argv, cpu), cwd=cwd, env=env, **popen), port


def serve_and_wait(procs: Procs, app: str, path: str = "/health", status: int = 200,
                   **kwargs: Any) -> tuple[subprocess.Popen[Any], int]:
    """``start_uvicorn``, then wait until ``GET path`` answers ``status``."""
    proc, port = start_uvicorn(procs, app, **kwargs)
    wait_http(port, proc, path, status)
    return proc, port
