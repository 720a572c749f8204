"""Redis faults against a real redis-server that each test starts, kills, pauses and restarts.

The middleware runs in this process (httpx.ASGITransport); only Redis misbehaves. Every test has
its own redis-server, so killing it never disturbs another test. Process-level waits (a restart,
a pause) take real time; lease expiry runs on an injected clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from middleware import BarbicanSource, Bucket, QuotaMiddleware, RedisStore, Rule, StaticSource, StoreError, Window
from middleware.keys import counter_keys
from middleware.stores.base import Claim
from middleware.stores.redis import BATCH_SCRIPT, UNLOCK_SCRIPT
from tests.conftest import FakeClock, own_redis_server
from tests.servers import RedisServer, free_port
from tests.upstreams import FakeBarbican

pytestmark = pytest.mark.anyio

RULES = [Rule("POST", "/things", "things"), Rule("DELETE", "/things/{id}", "things", action="release")]
HEADERS = {"X-Project-Id": "p", "X-Auth-Token": "tok"}
BUCKET = Bucket("p", "things")
#: A bucket of the minute FakeClock starts in (its keys expire after it).
MINUTE = Bucket("p", "things:rate", Window(1_800_000_000 - 1_800_000_000 % 60, 1_800_000_000 - 1_800_000_000 % 60 + 60))
#: The store's timeout in these tests.
STORE_TIMEOUT = 0.3


@pytest.fixture
async def admin(redis_proc: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_proc.port, socket_timeout=2)
    yield client
    await client.aclose()


async def create(request: Request) -> Response:
    return JSONResponse({"ok": True}, status_code=201)


async def delete(request: Request) -> Response:
    return Response(status_code=204)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


INNER = Starlette(routes=[Route("/things", create, methods=["POST"]), Route("/things/{id}", delete, methods=["DELETE"]),
                          Route("/health", health)])


class Guarded:
    """The middleware on a RedisStore of its own (its own connection pool), with a client."""

    def __init__(self, url: str, clock: FakeClock, limit: int = 1_000_000, **options: Any) -> None:
        self.store = RedisStore(url, timeout=STORE_TIMEOUT, clock=clock)
        options.setdefault("source", StaticSource({"things": limit}))
        self.mw = QuotaMiddleware(INNER, rules=RULES, store=self.store, clock=clock, **options)
        # raise_app_exceptions: an exception escaping the middleware fails the test (no hidden 500).
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.mw), base_url="http://app.test")

    async def post(self, project: str = "p") -> httpx.Response:
        return await self.client.post("/things", headers={**HEADERS, "X-Project-Id": project})

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.mw.aclose()


@pytest.fixture
async def make(clock: FakeClock) -> AsyncIterator[Any]:
    made: list[Guarded] = []

    def factory(url: str, **options: Any) -> Guarded:
        made.append(Guarded(url, clock, **options))
        return made[-1]

    yield factory
    for guarded in made:
        await guarded.aclose()


async def wait_for(check: Any, timeout: float, what: str) -> float:
    """Poll an async check until it is true; returns how long it took."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.02)


# -- Redis killed under load ----------------------------------------------------------------------

class Load:
    """Concurrent creates in a loop; records (started, finished, status) of each request."""

    def __init__(self, guarded: Guarded, concurrency: int = 16) -> None:
        self.guarded = guarded
        self.records: list[tuple[float, float, int]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._loop(i)) for i in range(concurrency)]

    async def _loop(self, i: int) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            response = await self.guarded.post(f"load-{i % 4}")
            self.records.append((started, time.monotonic(), response.status_code))
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)  # re-raises anything that escaped the middleware

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> list[int]:
        """Statuses of the requests that started and finished within [since, until)."""
        return [status for started, finished, status in self.records if since <= started and finished < until]


