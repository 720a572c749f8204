"""A uvicorn worker killed (SIGKILL) while its requests hold reservations: the leases give the quota back.

The app (tests/lease_app.py) runs under real uvicorn with two workers on a real redis-server;
``POST /hold`` reserves one ``things`` and then sleeps in the app, so the reservation is held
until the worker dies. Nothing in the dying process can settle it: only the lease can.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from middleware import Bucket, RedisStore
from tests.servers import RedisServer, uvicorn_process

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LEASE = 2.0
LIMIT = 2


async def hold(client: httpx.AsyncClient, project: str, hold_id: str) -> int | str:
    try:
        response = await client.post("/hold", headers={"X-Project-Id": project, "X-Hold-Id": hold_id})
        return response.status_code
    except httpx.TransportError as exc:  # the worker died under the request: expected
        return type(exc).__name__


async def test_reservations_of_a_killed_worker_come_back_after_the_lease(
        redis_server: RedisServer, real_redis: aioredis.Redis, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url, "LEASE_SECONDS": str(LEASE), "LIMIT": str(LIMIT),
           "HOLD_DIR": str(tmp_path)}
    store = RedisStore(real_redis)
    bucket = Bucket("crash", "things")
    headers = {"X-Project-Id": "crash"}
    with uvicorn_process("tests.lease_app:app", env=env, workers=2) as (base, supervisor):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            holds = [asyncio.ensure_future(hold(client, "crash", f"h{i}")) for i in range(LIMIT)]
            try:
                deadline = time.monotonic() + 10
                while len(list(tmp_path.glob("h*"))) < LIMIT:
                    assert time.monotonic() < deadline, "the holding requests never reached the app"
                    await asyncio.sleep(0.02)
                reserved_at = time.monotonic()
                pids = {int(p.read_text()) for p in tmp_path.glob("h*")}
                assert supervisor.pid not in pids  # the workers hold them, not the supervisor
                assert await store.usage(bucket) == LIMIT
                assert (await client.post("/things", headers=headers)).status_code == 403  # quota all held

                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                results = await asyncio.gather(*holds)
            finally:
                for task in holds:
                    task.cancel()
            assert all(isinstance(r, str) for r in results), f"a held request was answered: {results}"

            # Dead workers settle nothing: the reservations are still counted until their lease ends.
            if time.monotonic() - reserved_at < LEASE - 0.5:
                assert await store.usage(bucket) == LIMIT
            assert await real_redis.zcard(b"quota:{crash}:things:leases") == LIMIT

            await asyncio.sleep(max(0.0, reserved_at + LEASE + 0.2 - time.monotonic()))
            assert await store.usage(bucket) == 0
            assert await real_redis.zcard(b"quota:{crash}:things:leases") == 0

            # The supervisor replaced the dead workers; whoever answers, the quota is available again.
            statuses = []
            for _ in range(LIMIT + 1):
                statuses.append(await _create_retrying(client, headers))
            assert statuses == [201] * LIMIT + [403]
            assert supervisor.poll() is None
    assert await store.usage(bucket) == LIMIT
    await store.aclose()


async def _create_retrying(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    """One create; a connection a dying worker left in the pool may fail once (nothing was sent to the app)."""
    for _ in range(20):
        try:
            return (await client.post("/things", headers=headers)).status_code
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    raise AssertionError("no worker answered after the kill")
