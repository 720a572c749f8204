"""Rate-limit style gating through the middleware: windows, weighted costs, metering, seeds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from middleware import (
    Bucket,
    CaptainDataSource,
    LatitudeSource,
    Limit,
    Period,
    QuotaMiddleware,
    RedisStore,
    Rule,
    StaticSource,
    Store,
)
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).resolve().parent.parent / "examples" / "fixtures"
MINUTE_START = 1_800_000_000.0 - 1_800_000_000.0 % 60  # the fake clock's minute


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def download(request: Request) -> Response:
    size, chunk = int(request.query_params["size"]), 64 * 1024

    async def body() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            yield b"x" * min(chunk, left)
            left -= chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


def app() -> Starlette:
    return Starlette(routes=[Route("/call", ok, methods=["POST"]), Route("/enrich", ok, methods=["POST"]),
                             Route("/regions/{region}/files/{name}", download)])


def client_for(asgi: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://app.test")


H = {"X-Project-Id": "p"}


async def test_fixed_window_rolls_over(clock: FakeClock, store: Store) -> None:
    clock.now = MINUTE_START + 50
    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/call", "calls", window="minute")],
                         source=StaticSource({"calls": 3}), store=store, clock=clock)
    async with client_for(mw) as client:
        statuses = [(await client.post("/call", headers=H)).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        rejected = await client.post("/call", headers=H)
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "10"  # seconds until the minute ends
        assert rejected.headers["ratelimit-policy"] == '"calls";q=3;w=60'
        assert rejected.headers["ratelimit"] == '"calls";r=0;t=10'
        body = rejected.json()
        assert body["code"] == 429 and body["title"] == "Too Many Requests" and "calls allows 3" in body["description"]
        clock.advance(9.999)
        assert (await client.post("/call", headers=H)).status_code == 429  # still the same window
        clock.advance(0.001)
        admitted = await client.post("/call", headers=H)
        assert admitted.status_code == 200
        assert admitted.headers["ratelimit"] == '"calls";r=2;t=60'


def captaindata_upstream(clock: FakeClock, used: float, calls: list[int], status: int = 200,
                         headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The seed's example body, with the billing period moved around the fake clock's now."""
    doc = json.loads((FIXTURES / "captaindata_quotas.json").read_bytes())
    doc |= {"credits_used": used, "current_month_start": "2027-01-01T00:00:00Z",
            "current_month_end": "2027-02-01T00:00:00Z"}
    clock.now = 1_798_761_600.0 + 86400 * 10  # 2027-01-11

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(status, json=doc, headers=headers or {})

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def test_captaindata_credits_with_fractional_costs_and_upstream_usage(clock: FakeClock, store: Store) -> None:
    calls: list[int] = []
    source = CaptainDataSource(api_key="k", client=captaindata_upstream(clock, used=50, calls=calls))
    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/enrich", "credits", cost=0.3)], source=source, store=store,
                         clock=clock)
    async with client_for(mw) as client:
        statuses = [(await client.post("/enrich", headers=H)).status_code for _ in range(170)]
        # 100 credits, 50 already used upstream: 0.3 each admits 166 (49.8 credits), not 167.
        assert statuses.count(200) == 166 and statuses[166:] == [429] * 4
        rejected = await client.post("/enrich", headers=H)
    window_end = 1_801_440_000.0  # 2027-02-01T00:00:00Z
    assert rejected.headers["retry-after"] == str(round(window_end - clock.now))
    assert "allows 100 credits per window ending 2027-02-01T00:00:00Z, 99.8 credits already in use" in \
        rejected.json()["description"]
    assert len(calls) == 1
    await store.flush()
    bucket = Bucket("p", "credits", mw.cache._local["p"].quotas.limit("credits").period)  # type: ignore[arg-type]
    assert await store.usage(bucket) == 99_800


async def test_captaindata_usage_seed_never_double_counts(clock: FakeClock) -> None:
    calls: list[int] = []
    source = CaptainDataSource(api_key="k", client=captaindata_upstream(clock, used=10, calls=calls))
    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/enrich", "credits", cost=1)], source=source, clock=clock,
                         cache_ttl=60)
    async with client_for(mw) as client:
        for _ in range(5):
            assert (await client.post("/enrich", headers=H)).status_code == 200
        # The upstream has now seen our 5 and reports 15 used: the counter is 15, not 20.
        source._client = captaindata_upstream(clock, used=15, calls=calls)
        clock.advance(61)
        response = await client.post("/enrich", headers=H)
    assert len(calls) == 2
    assert response.headers["ratelimit"].startswith('"credits";r=84;')  # 100 - 15 - this request


async def test_captaindata_429_is_honoured_across_requests(clock: FakeClock) -> None:
    calls: list[int] = []
    source = CaptainDataSource(api_key="k", client=captaindata_upstream(clock, used=0, calls=calls, status=429,
                                                                         headers={"Retry-After": "30"}))
    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/enrich", "credits")], source=source, clock=clock)
    async with client_for(mw) as client:
        first = await client.post("/enrich", headers=H)
        assert first.status_code == 503 and first.headers["retry-after"] == "30"
        clock.advance(10)
        second = await client.post("/enrich", headers=H)
        assert second.status_code == 503 and second.headers["retry-after"] == "20"
        assert len(calls) == 1  # not asked again before its Retry-After
        clock.advance(21)
        await client.post("/enrich", headers=H)
        assert len(calls) == 2


