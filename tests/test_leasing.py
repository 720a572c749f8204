"""Local leases: the whole store contract over LeasingStore, plus what leasing itself promises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from middleware import Bucket, MemoryStore, RedisStore, Store
from middleware.stores.leasing import LeasingStore
from tests.conftest import FakeClock
from tests.servers import RedisServer
from tests.test_store_contract import *  # noqa: F403 - the same contract, run over leased stores

pytestmark = pytest.mark.anyio
LEASE_MS = 30_000


@pytest.fixture(params=["leased-memory", "leased-redis"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    if request.param == "leased-memory":
        yield LeasingStore(MemoryStore(clock=clock))
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = aioredis.Redis(port=server.port, socket_timeout=2)
    await client.flushall()
    leased = LeasingStore(RedisStore(client, clock=clock))
    yield leased
    await leased.aclose()
    await client.aclose()


class CountingStore(MemoryStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.reserves = 0

    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1):  # type: ignore[no-untyped-def]
        self.reserves += 1
        return await super().reserve(bucket, cost, limit, lease_ms, scale)


B2 = Bucket("p", "secrets")


async def test_far_from_the_limit_most_admissions_stay_local(clock: FakeClock) -> None:
    inner = CountingStore(clock)
    leased = LeasingStore(inner, max_block=100)
    for _ in range(500):
        decision = await leased.reserve(B2, 1, -1, LEASE_MS)
        assert decision.reservation
        await leased.commit(decision.reservation)
    assert inner.reserves <= 10  # blocks of 100, not 500 round trips
    assert await leased.usage(B2) == 500
    await leased.flush()
    assert await inner.usage(B2) == 500  # unused block units went back


async def test_an_open_block_decides_and_settles_without_a_coroutine(clock: FakeClock) -> None:
    inner = CountingStore(clock)
    leased = LeasingStore(inner, max_block=100, block_seconds=60)
    assert leased.reserve_nowait(B2, 1, -1, LEASE_MS) is None  # no block yet: the store must be asked
    first = await leased.reserve(B2, 1, -1, LEASE_MS)  # takes a block of 100
    assert first.reservation and inner.reserves == 1
    local = [leased.reserve_nowait(B2, 1, -1, LEASE_MS) for _ in range(50)]
    assert all(d is not None and d.admitted for d in local) and inner.reserves == 1
    for i, decision in enumerate(local):
        assert decision is not None and decision.reservation
        assert leased.settle_nowait(decision.reservation, keep=i < 20)
    assert leased.settle_nowait(first.reservation, keep=True)
    # A reservation the inner store decided (no block: where the project stands is not known yet)
    # is the inner store's to settle: a memory store does it in process too.
    own = await leased.reserve(Bucket("q", "secrets"), 1, 10, LEASE_MS)
    assert own.reservation and inner.reserves == 2
    assert leased.settle_nowait(own.reservation, True)
    assert await inner.commits(Bucket("q", "secrets")) == 1
    await leased.flush()
    assert await inner.usage(B2) == 1 + 20  # the 30 refunded and the block's unused units went back
    assert await inner.usage(Bucket("q", "secrets")) == 1


async def test_near_the_limit_every_decision_goes_to_the_store(clock: FakeClock) -> None:
    inner = CountingStore(clock)
    leased = LeasingStore(inner)
    decisions = [await leased.reserve(B2, 1, 50, LEASE_MS) for _ in range(60)]
    assert sum(d.admitted for d in decisions) == 50
    assert inner.reserves == 60  # 50 remaining / 64 is below one unit: no blocks


async def test_blocks_shrink_as_the_project_nears_its_limit(clock: FakeClock) -> None:
    inner = CountingStore(clock)
    leased = LeasingStore(inner, max_block=1000, block_seconds=60)
    admitted = 0
    while True:
        decision = await leased.reserve(B2, 1, 10_000, LEASE_MS)
        if not decision.admitted:
            break
        admitted += 1
        assert decision.reservation
        await leased.commit(decision.reservation)
    assert admitted == 10_000  # one worker holding its own blocks loses nothing
    assert 20 < inner.reserves < 1_000
    await leased.flush()
    assert await inner.usage(B2) == 10_000


async def test_workers_sharing_redis_never_admit_past_the_limit(real_redis: aioredis.Redis,
                                                                clock: FakeClock) -> None:
    workers = [LeasingStore(RedisStore(real_redis, clock=clock), block_seconds=0.05) for _ in range(4)]
    limit = 5_000

    async def create(worker: LeasingStore) -> bool:
        decision = await worker.reserve(B2, 1, limit, LEASE_MS)
        if decision.reservation:
            await asyncio.sleep(0)
            await worker.commit(decision.reservation)
        return decision.admitted

    results = await asyncio.gather(*(create(workers[i % 4]) for i in range(6_000)))
    for worker in workers:
        await worker.flush()
    admitted = sum(results)
    assert admitted <= limit
    assert await workers[0].inner.usage(B2) == admitted  # every block settled to what was kept


async def test_a_lowered_limit_closes_the_block(clock: FakeClock) -> None:
    leased = LeasingStore(MemoryStore(clock=clock), block_seconds=60)
    for _ in range(3):
        decision = await leased.reserve(B2, 1, 100_000, LEASE_MS)
        assert decision.reservation
        await leased.commit(decision.reservation)
    # The source now says 4: the open block (granted under 100000) must not admit any more.
    statuses = [(await leased.reserve(B2, 1, 4, LEASE_MS)).admitted for _ in range(3)]
    assert statuses == [True, False, False]


async def test_a_killed_workers_block_expires_with_its_lease(clock: FakeClock) -> None:
    inner = MemoryStore(clock=clock)
    doomed = LeasingStore(inner, block_seconds=60)
    await doomed.reserve(B2, 1, -1, LEASE_MS)  # takes a block, then the worker "dies"
    assert await inner.usage(B2) == 1000
    clock.advance((LEASE_MS + 60_000) / 1000 + 1)
    assert await inner.usage(B2) == 0


async def test_refunds_go_back_to_the_block(clock: FakeClock) -> None:
    inner = CountingStore(clock)
    leased = LeasingStore(inner, max_block=10, block_seconds=60)
    for _ in range(30):
        decision = await leased.reserve(B2, 1, -1, LEASE_MS)
        assert decision.reservation
        await leased.refund(decision.reservation)
    assert inner.reserves == 1
    await leased.flush()
    assert await inner.usage(B2) == 0


async def test_a_limit_lowered_at_the_source_takes_effect_within_one_ttl(real_redis: aioredis.Redis,
                                                                         clock: FakeClock) -> None:
    from middleware import BarbicanSource, QuotaMiddleware
    from tests.test_middleware import RULES, client_for, inner_app
    from tests.upstreams import FakeBarbican

    upstream = FakeBarbican({"tok": {"things": 100_000}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, store=RedisStore(real_redis, clock=clock), local_leases=True,
                         source=BarbicanSource("http://q.test", client=upstream.client(), resources=["things"]),
                         cache_ttl=10, cache_jitter=0, clock=clock)
    headers = {"X-Project-Id": "p", "X-Auth-Token": "tok"}
    async with client_for(mw) as client:
        assert [(await client.post("/things", headers=headers)).status_code for _ in range(20)] == [201] * 20
        assert isinstance(mw.store, LeasingStore) and mw.store._open  # admitting from a local block
        upstream.quotas_by_token["tok"] = {"things": 25}
        clock.advance(10)  # one TTL later the source's new limit is read ...
        statuses = [(await client.post("/things", headers=headers)).status_code for _ in range(10)]
    assert statuses == [201] * 5 + [403] * 5  # ... and the open block admits nothing past it
    await mw.store.flush()
    assert await mw.store.usage(Bucket("p", "things")) == 25
