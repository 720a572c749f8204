"""OpenTelemetry: counters and a span per decision, read back from the SDK's in-memory exporters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from middleware import QuotaEngine, QuotaMiddleware, RedisStore, StaticSource
from middleware.otel import QuotaTelemetry
from tests.servers import free_port
from tests.test_middleware import HEADERS, RULES, client_for, inner_app

pytestmark = pytest.mark.anyio


class Telemetry:
    def __init__(self, **options: Any) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.quota = QuotaTelemetry(meter_provider=MeterProvider(metric_readers=[self.reader]),
                                    tracer_provider=self.tracer_provider, **options)

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """{sorted attributes: data point} of one instrument."""
        data = self.reader.get_metrics_data()
        found = {}
        for resource_metrics in data.resource_metrics if data else ():
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            found[tuple(sorted(point.attributes.items()))] = point
        return found

    def count(self, name: str, **attributes: str) -> int:
        point = self.points(name).get(tuple(sorted(attributes.items())))
        return 0 if point is None else int(point.value)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.tracer_provider.shutdown()


async def test_counters_and_a_span_per_decision(telemetry: Telemetry) -> None:
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 2}), metrics=telemetry.quota)
    outer = telemetry.tracer_provider.get_tracer("test")
    async with client_for(mw) as client:
        with outer.start_as_current_span("request") as request_span:
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
        assert (await client.post("/fail", headers=HEADERS)).status_code == 409  # admitted, refunded
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        assert (await client.post("/things", headers=HEADERS)).status_code == 403
        assert (await client.delete("/things/1", headers=HEADERS)).status_code == 204
    count = lambda outcome: telemetry.count("quota.decisions", **{"quota.resource": "things",  # noqa: E731
                                                                   "quota.outcome": outcome})
    assert (count("admitted"), count("refunded"), count("rejected"), count("released")) == (3, 1, 1, 1)
    assert telemetry.count("quota.near_limit", **{"quota.resource": "things"}) == 2  # 2 of 2, twice
    store = telemetry.points("quota.store.duration")[(("quota.operation", "consume"),)]
    assert store.count == 4

    spans = [s for s in telemetry.finished() if s.name.startswith("quota.")]
    outcomes = [(s.name, s.attributes["quota.outcome"]) for s in spans if s.attributes]
    assert outcomes == [("quota.decide", "admitted"), ("quota.decide", "admitted"), ("quota.settle", "refunded"),
                        ("quota.decide", "admitted"), ("quota.decide", "rejected"), ("quota.settle", "released")]
    first = spans[0]
    assert first.attributes is not None
    # The engine opens the span around the whole decision (quota fetch included); each bucket the
    # decision charged is an event carrying its usage and limit.
    assert dict(first.attributes) == {"quota.project": "p", "quota.resource": "things", "quota.outcome": "admitted"}
    assert [(e.name, dict(e.attributes or {})) for e in first.events] == [
        ("quota.admitted", {"quota.project": "p", "quota.resource": "things", "quota.outcome": "admitted",
                            "quota.used": 1, "quota.limit": 2})]
    # A child of the request's span.
    assert first.parent is not None and first.parent.span_id == request_span.get_span_context().span_id
    assert first.start_time is not None and first.end_time is not None and first.start_time <= first.end_time
    assert all(s.status.status_code == trace.StatusCode.UNSET for s in spans)


async def test_failures_are_error_spans_and_store_errors_are_counted(telemetry: Telemetry) -> None:
    mw = QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 5}), metrics=telemetry.quota,
                         store=RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 503
    await mw.aclose()
    assert telemetry.count("quota.decisions", **{"quota.resource": "things", "quota.outcome": "failed_closed"}) == 1
    assert telemetry.count("quota.store.errors", **{"quota.operation": "consume"}) == 1
    [span] = [s for s in telemetry.finished() if s.name == "quota.decide"]
    assert span.status.status_code == trace.StatusCode.ERROR and span.attributes is not None
    assert span.attributes["quota.outcome"] == "failed_closed"


async def test_per_project_attribute_only_when_asked() -> None:
    for per_project in (False, True):
        t = Telemetry(per_project=per_project, spans=False)
        engine = QuotaEngine(source=StaticSource({"things": 1}), metrics=t.quota)
        async with client_for(QuotaMiddleware(inner_app(), rules=RULES, engine=engine)) as client:
            await client.post("/things", headers=HEADERS)
        [key] = t.points("quota.decisions")
        assert ("quota.project", "p") in key if per_project else all(k != "quota.project" for k, _ in key)
        assert t.finished() == []


async def test_trace_decision_keeps_the_outcome_on_the_span_the_engine_opened(telemetry: Telemetry) -> None:
    """What the engine would do with the hunk in the report: one span around the whole decision."""
    quota = telemetry.quota
    with quota.trace_decision("p", "things"):
        quota.store("consume", 0.001)
        quota.decision("things", "rejected", "p")
    with quota.trace_decision("p", "things"):
        quota.admitted("things", "p", 3, 4)
    with quota.trace_decision("p", "things"):  # a project and its parent: two buckets, one decision
        quota.admitted("things", "p", 1, 4)
        quota.decision("things", "rejected", "org")
    quota.decision("things", "refunded", "p")  # a settlement, later: its own span
    spans = telemetry.finished()
    assert [(s.name, s.attributes and s.attributes["quota.outcome"]) for s in spans] == [
        ("quota.decide", "rejected"), ("quota.decide", "admitted"), ("quota.decide", "rejected"),
        ("quota.settle", "refunded")]
    both = spans[2]
    assert both.attributes is not None and both.attributes["quota.project"] == "p"
    assert [(e.name, e.attributes and e.attributes["quota.project"]) for e in both.events] == [
        ("quota.admitted", "p"), ("quota.rejected", "org")]
    assert telemetry.count("quota.decisions", **{"quota.resource": "things", "quota.outcome": "rejected"}) == 2


def test_usable_with_the_global_providers() -> None:
    quota = QuotaTelemetry()  # no SDK configured: the API's no-op providers
    quota.admitted("things", "p", 1, 1)
    quota.decision("things", "rejected", "p")
    quota.fetch("static", "ok", 0.01)
    quota.cache("hit")
    quota.data_lost()
