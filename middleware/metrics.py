"""Prometheus metrics of the middleware's decisions (needs ``prometheus_client``).

    metrics = QuotaMetrics()                      # registers in prometheus_client's default registry
    app.add_middleware(QuotaMiddleware, ..., metrics=metrics)
    app.mount("/metrics", metrics.asgi_app())     # behind your own auth, like any admin route

Labels stay low-cardinality: resource, outcome, source, status, operation. Per-project labels only
with ``per_project=True`` (every project becomes a time series: mind your Prometheus).

- ``quota_decisions_total{resource, outcome}``: admitted, rejected, refunded, released,
  failed_open, failed_closed, shadow_rejected (would have been rejected; shadow mode admitted it).
- ``quota_near_limit_total{resource}``: admissions that left usage above 80% of the limit.
- ``quota_upstream_fetch_seconds{source, status}``: quota API fetches (ok, rejected, unavailable,
  invalid) and their latency; ``_count`` is the number of fetches.
- ``quota_cache_total{result}``: quota cache lookups (hit, shared_hit, miss).
- ``quota_store_seconds{operation}`` and ``quota_store_errors_total{operation}``: the store's
  latency as requests see it, and its failures.
- ``quota_store_data_lost_total``: times the store was seen to have lost usage data (Redis
  restarted without persistence, flushed, or evicting keys): alert on any increase.

Several worker processes (``uvicorn --workers N``, gunicorn): set ``PROMETHEUS_MULTIPROC_DIR`` to
an empty directory in the server's environment (before anything imports ``prometheus_client``)
and each process writes its values there; ``asgi_app()`` then serves the sum over every process,
whichever worker answers the scrape. Every metric here is a counter or a histogram, which
prometheus_client adds up across processes as they are: there is no gauge, so no
``multiprocess_mode`` to choose. Empty the directory when the server starts (not when a worker
restarts: its counts would vanish from the sums).
"""

from __future__ import annotations

from typing import Any

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("QuotaMetrics needs prometheus_client: pip install 'quota-middleware[metrics]'") from exc

NEAR_LIMIT = 0.8


def multiprocess_mode() -> bool:
    """True when prometheus_client keeps values in ``PROMETHEUS_MULTIPROC_DIR`` (several workers).

    prometheus_client reads that variable once, when it is imported; what it chose is what counts.
    """
    return prometheus_client.values.ValueClass is not prometheus_client.values.MutexValue


class QuotaMetrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None, *, namespace: str = "quota",
                 per_project: bool = False) -> None:
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self.per_project = per_project
        labels = ["resource", "outcome", *(["project"] if per_project else [])]
        self._decisions = prometheus_client.Counter(f"{namespace}_decisions", "Quota decisions by outcome", labels,
                                                    registry=self.registry)
        self._near = prometheus_client.Counter(f"{namespace}_near_limit", "Admissions above 80% of the limit",
                                               ["resource"], registry=self.registry)
        self._fetch = prometheus_client.Histogram(f"{namespace}_upstream_fetch_seconds", "Quota API fetches",
                                                  ["source", "status"], registry=self.registry)
        self._cache = prometheus_client.Counter(f"{namespace}_cache", "Quota cache lookups", ["result"],
                                                registry=self.registry)
        self._store = prometheus_client.Histogram(f"{namespace}_store_seconds", "Store latency per request",
                                                  ["operation"], registry=self.registry,
                                                  buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self._store_errors = prometheus_client.Counter(f"{namespace}_store_errors", "Store failures",
                                                       ["operation"], registry=self.registry)
        self._data_lost = prometheus_client.Counter(f"{namespace}_store_data_lost",
                                                    "Times the store was seen to have lost usage data",
                                                    registry=self.registry)

    def decision(self, resource: str, outcome: str, project: str) -> None:
        if self.per_project:
            self._decisions.labels(resource, outcome, project).inc()
        else:
            self._decisions.labels(resource, outcome).inc()

    def admitted(self, resource: str, project: str, used: int, limit: int) -> None:
        self.decision(resource, "admitted", project)
        if limit > 0 and used > NEAR_LIMIT * limit:
            self._near.labels(resource).inc()

    def fetch(self, source: str, status: str, seconds: float) -> None:
        self._fetch.labels(source, status).observe(seconds)

    def cache(self, result: str) -> None:
        self._cache.labels(result).inc()

    def store(self, operation: str, seconds: float, failed: bool = False) -> None:
        self._store.labels(operation).observe(seconds)
        if failed:
            self._store_errors.labels(operation).inc()

    def data_lost(self) -> None:
        self._data_lost.inc()

    def asgi_app(self) -> Any:
        """The exposition endpoint as an ASGI app, to mount at ``/metrics``.

        In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) it serves what every worker process
        wrote there, added up, rather than this process's own registry.
        """
        if multiprocess_mode():
            from prometheus_client import multiprocess

            registry = prometheus_client.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return prometheus_client.make_asgi_app(registry=registry)
        return prometheus_client.make_asgi_app(registry=self.registry)
