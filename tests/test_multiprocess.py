"""Real uvicorn workers sharing one real redis-server: exactness across processes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis.asyncio as aioredis

from middleware import Bucket, RedisStore
from tests.servers import RedisServer, uvicorn_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def burst(base: str, n: int, project: str, concurrency: int) -> list[int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        async def one() -> int:
            response = await client.post("/v1/secrets", json={"name": "s"},
                                         headers={"X-Project-Id": project, "X-Auth-Token": "t"})
            return response.status_code

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_concurrent_creates_on_two_workers_admit_exactly_the_limit(redis_server: RedisServer,
                                                                         real_redis: aioredis.Redis) -> None:
    with uvicorn_server("tests.fake_barbican_server:app",
                        env={"FAKE_BARBICAN_QUOTAS": json.dumps({"secrets": 50})}) as upstream:
        env = {"QUOTA_SOURCE_URL": upstream, "REDIS_URL": redis_server.url}
        with uvicorn_server("examples.barbican_store:app", env=env, workers=2) as base:
            statuses = await burst(base, 300, "race", concurrency=100)
            assert statuses.count(201) == 50, statuses
            assert statuses.count(403) == 250
            store = RedisStore(real_redis)
            assert await store.usage(Bucket("race", "secrets")) == 50
            # Commits travel after the responses; every lease is settled moments later.
            for _ in range(100):
                if await real_redis.zcard(b"quota:{race}:secrets:leases") == 0:
                    break
                await asyncio.sleep(0.02)
            assert await real_redis.zcard(b"quota:{race}:secrets:leases") == 0
            assert await store.usage(Bucket("race", "secrets")) == 50
