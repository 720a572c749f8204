"""RedisStore on a real three-master Redis Cluster that the suite starts (see ``redis_cluster``).

The store contract and the middleware tests already run on the cluster through the ``store``
fixture. These tests add what only a cluster can show: projects spread over several nodes, one
script call per hash slot, and per-node script caches.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot

from middleware import Bucket, RedisStore, StoreError
from middleware.keys import counter_keys, quotas_key
from tests.conftest import FakeClock
from tests.servers import RedisCluster, free_port
from tests.test_middleware import client_for, guarded

pytestmark = pytest.mark.anyio

LEASE = 30_000
PROJECTS = [f"project-{i}" for i in range(20)]
#: A store that lost a batch would leave its callers waiting forever: bound every wait.
WAIT = 10.0


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    client = AsyncRedisCluster(host="127.0.0.1", port=redis_cluster.ports[0], socket_timeout=2)
    await client.flushall(target_nodes=AsyncRedisCluster.PRIMARIES)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster_store(cluster_client: AsyncRedisCluster, clock: FakeClock) -> AsyncIterator[RedisStore]:
    store = RedisStore(cluster_client, clock=clock)
    yield store
    await store.aclose()


def slot_of(store: RedisStore, project: str, resource: str = "things") -> int:
    counter, leases, _ = counter_keys(store.prefix, project, resource)
    assert key_slot(counter.encode()) == key_slot(leases.encode())
    return key_slot(counter.encode())


def owner_port(client: AsyncRedisCluster, slot: int) -> int:
    return int(client.nodes_manager.get_node_from_slot(slot).port)


def node_clients(cluster: RedisCluster) -> list[aioredis.Redis]:
    return [aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2) for port in cluster.ports]


async def test_projects_on_every_node_admit_exactly_their_limit(cluster_store: RedisStore,
                                                                cluster_client: AsyncRedisCluster) -> None:
    await cluster_client.initialize()
    ports = {owner_port(cluster_client, slot_of(cluster_store, p)) for p in PROJECTS}
    assert len(ports) >= 2, "the projects must spread over several nodes to test anything"

    buckets = [Bucket(p, "things") for p in PROJECTS]
    calls = [(b, cluster_store.reserve(b, 1, 7, LEASE)) for b in buckets for _ in range(50)]
    decisions = await asyncio.wait_for(asyncio.gather(*(call for _, call in calls)), WAIT)
    admitted = Counter(b.project for (b, _), d in zip(calls, decisions, strict=True) if d.admitted)
    assert admitted == {p: 7 for p in PROJECTS}
    assert [await cluster_store.usage(b) for b in buckets] == [7] * len(buckets)


async def test_one_script_call_per_slot_and_keys_on_the_owning_node(
        redis_cluster: RedisCluster, cluster_store: RedisStore, cluster_client: AsyncRedisCluster) -> None:
    resources = ["things", "orders"]
    buckets = [Bucket(p, r) for p in PROJECTS for r in resources]
    # Warm up: every node learns the script (a NOSCRIPT reload would count as extra calls).
    await asyncio.wait_for(asyncio.gather(*(cluster_store.usage(b) for b in buckets)), WAIT)
    nodes = node_clients(redis_cluster)
    try:
        for node in nodes:
            await node.config_resetstat()
        # One tick: 5 operations per bucket, 200 in all, travel as one batch split by slot.
        decisions = await asyncio.wait_for(
            asyncio.gather(*(cluster_store.reserve(b, 1, 3, LEASE) for b in buckets for _ in range(5))), WAIT)
        assert sum(d.admitted for d in decisions) == 3 * len(buckets)

        slots_by_port: dict[int, set[int]] = defaultdict(set)
        for p in PROJECTS:
            slots_by_port[owner_port(cluster_client, slot_of(cluster_store, p))].add(slot_of(cluster_store, p))
        for port, node in zip(redis_cluster.ports, nodes, strict=True):
            stats = await node.info("commandstats")
            errors = await node.info("errorstats")
            assert not errors, f"node {port} answered errors: {errors}"
            evalsha = stats.get("cmdstat_evalsha", {"calls": 0, "failed_calls": 0})
            assert evalsha["failed_calls"] == 0
            # Both resources of a project share its hash tag, so its slot costs one call in all.
            assert evalsha["calls"] == len(slots_by_port[port]), (port, evalsha)

            # Every key a node holds is of a slot it owns, and a project's keys all sit together.
            for key in await node.keys("quota:*"):
                assert owner_port(cluster_client, key_slot(key)) == port
        assert [await cluster_store.usage(b) for b in buckets] == [3] * len(buckets)
    finally:
        for node in nodes:
            await node.aclose()


async def test_scripts_reload_when_one_node_forgot_them(redis_cluster: RedisCluster,
                                                        cluster_store: RedisStore,
                                                        cluster_client: AsyncRedisCluster) -> None:
    buckets = [Bucket(p, "things") for p in PROJECTS]
    first = await asyncio.wait_for(asyncio.gather(*(cluster_store.reserve(b, 1, 5, LEASE) for b in buckets)), WAIT)
    assert all(d.admitted for d in first)
    await cluster_client.initialize()
    victim = owner_port(cluster_client, slot_of(cluster_store, PROJECTS[0]))
    node = aioredis.Redis(host="127.0.0.1", port=victim, socket_timeout=2)
    try:
        await node.script_flush()
    finally:
        await node.aclose()
    decisions = await asyncio.wait_for(asyncio.gather(*(cluster_store.reserve(b, 1, 5, LEASE) for b in buckets)), WAIT)
    assert [d.used for d in decisions] == [2] * len(buckets)


async def test_shared_blobs_and_locks_on_every_node(cluster_store: RedisStore,
                                                    cluster_client: AsyncRedisCluster) -> None:
    await cluster_client.initialize()
    keys = [quotas_key(cluster_store.prefix, p, "static") for p in PROJECTS]
    assert len({owner_port(cluster_client, key_slot(k.encode())) for k in keys}) >= 2
    for i, project in enumerate(PROJECTS):
        await cluster_store.save(project, "static", "quotas", f"blob-{i}".encode(), 10_000)
    assert [await cluster_store.load(p, "static", "quotas") for p in PROJECTS] == [
        f"blob-{i}".encode() for i in range(len(PROJECTS))]
    assert [await cluster_client.get(k) for k in keys] == [f"blob-{i}".encode() for i in range(len(keys))]
    assert await cluster_store.load(PROJECTS[0], "static", "backoff") is None
    for project in PROJECTS:
        assert await cluster_store.try_lock(project, "static", "me", 10_000)
        assert not await cluster_store.try_lock(project, "static", "you", 10_000)
        await cluster_store.unlock(project, "static", "you")  # not the holder: the lock stays
        assert not await cluster_store.try_lock(project, "static", "you", 10_000)
        await cluster_store.unlock(project, "static", "me")
        assert await cluster_store.try_lock(project, "static", "you", 10_000)


async def test_middleware_on_the_cluster_admits_exactly_the_limit(cluster_store: RedisStore) -> None:
    projects = PROJECTS[:6]
    mw = guarded(cluster_store, limit=7)
    async with client_for(mw) as client:
        requests = [(p, client.post("/things", headers={"X-Project-Id": p, "X-Auth-Token": "tok"}))
                    for p in projects for _ in range(25)]
        responses: list[httpx.Response] = await asyncio.wait_for(asyncio.gather(*(r for _, r in requests)), WAIT)
    assert {r.status_code for r in responses} == {201, 403}
    created = Counter(p for (p, _), r in zip(requests, responses, strict=True) if r.status_code == 201)
    assert created == {p: 7 for p in projects}
    await cluster_store.flush()
    assert [await cluster_store.usage(Bucket(p, "things")) for p in projects] == [7] * len(projects)


# -- an unreachable cluster -------------------------------------------------------------------------
# redis-py raises RedisClusterException, which is no RedisError, when no node answers. RedisStore
# must turn it into StoreError like any other Redis failure, promptly.

@pytest.fixture
async def dead_cluster_store() -> AsyncIterator[RedisStore]:
    client = AsyncRedisCluster(host="127.0.0.1", port=free_port(), socket_timeout=0.3, socket_connect_timeout=0.3)
    store = RedisStore(client, timeout=0.3)
    yield store
    await client.aclose()


async def test_unreachable_cluster_is_a_prompt_store_error(dead_cluster_store: RedisStore) -> None:
    with pytest.raises(StoreError):
        await asyncio.wait_for(dead_cluster_store.reserve(Bucket("p", "things"), 1, 5, LEASE), 1.5)


async def test_unreachable_cluster_fails_shared_reads_as_store_errors(dead_cluster_store: RedisStore) -> None:
    with pytest.raises(StoreError):
        await dead_cluster_store.load("p", "static", "quotas")


# -- many slots of one node in one batch ------------------------------------------------------------
# The async RedisCluster client opens at most max_connections (100 by default) connections per node
# and raises MaxConnectionsError past that instead of waiting. RedisStore sends each slot of a batch
# (up to MAX_BATCH, 256) as its own concurrent script call, so more than 100 busy slots of one node
# in one tick would fail: RedisStore bounds how many script calls are in flight.

async def test_many_projects_of_one_node_in_one_tick(cluster_store: RedisStore,
                                                      cluster_client: AsyncRedisCluster) -> None:
    await cluster_client.initialize()
    port = owner_port(cluster_client, slot_of(cluster_store, PROJECTS[0]))
    projects: dict[int, str] = {}  # one project per slot, every slot on the same node
    for i in range(5000):
        project = f"tenant-{i}"
        slot = slot_of(cluster_store, project)
        if owner_port(cluster_client, slot) == port:
            projects.setdefault(slot, project)
        if len(projects) == 150:
            break
    buckets = [Bucket(p, "things") for p in projects.values()]
    decisions = await asyncio.wait_for(
        asyncio.gather(*(cluster_store.reserve(b, 1, 5, LEASE) for b in buckets)), WAIT)
    assert all(d.admitted for d in decisions)
