"""Upstream faults against a real HTTP quota API (tests/upstreams/fault_server.py under uvicorn).

Every test drives its own scenario on the one running upstream; what the upstream answers is
switched through its control endpoint. Cache freshness and the stale bound run on an injected
clock; only the upstream's own slowness (timeouts, slow bodies) takes real time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from middleware import BarbicanSource, Bucket, QuotaMiddleware, RedisStore, Rule
from tests.conftest import FakeClock
from tests.servers import uvicorn_server

pytestmark = pytest.mark.anyio

RULES = [Rule("POST", "/things", "things")]
HEADERS = {"X-Project-Id": "p", "X-Auth-Token": "tok"}
#: The source's httpx timeout in these tests (connect, read, write and pool).
TIMEOUT = 0.3
#: What "answered within the timeout" allows on top of it: scheduling on a busy CI machine.
SLACK = 1.2


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    # Scenarios that hang (sleep 5 s) may still be running at the end: do not wait for them.
    with uvicorn_server("tests.upstreams.fault_server:app", env={}, extra=["--timeout-graceful-shutdown", "1"]) as base:
        yield base


class Scenario:
    """One scenario on the running upstream: its base URL for a source, and its switch."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.name = uuid.uuid4().hex
        self.url = f"{upstream}/s/{self.name}"

    async def set(self, mode: str, **behaviour: Any) -> None:
        async with httpx.AsyncClient(base_url=self.upstream) as client:
            response = await client.put(f"/_control/{self.name}", json={"mode": mode, **behaviour})
            response.raise_for_status()

    async def calls(self) -> int:
        async with httpx.AsyncClient(base_url=self.upstream) as client:
            return int((await client.get(f"/_control/{self.name}")).json()["calls"])


@pytest.fixture
def scenario(upstream: str) -> Scenario:
    return Scenario(upstream)


class Inner:
    """The guarded app; counts how often a guarded route really ran."""

    def __init__(self) -> None:
        self.created = 0
        self.app = Starlette(routes=[Route("/things", self.create, methods=["POST"]),
                                     Route("/health", self.health)])

    async def create(self, request: Request) -> Response:
        self.created += 1
        return JSONResponse({"ok": True}, status_code=201)

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok")


Factory = Callable[..., Awaitable[tuple[QuotaMiddleware, Inner, httpx.AsyncClient]]]


@pytest.fixture
async def guarded(clock: FakeClock) -> AsyncIterator[Factory]:
    """Builds middleware + client on a scenario; closes all of it (httpx clients, store) after the test."""
    opened: list[tuple[QuotaMiddleware, httpx.AsyncClient]] = []

    async def make(scenario: Scenario, **options: Any) -> tuple[QuotaMiddleware, Inner, httpx.AsyncClient]:
        inner = Inner()
        options.setdefault("clock", clock)
        source = BarbicanSource(scenario.url, timeout=TIMEOUT, resources=["things"])
        mw = QuotaMiddleware(inner.app, rules=RULES, source=source, **options)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://app.test")
        opened.append((mw, client))
        return mw, inner, client

    yield make
    for mw, client in opened:
        await client.aclose()
        await mw.aclose()


async def timed_post(client: httpx.AsyncClient, project: str = "p") -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post("/things", headers={**HEADERS, "X-Project-Id": project})
    return response, time.monotonic() - started


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == 503 and body["title"] == "Service Unavailable"
    assert "quota service" in body["description"].lower()
    assert response.headers["retry-after"].isdigit()


# -- a healthy upstream: the baseline every fault is measured against --------------------------------

async def test_healthy_upstream_enforces_its_limit_with_one_fetch(scenario: Scenario, guarded: Factory) -> None:
    await scenario.set("ok", quotas={"things": 2})
    _, inner, client = await guarded(scenario)
    statuses = [(await client.post("/things", headers=HEADERS)).status_code for _ in range(3)]
    assert statuses == [201, 201, 403]
    assert inner.created == 2 and await scenario.calls() == 1


# -- faults on a cold cache: the failure policy answers -------------------------------------------