@pytest.mark.parametrize(("policy", "outage_status"), [("fail_closed", 503), ("fail_open", 201)])
async def test_redis_killed_under_load_applies_the_policy_and_recovers_on_the_same_port(
        redis_proc: RedisServer, make: Any, policy: str, outage_status: int,
        caplog: pytest.LogCaptureFixture) -> None:
    guarded = make(redis_proc.url, on_store_error=policy)
    load = Load(guarded)
    try:
        await asyncio.sleep(0.5)
        port = redis_proc.port
        killed = time.monotonic()
        redis_proc.kill()
        await asyncio.sleep(1.0)
        outage_end = time.monotonic()
        redis_proc.start()  # same object, same port
        assert redis_proc.port == port
        restarted = time.monotonic()
        await asyncio.sleep(2.5)
    finally:
        await load.stop()

    before, during = load.statuses(until=killed), load.statuses(killed + 0.05, outage_end)
    after_recovery = load.statuses(restarted + 2.0)
    assert before and set(before) == {201}, "the load must be admitted while Redis is up"
    assert during and set(during) == {outage_status}, f"while Redis is down: {sorted(set(during))}"
    assert set(load.statuses()) <= {201, 503}  # never a 500, never anything else
    assert after_recovery and set(after_recovery) == {201}, "still failing 2 s after Redis came back"
    first_ok = min(finished for started, finished, status in load.records if started >= restarted and status == 201)
    assert first_ok - restarted < 2.0
    # The restarted (empty) Redis really counts again: admitted requests reached it.
    await guarded.store.flush()
    used = sum([await guarded.store.usage(Bucket(f"load-{i}", "things")) for i in range(4)])
    assert used > 0
    assert "quota store failed" in caplog.text or "fail_open" in caplog.text


async def test_redis_down_at_start_then_up_needs_no_app_restart(make: Any) -> None:
    server = own_redis_server()  # not started yet: its port refuses connections
    guarded = make(server.url, limit=2)
    try:
        response = await guarded.post()
        assert response.status_code == 503 and response.json()["code"] == 503
        assert response.headers["retry-after"] == "5"
        server.start()
        assert [(await guarded.post()).status_code for _ in range(3)] == [201, 201, 403]
    finally:
        server.stop()


# -- Redis paused (SIGSTOP): slow, not dead ---------------------------------------------------------

async def test_paused_redis_bounds_latency_by_the_store_timeout_and_spares_unguarded_routes(
        redis_proc: RedisServer, make: Any, clock: FakeClock) -> None:
    assert redis_proc.process is not None
    guarded = make(redis_proc.url, limit=1000)
    assert [(await guarded.post()).status_code for _ in range(3)] == [201] * 3
    await guarded.store.flush()
    redis_proc.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(2):  # on the pooled connection, then on a fresh one to the paused server
            started = time.monotonic()
            response = await guarded.post()
            alone = time.monotonic() - started
            assert response.status_code == 503 and response.json()["code"] == 503
            assert alone < STORE_TIMEOUT + 0.3, f"a guarded request took {alone:.2f}s (timeout {STORE_TIMEOUT}s)"

        # A burst of guarded requests while unguarded ones keep flowing.
        async def guarded_one() -> tuple[int, float]:
            t0 = time.monotonic()
            status = (await guarded.post()).status_code
            return status, time.monotonic() - t0

        async def health_one() -> float:
            t0 = time.monotonic()
            assert (await guarded.client.get("/health")).status_code == 200
            return time.monotonic() - t0

        burst = [asyncio.ensure_future(guarded_one()) for _ in range(30)]
        await asyncio.sleep(0.01)
        health = [await health_one() for _ in range(10)]
        results = await asyncio.gather(*burst)
        assert {status for status, _ in results} == {503}
        # One batch may be stuck when a request arrives; it waits for that one and then its own.
        worst = max(latency for _, latency in results)
        assert worst < 2 * STORE_TIMEOUT + 0.4, f"a guarded request took {worst:.2f}s during the pause"
        assert max(health) < 0.1, f"an unguarded request took {max(health):.3f}s during the pause"
    finally:
        redis_proc.process.send_signal(signal.SIGCONT)

    took = await wait_for(lambda: _admitted(guarded), 2.0, "a 201 after SIGCONT")
    assert took < 2.0
    # Requests refused during the pause cost nothing once their leases are over: the scripts a
    # paused Redis ran late, for callers long gone, only hold leases.
    await guarded.store.flush()
    clock.advance(121)
    assert await guarded.store.usage(BUCKET) == 4  # the three before the pause and the one after


