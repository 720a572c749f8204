"""One contract, every store: MemoryStore, RedisStore on fakeredis, RedisStore on redis-server."""

from __future__ import annotations

import asyncio

import pytest

from middleware import Bucket, BucketUsage, Decision, MemoryStore, RedisStore, Store, StoreError
from middleware.keys import commits_key, counter_keys, member_id
from middleware.stores.base import WINDOW_GRACE_MS, Claim, Reservation, Taken, reservation_of
from middleware.stores.memory import SWEEP_EVERY_MS
from middleware.windows import Period
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


async def test_a_rejection_leaves_nothing_behind(store: Store, clock: FakeClock) -> None:
    kept = await store.reserve(B, 2, 2, LEASE)
    assert kept.reservation
    await store.commit(kept.reservation)
    for _ in range(3):
        rejected = await store.reserve(B, 1, 2, LEASE)
        assert not rejected.admitted and rejected.used == 2
    clock.advance(LEASE / 1000 + 1)  # a lease a rejection left behind would be given back now
    assert await store.usage(B) == 2


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


async def test_a_group_committed_after_its_leases_expired_counts_in_every_bucket_once(store: Store,
                                                                                       clock: FakeClock) -> None:
    other = Bucket("org", "secrets")
    slow = await store.reserve_all([Claim(B, 1, 5), Claim(other, 2, 5)], LEASE)
    clock.advance(LEASE / 1000 + 1)
    assert [await store.usage(b) for b in (B, other)] == [0, 0]
    for decision in slow:
        assert decision.reservation
        await store.commit(decision.reservation)
        await store.commit(decision.reservation)  # sent twice: still once
    await store.flush()
    assert [await store.usage(b) for b in (B, other)] == [1, 2]


async def _settle_together(store: Store, decisions: list[Decision], keep: bool) -> None:
    """A group's reservations settled as the engine settles them: together where the store can."""
    reservations = [d.reservation for d in decisions if d.reservation is not None]
    if not store.settle_all_nowait(reservations, keep):
        for reservation in reservations:
            await (store.commit(reservation) if keep else store.refund(reservation))


async def test_a_group_settled_together_commits_or_refunds_every_bucket(store: Store, clock: FakeClock) -> None:
    # One project's buckets (one hash slot on a cluster): a count quota, another, a window.
    orders, minute = Bucket(B.project, "orders"), Bucket(B.project, "secrets:rate", Period(60).window_at(clock()))
    claims = [Claim(B, 1, 5), Claim(orders, 2, 5), Claim(minute, 1, 5)]
    await _settle_together(store, await store.reserve_all(claims, LEASE), keep=True)
    await _settle_together(store, await store.reserve_all(claims, LEASE), keep=False)
    await store.flush()
    assert [await store.usage(b) for b in (B, orders, minute)] == [1, 2, 1]
    assert [await store.commits(b) for b in (B, orders, minute)] == [1, 2, 1]
    clock.advance(LEASE / 1000 + 1)  # nothing is left held: no lease expires into a give-back
    assert [await store.usage(b) for b in (B, orders, minute)] == [1, 2, 1]
    if isinstance(store, RedisStore):  # the window's keys still expire after it
        assert minute.window is not None
        start = int(minute.window.start)
        for key in (*counter_keys(store.prefix, B.project, minute.resource, start)[:2],
                    commits_key(store.prefix, B.project, minute.resource, start)):
            assert await store.client.pttl(key) != -1, key


async def test_a_group_settled_together_after_its_leases_expired_counts_in_every_bucket_once(
        store: Store, clock: FakeClock) -> None:
    orders = Bucket(B.project, "orders")
    slow = await store.reserve_all([Claim(B, 1, 5), Claim(orders, 2, 5)], LEASE)
    clock.advance(LEASE / 1000 + 1)
    assert [await store.usage(b) for b in (B, orders)] == [0, 0]
    await _settle_together(store, slow, keep=True)
    await _settle_together(store, slow, keep=True)  # sent twice: still once
    await store.flush()
    assert [await store.usage(b) for b in (B, orders)] == [1, 2]


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


