"""bench/apps.py's ``awaited_app``: the floor the Redis targets are compared with must really wait
for Redis, share one round trip among the requests waiting together, and fail (not hang) when
Redis is gone, or the benchmark measures something else."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.servers import ROOT, RedisServer, free_port

pytestmark = pytest.mark.anyio


def bench_apps() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_apps_under_test", ROOT / "bench" / "apps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def pings(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))
    finally:
        await client.aclose()


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """The apps a test made: their connection closed after it."""
    apps: list[Any] = []
    yield apps
    for app in apps:
        await app.aclose()


async def test_requests_waiting_together_share_one_round_trip(redis_server: RedisServer, closing: list[Any]) -> None:
    apps = bench_apps()
    app = apps.AwaitingRoundTrip(apps.build_app(), redis_server.url)
    before = await pings(redis_server.url)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        closing.append(app)
        answers = await asyncio.gather(*(client.post("/v1/secrets", json={"name": f"s{i}"}) for i in range(20)))
        assert [a.status_code for a in answers] == [201] * 20
        sent = await pings(redis_server.url) - before
        assert 1 <= sent < 20  # every request waited for Redis, fewer round trips than requests
        # A GET is not held: no round trip.
        assert (await client.get("/health")).status_code == 200
        assert await pings(redis_server.url) - before == sent


async def test_a_redis_that_is_gone_fails_the_waiting_requests(redis_server: RedisServer, closing: list[Any]) -> None:
    apps = bench_apps()
    app = apps.AwaitingRoundTrip(apps.build_app(), f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        closing.append(app)
        with pytest.raises(ConnectionError, match="Redis round trip failed"):
            await asyncio.wait_for(client.post("/v1/secrets", json={"name": "s"}), timeout=10)
        # The next round trip connects again: a Redis that came back is used.
        app.address = ("127.0.0.1", redis_server.port)
        assert (await client.post("/v1/secrets", json={"name": "s"})).status_code == 201


async def test_a_request_cancelled_while_waiting_does_not_stall_the_others(redis_server: RedisServer,
                                                                           closing: list[Any]) -> None:
    apps = bench_apps()
    app = apps.AwaitingRoundTrip(apps.build_app(), redis_server.url)
    closing.append(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        gone = asyncio.ensure_future(client.post("/v1/secrets", json={"name": "gone"}))
        kept = asyncio.ensure_future(client.post("/v1/secrets", json={"name": "kept"}))
        await asyncio.sleep(0)  # both are waiting for the same round trip
        gone.cancel()
        assert (await asyncio.wait_for(kept, timeout=10)).status_code == 201
        assert (await client.post("/v1/secrets", json={"name": "next"})).status_code == 201