#: (mode and its behaviour, how long the caller may wait at most, the Retry-After the caller gets)
FAULTS: dict[str, tuple[dict[str, Any], float, str | None]] = {
    "timeout": ({"mode": "sleep", "delay": 5.0}, TIMEOUT + SLACK, "5"),
    "500": ({"mode": "status", "status": 500, "body": "Internal Server Error"}, SLACK, "5"),
    "502": ({"mode": "status", "status": 502}, SLACK, "5"),
    "503 with Retry-After": ({"mode": "status", "status": 503, "retry_after": 12}, SLACK, "12"),
    "429 with Retry-After": ({"mode": "status", "status": 429, "retry_after": 7}, SLACK, "7"),
    "429 with an HTTP-date Retry-After": ({"mode": "status", "status": 429, "retry_after": "DATE+30"}, SLACK,
                                          "30"),
    "garbage body": ({"mode": "garbage", "body": "<html>Bad Gateway</html>{"}, SLACK, "5"),
    "JSON that is not a quota document": ({"mode": "garbage", "body": '{"quotas": [1, 2]}'}, SLACK, "5"),
    # 4 KB of "[": past the JSON parser's recursion limit, not only past our nesting bound.
    "deeply nested JSON": ({"mode": "garbage", "body": "[" * 4096}, SLACK, "5"),
    "wrong media type": ({"mode": "media", "content_type": "text/html"}, SLACK, "5"),
    # Refused at the 1 MiB bound (decoded), not read whole: see the test after the next.
    "gzip bomb": ({"mode": "gzip_bomb", "mib": 1024}, SLACK, "5"),
    "huge body": ({"mode": "huge_body", "mib": 300}, SLACK, "5"),
    "huge body with its Content-Length": ({"mode": "huge_body", "mib": 300, "declare_length": True}, SLACK, "5"),
    "stalled body": ({"mode": "stall_body", "delay": 5.0}, TIMEOUT + SLACK, "5"),
    # Every byte arrives within the read timeout, but the whole answer takes ~4 s: a source built
    # with timeout=0.3 must not hold the caller that long.
    "dripping body": ({"mode": "drip_body", "delay": 0.15, "quotas": {"things": 5}}, TIMEOUT + SLACK, "5"),
}


def behaviour(name: str) -> dict[str, Any]:
    spec = dict(FAULTS[name][0])
    if spec.get("retry_after") == "DATE+30":
        spec["retry_after"] = http_date(30)
    return spec


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_upstream_fault_fails_closed_quickly_with_503(scenario: Scenario, guarded: Factory, fault: str) -> None:
    await scenario.set(**behaviour(fault))
    _, inner, client = await guarded(scenario)
    response, elapsed = await timed_post(client)
    assert_unavailable(response)
    _, bound, retry_after = FAULTS[fault]
    assert elapsed < bound, f"the caller waited {elapsed:.2f}s for a {fault} (bound {bound}s)"
    if retry_after == "30":  # an HTTP date, read a moment later: 29 or 30
        assert int(response.headers["retry-after"]) in (29, 30)
    else:
        assert response.headers["retry-after"] == retry_after
    assert inner.created == 0
    assert await scenario.calls() == 1


@pytest.mark.parametrize("fault", ["timeout", "500", "429 with Retry-After", "garbage body", "wrong media type",
                                   "deeply nested JSON"])
