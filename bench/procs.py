"""Subprocess plumbing shared by the benchmark scripts: every process in its own group, all
stopped at the end (with a scratch directory: ``workspace``), free loopback ports, waiting for a
server to answer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


class Procs:
    """Every subprocess a run started, each in its own process group; all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        if proc.poll() is None:
            _signal_group(proc, sig)
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
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


@contextmanager
def workspace(prefix: str) -> Iterator[tuple[Procs, Path]]:
    """Processes to start and a scratch directory; on the way out, every process is stopped and
    the directory removed, however the run ended."""
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield procs, tmp
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group made by start_new_session (pgid == pid)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(port: int, proc: subprocess.Popen[bytes], path: str, status: int, timeout: float = 30.0) -> None:
    """Wait until ``GET path`` on the server answers ``status``; exit clearly if it dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server on port {port} exited with {proc.returncode} before answering")
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(f"HTTP/1.1 {status}".encode()):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server on port {port} did not answer GET {path} within {timeout:.0f}s")
