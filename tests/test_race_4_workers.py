"""Four real uvicorn workers on one real redis-server: 1000 concurrent creates against a limit of 100.

The example Barbican store (examples/barbican_store.py) is served with ``--workers 4`` and asks a
Barbican quota API (tests/upstreams/barbican_server.py) for a ``secrets`` quota of 100. Each round uses
a fresh project, so each round also races the four workers' cold quota caches.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis

from middleware import Bucket, RedisStore
from tests.servers import RedisServer, uvicorn_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LIMIT = 100
CREATES = 1000
ROUNDS = 3


async def post(port: int, project: str) -> int:
    """One ``POST /v1/secrets`` on its own connection; returns the status.

    A bare asyncio HTTP/1.1 client: httpx's pool costs O(connections) per request, which at a
    thousand connections takes far longer than the server does.
    """
    body = b'{"name": "s"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/secrets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"X-Project-Id: " + project.encode() + b"\r\nX-Auth-Token: t\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    _, _, payload = rest.partition(b"\r\n\r\n")
    doc = json.loads(payload)
    assert ("secret_ref" in doc) if status == 201 else (doc["code"] == status), answer
    return status


async def burst(port: int, project: str) -> Counter[int]:
    """CREATES creates, all in flight together (each on its own connection), over the four workers."""
    start = asyncio.Event()

    async def one() -> int:
        await start.wait()
        return await post(port, project)

    tasks = [asyncio.ensure_future(one()) for _ in range(CREATES)]
    await asyncio.sleep(0)
    start.set()
    return Counter(await asyncio.gather(*tasks))


async def settled(real_redis: aioredis.Redis, project: str) -> None:
    """Commits travel after the responses: wait (briefly) until no lease is left."""
    key = f"quota:{{{project}}}:secrets:leases"
    for _ in range(150):
        if await real_redis.zcard(key) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{await real_redis.zcard(key)} reservations of {project} never settled")


async def test_1000_concurrent_creates_on_four_workers_admit_exactly_100(redis_server: RedisServer,
                                                                         real_redis: aioredis.Redis) -> None:
    store = RedisStore(real_redis)
    started = time.monotonic()
    with uvicorn_server("tests.upstreams.barbican_server:app",
                        env={"FAKE_BARBICAN_QUOTAS": json.dumps({"secrets": LIMIT})}) as upstream:
        env = {"QUOTA_SOURCE_URL": upstream, "REDIS_URL": redis_server.url}
        with uvicorn_server("examples.barbican_store:app", env=env, workers=4) as base:
            for round_ in range(ROUNDS):
                project = f"race-{round_}-{uuid.uuid4().hex[:8]}"
                statuses = await burst(int(base.rsplit(":", 1)[1]), project)
                assert statuses == Counter({201: LIMIT, 403: CREATES - LIMIT}), f"round {round_}: {statuses}"
                await settled(real_redis, project)
                assert await store.usage(Bucket(project, "secrets")) == LIMIT
    await store.aclose()
    assert time.monotonic() - started < 30
