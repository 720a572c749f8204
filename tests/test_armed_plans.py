"""A warm request's path (QuotaEngine.take_nowait): a plan checked once is served until the second
ends, and sooner when anything it was made from changes. Every change must still apply to the
very next request, as it did when each request looked everything up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fakeredis
import pytest

from middleware import Limit, MemoryStore, QuotaMiddleware, Quotas, QuotaSource, RedisStore, Rule, StaticSource, Window
from middleware.stores.base import Bucket, Decision, Taken
from middleware.testing import QuotaFixture
from middleware.windows import Period
from tests.conftest import FakeClock
from tests.test_middleware import HEADERS, client_for, inner_app

pytestmark = pytest.mark.anyio

RULES = [Rule("POST", "/things", "things")]


class Upstream(QuotaSource):
    """A cached source whose limits the test changes, counting its fetches."""

    def __init__(self, limits: dict[str, dict[str, int]]) -> None:
        self.limits = limits
        self.fetches = 0

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        self.fetches += 1
        return Quotas({name: Limit(value) for name, value in self.limits[project].items()})


class CountingStore(MemoryStore):
    """Counts admissions asked the long way (reserve_nowait, which takes in turn) and all takes."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.asked = 0
        self.taken = 0

    def reserve_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        self.asked += 1
        return super().reserve_nowait(bucket, cost, limit, lease_ms, scale)

    def take_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Taken | None:
        self.taken += 1
        return super().take_nowait(bucket, cost, limit, lease_ms, scale)


async def statuses(mw: QuotaMiddleware, n: int, project: str = "p") -> list[int]:
    async with client_for(mw) as client:
        return [(await client.post("/things", headers={**HEADERS, "X-Project-Id": project})).status_code
                for _ in range(n)]


async def test_warm_requests_are_taken_in_plain_values_and_count_exactly(clock: FakeClock) -> None:
    store = CountingStore(clock=clock)
    mw = QuotaMiddleware(inner_app(), rules=[*RULES, Rule("POST", "/fail", "things")], store=store, clock=clock,
                         source=Upstream({"p": {"things": 3}}))
    async with client_for(mw) as client:
        responses = [await client.post("/things", headers=HEADERS) for _ in range(3)]
        # The first request of a project awaits its quotas and is decided the long way; the
        # next ones are taken.
        assert (store.asked, store.taken - store.asked) == (1, 2)
        responses.append(await client.post("/things", headers=HEADERS))
        responses.append(await client.post("/fail", headers=HEADERS))
    assert [r.status_code for r in responses] == [201, 201, 201, 403, 403]
    assert [r.headers.get("ratelimit") for r in responses[:3]] == [
        '"things";r=2', '"things";r=1', '"things";r=0']
    assert await store.usage(Bucket("p", "things")) == 3


async def test_a_failed_creation_taken_is_given_back_with_its_headers(clock: FakeClock) -> None:
    mw = QuotaMiddleware(inner_app(), rules=[*RULES, Rule("POST", "/fail", "things")],
                         source=StaticSource({"things": 3}), clock=clock)
    async with client_for(mw) as client:
        created = await client.post("/things", headers=HEADERS)
        failed = [await client.post("/fail", headers=HEADERS) for _ in range(2)]
    assert created.headers["ratelimit"] == '"things";r=2'
    assert [(r.status_code, r.headers["ratelimit"]) for r in failed] == [(409, '"things";r=2')] * 2
    assert await mw.store.usage(Bucket("p", "things")) == 1


async def test_quotas_going_stale_within_a_second_are_fetched_again(clock: FakeClock) -> None:
    clock.now = 1_800_000_000.0  # a whole second: the plan is armed until .999..., or its quotas' TTL
    upstream = Upstream({"p": {"things": 5}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=upstream, cache_ttl=0.5, cache_jitter=0, clock=clock)
    assert await statuses(mw, 2) == [201, 201]
    upstream.limits["p"]["things"] = 2
    clock.advance(0.6)  # the same second, past the TTL
    assert await statuses(mw, 1) == [403]
    assert upstream.fetches == 2


async def test_quotas_evicted_or_fetched_again_apply_to_the_next_request(clock: FakeClock) -> None:
    # Quotas dropped from the cache to make room (for another project's) disarm the plans made
    # from them, and so do quotas fetched again (here by engine.usage): the next request sees them.
    upstream = Upstream({"p": {"things": 5}, "q": {"things": 5}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=upstream, cache_size=1, clock=clock)
    assert await statuses(mw, 2) == [201, 201]
    assert await statuses(mw, 1, project="q") == [201]  # evicts p's quotas
    upstream.limits["p"]["things"] = 2
    assert (await mw.engine.usage("p"))["things"]["limit"] == 2
    assert await statuses(mw, 1) == [403]


async def test_a_changed_fixture_applies_to_the_next_request(clock: FakeClock) -> None:
    # FixtureSource is read on every decision: never armed.
    fixture = QuotaFixture({"things": 5}, clock=clock)
    mw = fixture.middleware(inner_app(), RULES)
    assert await statuses(mw, 2) == [201, 201]
    fixture.set_quota("p", "things", 2)
    assert await statuses(mw, 1) == [403]


async def test_a_parent_found_after_the_plan_was_armed_applies_within_the_second(clock: FakeClock) -> None:
    clock.now = 1_800_000_000.0
    parents: dict[str, str | None] = {"p": None}
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 5}, projects={"org": {"things": 0}}),
                         parent=parents.get, cache_ttl=0.3, clock=clock)
    assert await statuses(mw, 2) == [201, 201]
    parents["p"] = "org"
    clock.advance(0.5)  # the same second, past the parent's TTL
    assert await statuses(mw, 1) == [403]


