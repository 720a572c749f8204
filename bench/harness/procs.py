"""Processes of a benchmark run: every one in its own process group, all stopped at the end (with
a scratch directory: ``workspace``); free loopback ports; waiting for a server to answer; the CPU
time a process group used (from /proc)."""

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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Procs:
    """Every subprocess a run started, each in its own process group; all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        """A process that ended by itself (a load generator): nothing to stop at the end."""
        if proc in self.procs:
            self.procs.remove(proc)

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        if proc.poll() is None:
            _signal_group(proc, sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)  # whatever is left of the group (uvicorn workers)
        if proc.poll() is None:
            proc.wait(grace)
        self.forget(proc)

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


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group made by start_new_session (pgid == pid)
    except (ProcessLookupError, PermissionError):
        pass


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``argv`` run on one CPU only (``taskset -c``), it and every process or thread it starts; as is
    when ``cpu`` is None or taskset is missing."""
    if cpu is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(port: int, proc: subprocess.Popen[Any], path: str, status: int, timeout: float = 30.0) -> None:
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


def _stat_fields(pid: int | str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # [0] state, [1] ppid, [2] pgrp, [11] utime, [12] stime
    except OSError:
        return None  # gone meanwhile


def group_cpu(pgid: int) -> float | None:
    """CPU seconds (user + system) used so far by every live process of a process group (Linux /proc).

    A server started by :class:`Procs` is its own group (pgid == the pid Procs returned): with
    uvicorn's ``--workers N`` or the prefork launcher, that is the supervisor and its workers.
    """
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group, the leader first (for py-spy: the workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry))
    return sorted(pids, key=lambda p: (p != pgid, p))
