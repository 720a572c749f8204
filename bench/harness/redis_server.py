"""A loopback redis-server for one run, and what it did: ``INFO commandstats`` and its CPU."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import HOST, Procs, free_port, group_cpu, pinned


class RedisServer:
    """Debian's redis-server on a free 127.0.0.1 port, in its own directory under the run's scratch.

    No persistence by default (``--save "" --appendonly no``); ``persistent=True`` turns the
    append-only file on, so that a server killed and started again keeps its data (soak.py).
    ``client`` is a sync redis-py client on it.
    """

    def __init__(self, procs: Procs, tmp: Path, name: str = "redis", *, persistent: bool = False,
                 cpu: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found on PATH (Debian: apt-get install redis-server)")
        self.binary, self.procs, self.name, self.persistent, self.cpu = binary, procs, name, persistent, cpu
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen[Any] | None = None
        self._client: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "redis-server is not running"
        return self.proc.pid

    @property
    def client(self) -> Any:
        if self._client is None:
            import redis  # the sync client that comes with the project's redis dependency

            self._client = redis.Redis(host=HOST, port=self.port, socket_timeout=5.0)
        return self._client

    def start(self) -> RedisServer:
        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent \
            else ["--appendonly", "no"]
        argv = [self.binary, "--port", str(self.port), "--bind", HOST, "--protected-mode", "yes", "--save", "",
                *persistence, "--daemonize", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        self.proc = self.procs.start(pinned(argv, self.cpu), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15.0
        while True:
            try:
                self.client.ping()
                return self
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start on {HOST}:{self.port} "
                                     f"(see {self.dir}/redis.log)") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would (soak.py --chaos); ``start()`` brings it back on the same port."""
        if self.proc is not None:
            self.procs.stop(self.proc, sig=signal.SIGKILL)
            self.proc = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def start_redis(procs: Procs, tmp: Path, name: str = "redis", cpu: int | None = None) -> RedisServer:
    """A fresh, empty redis-server without persistence (on CPU ``cpu`` only, if given)."""
    server = RedisServer(procs, tmp, name, cpu=cpu).start()
    server.client.flushall()
    return server


def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in info.items()}


def stats_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> Counter[str]:
    """Calls per command between two commandstats (``NAME:usec`` for their time), without INFO itself."""
    out: Counter[str] = Counter()
    for name, (calls, usec) in after.items():
        b_calls, b_usec = before.get(name, (0, 0))
        if name != "info" and calls > b_calls:  # INFO is the harness's own probe
            out[name] += calls - b_calls
            out[name + ":usec"] += usec - b_usec
    return out


@dataclass
class RedisPhase:
    """What one redis-server did while some requests were served."""

    requests: int  # the requests it served (201 answers), to divide by
    delta: Counter[str]
    cpu: float | None  # redis-server CPU seconds

    @property
    def commands(self) -> int:
        return sum(v for k, v in self.delta.items() if not k.endswith(":usec"))

    @property
    def scripts(self) -> int:
        return self.delta["evalsha"] + self.delta["eval"]


class RedisMeter:
    """Commands and CPU of one redis-server since the last ``mark()`` / ``take()``."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.mark()

    def mark(self) -> None:
        self.stats, self.cpu = commandstats(self.redis.client), group_cpu(self.redis.pid)

    def take(self, requests: int) -> RedisPhase:
        before, cpu_before = self.stats, self.cpu
        self.mark()
        cpu = None if cpu_before is None or self.cpu is None else self.cpu - cpu_before
        return RedisPhase(requests, stats_delta(before, self.stats), cpu)
