"""A Redis that lost its data is noticed: ERROR log, metric, and a reconciliation that heals it.

Real redis-servers only: restarted without persistence, flushed, evicting under maxmemory, and the
three-master cluster with one node flushed.
"""

from __future__ import annotations

import logging

import prometheus_client
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from middleware import Bucket, RedisStore
from middleware.metrics import QuotaMetrics
from middleware.reconcile import Reconciler
from tests.conftest import FakeClock
from tests.servers import RedisCluster, RedisServer
from tests.test_faults_redis import BUCKET, Guarded, _answers, wait_for

pytestmark = pytest.mark.anyio


def lost(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and "lost quota data" in r.getMessage()]


async def test_a_restart_without_persistence_is_noticed_and_healed(redis_proc: RedisServer, clock: FakeClock,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    registry = prometheus_client.CollectorRegistry()
    live = {"p": 0}
    guarded = Guarded(redis_proc.url, clock, limit=3, metrics=QuotaMetrics(registry))
    try:
        await restart_and_heal(redis_proc, guarded, live, registry, caplog)
    finally:
        await guarded.aclose()


async def restart_and_heal(redis_proc: RedisServer, guarded: Guarded, live: dict[str, int],
                           registry: prometheus_client.CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    guarded.store.integrity.interval = 0.0  # check at every batch: the test needs no waiting
    reconciler = Reconciler(guarded.store, lambda project, resource: live[project], targets=[("p", "things")])
    for _ in range(3):
        assert (await guarded.post()).status_code == 201
        live["p"] += 1
    assert (await guarded.post()).status_code == 403
    await guarded.store.flush()
    assert not lost(caplog)

    redis_proc.kill()
    redis_proc.start()  # same port, no persistence: every counter is gone
    await wait_for(lambda: _answers(guarded), 2.0, "the restarted Redis")

    last: list[object] = []

    async def healed() -> bool:
        await guarded.store.flush()
        last[:] = [len(lost(caplog)), await guarded.store.usage(BUCKET)]
        return last == [1, 3]

    with caplog.at_level(logging.ERROR):
        # Any call of the store notices the loss (here the probes and reads of wait_for): no
        # create, whose commit could land while the reconciliation reads the truth and be
        # counted on top of it (the reconciler's documented, passing over-count).
        try:
            await wait_for(healed, 5.0, "the loss noticed and the counter reconciled")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: (losses seen, usage) = {last}; log: {caplog.text[-2000:]}") from None
    assert len(lost(caplog)) == 1
    assert registry.get_sample_value("quota_store_data_lost_total") == 1.0
    assert (await guarded.post()).status_code == 403  # healed: the live resources count again
    assert reconciler is not None


async def test_a_healthy_redis_reports_nothing(redis_proc: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(redis_proc.url)
    try:
        assert await store.reserve(Bucket("p", "x"), 1, 10, 60_000)
        for _ in range(3):
            assert await store.integrity.check() is False
    finally:
        await store.aclose()
    assert not lost(caplog)


async def test_a_flush_is_noticed_by_every_process_and_healed_by_one(redis_proc: RedisServer) -> None:
    stores = [RedisStore(redis_proc.url) for _ in range(3)]
    healed: list[int] = []
    noticed: list[int] = []
    for i, store in enumerate(stores):
        store.on_data_loss(lambda i=i: noticed.append(i))
        store.on_data_loss(lambda i=i: healed.append(i), heal=True)
    admin = aioredis.Redis(port=redis_proc.port)
    try:
        for store in stores:
            assert await store.integrity.check() is False  # first use: the marker is written or read
        await admin.flushall()
        assert [await store.integrity.check() for store in stores] == [True, True, True]
        assert sorted(noticed) == [0, 1, 2] and len(healed) == 1
        assert [await store.integrity.check() for store in stores] == [False, False, False]
    finally:
        await admin.aclose()
        for store in stores:
            await store.aclose()


async def test_evictions_are_noticed_and_the_policy_warned_about(redis_proc: RedisServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    admin = aioredis.Redis(port=redis_proc.port)
    store = RedisStore(redis_proc.url)
    try:
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING):
            assert await store.integrity.check() is False
        assert any("allkeys-lru" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory", used + 2 * 1024 * 1024)
        junk = b"x" * 10_000
        for i in range(1000):  # 10 MB into 2 MB of room: Redis evicts
            await admin.set(f"junk:{i}", junk)
        assert int((await admin.info("stats"))["evicted_keys"]) > 0
        with caplog.at_level(logging.ERROR):
            assert await store.integrity.check() is True
        assert any("keys evicted" in r.getMessage() for r in lost(caplog))
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.aclose()
        await store.aclose()


@pytest.mark.slow
async def test_a_cluster_node_that_lost_its_data_is_noticed(redis_cluster: RedisCluster,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    client = AsyncRedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    store = RedisStore(client, prefix="dl:")
    try:
        assert await store.integrity.check() is False
        keys = await store.integrity._marker_keys()  # noqa: SLF001 - one marker per primary is the point
        assert len({client.get_node_from_key(key).name for key in keys}) == 3
        victim = client.get_node_from_key(keys[1])
        await client.flushall(target_nodes=victim)
        with caplog.at_level(logging.ERROR):
            assert await store.integrity.check() is True
        assert [r for r in lost(caplog) if keys[1] in r.getMessage()]
    finally:
        await store.aclose()
        await client.delete(*await store.integrity._marker_keys())  # noqa: SLF001
        await client.aclose()
