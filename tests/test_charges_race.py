"""Mixed requests charging 1 to 3 buckets (a count quota, a per-minute limit, a parent's cap), racing
over four real uvicorn workers on a real Redis and on the real three-master Cluster.

No limit is ever passed, at any level; after the run every bucket's usage equals what the admitted,
successful requests created, and nothing refused or failed holds anything.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from middleware import Bucket, RedisStore
from tests.servers import RedisCluster, RedisServer, uvicorn_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

COUNT, RATE, ORG_CAP = 12, 10, 15
PROJECTS = ("solo", "kid1", "kid2")


async def post(port: int, path: str, project: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nX-Project-Id: {project}\r\nConnection: close\r\n"
                     f"Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(answer.split(b" ", 2)[1])


async def emptied(deployment: str, request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The URL of the session's real Redis or Cluster, and a client of it, every key deleted."""
    if deployment == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client: Any = AsyncRedisCluster(host="127.0.0.1", port=cluster.ports[0])
        await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
        return cluster.url, client
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis(port=server.port)
    await client.flushall()
    return server.url, client


@pytest.mark.parametrize("deployment", ["redis", "cluster"])
async def test_mixed_charges_on_four_workers_never_pass_any_limit(deployment: str,
                                                                  request: pytest.FixtureRequest) -> None:
    url, client = await emptied(deployment, request)
    env = {"REDIS_URL": url, "REDIS_CLUSTER": "1" if deployment == "cluster" else "0", "COUNT": str(COUNT),
           "RATE": str(RATE), "ORG_CAP": str(ORG_CAP)}
    shuffle = random.Random(7)
    calls = [(project, route, fail) for project in PROJECTS for route in ("one", "two", "three")
             for fail in (False,) * 9 + (True,)] * 3
    shuffle.shuffle(calls)
    store = RedisStore(client)
    try:
        with uvicorn_server("tests.charges_app:app", env=env, workers=4) as base:
            port = int(base.rsplit(":", 1)[1])
            statuses = await asyncio.gather(*(post(port, f"/{route}" + ("?fail=1" if fail else ""), project)
                                              for project, route, fail in calls))
        answered = Counter(statuses)
        assert set(answered) <= {201, 403, 429, 500}, answered
        created = Counter(p for (p, _, _), status in zip(calls, statuses, strict=True) if status == 201)
        rated = Counter(p for (p, route, _), status in zip(calls, statuses, strict=True)
                        if status == 201 and route != "one")
        await store.flush()
        views = {p: await store.buckets(p) for p in (*PROJECTS, "org")}
        figures: dict[str, Any] = {
            "statuses": dict(sorted(answered.items())),
            "count usage": {p: await store.usage(Bucket(p, "things")) for p in PROJECTS},
            "org cap usage": await store.usage(Bucket("org", "things")),
            "rate usage per window": {p: [v.used for v in views[p] if v.bucket.resource == "things:rate"]
                                      for p in PROJECTS},
            "leases held": sum(v.reservations for vs in views.values() for v in vs),
        }
        print(f"figures ({deployment}): {figures}")  # shown with -rP
        # Never past a limit, at any level; usage is exactly what was created. (A limit may end a
        # little short of full: a request that fails after admission holds its reservation while
        # the last attempts are refused. The exact-cap race below has no failing request.)
        assert figures["count usage"] == {p: created[p] for p in PROJECTS}
        assert all(used <= COUNT for used in figures["count usage"].values())
        assert figures["org cap usage"] == created["kid1"] + created["kid2"] <= ORG_CAP
        assert answered[403] > 0  # the limits were met
        assert all(used <= RATE for windows in figures["rate usage per window"].values() for used in windows)
        assert {p: sum(w) for p, w in figures["rate usage per window"].items()} == {p: rated[p] for p in PROJECTS}
        # Nothing refused or failed holds anything.
        assert figures["leases held"] == 0
    finally:
        await store.aclose()
        await client.aclose()


@pytest.mark.parametrize("deployment", ["redis", "cluster"])
async def test_children_racing_for_their_parents_cap_admit_exactly_the_cap(deployment: str,
                                                                            request: pytest.FixtureRequest) -> None:
    url, client = await emptied(deployment, request)
    # Each kid alone could take 12; their parent allows 15 in all.
    env = {"REDIS_URL": url, "REDIS_CLUSTER": "1" if deployment == "cluster" else "0", "COUNT": str(COUNT),
           "RATE": "1000", "ORG_CAP": str(ORG_CAP)}
    store = RedisStore(client)
    try:
        with uvicorn_server("tests.charges_app:app", env=env, workers=4) as base:
            port = int(base.rsplit(":", 1)[1])
            kids = ["kid1", "kid2"] * 60
            statuses = await asyncio.gather(*(post(port, "/one", kid) for kid in kids))
        created = Counter(kid for kid, status in zip(kids, statuses, strict=True) if status == 201)
        await store.flush()
        usage = {p: await store.usage(Bucket(p, "things")) for p in ("kid1", "kid2", "org")}
        print(f"figures ({deployment}): created {dict(created)}, usage {usage}")  # shown with -rP
        assert Counter(statuses) == Counter({201: ORG_CAP, 403: len(kids) - ORG_CAP})
        assert usage == {"kid1": created["kid1"], "kid2": created["kid2"], "org": ORG_CAP}
    finally:
        await store.aclose()
        await client.aclose()
