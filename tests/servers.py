"""Real servers the tests start: redis-server and uvicorn, on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check, timeout: float = 15.0, what: str = "server") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready in {timeout}s: {last}")


class RedisServer:
    """One redis-server process on a free loopback port, with its own data directory."""

    def __init__(self, *, persist: bool = False, args: Sequence[str] = ()) -> None:
        """``args``: more redis-server options (``--timeout 1``, ``--maxmemory 8mb``), kept across restarts."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="qm-redis-")
        self.persist = persist
        self.args = tuple(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "yes" if self.persist else "no", "--protected-mode", "no", *self.args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            wait_until(client.ping, what="redis-server")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@contextmanager
def uvicorn_server(app: str, *, env: Mapping[str, str], workers: int = 1,
                   extra: Sequence[str] = ()) -> Iterator[str]:
    """``uvicorn app`` in a subprocess; yields its base URL once it answers."""
    with uvicorn_process(app, env=env, workers=workers, extra=extra) as (base, _):
        yield base


@contextmanager
def uvicorn_process(app: str, *, env: Mapping[str, str], workers: int = 1,
                    extra: Sequence[str] = ()) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like :func:`uvicorn_server`, but also yields the process (to signal or kill it).

    With ``workers=1`` uvicorn serves in that very process: killing it kills the worker.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), "--log-level", "warning", "--no-access-log", *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and httpx.get(base + "/", timeout=1).status_code < 500,
                   what=f"uvicorn {app}")
        yield base, process
    finally:
        stop_process(process)


@contextmanager
def gunicorn_server(app: str, *, env: Mapping[str, str], workers: int = 2, preload: bool = True,
                    extra: Sequence[str] = ()) -> Iterator[str]:
    """``gunicorn -k uvicorn.workers.UvicornWorker app`` in a subprocess; yields its base URL once it answers.

    With ``preload`` the app module is imported once, in the arbiter, and the workers fork from it.
    The arbiter and its workers get a session (a process group) of their own: whatever is left of
    that group when the arbiter has stopped is killed, so no worker outlives the test.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
           "--worker-class", "uvicorn.workers.UvicornWorker", "--graceful-timeout", "3", "--timeout", "30",
           "--log-level", "warning", *(["--preload"] if preload else []), *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(process, base), what=f"gunicorn {app}")
        yield base
    finally:
        stop_process(process)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind by an arbiter that died
        except ProcessLookupError:
            pass


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, 15 s to go, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _answers(process: subprocess.Popen[bytes], base: str) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"the server exited with status {process.returncode} before it answered")
    return httpx.get(base + "/", timeout=1).status_code < 500


# -- Redis Cluster ---------------------------------------------------------------------------------

class RedisCluster:
    """Three cluster-enabled redis-server masters on loopback, joined by ``redis-cli --cluster create``.

    A node also listens on its cluster bus port, ``port + 10000``. Ports are drawn below the
    kernel's ephemeral range (which starts at 32768 on Linux) so that neither a node's port nor its
    bus port can collide with a port the kernel hands out to another test. Every wait is bounded;
    a failed start stops whatever it had started and removes its directory.
    """

    MASTERS = 3
    BUS_OFFSET = 10_000
    SLOTS = 16_384

    def __init__(self, *, masters: int = MASTERS, timeout: float = 20.0) -> None:
        import random

        server = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if server is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli are not installed "
                                    "(Debian: apt-get install redis-server redis-tools)")
        self.server_binary = server
        self.cli_binary = cli
        self.masters = masters
        self.timeout = timeout
        self._random = random.Random()
        self.ports: list[int] = []
        self.dir: str | None = None
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def url(self) -> str:
        """The first node; a cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def _pick_port(self, taken: set[int]) -> int:
        for _ in range(500):
            port = self._random.randrange(12_000, 22_700)
            bus = port + self.BUS_OFFSET
            if not {port, bus} & taken and self._bindable(port) and self._bindable(bus):
                return port
        raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        deadline = time.monotonic() + self.timeout
        self.dir = tempfile.mkdtemp(prefix="qm-redis-cluster-")
        taken: set[int] = set()
        for _ in range(self.masters):
            port = self._pick_port(taken)
            taken |= {port, port + self.BUS_OFFSET}
            self.ports.append(port)
        for port in self.ports:
            args = [self.server_binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
                    "--cluster-enabled", "yes", "--cluster-config-file", f"{self.dir}/nodes-{port}.conf",
                    "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                    "--protected-mode", "no", "--logfile", f"{self.dir}/redis-{port}.log"]
            self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, process in zip(self.ports, self.processes, strict=True):
            node = self._node(port)
            try:
                # The check runs before the loop moves on: it binds this node.
                wait_until(lambda: process.poll() is None and node.ping(),  # noqa: B023
                           timeout=self._left(deadline),
                           what=f"cluster node 127.0.0.1:{port}")
            finally:
                node.close()
        create = [self.cli_binary, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=self._left(deadline))
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}): "
                               f"{done.stdout.decode(errors='replace')[-2000:]}"
                               f"{done.stderr.decode(errors='replace')[-2000:]}")
        for port in self.ports:
            node = self._node(port)
            try:
                wait_until(lambda: self._ready(node), timeout=self._left(deadline),  # noqa: B023
                           what=f"cluster_state:ok on 127.0.0.1:{port}")
            finally:
                node.close()

    def _ready(self, node: redis.Redis) -> bool:
        info = node.execute_command("CLUSTER INFO")
        if isinstance(info, dict):  # redis-py parses the reply into a dict
            fields = {str(k): str(v) for k, v in info.items()}
        else:
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return (fields.get("cluster_state") == "ok"
                and fields.get("cluster_slots_assigned") == str(self.SLOTS)
                and fields.get("cluster_slots_ok") == str(self.SLOTS)
                and fields.get("cluster_known_nodes") == str(self.masters)
                and fields.get("cluster_size") == str(self.masters))

    @staticmethod
    def _left(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("Redis Cluster did not start in time")
        return left

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes = []
        self.ports = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
