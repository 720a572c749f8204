"""Metrics after scripted traffic, and shadow mode over a full quota."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from middleware import BarbicanSource, Bucket, QuotaMiddleware, Rule, StaticSource, Store
from middleware.metrics import QuotaMetrics
from tests.conftest import FakeClock
from tests.test_middleware import HEADERS, RULES, client_for, inner_app
from tests.upstreams import FakeBarbican

pytestmark = pytest.mark.anyio


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_metrics_count_every_outcome_exactly(store: Store) -> None:
    registry = CollectorRegistry()
    metrics = QuotaMetrics(registry)
    upstream = FakeBarbican({"tok": {"things": 5}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, store=store, metrics=metrics,
                         source=BarbicanSource("http://q.test", client=upstream.client(), resources=["things"]))
    async with client_for(mw) as client:
        for _ in range(4):
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
        assert (await client.post("/fail", headers=HEADERS)).status_code == 409  # admitted, then refunded
        assert (await client.post("/things", headers=HEADERS)).status_code == 201  # 5 of 5: near the limit
        assert (await client.post("/things", headers=HEADERS)).status_code == 403
        assert (await client.delete("/things/1", headers=HEADERS)).status_code == 204
        assert (await client.get("/health")).status_code == 200  # unguarded: not counted
    count = lambda outcome: sample(registry, "quota_decisions_total", resource="things", outcome=outcome)  # noqa: E731
    assert (count("admitted"), count("refunded"), count("rejected"), count("released")) == (6, 1, 1, 1)
    # usage after each admission: 1 2 3 4 5(refunded later) 5 -> above 80% of 5 twice (5 and 5)
    assert sample(registry, "quota_near_limit_total", resource="things") == 2
    assert sample(registry, "quota_upstream_fetch_seconds_count", source="barbican", status="ok") == 1
    assert sample(registry, "quota_cache_total", result="miss") == 1
    assert sample(registry, "quota_cache_total", result="hit") == 6  # 7 guarded creates; deletes ask no quota
    assert sample(registry, "quota_store_seconds_count", operation="consume") == 7
    assert sample(registry, "quota_store_errors_total", operation="consume") == 0


async def test_metrics_count_failures_and_are_exposed() -> None:
    from middleware import RedisStore
    from tests.servers import free_port

    registry = CollectorRegistry()
    metrics = QuotaMetrics(registry)
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 5}), metrics=metrics,
                         store=RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 503
    assert sample(registry, "quota_decisions_total", resource="things", outcome="failed_closed") == 1
    assert sample(registry, "quota_store_errors_total", operation="consume") == 1
    async with client_for(metrics.asgi_app()) as client:
        exposition = (await client.get("/")).text
    assert 'quota_decisions_total{outcome="failed_closed",resource="things"} 1.0' in exposition


async def test_per_project_labels_only_when_asked() -> None:
    registry = CollectorRegistry()
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 1}),
                         metrics=QuotaMetrics(registry, per_project=True))
    async with client_for(mw) as client:
        await client.post("/things", headers=HEADERS)
    assert sample(registry, "quota_decisions_total", resource="things", outcome="admitted", project="p") == 1


@pytest.mark.parametrize("where", ["global", "rule"])
async def test_shadow_mode_never_refuses_but_counts_what_it_would(store: Store, where: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    rules = [Rule("POST", "/things", "things", shadow=(where == "rule"))]
    mw = QuotaMiddleware(inner_app(), rules=rules, source=StaticSource({"things": 2}), store=store,
                         shadow=(where == "global"), metrics=QuotaMetrics(registry))
    with caplog.at_level(logging.INFO, logger="quota_middleware"):
        async with client_for(mw) as client:
            statuses = [(await client.post("/things", headers=HEADERS)).status_code for _ in range(5)]
    assert statuses == [201] * 5  # a full quota, and every request admitted
    assert sample(registry, "quota_decisions_total", resource="things", outcome="shadow_rejected") == 3
    assert sample(registry, "quota_decisions_total", resource="things", outcome="rejected") == 0
    assert caplog.text.count("shadow mode: would have refused project 'p'") == 3
    await mw.store.flush()
    assert await mw.store.usage(Bucket("p", "things")) == 5  # usage stays true for the day enforcement starts


async def test_shadow_mode_lets_requests_without_identity_through() -> None:
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 0}), shadow=True)
    async with client_for(mw) as client:
        assert (await client.post("/things")).status_code == 201


async def test_shadow_mode_lets_a_refused_credential_through() -> None:
    upstream = FakeBarbican({})  # every token refused
    mw = QuotaMiddleware(inner_app(), rules=RULES, shadow=True,
                         source=BarbicanSource("http://q.test", client=upstream.client(), resources=["things"]))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201


async def test_shadow_refusals_are_warnings_and_a_flood_of_them_does_not_flood_the_log(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    from middleware.engine import SHADOW_LOG_PER_MINUTE

    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 0}), shadow=True, clock=clock)
    with caplog.at_level(logging.WARNING, logger="quota_middleware"):
        async with client_for(mw) as client:
            for _ in range(3 * SHADOW_LOG_PER_MINUTE):
                assert (await client.post("/things", headers=HEADERS)).status_code == 201
            clock.advance(61)  # the next minute: one line says how many were left out
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
    refusals = [r for r in caplog.records if "would have refused" in r.getMessage()]
    assert len(refusals) == SHADOW_LOG_PER_MINUTE + 1 and {r.levelno for r in refusals} == {logging.WARNING}
    left_out = [r.getMessage() for r in caplog.records if "were not logged" in r.getMessage()]
    assert left_out == [f"shadow mode: {2 * SHADOW_LOG_PER_MINUTE} more refusals in the last 61s were not logged"]
