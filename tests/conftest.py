from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from middleware import MemoryStore, RedisStore, Store
from tests.servers import RedisCluster, RedisServer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """Injected time: tests move it instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _real(kind: type[RedisServer] | type[RedisCluster]) -> Iterator[Any]:
    """Start a real Redis for the session: mandatory in CI, skipped elsewhere if not installed."""
    try:
        server = kind()
    except FileNotFoundError as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole session."""
    yield from _real(RedisServer)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real three-master Redis Cluster for the whole session."""
    yield from _real(RedisCluster)


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port, socket_timeout=2)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "fakeredis", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    """The same contract runs over every store."""
    if request.param == "memory":
        yield MemoryStore(clock=clock)
        return
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    elif request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client = AsyncRedisCluster(host="127.0.0.1", port=cluster.ports[0], socket_timeout=2)
        await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = aioredis.Redis(port=server.port, socket_timeout=2)
        await client.flushall()
    redis_store = RedisStore(client, clock=clock)
    yield redis_store
    await redis_store.aclose()
    await client.aclose()


# -- a redis-server of one test alone ----------------------------------------------------------------

def own_redis_server(persist: bool = False) -> RedisServer:
    try:
        return RedisServer(persist=persist)
    except FileNotFoundError as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))


@pytest.fixture
def redis_proc() -> Iterator[RedisServer]:
    """A redis-server of this test alone: it may kill, pause and restart it."""
    server = own_redis_server()
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)  # a paused server would not stop
        server.stop()


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    server = own_redis_server(persist=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