async def test_nowait_calls_count_like_awaited_ones(store: Store) -> None:
    # The middleware asks reserve_nowait / settle_nowait first and awaits only when a store has no
    # answer in process; whichever way each call goes, the counting is the same.
    decisions = [store.reserve_nowait(B, 1, 4, LEASE) or await store.reserve(B, 1, 4, LEASE) for _ in range(6)]
    assert [d.admitted for d in decisions] == [True] * 4 + [False] * 2
    for i, decision in enumerate(decisions[:4]):
        assert decision.reservation
        keep = i % 2 == 0
        if not store.settle_nowait(decision.reservation, keep):
            await (store.commit(decision.reservation) if keep else store.refund(decision.reservation))
    await store.flush()
    assert await store.usage(B) == 2


async def test_taken_calls_count_like_awaited_ones(store: Store, clock: FakeClock) -> None:
    # The engine's fast path: take_nowait / settle_taken_nowait, in plain values, where a store
    # decides in process, and take where it must be awaited; whichever way each call goes, the
    # counting is the same.
    held: list[Reservation] = []
    refused = 0
    for _ in range(6):
        taken = store.take_nowait(B, 1, 4, LEASE)
        later = store.take(B, 1, 4, LEASE) if taken is None else None
        if later is not None:
            taken = await later
            if taken is None:  # refused: nothing held
                refused += 1
                continue
        if taken is not None:
            used, limit, _, expires_ms = taken
            assert (used, limit) == (len(held) + 1, 4) and expires_ms == int(clock() * 1000) + LEASE
            held.append(reservation_of(B, 1, taken))
            continue
        decision = await store.reserve(B, 1, 4, LEASE)  # refused, or not decidable in process
        if decision.reservation is None:
            refused += 1
        else:
            held.append(decision.reservation)
    assert len(held) == 4 and refused == 2
    for i, reservation in enumerate(held):
        keep = i % 2 == 0
        for _ in range(2):  # settled twice: counted once
            if not store.settle_taken_nowait(B, 1, reservation.member, keep):
                await (store.commit(reservation) if keep else store.refund(reservation))
    await store.flush()
    assert await store.usage(B) == 2


async def test_a_taken_lease_expires_and_a_late_commit_counts_once(store: Store, clock: FakeClock) -> None:
    taken = store.take_nowait(B, 2, 2, LEASE)
    later = store.take(B, 2, 2, LEASE) if taken is None else None
    if later is not None:
        taken = await later
    if taken is None:  # a store that takes nothing in plain values settles nothing that way either
        assert not store.settle_taken_nowait(B, 2, "any", True) and await store.usage(B) == 0
        return
    clock.advance(LEASE / 1000 + 0.001)
    assert await store.usage(B) == 0  # the lease was given back
    for _ in range(2):
        assert store.settle_taken_nowait(B, 2, taken[2], True)
    await store.flush()
    assert await store.usage(B) == 2
    assert store.take_nowait(B, 1, 2, LEASE) is None  # full: refused, nothing held
    later = store.take(B, 1, 2, LEASE)
    assert later is None or await later is None
    assert await store.usage(B) == 2


async def test_a_group_taken_counts_like_one_reserved(store: Store) -> None:
    a, b = Bucket("p", "a"), Bucket("p", "b")
    # Plain tuples, as the engine passes them: a plan's very claims on every request.
    claims = ((a, 1, 2, 1), (b, 2, 10, 1))

    async def take() -> list[Taken] | None:
        """take_all_nowait where the store decides in process, else take_all (awaited)."""
        taken = store.take_all_nowait(claims, LEASE)
        later = store.take_all(claims, LEASE) if taken is None else None
        return taken if later is None else await later

    first = await take()
    if first is None:  # a store that takes nothing in plain values: nothing held
        assert [await store.usage(bucket) for bucket in (a, b)] == [0, 0]
        return
    second = await take()
    assert second is not None
    assert [(used, limit) for used, limit, _, _ in first + second] == [(1, 2), (2, 10), (2, 2), (4, 10)]
    assert len({member_id(member) for _, _, member, _ in first}) == 1  # one id for the group, as reserve_all
    assert await take() is None  # a is full: refused whole, b untouched
    assert [await store.usage(bucket) for bucket in (a, b)] == [2, 4]
    for taken, keep in ((first, True), (second, False)):
        for _ in range(2):  # settled twice: counted once
            if keep or not store.settle_taken_all_nowait(claims, taken, keep):  # at once, or bucket by bucket
                for (bucket, cost, _, _), (_, _, member, _) in zip(claims, taken, strict=True):
                    assert store.settle_taken_nowait(bucket, cost, member, keep)
    await store.flush()
    assert [await store.usage(bucket) for bucket in (a, b)] == [1, 2]