async def test_calls_cut_off_in_flight_never_answer_later_ones(redis_proc: RedisServer, clock: FakeClock) -> None:
    """Several script calls are in flight on one connection: a timeout must not leave a reply behind."""
    assert redis_proc.process is not None
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, pipeline=3, clock=clock)
    buckets = [Bucket(f"p{i}", "things") for i in range(6)]
    for used, bucket in enumerate(buckets, start=1):
        await store.charge(bucket, used)

    def usages() -> Any:  # 24 reads in one tick: more than one script call, pipelined
        return asyncio.gather(*(store.usage(bucket) for _ in range(4) for bucket in buckets), return_exceptions=True)

    assert await usages() == [1, 2, 3, 4, 5, 6] * 4
    redis_proc.process.send_signal(signal.SIGSTOP)
    try:
        cut_off = await usages()
        assert all(isinstance(result, StoreError) for result in cut_off), cut_off
    finally:
        redis_proc.process.send_signal(signal.SIGCONT)
    # The paused Redis answers the cut-off calls late, on a connection that is gone: every answer
    # from now on is its own bucket's.
    for _ in range(3):
        assert await usages() == [1, 2, 3, 4, 5, 6] * 4
    await store.aclose()


async def _admitted(guarded: Guarded) -> bool:
    return (await guarded.post()).status_code == 201


# -- SCRIPT FLUSH: the scripts come back by themselves ----------------------------------------------

async def test_script_flush_mid_run_reloads_the_scripts(redis_proc: RedisServer, make: Any, admin: aioredis.Redis,
                                                        clock: FakeClock) -> None:
    upstream = FakeBarbican({"tok": {"things": 4}})
    source = BarbicanSource("http://quota.test", client=upstream.client(), resources=["things"])
    guarded = make(redis_proc.url, source=source, cache_ttl=10, cache_jitter=0)
    assert [(await guarded.post()).status_code for _ in range(2)] == [201, 201]
    await guarded.store.flush()
    shas = [hashlib.sha1(script.encode()).hexdigest() for script in (BATCH_SCRIPT, UNLOCK_SCRIPT)]
    assert await admin.script_exists(*shas) == [True, True]

    await admin.script_flush()
    assert await admin.script_exists(*shas) == [False, False]
    clock.advance(11)  # the quotas are due: the cache takes and gives back the fetch lock (unlock script)
    assert [(await guarded.post()).status_code for _ in range(3)] == [201, 201, 403]
    assert upstream.calls == 2
    await guarded.store.flush()
    assert await admin.script_exists(*shas) == [True, True]
    assert await guarded.store.usage(BUCKET) == 4
    assert await admin.exists("quota:{p}:quotas:barbican:lock") == 0  # the lock was given back
    assert (await guarded.client.delete("/things/1", headers=HEADERS)).status_code == 204
    assert await guarded.store.usage(BUCKET) == 3


# -- persistence: counters survive a restart when Redis keeps them --------------------------------

@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_counters_survive_a_restart_when_redis_persists_them(persistent_redis: RedisServer, make: Any,
                                                                   how: str) -> None:
    guarded = make(persistent_redis.url, limit=5)
    assert [(await guarded.post()).status_code for _ in range(3)] == [201] * 3
    await guarded.store.flush()
    getattr(persistent_redis, how)()  # SIGTERM (clean shutdown) or SIGKILL: appendonly keeps both
    persistent_redis.start()
    await wait_for(lambda: _answers(guarded), 2.0, "the restarted Redis")
    assert await guarded.store.usage(BUCKET) == 3
    assert [(await guarded.post()).status_code for _ in range(3)] == [201, 201, 403]


async def _answers(guarded: Guarded) -> bool:
    try:
        await guarded.store.usage(Bucket("probe", "things"))
    except Exception:  # noqa: BLE001 - StoreError until Redis is back
        return False
    return True