async def test_upstream_fault_fails_open_when_configured(scenario: Scenario, guarded: Factory, fault: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    await scenario.set(**behaviour(fault))
    mw, inner, client = await guarded(scenario, on_source_error="fail_open")
    response, elapsed = await timed_post(client)
    assert response.status_code == 201 and inner.created == 1
    assert elapsed < FAULTS[fault][1]
    assert "fail_open" in caplog.text
    await mw.store.flush()
    assert await mw.store.usage(Bucket("p", "things")) == 1  # admitted, and still counted


@pytest.mark.parametrize("fault", ["gzip bomb", "huge body", "huge body with its Content-Length"])
async def test_a_huge_answer_is_refused_for_its_size_before_the_deadline(
        scenario: Scenario, guarded: Factory, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    """Over a real socket: the answer is refused at the bound, not cut by the deadline after
    megabytes were read (tests/test_sources.py measures the memory this costs)."""
    await scenario.set(**behaviour(fault))
    _, _, client = await guarded(scenario)
    assert_unavailable(await client.post("/things", headers=HEADERS))
    assert "oversized body (over 1048576 bytes)" in caplog.text


async def test_a_burst_against_a_hanging_upstream_asks_it_once(scenario: Scenario, guarded: Factory) -> None:
    await scenario.set("sleep", delay=5.0)
    _, inner, client = await guarded(scenario)
    started = time.monotonic()
    responses = await asyncio.gather(*(client.post("/things", headers=HEADERS) for _ in range(20)))
    assert [r.status_code for r in responses] == [503] * 20
    assert time.monotonic() - started < TIMEOUT + SLACK
    assert await scenario.calls() == 1  # single flight: the burst waited on one fetch
    assert inner.created == 0


# -- stale quotas: served within the bound, the policy after it ------------------------------------

STALE_FAULTS = ["timeout", "500", "429 with Retry-After", "garbage body", "wrong media type", "stalled body",
                "deeply nested JSON"]


@pytest.mark.parametrize("fault", STALE_FAULTS)
async def test_stale_quotas_are_served_within_the_bound_then_the_policy(
        scenario: Scenario, guarded: Factory, clock: FakeClock, fault: str) -> None:
    await scenario.set("ok", quotas={"things": 2})
    _, inner, client = await guarded(scenario, cache_ttl=10, cache_jitter=0, stale_ttl=100)
    assert (await client.post("/things", headers=HEADERS)).status_code == 201
    await scenario.set(**behaviour(fault))

    clock.advance(11)  # past the TTL: a refresh is due, and fails
    assert (await client.post("/things", headers=HEADERS)).status_code == 201  # the stale limit 2 holds
    assert await scenario.calls() == 2
    clock.advance(50)
    response = await client.post("/things", headers=HEADERS)
    assert response.status_code == 403  # still enforced from the stale copy
    assert "allows 2" in response.json()["description"]
    assert await scenario.calls() == 3  # every request past the TTL tried the upstream again

    clock.advance(50)  # 111 s after the fetch: past TTL + stale bound
    assert_unavailable(await client.post("/things", headers=HEADERS))
    assert inner.created == 2

    await scenario.set("ok", quotas={"things": 3})  # the upstream recovers with a new limit
    calls = await scenario.calls()
    assert_unavailable(await client.post("/things", headers=HEADERS))  # backing off after that failure
    assert await scenario.calls() == calls  # ... without asking the upstream
    clock.advance(10)  # past the back-off (1 s, or the upstream's Retry-After of 7 s)
    assert [(await client.post("/things", headers=HEADERS)).status_code for _ in range(2)] == [201, 403]
    assert inner.created == 3 and await scenario.calls() == calls + 1


async def test_past_the_stale_bound_fail_open_admits(scenario: Scenario, guarded: Factory, clock: FakeClock) -> None:
    await scenario.set("ok", quotas={"things": 1})
    _, inner, client = await guarded(scenario, cache_ttl=10, cache_jitter=0, stale_ttl=100,
                                     on_source_error="fail_open")
    assert (await client.post("/things", headers=HEADERS)).status_code == 201
    await scenario.set("status", status=500)
    clock.advance(60)
    assert (await client.post("/things", headers=HEADERS)).status_code == 403  # stale limit 1, not fail_open
    clock.advance(60)
    assert (await client.post("/things", headers=HEADERS)).status_code == 201  # policy: admit
    assert inner.created == 2


async def test_another_worker_serves_the_shared_stale_copy(scenario: Scenario, guarded: Factory, clock: FakeClock,
                                                           real_redis: aioredis.Redis) -> None:
    """A worker with a cold local cache finds the copy another worker left in Redis while the
    upstream is down, and serves it within the stale bound (then the policy)."""
    await scenario.set("ok", quotas={"things": 1})
    options = {"cache_ttl": 10, "cache_jitter": 0, "stale_ttl": 100}
    _, _, first = await guarded(scenario, store=RedisStore(real_redis, clock=clock), **options)
    assert (await first.post("/things", headers=HEADERS)).status_code == 201
    await scenario.set("status", status=502)
    clock.advance(30)
    _, _, second = await guarded(scenario, store=RedisStore(real_redis, clock=clock), **options)
    response = await second.post("/things", headers=HEADERS)
    assert response.status_code == 403 and "allows 1" in response.json()["description"]
    clock.advance(90)
    assert_unavailable(await second.post("/things", headers=HEADERS))


async def test_a_worker_that_refreshed_first_serves_the_shared_stale_copy_while_backing_off(
        scenario: Scenario, guarded: Factory, clock: FakeClock, real_redis: aioredis.Redis) -> None:
    """A worker that never held the project is the one whose refresh gets the 429: it serves the
    shared stale copy for as long as the Retry-After lasts, not only on that first request."""
    await scenario.set("ok", quotas={"things": 1})
    options = {"cache_ttl": 10, "cache_jitter": 0, "stale_ttl": 100}
    _, _, first = await guarded(scenario, store=RedisStore(real_redis, clock=clock), **options)
    assert (await first.post("/things", headers=HEADERS)).status_code == 201
    await scenario.set("status", status=429, retry_after=60)
    clock.advance(30)
    _, _, second = await guarded(scenario, store=RedisStore(real_redis, clock=clock), **options)
    for _ in range(3):
        response = await second.post("/things", headers=HEADERS)
        assert response.status_code == 403 and "allows 1" in response.json()["description"]
        clock.advance(20)
    assert await scenario.calls() == 2  # the fetch, and the one refresh told to wait
