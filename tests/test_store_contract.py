"""One contract, every store: MemoryStore, RedisStore on fakeredis, RedisStore on redis-server."""

from __future__ import annotations

import asyncio

import pytest

from middleware import Bucket, Store
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

B = Bucket("project-a", "secrets")
LEASE = 30_000


async def test_admits_up_to_the_limit_and_rejects_the_next(store: Store) -> None:
    decisions = [await store.reserve(B, 1, 3, LEASE) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    assert [d.used for d in decisions] == [1, 2, 3, 3]
    assert decisions[3].reservation is None
    assert decisions[2].remaining == 0
    assert await store.usage(B) == 3


async def test_negative_limit_admits_everything_and_still_counts(store: Store) -> None:
    for _ in range(5):
        assert (await store.reserve(B, 1, -1, LEASE)).admitted
    assert await store.usage(B) == 5


async def test_zero_limit_rejects_the_first(store: Store) -> None:
    decision = await store.reserve(B, 1, 0, LEASE)
    assert not decision.admitted
    assert await store.usage(B) == 0


async def test_cost_counts_whole(store: Store) -> None:
    assert (await store.reserve(B, 3, 5, LEASE)).admitted
    assert not (await store.reserve(B, 3, 5, LEASE)).admitted  # 3 + 3 > 5: no partial admission
    assert (await store.reserve(B, 2, 5, LEASE)).used == 5


async def test_commit_keeps_and_refund_gives_back(store: Store) -> None:
    kept = await store.reserve(B, 1, 2, LEASE)
    dropped = await store.reserve(B, 1, 2, LEASE)
    assert kept.reservation and dropped.reservation
    await store.commit(kept.reservation)
    await store.refund(dropped.reservation)
    await store.refund(dropped.reservation)  # a second refund gives nothing more
    assert await store.usage(B) == 1
    assert (await store.reserve(B, 1, 2, LEASE)).admitted


async def test_unsettled_lease_expires_by_itself(store: Store, clock: FakeClock) -> None:
    held = await store.reserve(B, 2, 2, LEASE)
    assert not (await store.reserve(B, 1, 2, LEASE)).admitted
    clock.advance(LEASE / 1000 + 0.001)
    assert await store.usage(B) == 0
    assert (await store.reserve(B, 1, 2, LEASE)).admitted
    # The killed request's refund arriving late must not give its cost back twice.
    assert held.reservation
    await store.refund(held.reservation)
    assert await store.usage(B) == 1


async def test_commit_after_lease_expiry_counts_the_creation_again(store: Store, clock: FakeClock) -> None:
    slow = await store.reserve(B, 1, 5, LEASE)
    clock.advance(LEASE / 1000 + 1)
    assert await store.usage(B) == 0
    assert slow.reservation
    await store.commit(slow.reservation)
    assert await store.usage(B) == 1


async def test_release_gives_back_never_below_zero(store: Store) -> None:
    for _ in range(2):
        decision = await store.reserve(B, 1, 5, LEASE)
        assert decision.reservation
        await store.commit(decision.reservation)
    assert await store.release(B, 1) == 1
    assert await store.release(B, 5) == 0
    assert await store.release(B, 1) == 0
    assert await store.usage(B) == 0


async def test_set_usage_keeps_live_leases(store: Store) -> None:
    held = await store.reserve(B, 1, 10, LEASE)
    await store.set_usage(B, 4)
    assert await store.usage(B) == 5
    assert held.reservation
    await store.refund(held.reservation)
    assert await store.usage(B) == 4


async def test_buckets_are_independent(store: Store) -> None:
    other_project = Bucket("project-b", "secrets")
    other_resource = Bucket("project-a", "orders")
    assert (await store.reserve(B, 1, 1, LEASE)).admitted
    assert (await store.reserve(other_project, 1, 1, LEASE)).admitted
    assert (await store.reserve(other_resource, 1, 1, LEASE)).admitted
    assert not (await store.reserve(B, 1, 1, LEASE)).admitted


async def test_hostile_names_never_share_a_counter(store: Store) -> None:
    # Pairs that a naive "prefix:project:resource" key would merge.
    buckets = [Bucket("a:b", "c"), Bucket("a", "b:c"), Bucket("{a}", "c"), Bucket("a", "c"),
               Bucket("a%3Ab", "c"), Bucket("a\nb", "c"), Bucket("ä", "c"), Bucket("*", "c")]
    for bucket in buckets:
        assert (await store.reserve(bucket, 1, 1, LEASE)).admitted, bucket
    for bucket in buckets:
        assert await store.usage(bucket) == 1, bucket


async def test_concurrent_reserves_admit_exactly_the_limit(store: Store) -> None:
    decisions = await asyncio.gather(*(store.reserve(B, 1, 37, LEASE) for _ in range(200)))
    assert sum(d.admitted for d in decisions) == 37
    assert await store.usage(B) == 37


async def test_flush_applies_handed_over_settlements(store: Store) -> None:
    decisions = await asyncio.gather(*(store.reserve(B, 1, 10, LEASE) for _ in range(10)))
    for i, decision in enumerate(decisions):
        assert decision.reservation
        await (store.commit(decision.reservation) if i % 2 else store.refund(decision.reservation))
    await store.flush()
    assert await store.usage(B) == 5