async def test_without_persistence_a_restart_forgets_the_counters(redis_proc: RedisServer, make: Any) -> None:
    """The control for the test above: the counters really live in Redis, not in the process."""
    guarded = make(redis_proc.url, limit=5)
    assert [(await guarded.post()).status_code for _ in range(3)] == [201] * 3
    await guarded.store.flush()
    redis_proc.kill()
    redis_proc.start()
    await wait_for(lambda: _answers(guarded), 2.0, "the restarted Redis")
    assert await guarded.store.usage(BUCKET) == 0



# -- settlements that meet a Redis outage ----------------------------------------------------------

async def test_a_commit_lost_to_an_outage_is_not_given_back_when_its_lease_ends(
        persistent_redis: RedisServer, clock: FakeClock) -> None:
    """A creation answered 201 while Redis was briefly down still counts once Redis is back.

    The reservation survives the restart (appendonly), but its commit could not be delivered. When
    the lease ends, the store must not hand the cost back: the secret exists. Otherwise one Redis
    blip lets a project go over its limit.
    """
    gate = asyncio.Event()

    async def slow_create(request: Request) -> Response:
        await gate.wait()
        return JSONResponse({"ok": True}, status_code=201)

    app = Starlette(routes=[Route("/things", slow_create, methods=["POST"])])
    store = RedisStore(persistent_redis.url, timeout=STORE_TIMEOUT, clock=clock)
    mw = QuotaMiddleware(app, rules=RULES, store=store, source=StaticSource({"things": 1}), clock=clock,
                         lease_seconds=60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://app.test") as client:
        try:
            pending = asyncio.ensure_future(client.post("/things", headers=HEADERS))
            await wait_for(lambda: _usage_is(store, 1), 2.0, "the reservation")
            persistent_redis.kill()
            gate.set()
            assert (await pending).status_code == 201  # the creation happened
            await store.flush()  # the commit meets the dead Redis
            persistent_redis.start()
            await wait_for(lambda: _usage_is(store, 1), 2.0, "the restarted Redis")
            clock.advance(61)  # the lease of that reservation ends
            assert await store.usage(BUCKET) == 1, "the committed creation was given back when its lease ended"
            gate.clear()
            second = asyncio.ensure_future(client.post("/things", headers=HEADERS))
            await asyncio.sleep(0.05)
            gate.set()
            assert (await second).status_code == 403, "a limit of 1 admitted a second creation"
        finally:
            gate.set()
            await mw.aclose()


async def _usage_is(store: RedisStore, expected: int) -> bool:
    try:
        return await store.usage(BUCKET) == expected
    except Exception:  # noqa: BLE001 - StoreError until Redis is back
        return False


async def test_a_release_lost_to_an_outage_gives_the_quota_back_once_redis_is_back(
        persistent_redis: RedisServer, make: Any) -> None:
    """A delete answered 204 while Redis was down: once Redis is back, the quota is free again."""
    guarded = make(persistent_redis.url, limit=1)
    assert (await guarded.post()).status_code == 201
    await guarded.store.flush()
    persistent_redis.kill()
    assert (await guarded.client.delete("/things/1", headers=HEADERS)).status_code == 204  # the app deleted it
    persistent_redis.start()
    await wait_for(lambda: _answers(guarded), 2.0, "the restarted Redis")
    took = await wait_for(lambda: _usage_is(guarded.store, 0), 3.0, "the release of the deleted thing")
    assert took < 3.0
    assert (await guarded.post()).status_code == 201


# -- settlements that Redis refuses while it runs the script ---------------------------------------
# Redis refuses a script's first write when it is out of memory (maxmemory, noeviction) or
# read-only (a replica after a failover): the script still runs and answers, one operation at a
# time. A refused settlement must be sent again until applied, and applied once.

async def _fill_until_oom(admin: aioredis.Redis) -> list[str]:
    """Fill Redis with junk until even a small write is refused for memory; returns the junk keys."""
    used = (await admin.info("memory"))["used_memory"]
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", used + 4 * 1024 * 1024)
    junk: list[str] = []
    for size in (65536, 4096, 256, 16):  # a refused write's own query buffer counted: go down to small ones
        while len(junk) < 5000:
            try:
                await admin.set(f"junk:{len(junk)}", b"x" * size)
            except redis.exceptions.OutOfMemoryError:
                break
            junk.append(f"junk:{len(junk)}")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        await admin.zadd("probe", {"m": 1})
    return junk


async def test_settlements_refused_for_memory_are_applied_once_memory_is_free(
        redis_proc: RedisServer, admin: aioredis.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, clock=clock)
    try:
        assert await store.charge(BUCKET, 2) == 2  # two creations counted earlier
        kept, dropped = [(await store.reserve(BUCKET, 1, 10, 30_000)).reservation for _ in range(2)]
        assert kept and dropped and await store.usage(BUCKET) == 4
        junk = await _fill_until_oom(admin)

        with pytest.raises(StoreError, match="OOM"):  # refused: the release waits to be sent again
            await store.release(BUCKET, 1)
        with pytest.raises(StoreError, match="OOM"):  # refused, and nothing reserved
            await store.reserve(BUCKET, 1, 10, 30_000)
        await store.commit(kept)
        await store.refund(dropped)
        await store.flush()
        await asyncio.sleep(0.5)  # a few attempts while memory is still full

        await admin.delete(*junk)
        await wait_for(lambda: _usage_is(store, 2), 5.0, "the release refused for memory")
        # Exactly once each: 2 + 1 kept - 1 refunded, the dropped one given back once, the release
        # once; the commit is not given back when the lease would have ended.
        clock.advance(31)
        await asyncio.sleep(0.5)
        assert await store.usage(BUCKET) == 2
        assert await store.commits(BUCKET) == 1
        assert await admin.zcard("quota:{p}:things:leases") == 0
        assert "gave up on a quota settlement" not in caplog.text
    finally:
        await store.aclose()


async def test_group_settlements_while_memory_is_full_are_applied_once_in_every_bucket(
        redis_proc: RedisServer, admin: aioredis.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, clock=clock)
    other = Bucket("p", "others")
    try:
        kept = await store.reserve_all([Claim(BUCKET, 1, 10), Claim(other, 2, 10)], 30_000)
        dropped = await store.reserve_all([Claim(BUCKET, 1, 10), Claim(other, 2, 10)], 30_000)
        assert await store.usage(BUCKET) == 2 and await store.usage(other) == 4
        junk = await _fill_until_oom(admin)
        # One operation each. A settlement first takes a lease (which frees memory), so Redis lets
        # the rest of it write (see batch.lua): applied while memory is full, and only once.
        assert store.settle_all_nowait([d.reservation for d in kept if d.reservation], True)
        assert store.settle_all_nowait([d.reservation for d in dropped if d.reservation], False)
        await store.flush()
        await asyncio.sleep(0.5)  # sent again, were any refused

        await admin.delete(*junk)
        await wait_for(lambda: _usage_is(store, 1), 5.0, "the group settlements")
        clock.advance(31)  # past the leases: a commit applied is not given back, nothing is held
        await asyncio.sleep(0.5)
        assert [await store.usage(b) for b in (BUCKET, other)] == [1, 2]
        assert [await store.commits(b) for b in (BUCKET, other)] == [1, 2]
        assert await admin.zcard("quota:{p}:things:leases") == 0
        assert await admin.zcard("quota:{p}:others:leases") == 0
        assert "gave up on a quota settlement" not in caplog.text
    finally:
        await store.aclose()


async def test_settlements_refused_by_a_read_only_redis_are_applied_once_it_takes_writes(
        redis_proc: RedisServer, admin: aioredis.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, clock=clock)
    try:
        assert await store.charge(BUCKET, 2) == 2
        kept, also_kept, dropped = [(await store.reserve(BUCKET, 1, 10, 30_000)).reservation for _ in range(3)]
        assert kept and also_kept and dropped
        # A failover demotes this node: a replica of a master that is not there keeps its data and
        # refuses writes.
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        await store.commit(kept)  # the two commits: one operation (see RedisStore._take)
        await store.commit(also_kept)
        await store.refund(dropped)
        with pytest.raises(StoreError, match="READONLY"):
            await store.release(BUCKET, 1)
        await store.flush()
        assert await store.usage(BUCKET) == 5  # nothing applied yet
        await asyncio.sleep(0.5)

        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await wait_for(lambda: _usage_is(store, 3), 5.0, "the settlements refused by a replica")
        clock.advance(31)
        await asyncio.sleep(0.5)
        assert await store.usage(BUCKET) == 3
        assert await store.commits(BUCKET) == 2
        assert "gave up on a quota settlement" not in caplog.text
    finally:
        await store.aclose()

# -- connections Redis closed while they sat idle ----------------------------------------------------

async def test_connections_closed_by_an_idle_timeout_fail_no_request(
        redis_proc: RedisServer, make: Any, admin: aioredis.Redis) -> None:
    await admin.config_set("timeout", 1)  # managed Redis and proxies close idle connections
    guarded = make(redis_proc.url)
    statuses = [(await guarded.post()).status_code for _ in range(3)]
    for _ in range(2):
        await asyncio.sleep(2.5)  # Redis closes the store's connections meanwhile
        statuses += [(await guarded.post()).status_code for _ in range(3)]
    assert statuses == [201] * 9


async def test_a_restarted_redis_fails_no_request(redis_proc: RedisServer, make: Any) -> None:
    guarded = make(redis_proc.url)
    assert (await guarded.post()).status_code == 201
    redis_proc.kill()
    redis_proc.start()  # same port, empty (no persistence), the scripts gone
    assert [(await guarded.post()).status_code for _ in range(3)] == [201] * 3


async def test_pooled_calls_survive_an_idle_timeout_and_a_restart(redis_proc: RedisServer, admin: aioredis.Redis,
                                                                   clock: FakeClock) -> None:
    """Shared blobs, locks and overrides go through the client's pool, not the batch connection."""
    await admin.config_set("timeout", 1)
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, clock=clock)
    try:
        await store.save("p", "static", "quotas", b"v", 60_000)
        await asyncio.sleep(2.5)  # Redis closes the pooled connection meanwhile
        assert await store.load("p", "static", "quotas") == b"v"
        redis_proc.kill()
        redis_proc.start()
        assert await store.load("p", "static", "quotas") is None  # an empty Redis, not a StoreError
    finally:
        await store.aclose()


