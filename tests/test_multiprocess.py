"""Real uvicorn workers sharing one real redis-server: exactness across processes."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from middleware import Bucket, RedisStore
from tests.servers import RedisServer, uvicorn_server
from tests.test_race_4_workers import post

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def burst(base: str, n: int, project: str) -> list[int]:
    """n creates in flight together, each on its own connection (httpx's pool is the slow part at this
    scale, so the bare client of the 4-worker race test is used)."""
    port = int(base.rsplit(":", 1)[1])
    return list(await asyncio.gather(*(post(port, project) for _ in range(n))))


@pytest.mark.parametrize(("leases", "limit", "workers"), [("0", 50, 2), ("1", 50, 2), ("1", 3, 4), ("1", 2000, 2)])
async def test_concurrent_creates_on_workers_admit_exactly_the_limit(redis_server: RedisServer,
                                                                     real_redis: aioredis.Redis, leases: str,
                                                                     limit: int, workers: int) -> None:
    project = f"race-{leases}-{limit}"
    with uvicorn_server("tests.upstreams.barbican_server:app",
                        env={"FAKE_BARBICAN_QUOTAS": json.dumps({"secrets": limit})}) as upstream:
        env = {"QUOTA_SOURCE_URL": upstream, "REDIS_URL": redis_server.url, "QUOTA_LOCAL_LEASES": leases}
        with uvicorn_server("examples.barbican_store:app", env=env, workers=workers) as base:
            total = max(300, limit + limit // 5)
            statuses = await burst(base, total, project)
            assert statuses.count(201) == limit, statuses.count(201)
            assert statuses.count(403) == total - limit
            store = RedisStore(real_redis)
            leases_key = f"quota:{{{project}}}:secrets:leases".encode()
            # Commits travel after the responses; every lease is settled moments later.
            for _ in range(100):
                if await real_redis.zcard(leases_key) == 0:
                    break
                await asyncio.sleep(0.02)
            assert await real_redis.zcard(leases_key) == 0
            assert await store.usage(Bucket(project, "secrets")) == limit
            await store.aclose()
