"""QuotaEngine: the decision and its settlement, with no HTTP in sight.

    demand (resource, cost)  ->  effective limit (cache, then upstream)  ->  charge
    ->  one atomic decision in the store  ->  ... the work ...  ->  settle (commit or refund)

The middleware and the FastAPI dependency are adapters around one engine; a background job that
creates resources calls it directly. The engine owns what every adapter shares: the store (and its
local leases), the quota cache, the default limit, the failure policies, shadow mode and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from . import options
from .cache import QuotaCache
from .errors import ConfigurationError, SourceError, SourceRejected, StoreError
from .nowait import nowait_usable
from .quotas import UNLIMITED, Limit, Quotas, in_quota_units, to_store_units
from .rendering import Rejection, format_amount, iso_time, ratelimit_headers
from .sources.base import QuotaSource
from .stores.base import Bucket, Decision, Reservation, SharedState, Store
from .stores.leasing import LeasingStore
from .stores.memory import MemoryStore
from .types import METRICS_METHODS, QuotaMetricsLike, RawHeaders
from .windows import Period, current_window

Policy = Literal["fail_closed", "fail_open"]
#: ``consume`` reserves (then commit or refund); ``meter`` admits while usage is under the limit.
Action = Literal["consume", "meter"]
Number = int | float | str | Any  # a Decimal too: whatever to_store_units reads

logger = logging.getLogger("quota_middleware")

OVER_QUOTA = "Quota exceeded for project {project}: {resource} allows {limit}{per}, {used} already in use."
DISABLED = "Quota exceeded for project {project}: {resource} is disabled (quota 0)."
SOURCE_FAILED = "Quota service unavailable: the effective quotas could not be read. Try again later."
STORE_FAILED = "Quota store unavailable: usage could not be checked. Try again later."
FAILED_OPEN = "admitting project %r (%s) without a quota check (fail_open): %s"
SHADOW_REJECTED = "shadow mode: would have refused project %r %s: %s"
SHADOW_PASSED = "shadow mode: letting project %r (%s) through: %s"
SETTLE_FAILED = "could not settle usage of project %r: %s"
UNREPORTED = ("quota source %r reports no limit for resource %r (it reported: %s); the default limit applies "
              "(%s). Check the rule's resource name, or the resources the source reads (resources=...).")
#: Resource names are bounded by the rules, but a computed one (from a path parameter) is not.
MAX_WARNED = 1024


def _check_policy(name: str, value: Any) -> Policy:
    if value not in ("fail_closed", "fail_open"):
        raise ConfigurationError(f"{name} must be 'fail_closed' or 'fail_open', got {value!r}")
    return value  # type: ignore[no-any-return]


class Demand(NamedTuple):
    """What a request (or a job) asks of one resource, before its limit is known."""

    resource: str
    #: In quota units: a whole number, or a fraction (``0.5`` credits); rounded up to store units.
    cost: Number = 1
    #: A fixed window the caller imposes (per minute); a window the source reports takes precedence.
    period: Period | None = None


# Built on every guarded request, and never changed: a plain slotted class costs about 60% of a
# named tuple to make (Admitted, which callers may unpack, stays one).
@dataclass(slots=True, eq=False)
class Charge:
    """One demand with its limit known: the bucket it counts in, its cost in store units, the limit."""

    bucket: Bucket
    limit: Limit
    units: int
    now: float

    def headers(self, decision: Decision, used: int | None = None) -> RawHeaders:
        limit = self.limit if decision.limit == self.limit.value else replace(self.limit, value=decision.limit)
        used = decision.used if used is None else used
        return ratelimit_headers(self.bucket.resource, limit, used, self.bucket.window, self.now)

    def rejection(self, decision: Decision) -> Rejection:
        """Over quota: the limit applied may be an operator's override of the source's."""
        bucket, window, used = self.bucket, self.bucket.window, decision.used
        limit = replace(self.limit, value=decision.limit)
        if limit.value == 0:
            description = DISABLED.format(project=bucket.project, resource=bucket.resource)
        else:
            per = "" if window is None else f" per window ending {iso_time(window.end)}"
            unit = f" {limit.unit}" if limit.unit else ""
            description = OVER_QUOTA.format(project=bucket.project, resource=bucket.resource, per=per,
                                             limit=format_amount(limit.value, limit.scale) + unit,
                                             used=format_amount(used, limit.scale) + unit)
        # A count quota is Barbican's 403; a windowed one frees up at the window's end: 429.
        return Rejection(403 if window is None else 429, description, project=bucket.project,
                         resource=bucket.resource, limit=in_quota_units(limit.value, limit.scale),
                         used=in_quota_units(used, limit.scale),
                         retry_after=None if window is None else window.end - self.now, headers=self.headers(decision))


class Admitted(NamedTuple):
    """What the store admitted: the charge, and the decision (holding a reservation, for consume)."""

    charge: Charge
    decision: Decision


def _no_answer(*args: Any) -> None:
    return None  # the store's own reserve() must decide (see middleware/nowait.py)


def _not_settled(*args: Any) -> bool:
    return False  # the store's own commit() / refund() must settle


class QuotaEngine:
    def __init__(
        self,
        *,
        source: QuotaSource,
        store: Store | None = None,
        default_limit: int = UNLIMITED,
        cache_ttl: float = 60.0,
        cache_jitter: float = 0.1,
        stale_ttl: float = 300.0,
        cache_size: int = 10_000,
        lease_seconds: float = 120.0,
        local_leases: bool = False,
        shadow: bool = False,
        metrics: QuotaMetricsLike | None = None,
        on_source_error: Policy = "fail_closed",
        on_store_error: Policy = "fail_closed",
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(source, QuotaSource):
            raise ConfigurationError(f"source must be a QuotaSource (BarbicanSource, StaticSource, ...), "
                                     f"got {source!r}")
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError(f"store must be a Store (MemoryStore, RedisStore, ...) or None, got {store!r}")
        default_limit = options.integer("default_limit", default_limit)
        for name, value in (("cache_ttl", cache_ttl), ("lease_seconds", lease_seconds), ("retry_after", retry_after)):
            options.number(name, value, positive=True)
        options.number("stale_ttl", stale_ttl, minimum=0)
        options.number("cache_jitter", cache_jitter, minimum=0, maximum=1)
        options.integer("cache_size", cache_size, minimum=1)
        options.flag("local_leases", local_leases)
        options.flag("shadow", shadow)
        options.function("clock", clock, "a callable returning epoch seconds")
        if metrics is not None and not all(callable(getattr(metrics, name, None)) for name in METRICS_METHODS):
            raise ConfigurationError(f"metrics must be a QuotaMetrics (or have {', '.join(METRICS_METHODS)}), "
                                     f"got {metrics!r}")
        self.source = source
        store = store if store is not None else MemoryStore(clock=clock)
        #: What the store shares across processes (None: the memory store, one process).
        self.shared = store if isinstance(store, SharedState) else None
        # Local leases only pay where a round trip is saved: around a shared store.
        self.store = LeasingStore(store) if local_leases and self.shared is not None else store
        self._reserve_nowait = self.store.reserve_nowait if nowait_usable(self.store, "reserve_nowait", "reserve") \
            else _no_answer
        self._settle_nowait = self.store.settle_nowait \
            if nowait_usable(self.store, "settle_nowait", "commit", "refund") else _not_settled
        self.default_limit = UNLIMITED if default_limit < 0 else default_limit
        self._default = Limit(self.default_limit)
        #: Resources the source did not report, already warned about (see _unreported).
        self._warned: set[str] = set()
        self.cache = QuotaCache(source, self.store, shared=self.shared, ttl=cache_ttl, jitter=cache_jitter,
                                stale=stale_ttl, maxsize=cache_size, clock=clock, metrics=metrics)
        self.lease_ms = int(lease_seconds * 1000)
        self.on_source_error = _check_policy("on_source_error", on_source_error)
        self.on_store_error = _check_policy("on_store_error", on_store_error)
        self.retry_after = retry_after
        self.clock = clock
        #: Decide and count as in enforcement, but never refuse (per rule: Rule(..., shadow=True)).
        self.shadow = shadow
        self.metrics = metrics
        data_lost = getattr(metrics, "data_lost", None)
        if callable(data_lost):
            self.store.on_data_loss(data_lost)

    # -- deciding -------------------------------------------------------------------------------

    async def admit(self, project: str, demand: Demand, *, headers: RawHeaders = [],  # noqa: B006 - never mutated
                    action: Action = "consume", shadow: bool = False) -> Admitted | Rejection | None:
        """Decide one demand of ``project`` before the work it pays for is done.

        Returns what was admitted (holding a reservation, for ``consume``: settle it), the
        Rejection to answer with, or None: go ahead uncounted (``fail_open`` while the store
        fails). ``headers`` are the request's, read only when the source needs the caller's
        credential. ``shadow`` (or the engine's own) decides and counts but never refuses.
        """
        shadow = shadow or self.shadow
        resource = demand.resource
        try:
            quotas = self.cache.fresh(project)  # a warm project: no coroutine
            if quotas is None:
                quotas = await self.cache.get(project, headers)
            charge = self.charge(quotas, project, demand)
        except SourceRejected as exc:
            if shadow:  # the quota service refused the caller's credential; enforcement is not on yet
                logger.info(SHADOW_PASSED, project, resource, exc, extra=_fields(project, resource, "shadow_passed"))
                return None
            return Rejection(exc.caller_status, f"Quota service refused the request: {exc}",
                             project=project, resource=resource)
        except SourceError as exc:
            if self.on_source_error == "fail_closed" and not shadow:
                logger.warning("quota API failed for project %r: %s", project, exc,
                               extra=_fields(project, resource, "failed_closed"))
                self.record_outcome(resource, "failed_closed", project)
                return Rejection(503, SOURCE_FAILED, project=project, resource=resource,
                                 retry_after=exc.retry_after or self.retry_after)
            logger.warning(FAILED_OPEN, project, resource, exc, extra=_fields(project, resource, "failed_open"))
            self.record_outcome(resource, "failed_open", project)
            # Still counted (in the demand's window, if it has one), so that usage stays true for when
            # the source is back.
            now = self.clock()
            charge = Charge(Bucket(project, resource, current_window(demand.period, now)), Limit(UNLIMITED),
                            _units(demand.cost, 1), now)

        try:
            # Even a disabled resource (limit 0) asks the store: an operator's override may lift it.
            # A Decision is a non-empty tuple: `or` awaits the store only when it cannot answer in process.
            decision = self._decide_nowait(action, charge) or await self._decide(action, charge, charge.limit.value)
            if not decision.admitted:
                self.record_outcome(resource, "shadow_rejected" if shadow else "rejected", project)
                if not shadow:
                    return charge.rejection(decision)
                # Shadow mode: what enforcement would refuse is recorded, admitted, and counted,
                # so that usage stays true for the day enforcement starts.
                logger.info(SHADOW_REJECTED, project, resource, charge.rejection(decision).description,
                            extra=_fields(project, resource, "shadow_rejected"))
                decision = await self._decide(action, charge, UNLIMITED)
        except StoreError as exc:
            if self.on_store_error == "fail_closed" and not shadow:
                logger.warning("quota store failed for project %r: %s", project, exc,
                               extra=_fields(project, resource, "failed_closed"))
                self.record_outcome(resource, "failed_closed", project)
                return Rejection(503, STORE_FAILED, project=project, resource=resource, retry_after=self.retry_after)
            logger.warning(FAILED_OPEN, project, resource, exc, extra=_fields(project, resource, "failed_open"))
            self.record_outcome(resource, "failed_open", project)
            return None
        if self.metrics is not None:
            self.metrics.admitted(resource, project, decision.used, decision.limit)
        return Admitted(charge, decision)

    def charge(self, quotas: Quotas, project: str, demand: Demand) -> Charge:
        """The demand against the project's effective limit, in the window it counts in now."""
        limit = quotas.limits.get(demand.resource)
        if limit is None:
            limit = self._unreported(demand.resource, quotas)
        now = self.clock()
        period = limit.period or demand.period
        window = None if period is None else current_window(period, now)  # None: a count quota
        return Charge(Bucket(project, demand.resource, window), limit, _units(demand.cost, limit.scale), now)

    def _unreported(self, resource: str, quotas: Quotas) -> Limit:
        """The default limit, for a resource the source did not report; said once per resource.

        Most often a typo in a rule, or a source told to read other resources (``resources=``):
        silently unlimited is the worst way to find out.
        """
        if resource not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add(resource)
            logger.warning(UNREPORTED, self.source.namespace, resource, ", ".join(sorted(quotas.limits)) or "none",
                           "unlimited" if self.default_limit < 0 else self.default_limit,
                           extra=_fields(None, resource, "unreported"))
        return self._default

    def _decide_nowait(self, action: Action, charge: Charge) -> Decision | None:
        """The decision when the store has it in process (an open local lease, the memory store)."""
        if action == "meter":
            return None
        started = time.perf_counter() if self.metrics is not None else 0.0
        decision = self._reserve_nowait(charge.bucket, charge.units, charge.limit.value, self.lease_ms,
                                        charge.limit.scale)
        if decision is not None and self.metrics is not None:
            self.metrics.store(action, time.perf_counter() - started)
        return decision

    def _decide(self, action: Action, charge: Charge, limit: int) -> Awaitable[Decision]:
        """One atomic decision in the store (timed, when metrics are on)."""
        if action == "meter":
            decision = self.store.check(charge.bucket, limit, charge.limit.scale)
        else:
            decision = self.store.reserve(charge.bucket, charge.units, limit, self.lease_ms, charge.limit.scale)
        # Without metrics the caller awaits the store's own coroutine: no frame of ours in between.
        return decision if self.metrics is None else self._timed(action, decision)

    async def _timed(self, action: str, decision: Awaitable[Decision]) -> Decision:
        assert self.metrics is not None
        started = time.perf_counter()
        try:
            result = await decision
        except StoreError:
            self.metrics.store(action, time.perf_counter() - started, failed=True)
            raise
        self.metrics.store(action, time.perf_counter() - started)
        return result

    def record_outcome(self, resource: str, outcome: str, project: str) -> None:
        """Report a decision's outcome to the metrics, when they are on."""
        if self.metrics is not None:
            self.metrics.decision(resource, outcome, project)

    # -- settling -------------------------------------------------------------------------------

    async def settle(self, reservation: Reservation, keep: bool) -> None:
        """Keep (commit) or give back (refund) an admitted reservation. A store failure is logged,
        never raised: the work is done either way, and an unsettled lease expires by itself."""
        if not keep:
            self.record_outcome(reservation.bucket.resource, "refunded", reservation.bucket.project)
        try:
            if not self._settle_nowait(reservation, keep):
                await (self.store.commit(reservation) if keep else self.store.refund(reservation))
        except StoreError as exc:
            logger.warning(SETTLE_FAILED, reservation.bucket.project, exc,
                           extra=_fields(reservation.bucket.project, reservation.bucket.resource, "settle_failed"))

    async def release(self, bucket: Bucket, units: int) -> None:
        """Give ``units`` back after a delete, never below zero (a store failure is logged)."""
        self.record_outcome(bucket.resource, "released", bucket.project)
        try:
            await self.store.release(bucket, units)
        except StoreError as exc:
            # The Redis store keeps sending it until it is applied (once).
            logger.warning(SETTLE_FAILED, bucket.project, exc, extra=_fields(bucket.project, bucket.resource,
                                                                               "settle_failed"))

    async def meter(self, bucket: Bucket, amount: int) -> None:
        """Charge what a metered request used, after the fact (a store failure is logged)."""
        try:
            await self.store.charge(bucket, amount)
        except StoreError as exc:
            logger.warning(SETTLE_FAILED, bucket.project, exc, extra=_fields(bucket.project, bucket.resource,
                                                                               "settle_failed"))

    async def aclose(self) -> None:
        """Apply pending settlements and close the store and the source's connections."""
        await self.store.aclose()
        await self.source.aclose()


def _units(cost: Number, scale: int) -> int:
    # A whole cost (nearly always 1) needs no Decimal arithmetic.
    return cost * scale if type(cost) is int and cost >= 0 else to_store_units(cost, scale)


def _fields(project: str | None, resource: str | None, outcome: str) -> dict[str, Any]:
    """Log record fields (``extra``) that a structured log handler can index."""
    return {"quota_project": project, "quota_resource": resource, "quota_outcome": outcome}