async def test_a_connection_closed_before_the_store_saw_it_is_replaced_once(
        redis_proc: RedisServer, clock: FakeClock) -> None:
    """The close reaches the socket but the event loop has not read it yet when the next call goes."""
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, clock=clock)
    try:
        assert (await store.reserve(BUCKET, 1, 10, 30_000)).admitted
        with redis.Redis(port=redis_proc.port) as killer:  # blocking: this loop does not run meanwhile
            assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
            time.sleep(0.05)
        assert (await store.reserve(BUCKET, 1, 10, 30_000)).used == 2
    finally:
        await store.aclose()

# -- reservations nobody holds ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["one bucket", "take", "group", "group taken"])
@pytest.mark.parametrize("how", ["timeout", "cancelled"])
async def test_a_reservation_cut_off_by_a_paused_redis_is_given_back_promptly(
        redis_proc: RedisServer, admin: aioredis.Redis, clock: FakeClock, how: str, shape: str) -> None:
    assert redis_proc.process is not None
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, clock=clock)
    try:
        assert await store.usage(BUCKET) == 0
        redis_proc.process.send_signal(signal.SIGSTOP)
        try:
            # A group (a count bucket and a windowed one) is given back in every bucket.
            # take: the middleware's path on a warm project, answered in plain values.
            reserving = asyncio.ensure_future(
                store.reserve(BUCKET, 1, 10, 120_000) if shape == "one bucket" else
                store.take(BUCKET, 1, 10, 120_000) if shape == "take" else
                store.take_all(((BUCKET, 1, 10, 1), (MINUTE, 2, 10, 1)), 120_000) if shape == "group taken" else
                store.reserve_all([Claim(BUCKET, 1, 10), Claim(MINUTE, 2, 10)], 120_000))
            if how == "cancelled":  # the client went away before the store's timeout
                await asyncio.sleep(STORE_TIMEOUT / 3)
                reserving.cancel()
            with pytest.raises((StoreError, asyncio.CancelledError)):
                await reserving
            await asyncio.sleep(2 * STORE_TIMEOUT)
        finally:
            redis_proc.process.send_signal(signal.SIGCONT)
        # Redis ran the reservation when it resumed; the store gives it back well within its lease
        # (120 s, which the injected clock never reaches).
        await wait_for(lambda: _no_lease_left(admin), 5.0, "the reservation's give-back")
        assert await admin.get("quota:{p}:things:used") == b"0", "the reservation never reached Redis"
        assert await store.usage(BUCKET) == 0
        if shape.startswith("group"):
            assert await store.usage(MINUTE) == 0
            assert await admin.zcard(_keys_of(MINUTE)[1]) == 0
            # The windowed counter keeps its expiry through the give-back.
            assert await admin.pttl(_keys_of(MINUTE)[0]) > 0
    finally:
        await store.aclose()