async def test_flush_applies_handed_over_settlements(store: Store) -> None:
    decisions = await asyncio.gather(*(store.reserve(B, 1, 10, LEASE) for _ in range(10)))
    for i, decision in enumerate(decisions):
        assert decision.reservation
        await (store.commit(decision.reservation) if i % 2 else store.refund(decision.reservation))
    await store.flush()
    assert await store.usage(B) == 5


# -- windows, metering, seeding -------------------------------------------------------------------

def windowed(clock: FakeClock, seconds: float = 60) -> Bucket:
    return Bucket("project-a", "credits", Period(seconds).window_at(clock()))


async def test_a_window_starts_from_zero(store: Store, clock: FakeClock) -> None:
    first = windowed(clock)
    kept = await store.reserve(first, 2, 2, LEASE)
    assert kept.reservation
    await store.commit(kept.reservation)
    assert not (await store.reserve(first, 1, 2, LEASE)).admitted
    clock.advance(60)
    second = windowed(clock)
    assert second != first
    assert (await store.reserve(second, 2, 2, LEASE)).admitted
    assert await store.usage(first) == 2  # the old window is untouched until it expires


async def test_windowed_counters_expire_after_their_window(store: Store, clock: FakeClock) -> None:
    bucket = windowed(clock)
    decision = await store.reserve(bucket, 1, 5, LEASE)
    assert decision.reservation
    await store.commit(decision.reservation)
    await store.flush()
    clock.advance(60 + WINDOW_GRACE_MS / 1000 + 1)
    store = getattr(store, "inner", store)  # a LeasingStore keeps its counters in the store it wraps
    if isinstance(store, RedisStore):
        # Redis expires keys on its own clock: check the deadline it was given instead of waiting.
        counter, *_ = counter_keys(store.prefix, bucket.project, bucket.resource, int(bucket.window.start))
        deadline_ms = await store.client.pexpiretime(counter)
        assert deadline_ms == bucket.expires_ms
    else:
        await store.usage(Bucket("other", "x"))  # any access lets the store sweep
        assert await store.buckets(bucket.project) == []


async def test_a_bucket_refused_on_its_first_request_holds_nothing(store: Store) -> None:
    # A disabled resource (limit 0) refuses every request. (The memory store keeps no bucket for
    # it at all; Redis may keep its empty keys, listed with nothing used.)
    disabled = Bucket("project-refused", "secrets")
    decision = await store.reserve(disabled, 1, 0, LEASE)
    assert not decision.admitted and decision.reservation is None and decision.used == 0
    await store.flush()
    assert await store.usage(disabled) == 0
    assert all((view.used, view.reserved) == (0, 0) for view in await store.buckets(disabled.project))
    if isinstance(store, MemoryStore):
        assert await store.buckets(disabled.project) == []


async def test_weighted_costs_never_admit_past_the_limit(store: Store) -> None:
    # Thousandths of a credit: 0.3 credits each against 1.0 admits 3, never a 4th.
    decisions = await asyncio.gather(*(store.reserve(B, 300, 1000, LEASE) for _ in range(10)))
    assert sum(d.admitted for d in decisions) == 3
    assert await store.usage(B) == 900


async def test_metering_admits_below_the_limit_then_charges_after(store: Store) -> None:
    assert (await store.check(B, 100)).admitted
    assert await store.charge(B, 70) == 70
    assert (await store.check(B, 100)).admitted  # 70 < 100: one more response may go out
    assert await store.charge(B, 70) == 140  # a charge is what was used, past the limit or not
    decision = await store.check(B, 100)
    assert not decision.admitted and decision.used == 140
    assert (await store.check(B, -1)).admitted


async def test_seed_raises_usage_but_never_lowers_it(store: Store) -> None:
    assert await store.seed(B, 50) == 50
    assert await store.seed(B, 20) == 50
    assert await store.charge(B, 5) == 55
    assert await store.seed(B, 60) == 60


# -- Redis only: what Redis itself can do to us ---------------------------------------------------