async def test_a_window_ending_mid_second_is_planned_per_request(clock: FakeClock) -> None:
    # Its t= changes within a second: its charges are made per request (the plan is armed, not
    # taken), the window's end still exact.
    clock.now = 1_800_000_000.25
    period = Window(clock.now - 10, clock.now + 1.5)  # ends at .75
    mw = QuotaMiddleware(inner_app(), rules=RULES, clock=clock,
                         source=StaticSource({"things": Limit(10, period=period)}))
    async with client_for(mw) as client:
        first = await client.post("/things", headers=HEADERS)
        clock.advance(0.6)  # .85 of the same second: 0.9 s left
        second = await client.post("/things", headers=HEADERS)
    assert first.headers["ratelimit"] == '"things";r=9;t=2'
    assert second.headers["ratelimit"] == '"things";r=8;t=1'


async def test_a_parents_quotas_replaced_apply_to_its_childrens_next_request(clock: FakeClock) -> None:
    # A child's armed plan charges its parent too: the parent's quotas fetched again (here by
    # engine.usage, after another project evicted them) must disarm it.
    upstream = Upstream({"p": {"things": 5}, "org": {"things": 5}, "q": {"things": 5}, "r": {"things": 5}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=upstream, parent={"p": "org"}.get, cache_size=2,
                         clock=clock)
    assert await statuses(mw, 2) == [201, 201]  # the second is decided on the plan it arms
    for other in ("q", "r"):  # their quotas evict p's and the parent's
        assert await statuses(mw, 1, project=other) == [201]
    upstream.limits["org"]["things"] = 2
    assert (await mw.engine.usage("org"))["things"]["limit"] == 2
    assert await statuses(mw, 1) == [403]


async def test_a_parents_quotas_going_stale_first_bound_the_childs_plan(clock: FakeClock) -> None:
    clock.now = 1_800_000_000.0
    upstream = Upstream({"p": {"things": 5}, "org": {"things": 5}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=upstream, parent={"p": "org"}.get, clock=clock,
                         cache_ttl=0.5, cache_jitter=0)
    assert await statuses(mw, 1, project="org") == [201]  # the parent's quotas: fresh until .5
    clock.advance(0.3)
    assert await statuses(mw, 2) == [201, 201]  # the child's: fresh until .8; its plan armed until .5
    upstream.limits["org"]["things"] = 3
    clock.advance(0.3)  # .6: the parent's quotas are stale, the child's are not
    assert await statuses(mw, 1) == [403]


async def test_parents_forgotten_for_room_are_asked_again_within_the_second(clock: FakeClock) -> None:
    parents: dict[str, str | None] = {"p": "org", "q": None}
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 5}, projects={"org": {"things": 2}}),
                         parent=parents.get, cache_size=1, clock=clock)
    assert await statuses(mw, 2) == [201, 201]  # the org's cap is full now
    parents["p"] = None
    assert await statuses(mw, 1, project="q") == [201]  # its parent's lookup makes room: p's is forgotten
    assert await statuses(mw, 1) == [201]


async def test_a_store_that_settles_groups_its_own_way_is_not_taken_in_groups(clock: FakeClock) -> None:
    settled: list[bool] = []

    class AuditedStore(MemoryStore):  # overrides settle_all_nowait, not the plain-value paths
        def settle_all_nowait(self, reservations: Any, keep: bool) -> bool:
            settled.append(keep)
            return super().settle_all_nowait(reservations, keep)

    rules = [Rule("POST", "/things", charges={"things": 1, "others": 1})]
    mw = QuotaMiddleware(inner_app(), rules=rules, source=StaticSource({"things": 5, "others": 5}),
                         store=AuditedStore(clock=clock), clock=clock)
    assert await statuses(mw, 3) == [201, 201, 201]
    assert settled == [True, True, True]