def _keys_of(bucket: Bucket) -> tuple[str, str, str]:
    assert bucket.window is not None
    return counter_keys("quota:", bucket.project, bucket.resource, int(bucket.window.start))


async def _no_lease_left(admin: aioredis.Redis) -> bool:
    return await admin.get("quota:{p}:things:used") == b"0" and await admin.zcard("quota:{p}:things:leases") == 0


async def test_redis_killed_with_calls_in_flight_answers_every_caller(redis_proc: RedisServer,
                                                                     clock: FakeClock) -> None:
    assert redis_proc.process is not None
    store = RedisStore(redis_proc.url, timeout=STORE_TIMEOUT, pipeline=3, clock=clock)
    try:
        assert await store.usage(BUCKET) == 0
        redis_proc.process.send_signal(signal.SIGSTOP)  # the calls pile up, written and unanswered
        calls = asyncio.gather(*(store.reserve(Bucket(f"p{i}", "things"), 1, 10, 30_000) for i in range(600)),
                               return_exceptions=True)
        await asyncio.sleep(STORE_TIMEOUT / 3)
        redis_proc.kill()  # mid-batch: the connection is reset under them
        results = await asyncio.wait_for(calls, 10 * STORE_TIMEOUT)
        assert all(isinstance(result, StoreError) for result in results), {type(r) for r in results}
        redis_proc.start()
        await wait_for(lambda: _answers_reserve(store), 2.0, "a reserve on the restarted Redis")
    finally:
        await store.aclose()