async def test_fractional_costs_under_concurrency_on_real_redis(real_redis: Any, clock: FakeClock) -> None:
    credits = Limit(10_000, scale=1000, period=Period.parse("month"), unit="credits")  # 10 credits
    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/enrich", "credits", cost="0.3")],
                         source=StaticSource({"credits": credits}), store=RedisStore(real_redis, clock=clock),
                         clock=clock)
    async with client_for(mw) as client:
        responses = await asyncio.gather(*(client.post("/enrich", headers=H) for _ in range(200)))
    assert sum(r.status_code == 200 for r in responses) == 33  # 9.9 credits; a 34th would be 10.2
    assert sum(r.status_code == 429 for r in responses) == 167


async def test_computed_cost(store: Store) -> None:
    def cost(scope: dict[str, Any]) -> float:
        return float(scope["query_string"].decode().removeprefix("n="))

    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/call", "units", cost=cost)],
                         source=StaticSource({"units": 10}), store=store)
    async with client_for(mw) as client:
        assert (await client.post("/call?n=7", headers=H)).status_code == 200
        assert (await client.post("/call?n=4", headers=H)).status_code == 403
        assert (await client.post("/call?n=3", headers=H)).status_code == 200
        bad = await client.post("/call?n=lots", headers=H)
        assert bad.status_code == 400 and "cost" in bad.json()["description"]


def latitude_upstream(method: str, mbps: int = 0) -> httpx.AsyncClient:
    doc = json.loads((FIXTURES / "latitude_traffic_quota.json").read_bytes())
    entry = doc["data"]["attributes"]["quota_per_project"][0]
    entry["billing_method"] = method
    if mbps:
        entry["quota_per_region"][0]["quota_in_mbps"] = {"granted": mbps, "additional": 0, "total": mbps}
        entry["quota_per_region"][0]["quota_in_tb"] = {"granted": 0, "additional": 0, "total": 0}
    body = json.dumps(doc).encode()
    return httpx.AsyncClient(transport=httpx.MockTransport(
        lambda request: httpx.Response(200, content=body, headers={"Content-Type": "application/vnd.api+json"})))


async def test_metering_charges_exactly_the_streamed_bytes(store: Store, clock: FakeClock) -> None:
    mw = QuotaMiddleware(app(), rules=[Rule("GET", "/regions/{region}/files/{name}", "traffic:{region}",
                                            action="meter")],
                         source=LatitudeSource("http://l", token="k", client=latitude_upstream("Normal")),
                         store=store, clock=clock)
    project = {"X-Project-Id": "proj_lkg1DekRdvZE5"}
    async with client_for(mw) as client:
        response = await client.get("/regions/brazil/files/a?size=1000003", headers=project)
        assert response.status_code == 200 and len(response.content) == 1_000_003
        month = Period.parse("month").window_at(clock())
        assert response.headers["ratelimit-policy"] == f'"traffic:brazil";q=20;w={round(month.seconds)}'
    await store.flush()
    limit = mw.cache._local["proj_lkg1DekRdvZE5"].quotas.limit("traffic:brazil")
    bucket = Bucket("proj_lkg1DekRdvZE5", "traffic:brazil", limit.period.window_at(clock()))  # type: ignore[union-attr]
    assert await store.usage(bucket) == 1_000_003


async def test_project_over_its_traffic_quota_is_refused_until_the_window_ends(store: Store,
                                                                              clock: FakeClock) -> None:
    clock.now = MINUTE_START + 15
    # 95th percentile, 1 Mbps: 7.5 MB per minute.
    mw = QuotaMiddleware(app(), rules=[Rule("GET", "/regions/{region}/files/{name}", "traffic:{region}",
                                            action="meter")],
                         source=LatitudeSource("http://l", token="k", client=latitude_upstream("95th percentile", 1)),
                         store=store, clock=clock)
    project = {"X-Project-Id": "proj_lkg1DekRdvZE5"}
    async with client_for(mw) as client:
        for _ in range(2):  # 8 MB: the second response takes the project past its 7.5 MB
            assert (await client.get("/regions/brazil/files/a?size=4000000", headers=project)).status_code == 200
        refused = await client.get("/regions/brazil/files/a?size=10", headers=project)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "45"
        assert "traffic:brazil allows 1 Mbps" in refused.json()["description"]
        other_region = await client.get("/regions/mars/files/a?size=10", headers=project)
        assert other_region.status_code == 200  # no quota there: the default (unlimited)
        clock.advance(45)
        assert (await client.get("/regions/brazil/files/a?size=10", headers=project)).status_code == 200


async def test_failing_open_counts_in_the_rules_window(clock: FakeClock) -> None:
    clock.now = MINUTE_START + 5
    broken = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(502)))
    from middleware import BarbicanSource, MemoryStore

    store = MemoryStore(clock=clock)
    mw = QuotaMiddleware(app(), rules=[Rule("POST", "/call", "calls", window="minute")], store=store,
                         source=BarbicanSource("http://q", client=broken), on_source_error="fail_open", clock=clock)
    async with client_for(mw) as client:
        assert (await client.post("/call", headers={**H, "X-Auth-Token": "t"})).status_code == 200
    minute = Period.parse("minute").window_at(clock())
    assert await store.usage(Bucket("p", "calls", minute)) == 1
    assert await store.usage(Bucket("p", "calls")) == 0
