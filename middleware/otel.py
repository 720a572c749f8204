"""OpenTelemetry: the decisions' counters through the OpenTelemetry metrics API, and a span per
decision (needs ``opentelemetry-api``: ``pip install 'quota-middleware[otel]'``).

    telemetry = QuotaTelemetry()        # the global MeterProvider and TracerProvider, or pass your own
    app = QuotaMiddleware(app, ..., metrics=telemetry)

It is what :class:`middleware.metrics.QuotaMetrics` is for Prometheus, passed as ``metrics=`` the
same way (it implements the engine's metrics protocol, ``QuotaMetricsLike``). Instruments, with
the same attributes as the Prometheus labels:

- ``quota.decisions{quota.resource, quota.outcome}``: admitted, rejected, refunded, released,
  failed_open, failed_closed, shadow_rejected;
- ``quota.near_limit{quota.resource}``: admissions that left usage above 80% of the limit;
- ``quota.upstream.fetch.duration{quota.source, quota.status}`` (s): quota API fetches;
- ``quota.cache.lookups{quota.result}``: hit, shared_hit, miss;
- ``quota.store.duration{quota.operation}`` (s) and ``quota.store.errors{quota.operation}``;
- ``quota.store.data_lost``: times the store was seen to have lost usage data.

Spans: ``quota.decide`` for each decision (``quota.settle`` for a refund or a release), a child of
whatever span is current (the request's, under an instrumented server), with the attributes
``quota.project``, ``quota.resource`` and ``quota.outcome`` (and ``quota.used``, ``quota.limit`` in
store units, when admitted); failures (``failed_open``, ``failed_closed``) have an error status.
The engine reports a decision when it is made, so the span starts when the store was asked (the
``store`` report carries how long it took) and ends there: it times the store, not the quota
fetch. When the engine opens the span itself around the whole decision (through
:meth:`QuotaTelemetry.trace_decision`), the outcome is written on that span instead, and each
bucket the decision charged (several resources, a parent project) is an event on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("QuotaTelemetry needs opentelemetry-api: pip install 'quota-middleware[otel]'") from exc

__all__ = ["QuotaTelemetry"]

SCOPE = "quota_middleware"
#: As in middleware.metrics (which needs prometheus_client, so it is not imported here).
NEAR_LIMIT = 0.8
#: Outcomes that are settlements of an earlier decision, not decisions.
SETTLEMENTS = frozenset({"refunded", "released"})
FAILURES = frozenset({"failed_open", "failed_closed"})

#: The span trace_decision() opened, while the decision it covers runs, and the outcome it carries.
_open_span: ContextVar[tuple[trace.Span, list[str]] | None] = ContextVar("quota_open_span", default=None)
#: When (ns) the store was asked for the decision being made in this context.
_store_asked: ContextVar[int | None] = ContextVar("quota_store_asked", default=None)


class QuotaTelemetry:
    def __init__(self, *, meter_provider: otel_metrics.MeterProvider | None = None,
                 tracer_provider: trace.TracerProvider | None = None, per_project: bool = False,
                 spans: bool = True) -> None:
        """``per_project=True`` adds ``quota.project`` to the decision counter (every project
        becomes a series); spans always carry it. ``spans=False``: counters only."""
        from . import __version__

        meter = otel_metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        self.per_project = per_project
        self.spans = spans
        self._decisions = meter.create_counter("quota.decisions", unit="{decision}",
                                               description="Quota decisions by outcome")
        self._near = meter.create_counter("quota.near_limit", unit="{decision}",
                                          description="Admissions above 80% of the limit")
        self._fetch = meter.create_histogram("quota.upstream.fetch.duration", unit="s",
                                             description="Quota API fetches")
        self._cache = meter.create_counter("quota.cache.lookups", unit="{lookup}", description="Quota cache lookups")
        self._store = meter.create_histogram("quota.store.duration", unit="s",
                                             description="Store latency per request")
        self._store_errors = meter.create_counter("quota.store.errors", unit="{error}", description="Store failures")
        self._data_lost = meter.create_counter("quota.store.data_lost", unit="{event}",
                                               description="Times the store was seen to have lost usage data")

    # -- the engine's metrics protocol (middleware.types.QuotaMetricsLike) ----------------------------

    def decision(self, resource: str, outcome: str, project: str) -> None:
        attributes = {"quota.resource": resource, "quota.outcome": outcome}
        if self.per_project:
            attributes["quota.project"] = project
        self._decisions.add(1, attributes)
        if self.spans:
            self._span(project, resource, outcome, {})

    def admitted(self, resource: str, project: str, used: int, limit: int) -> None:
        attributes = {"quota.resource": resource, "quota.outcome": "admitted"}
        if self.per_project:
            attributes["quota.project"] = project
        self._decisions.add(1, attributes)
        if limit > 0 and used > NEAR_LIMIT * limit:
            self._near.add(1, {"quota.resource": resource})
        if self.spans:
            self._span(project, resource, "admitted", {"quota.used": used, "quota.limit": limit})

    def fetch(self, source: str, status: str, seconds: float) -> None:
        self._fetch.record(seconds, {"quota.source": source, "quota.status": status})

    def cache(self, result: str) -> None:
        self._cache.add(1, {"quota.result": result})

    def store(self, operation: str, seconds: float, failed: bool = False) -> None:
        self._store.record(seconds, {"quota.operation": operation})
        if failed:
            self._store_errors.add(1, {"quota.operation": operation})
        _store_asked.set(time.time_ns() - int(seconds * 1e9))

    def data_lost(self) -> None:
        self._data_lost.add(1)

    # -- spans ---------------------------------------------------------------------------------------

    @contextmanager
    def trace_decision(self, project: str, resource: str) -> Iterator[trace.Span]:
        """A span around a whole decision (quota fetch included), for an engine that opens one:
        the outcome reported while it is open is written on it."""
        if not self.spans:  # counters only: no span at all
            yield trace.INVALID_SPAN
            return
        with self.tracer.start_as_current_span("quota.decide", kind=trace.SpanKind.INTERNAL,
                                               attributes={"quota.project": project,
                                                           "quota.resource": resource}) as span:
            token = _open_span.set((span, []))
            try:
                yield span
            finally:
                _open_span.reset(token)

    def _span(self, project: str, resource: str, outcome: str, extra: dict[str, Any]) -> None:
        attributes = {"quota.project": project, "quota.resource": resource, "quota.outcome": outcome, **extra}
        asked = _store_asked.get()
        if asked is not None:
            _store_asked.set(None)  # one store call, one decision
        opened = _open_span.get()
        if opened is not None and outcome not in SETTLEMENTS:
            # One decision may charge several buckets (several resources, a parent project): each
            # report is an event; the span's outcome is the first that was not an admission.
            span, seen = opened
            span.add_event(f"quota.{outcome}", attributes)
            if not seen or seen[-1] == "admitted":
                span.set_attribute("quota.outcome", outcome)
            seen.append(outcome)
            if outcome in FAILURES:
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
            return
        name = "quota.settle" if outcome in SETTLEMENTS else "quota.decide"
        span = self.tracer.start_span(name, kind=trace.SpanKind.INTERNAL, attributes=attributes,
                                      start_time=None if outcome in SETTLEMENTS else asked)
        if outcome in FAILURES:
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        span.end()