async def _answers_reserve(store: RedisStore) -> bool:
    try:
        return (await store.reserve(BUCKET, 1, 10, 30_000)).admitted
    except StoreError:
        return False


# -- a reply that cannot be read ------------------------------------------------------------------

async def test_a_reply_that_cannot_be_read_is_asked_again_on_a_new_connection_and_counts_once(
        redis_proc: RedisServer, clock: FakeClock) -> None:
    # A proxy in front of redis-server that garbles the first reply to a script call (a broken
    # network device, a proxy speaking another protocol): the connection is dropped, the call is
    # sent again once on a new one (as after any connection lost mid-call), and what Redis ran
    # twice counts once.
    garbled: list[bytes] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scripted: list[bool]) -> None:
        try:
            while data := await reader.read(65536):
                if scripted and scripted[0] and not garbled:
                    garbled.append(data)
                    data = b"?not redis\r\n"
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def client(down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", redis_proc.port)
        scripted: list[bool] = [False]

        async def upward() -> None:
            try:
                while data := await down_reader.read(65536):
                    scripted[0] = scripted[0] or b"EVALSHA" in data
                    up_writer.write(data)
                    await up_writer.drain()
            finally:
                up_writer.close()

        await asyncio.gather(upward(), relay(up_reader, down_writer, scripted), return_exceptions=True)

    proxy = await asyncio.start_server(client, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=STORE_TIMEOUT, clock=clock)
    try:
        decision = await store.reserve(BUCKET, 1, 10, 30_000)
        assert garbled  # the reply Redis sent was replaced
        assert decision.admitted and decision.used == 1
        assert await store.usage(BUCKET) == 1
        assert (await store.reserve(BUCKET, 1, 10, 30_000)).used == 2
    finally:
        await store.aclose()
        proxy.close()
        await proxy.wait_closed()