async def test_a_corrupt_counter_fails_alone(store: Store) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("only Redis can be corrupted from outside")
    good, bad = Bucket("good", "secrets"), Bucket("bad", "secrets")
    counter, *_ = counter_keys(store.prefix, "bad", "secrets")
    await store.client.set(counter, b"not-a-number")
    results = await asyncio.gather(store.reserve(good, 1, 5, LEASE), store.reserve(bad, 1, 5, LEASE),
                                   return_exceptions=True)  # one batch, one script call
    assert isinstance(results[0], Decision) and results[0].admitted
    assert isinstance(results[1], StoreError) and "not a number" in str(results[1])
    assert await store.client.get(counter) == b"not-a-number"  # nothing was made up


async def test_a_group_with_a_corrupt_counter_fails_whole_and_holds_nothing(store: Store) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("only Redis can be corrupted from outside")
    good, bad, alone = Bucket("p", "good"), Bucket("p", "bad"), Bucket("q", "alone")
    counter, *_ = counter_keys(store.prefix, "p", "bad")
    await store.client.set(counter, b"not-a-number")
    # Two groups and a single reserve in one script call: the bad group fails, the others are answered.
    results = await asyncio.gather(store.reserve_all([Claim(good, 1, 5), Claim(bad, 1, 5)], LEASE),
                                   store.reserve_all([Claim(alone, 1, 5), Claim(good, 1, 5)], LEASE),
                                   store.reserve(alone, 1, 5, LEASE), return_exceptions=True)
    assert isinstance(results[0], StoreError) and "not a number" in str(results[0])
    assert isinstance(results[1], list) and results[1][1].used == 1 and isinstance(results[2], Decision)
    assert {results[1][0].used, results[2].used} == {1, 2}  # "alone" twice, in either order
    await store.flush()
    assert await store.usage(good) == 1  # the failed group's good bucket holds nothing
    assert await store.client.get(counter) == b"not-a-number"