async def test_on_redis_warm_requests_are_taken_in_plain_values_unless_reserve_is_overridden(
        clock: FakeClock) -> None:
    # A store that must be awaited (Redis, leases off) takes a warm project's requests in plain
    # values too (QuotaEngine.take_later), refusals and failures going the long way; a subclass
    # that audits reserve keeps seeing every request.
    calls: list[str] = []

    class CountingRedis(RedisStore):
        def take(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Any:
            calls.append("take")
            return super().take(bucket, cost, limit, lease_ms, scale)

    class AuditedRedis(CountingRedis):
        async def reserve(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("reserve")
            return await super().reserve(*args, **kwargs)

    for store_class, taken in ((CountingRedis, True), (AuditedRedis, False)):
        calls.clear()
        store = store_class(fakeredis.FakeAsyncRedis(), clock=clock)
        mw = QuotaMiddleware(inner_app(), rules=[*RULES, Rule("POST", "/fail", "things")], store=store,
                             clock=clock, source=StaticSource({"things": 3}))
        assert mw.engine.takes_later is taken
        async with client_for(mw) as client:
            got = [(await client.post(path, headers=HEADERS)).status_code
                   for path in ("/things", "/fail", "/things", "/things", "/things", "/things")]
            await store.flush()
            assert got == [201, 409, 201, 201, 403, 403]  # the failed creation used nothing
            assert await store.usage(Bucket("p", "things")) == 3
            # A refusal is answered the long way: the usual rejection.
            refused = await client.post("/things", headers=HEADERS)
            assert refused.status_code == 403 and refused.json()["code"] == 403
        assert calls == (["take"] if taken else ["reserve"]) * 7, calls
        await store.aclose()


async def test_on_redis_several_buckets_are_taken_and_settled_as_one_group(clock: FakeClock) -> None:
    # Several charges on Redis (leases off): one group operation to take them all (take_all) and one
    # to settle them (settle_taken_all_nowait); a refusal by any bucket is answered the long way.
    calls: list[str] = []

    class CountingRedis(RedisStore):
        def take_all(self, claims: Any, lease_ms: int) -> Any:
            calls.append("take_all")
            return super().take_all(claims, lease_ms)

        def settle_taken_all_nowait(self, claims: Any, taken: Any, keep: bool) -> bool:
            calls.append(f"settle {'kept' if keep else 'refunded'}")
            return super().settle_taken_all_nowait(claims, taken, keep)

    store = CountingRedis(fakeredis.FakeAsyncRedis(), clock=clock)
    rules = [*RULES, Rule("POST", "/things", "things:rate", limit="3/minute"),
             Rule("POST", "/fail", "things"), Rule("POST", "/fail", "things:rate", limit="3/minute")]
    mw = QuotaMiddleware(inner_app(), rules=rules, store=store, clock=clock, source=StaticSource({"things": 10}))
    async with client_for(mw) as client:
        got = [(await client.post(path, headers=HEADERS)).status_code for path in ("/things", "/fail", "/things")]
        third = await client.post("/things", headers=HEADERS)  # the minute's third: admitted
        over = await client.post("/things", headers=HEADERS)  # the fourth: refused by the rate
        await store.flush()
        usage = [await store.usage(bucket) for bucket in
                 (Bucket("p", "things"), Bucket("p", "things:rate", Period(60).window_at(clock())))]
    assert got == [201, 409, 201] and third.status_code == 201 and over.status_code == 429
    assert over.json()["code"] == 429 and "things:rate" in over.json()["description"]
    assert usage == [3, 3]  # the failed creation used nothing, in either bucket
    assert calls == ["take_all", "settle kept", "take_all", "settle refunded", "take_all", "settle kept",
                     "take_all", "settle kept", "take_all"], calls
    await store.aclose()


async def test_on_redis_a_subclass_auditing_settle_taken_nowait_sees_every_bucket_settled(clock: FakeClock) -> None:
    # The group settlement stands for settle_taken_nowait (and settle_nowait) too: a subclass that
    # overrides those must see each bucket's, as before the group path existed.
    seen: list[str] = []

    class Audited(RedisStore):
        def settle_taken_nowait(self, bucket: Bucket, cost: int, member: str, keep: bool) -> bool:
            seen.append(bucket.resource)
            return super().settle_taken_nowait(bucket, cost, member, keep)

    store = Audited(fakeredis.FakeAsyncRedis(), clock=clock)
    rules = [*RULES, Rule("POST", "/things", "things:rate", limit="100/minute")]
    mw = QuotaMiddleware(inner_app(), rules=rules, store=store, clock=clock, source=StaticSource({"things": 10}))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        await store.flush()
        assert await store.usage(Bucket("p", "things")) == 1
    assert sorted(seen) == ["things", "things:rate"]
    await store.aclose()


async def test_on_redis_a_plans_group_is_formatted_once_however_often_it_is_armed(clock: FakeClock) -> None:
    # A plan is armed again every second; its claims stay the very same tuple, which the Redis
    # store keeps its formatted group by (an entry per arming would fill and clear that table).
    store = RedisStore(fakeredis.FakeAsyncRedis(), clock=clock)
    rules = [*RULES, Rule("POST", "/things", "things:rate", limit="1000/minute")]
    mw = QuotaMiddleware(inner_app(), rules=rules, store=store, clock=clock, source=StaticSource({"things": 1000}))
    async with client_for(mw) as client:
        for _ in range(5):
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
            clock.advance(1)
        await store.flush()
        assert await store.usage(Bucket("p", "things")) == 5
    assert len(store._groups) == 1
    await store.aclose()