async def test_a_settlement_on_a_corrupt_counter_is_given_up_loudly_and_changes_nothing(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("only Redis can be corrupted from outside")
    held = await store.reserve(B, 1, 5, LEASE)
    assert held.reservation
    counter, leases, _ = counter_keys(store.prefix, B.project, B.resource)
    await store.client.set(counter, b"not-a-number")
    await store.refund(held.reservation)
    await store.flush()
    lost = [r for r in caplog.records if r.getMessage().startswith("gave up on a quota settlement")]
    assert [r.levelname for r in lost] == ["ERROR"] and "not a number" in lost[0].getMessage()
    assert store.pending_settlements == 0  # sending it again cannot mend a corrupt counter
    assert await store.client.zscore(leases, held.reservation.member) is not None  # the lease was not taken


async def test_a_reservation_sent_again_counts_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("only the Redis store sends a reservation again (after a lost connection)")
    monkeypatch.setattr("middleware.stores.redis.new_member", lambda cost: f"same-id:{cost}")
    first = await store.reserve(B, 1, 5, LEASE)
    again = await store.reserve(B, 1, 5, LEASE)  # same member, same lease expiry: a resend
    assert first.admitted and again.admitted
    assert again.used == 1 and await store.usage(B) == 1


async def test_a_reservation_id_another_holds_is_never_a_free_admission(
        store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("ids collide only across processes sharing a store")
    # Processes forked after import may draw the same ids: the script must not admit the second.
    monkeypatch.setattr("middleware.stores.redis.new_member", lambda cost: f"same-id:{cost}")
    mine = await store.reserve(B, 1, 5, LEASE)
    assert mine.reservation
    clock.advance(0.001)  # another process, a millisecond later
    with pytest.raises(StoreError, match="duplicate reservation id"):
        await store.reserve(B, 1, 5, LEASE)
    assert await store.usage(B) == 1
    await store.refund(mine.reservation)  # the holder's lease is untouched
    assert await store.usage(B) == 0


async def test_scripts_reload_after_script_flush(store: Store) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("scripts are a Redis thing")
    assert (await store.reserve(B, 1, 5, LEASE)).admitted
    await store.client.script_flush()
    assert (await store.reserve(B, 1, 5, LEASE)).used == 2


async def test_settlements_sent_twice_count_once(store: Store, clock: FakeClock) -> None:
    kept = await store.reserve(B, 1, 5, LEASE)
    late = await store.reserve(B, 1, 5, LEASE)
    dropped = await store.reserve(B, 1, 5, LEASE)
    assert kept.reservation and late.reservation and dropped.reservation
    for _ in range(2):  # a retry after a timeout sends the same settlement again
        await store.commit(kept.reservation)
        await store.refund(dropped.reservation)
    await store.flush()
    assert await store.usage(B) == 2  # kept + the still-leased late one
    clock.advance(LEASE / 1000 + 1)  # the late one's lease expires and is given back ...
    assert await store.usage(B) == 1
    for _ in range(2):  # ... then its commit arrives, twice
        await store.commit(late.reservation)
    await store.flush()
    assert await store.usage(B) == 2



async def test_commits_handed_over_together_are_each_kept_once(store: Store, clock: FakeClock) -> None:
    # Handed over in one go (the Redis store sends those of one bucket and cost as one operation):
    # two costs, a refund among them, and a commit whose lease already expired, which counts again.
    late = (await store.reserve(B, 1, -1, 1_000)).reservation
    clock.advance(2)
    assert late and await store.usage(B) == 0  # its lease expired and was given back
    held = [(await store.reserve(B, cost, -1, LEASE)).reservation for cost in (1, 3, 1, 3, 1)]
    dropped = (await store.reserve(B, 1, -1, LEASE)).reservation
    assert all(held) and dropped
    for reservation in [*held, late]:
        await store.commit(reservation)  # type: ignore[arg-type]
    await store.refund(dropped)
    await store.flush()
    assert await store.usage(B) == 10
    clock.advance(LEASE / 1000 + 1)  # no lease is left to expire
    assert await store.usage(B) == 10


def _operations_sent(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """What ``store`` sends from now on: each operation's kind, and how many members (or group
    ids) it carries."""
    sent: list[tuple[str, int]] = []
    send = store._send

    async def spy(ops: list) -> None:  # type: ignore[type-arg]
        sent.extend((op.kind, len(op.member.split(","))) for op in ops)
        await send(ops)

    monkeypatch.setattr(store, "_send", spy)
    return sent


async def test_redis_sends_the_commits_of_one_bucket_and_cost_as_one_operation(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("a Redis store's batching")
    other = Bucket(B.project, "others")
    held = [(await store.reserve(bucket, cost, -1, LEASE)).reservation
            for bucket, cost in [(B, 1)] * 5 + [(B, 3)] * 2 + [(other, 1)] * 2]
    sent = _operations_sent(store, monkeypatch)
    for reservation in held:
        await store.commit(reservation)  # type: ignore[arg-type]
    await store.flush()
    assert sorted(sent) == [("c", 2), ("c", 2), ("c", 5)]
    assert [await store.commits(b) for b in (B, other)] == [11, 2]
    for bucket in (B, other):
        assert await store.client.zcard(counter_keys(store.prefix, bucket.project, bucket.resource)[1]) == 0


async def test_redis_sends_the_commits_of_groups_of_the_same_claims_as_one_operation(
        store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("a Redis store's batching")
    other = Bucket(B.project, "others")
    claims = (Claim(B, 1, -1), Claim(other, 2, -1))  # a plan's claims: the same tuple every request
    held = [[d.reservation for d in await store.reserve_all(claims, LEASE)] for _ in range(4)]
    sent = _operations_sent(store, monkeypatch)
    for reservations in held[:3]:
        assert store.settle_all_nowait(reservations, True)  # type: ignore[arg-type]
    assert store.settle_all_nowait(held[3], False)  # type: ignore[arg-type]
    await store.flush()
    assert sorted(sent) == [("C", 3), ("F", 1)]
    clock.advance(LEASE / 1000 + 1)  # nothing is left to expire: the three groups stay counted
    assert [await store.usage(b) for b in (B, other)] == [3, 6]
    assert [await store.commits(b) for b in (B, other)] == [3, 6]

async def test_a_commit_of_several_leases_takes_each_lease_even_on_a_corrupt_commit_total(
        store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    store = getattr(store, "inner", store)
    if not isinstance(store, RedisStore):
        pytest.skip("only Redis can be corrupted from outside")
    held = [(await store.reserve(B, 1, 5, LEASE)).reservation for _ in range(3)]
    await store.client.set(commits_key(store.prefix, B.project, B.resource, None), b"not-a-number")
    for reservation in held:
        await store.commit(reservation)  # type: ignore[arg-type]
    await store.flush()
    lost = [r for r in caplog.records if r.getMessage().startswith("gave up on a quota settlement")]
    # One operation, given up loudly, with its number of commits.
    assert len(lost) == 1 and "(c x3)" in lost[0].getMessage() and "not a number" in lost[0].getMessage()
    # Every lease was taken (only the total, which reconciliations read, missed them): the
    # creations stay counted when the leases would have ended.
    assert await store.client.zcard(counter_keys(store.prefix, B.project, B.resource)[1]) == 0
    clock.advance(LEASE / 1000 + 1)
    assert await store.usage(B) == 3

# -- the memory store's own housekeeping ------------------------------------------------------------

async def test_memory_store_gives_back_expired_leases_that_never_stood_in_the_way(clock: FakeClock) -> None:
    # Admissions below the limit do not look for expired leases; the periodic sweep does, so
    # requests that outlived their lease are neither counted nor kept for long.
    store = MemoryStore(clock=clock)
    for _ in range(1000):
        assert (await store.reserve(B, 1, -1, 1_000)).admitted  # never settled
    clock.advance(SWEEP_EVERY_MS / 1000 + 1)
    decision = await store.reserve(B, 1, -1, LEASE)
    assert decision.used == 1
    assert [(view.used, view.reservations) for view in await store.buckets(B.project)] == [(1, 1)]
    await store.refund(decision.reservation)  # type: ignore[arg-type]
    assert await store.usage(B) == 0


async def test_memory_store_refuses_a_group_that_claims_a_bucket_twice(clock: FakeClock) -> None:
    # One member per group and bucket: a second claim on the same bucket would leave one lease
    # holding two costs' worth of usage. Buckets must be distinct (the engine sums repeats).
    store = MemoryStore(clock=clock)
    other = Bucket(B.project, "other")
    with pytest.raises(ValueError, match="claimed twice"):
        await store.reserve_all([Claim(other, 1, 5), Claim(B, 1, 5), Claim(B, 1, 5)], LEASE)
    assert [await store.usage(b) for b in (B, other)] == [0, 0]
    assert await store.buckets(B.project) == []


async def test_memory_store_writes_to_a_window_over_land_in_a_fresh_bucket(clock: FakeClock) -> None:
    # A write whose own clock reading sweeps the window's old bucket away starts a new one.
    store = MemoryStore(clock=clock)
    bucket = windowed(clock)
    assert await store.charge(bucket, 5) == 5
    clock.advance(60 + WINDOW_GRACE_MS / 1000 + SWEEP_EVERY_MS / 1000 + 1)
    assert await store.charge(bucket, 2) == 2
    assert await store.usage(bucket) == 2


# -- read-only views: what operators and usage reads see -------------------------------------------

async def test_a_bucket_is_inspected_without_changing_it(store: Store, clock: FakeClock) -> None:
    assert await store.inspect(B) == BucketUsage(B, 0, 0, 0)
    kept = await store.reserve(B, 2, 10, LEASE)
    live = await store.reserve(B, 3, 10, LEASE)
    short = await store.reserve(B, 1, 10, 1_000)
    assert kept.reservation and live.reservation and short.reservation
    await store.commit(kept.reservation)
    await store.flush()
    view = await store.inspect(B)
    assert (view.used, view.reserved, view.reservations, view.committed) == (6, 4, 2, 2)
    clock.advance(2)  # the short lease expires: seen as given back, without giving it back
    assert (await store.inspect(B))[1:] == (5, 3, 1)
    assert (await store.inspect(B))[1:] == (5, 3, 1)  # reading changed nothing
    assert await store.usage(B) == 5


async def test_every_bucket_of_a_project_is_listed_with_its_window(store: Store, clock: FakeClock) -> None:
    minute = Period.parse("minute").window_at(clock())
    for bucket, cost in ((B, 2), (Bucket(B.project, "orders"), 1), (Bucket(B.project, "calls", minute), 4),
                         (Bucket("project-b", "secrets"), 7)):
        decision = await store.reserve(bucket, cost, -1, LEASE)
        assert decision.reservation
        await store.commit(decision.reservation)
    await store.flush()
    views = await store.buckets(B.project)
    assert [(v.bucket.resource, v.used, v.committed) for v in views] == [
        ("calls", 4, 4), ("orders", 1, 1), ("secrets", 2, 2)]
    window = views[0].bucket.window
    assert window is not None and window.start == minute.start and abs(window.end - minute.end) < 0.01
    assert [v.bucket.window for v in views[1:]] == [None, None]
    assert [v.used for v in await store.buckets("project-b")] == [7]
    assert await store.buckets("nobody") == []


# -- several buckets, one decision: all or nothing ---------------------------------------------------

def refusing(claims: list[Claim], decisions: list[Decision]) -> list[str]:
    """The resources whose limit refused (a claim that did not fit)."""
    return [c.bucket.resource for c, d in zip(claims, decisions, strict=True)
            if d.limit >= 0 and d.used + c.cost > d.limit]


async def test_several_buckets_are_reserved_together_or_not_at_all(store: Store) -> None:
    count, rate, cap = Bucket("p", "secrets"), Bucket("p", "secrets:minute"), Bucket("org", "secrets")
    claims = [Claim(count, 1, 3), Claim(rate, 1, 10), Claim(cap, 2, 5)]
    first = await store.reserve_all(claims, LEASE)
    assert [d.admitted for d in first] == [True] * 3 and [d.used for d in first] == [1, 1, 2]
    second = await store.reserve_all(claims, LEASE)
    assert all(d.admitted for d in second)
    third = await store.reserve_all(claims, LEASE)  # the cap: 4 + 2 > 5
    assert not any(d.admitted for d in third) and all(d.reservation is None for d in third)
    assert refusing(claims, third) == ["secrets"] and third[2].limit == 5
    await store.flush()
    # Nothing of the refused decision is held anywhere.
    assert [await store.usage(b) for b in (count, rate, cap)] == [2, 2, 4]
    for decision in first:
        assert decision.reservation
        await store.refund(decision.reservation)
    for decision in second:
        assert decision.reservation
        await store.commit(decision.reservation)
    await store.flush()
    assert [await store.usage(b) for b in (count, rate, cap)] == [1, 1, 2]


async def test_a_group_refused_by_a_later_bucket_leaves_the_earlier_ones_as_they_were(store: Store) -> None:
    # The memory store takes buckets in turn and undoes them on a refusal: exactly, and keeping
    # no bucket it made for nothing.
    held, new, disabled = Bucket("p", "held"), Bucket("p", "new"), Bucket("p", "disabled")
    kept = await store.reserve(held, 2, 10, LEASE)
    assert kept.reservation
    await store.commit(kept.reservation)
    decisions = await store.reserve_all([Claim(held, 1, 10), Claim(new, 1, 10), Claim(disabled, 1, 0)], LEASE)
    assert [(d.admitted, d.used) for d in decisions] == [(False, 2), (False, 0), (False, 0)]
    await store.flush()
    assert [await store.usage(b) for b in (held, new, disabled)] == [2, 0, 0]
    if isinstance(store, MemoryStore):
        assert [view.bucket for view in await store.buckets("p")] == [held]


async def test_an_empty_group_is_answered_and_does_not_hold_up_its_batch(store: Store) -> None:
    a, b = Bucket("p", "a"), Bucket("p", "b")
    first, empty, last = await asyncio.wait_for(
        asyncio.gather(store.reserve(a, 1, 5, LEASE), store.reserve_all([], LEASE), store.reserve(b, 1, 5, LEASE)), 5)
    assert first.admitted and empty == [] and last.admitted


async def test_a_group_refused_by_its_first_bucket_takes_nothing_from_the_others(store: Store) -> None:
    a, b = Bucket("p", "a"), Bucket("p", "b")
    claims = [Claim(a, 1, 0), Claim(b, 1, 10)]  # a is disabled
    decisions = await store.reserve_all(claims, LEASE)
    assert not any(d.admitted for d in decisions) and refusing(claims, decisions) == ["a"]
    await store.flush()
    assert await store.usage(b) == 0


async def test_concurrent_groups_never_pass_any_limit(store: Store) -> None:
    count, cap = Bucket("p", "things"), Bucket("org", "things")
    claims = [Claim(count, 1, 7), Claim(cap, 1, 5)]
    single = [Claim(cap, 1, 5)]
    results = await asyncio.gather(*(store.reserve_all(claims if i % 2 else single, LEASE) for i in range(40)))
    admitted = [r for r in results if all(d.admitted for d in r)]
    assert len(admitted) == 5
    await store.flush()
    assert await store.usage(cap) == 5 and await store.usage(count) == sum(len(r) == 2 for r in admitted)
