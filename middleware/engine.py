"""QuotaEngine: the decision and its settlement, with no HTTP in sight.

    demand (resource, cost)  ->  effective limit (cache, then upstream)  ->  charge
    ->  one atomic decision in the store  ->  ... the work ...  ->  settle (commit or refund)

The middleware and the FastAPI dependency are adapters around one engine; a background job that
creates resources calls it directly. The engine owns what every adapter shares: the store (and its
local leases), the quota cache, the default limit, the failure policies, shadow mode and metrics.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from . import options
from .cache import QuotaCache
from .errors import ConfigurationError, QuotaExceeded, SourceError, SourceInvalid, SourceRejected, StoreError
from .nowait import nowait_usable
from .quotas import UNLIMITED, Limit, Number, Quotas, in_quota_units, to_store_units
from .rendering import Rejection, format_amount, iso_time, limit_headers, limit_policy, limit_state
from .sources.base import QuotaSource
from .stores.base import Bucket, Claim, Decision, Reservation, SharedState, Store, reservation_of
from .stores.leasing import LeasingStore
from .stores.memory import MemoryStore
from .types import METRICS_METHODS, QuotaMetricsLike, RawHeaders
from .windows import Period, current_window

Policy = Literal["fail_closed", "fail_open"]
#: ``consume`` reserves (then commit or refund); ``meter`` admits while usage is under the limit.
Action = Literal["consume", "meter"]
#: A project's parent: a function of the project id (sync or async), None for a project of its own.
ParentFn = Callable[[str], "str | None | Awaitable[str | None]"]

logger = logging.getLogger("quota_middleware")
INF = math.inf
#: A Decision's ``admitted``, read in C: all(map(_ADMITTED, decisions)).
_ADMITTED = operator.itemgetter(0)

OVER_QUOTA = "Quota exceeded for project {project}: {resource} allows {limit}{per}, {used} already in use."
DISABLED = "Quota exceeded for project {project}: {resource} is disabled (quota 0)."
SOURCE_FAILED = "Quota service unavailable: the effective quotas could not be read. Try again later."
STORE_FAILED = "Quota store unavailable: usage could not be checked. Try again later."
FAILED_OPEN = "admitting project %r (%s) without a quota check (fail_open): %s"
SHADOW_REJECTED = "shadow mode: would have refused project %r %s: %s"
SHADOW_PASSED = "shadow mode: letting project %r (%s) through: %s"
SHADOW_SUPPRESSED = "shadow mode: %d more refusals in the last %.0fs were not logged"
#: Shadow refusals are WARNINGs (what enforcement would do is what an operator watches for), at
#: most this many a minute: a flood of them must not flood the log.
SHADOW_LOG_PER_MINUTE = 10
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
    #: A limit of the caller's own, in quota units (a rule's ``limit=10, window="minute"``): used
    #: instead of the source's, for this project only (a negative one: unlimited).
    limit: int | None = None


# Built on every guarded request, and never changed: a plain slotted class costs about 60% of a
# named tuple to make (Admitted, which callers may unpack, stays one).
@dataclass(slots=True, eq=False)
class Charge:
    """One demand with its limit known: the bucket it counts in, its cost in store units, the limit."""

    bucket: Bucket
    limit: Limit
    units: int
    now: float
    #: (encoded name, RateLimit-Policy item) of ``limit``, named as the request's policy: made once
    #: per plan, for the up to three policies every request of several charges states.
    policy: tuple[bytes, bytes] | None = field(default=None, repr=False)

    def headers(self, decision: Decision, used: int | None = None, name: str | None = None) -> RawHeaders:
        """RateLimit headers of the limit the decision applied (an operator's override, maybe)."""
        return limit_headers(name or self.bucket.resource, decision.limit, self.limit.scale,
                             decision.used if used is None else used, self.bucket.window, self.now)

    def items(self, limit: int, used: int, own: str) -> tuple[bytes, bytes]:
        """This charge's (``RateLimit-Policy`` item, ``RateLimit`` item) under the limit applied
        (>= 0; an operator's override, maybe), in a request of project ``own``."""
        if self.policy is not None and limit == self.limit.value:  # the plan's, pre-encoded
            name, policy = self.policy
        else:
            name, policy = _policy_of(self, own, limit)  # type: ignore[misc]  # limit >= 0
        return policy, limit_state(name, limit, self.limit.scale, used, self.bucket.window, self.now)

    def rejection(self, decision: Decision, now: float | None = None) -> Rejection:
        """Over quota: the limit applied may be an operator's override of the source's. ``now``:
        the request's time, for Retry-After (the charge's own may be an earlier instant of the
        same second, see _Plan.charges)."""
        bucket, window, used = self.bucket, self.bucket.window, decision.used
        now = self.now if now is None else now
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
                         retry_after=None if window is None else window.end - now, headers=self.headers(decision))


class Admitted(NamedTuple):
    """What the store admitted: each charge and its decision (holding a reservation, for consume)."""

    charges: tuple[Charge, ...]
    decisions: tuple[Decision, ...]

    @property
    def charge(self) -> Charge:
        """The first charge (a request with one demand has only this one)."""
        return self.charges[0]

    @property
    def decision(self) -> Decision:
        return self.decisions[0]

    @property
    def reservations(self) -> list[Reservation]:
        return [d.reservation for d in self.decisions if d.reservation is not None]

    def headers(self, kept: bool = True) -> RawHeaders:
        """RateLimit headers for every policy the request met; a refunded request's usage without it."""
        if len(self.charges) == 1:  # one policy: no lists to join
            decision = self.decisions[0]
            return one_policy_headers(self.charges[0], decision.used, decision.limit, kept)
        return combined_headers(self.charges, self.decisions, refused=not kept)


def one_policy_headers(charge: Charge, used: int, limit: int, kept: bool) -> RawHeaders:
    """RateLimit headers of a request that met one policy (none if unlimited); a refunded
    request's usage without it."""
    if limit < 0:
        return []
    policy, state = charge.items(limit, used if kept else used - charge.units, charge.bucket.project)
    return [(b"ratelimit-policy", policy), (b"ratelimit", state)]


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
        parent: ParentFn | None = None,
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
        self._reserve_all_nowait = self.store.reserve_all_nowait \
            if nowait_usable(self.store, "reserve_all_nowait", "reserve_all") else _no_answer
        #: The store can decide without I/O (the memory store, local leases): admit_nowait can answer.
        self.decides_in_process = self._reserve_nowait is not _no_answer
        #: ... and say so in plain values: take_nowait can answer (see Store.take_nowait).
        self.takes_in_process = self.decides_in_process \
            and nowait_usable(self.store, "take_nowait", "reserve_nowait", "reserve") \
            and nowait_usable(self.store, "settle_taken_nowait", "settle_nowait", "commit", "refund")
        self._settle_nowait = self.store.settle_nowait \
            if nowait_usable(self.store, "settle_nowait", "commit", "refund") else _not_settled
        self._take_nowait = self.store.take_nowait
        #: A group of buckets taken in process too (the memory store): None if not.
        self._take_all_nowait = self.store.take_all_nowait if self.takes_in_process \
            and nowait_usable(self.store, "take_all_nowait", "reserve_all_nowait", "reserve_all") \
            and nowait_usable(self.store, "settle_taken_nowait", "settle_all_nowait") else None
        self._settle_taken_nowait = self.store.settle_taken_nowait
        #: A store that must be awaited takes in plain values too (Redis): take_later can answer.
        self._take = self.store.take if not self.takes_in_process \
            and nowait_usable(self.store, "take", "reserve") \
            and nowait_usable(self.store, "settle_taken_nowait", "settle_nowait", "commit", "refund") else None
        self._take_all = self.store.take_all if self._take is not None \
            and nowait_usable(self.store, "take_all", "reserve_all") \
            and nowait_usable(self.store, "settle_taken_nowait", "settle_all_nowait") else None
        self._settle_taken_all_nowait = self.store.settle_taken_all_nowait if self._take_all is not None \
            and nowait_usable(self.store, "settle_taken_all_nowait", "settle_taken_nowait", "settle_all_nowait",
                              "settle_nowait", "commit", "refund") else None
        self.takes_later = self._take is not None
        self._settle_all_nowait = self.store.settle_all_nowait \
            if nowait_usable(self.store, "settle_all_nowait", "settle_nowait", "commit", "refund") else _not_settled
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
        self._shadow_log = ShadowLog(clock)
        #: Opened around each decision when the metrics offer it (middleware.otel.QuotaTelemetry).
        self._trace = getattr(metrics, "trace_decision", None)
        if parent is not None:
            options.function("parent", parent, "a callable taking a project id and returning its parent's (or None)")
        self._parent_fn = parent
        #: project -> (parent or None, known until), for a cache TTL; None when no project has a parent.
        self._parents: dict[str, tuple[str | None, float]] | None = None
        if parent is not None or self.source.has_parents:
            self._parents = {}
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        #: (project, parent given, demands) -> the buckets they charge, worked out once (see _Plan).
        self._plans: dict[tuple[str, str | None, tuple[Demand, ...]], _Plan] = {}
        #: demands -> {project: its plan, armed for take_nowait} (see fast_plans).
        self._armed: dict[tuple[Demand, ...], dict[str, _Plan]] = {}
        #: parent -> the projects whose armed plans charge it (disarmed with it).
        self._children: dict[str, set[str]] = {}
        self.cache.on_change = self._disarm
        data_lost = getattr(metrics, "data_lost", None)
        if callable(data_lost):
            self.store.on_data_loss(data_lost)

    # -- deciding -------------------------------------------------------------------------------

    def admit(self, project: str, *demands: Demand, headers: RawHeaders = [],  # noqa: B006 - never mutated
              action: Action = "consume", shadow: bool = False, parent: str | None = None,
              plans: dict[str, _Plan] | None = None) -> Awaitable[Admitted | Rejection | None]:
        """Decide the demands of ``project`` before the work they pay for is done, all or nothing.

        Returns what was admitted (holding reservations, for ``consume``: settle them), the
        Rejection to answer with (it names the limit that refused), or None: go ahead uncounted
        (``fail_open`` while the store fails). ``headers`` are the request's, read only when the
        source needs the caller's credential. ``shadow`` (or the engine's own) decides and counts
        but never refuses. ``parent``: the project's parent, when the request says (else the
        engine's ``parent`` function or the source's): every demand is charged there too.
        ``plans``: ``fast_plans(demands)``, for demands that are always the same (a rule's).
        """
        # Not a coroutine itself: the caller awaits the one that decides, no frame of ours between.
        shadow = shadow or self.shadow
        if self._trace is not None:
            return self._traced(project, demands, headers, action, shadow, parent)
        if self.metrics is not None or parent is not None:
            plans = None  # metrics count cache hits; the plans are those of no parent given
        if len(demands) != 1 or parent is not None or self._parents is not None:
            return self._admit_all(project, demands, headers, action, shadow, parent, plans)
        return self._admit_one(project, demands, headers, action, shadow, plans)

    async def _traced(self, project: str, demands: tuple[Demand, ...], headers: RawHeaders, action: Action,
                      shadow: bool, parent: str | None) -> Admitted | Rejection | None:
        """A decision inside the span the metrics open (middleware.otel.QuotaTelemetry)."""
        assert self._trace is not None
        with self._trace(project, ",".join(demand.resource for demand in demands)):
            if len(demands) != 1 or parent is not None or self._parents is not None:
                return await self._admit_all(project, demands, headers, action, shadow, parent)
            return await self._admit_one(project, demands, headers, action, shadow)

    async def _admit_one(self, project: str, demands: tuple[Demand], headers: RawHeaders, action: Action,
                         shadow: bool, plans: dict[str, _Plan] | None = None) -> Admitted | Rejection | None:
        """One demand, one bucket: the common case, decided without building a claim list."""
        resource = demands[0].resource
        now = self.clock()
        try:
            # A warm project: no coroutine. A rule's demands: the plan armed for them.
            plan = self._plan_nowait(project, demands, None, now) if plans is None \
                else self._armed_plan(project, demands, plans, now)
            if plan is None:
                plan = await self._plan(project, demands, headers, None)
                now = self.clock()
            charges = plan.charges(now)
        except SourceError as exc:
            refusal = self._source_failed(exc, project, resource, shadow)
            if not isinstance(refusal, _CountUnlimited):
                return refusal
            charges = (self._unlimited(project, demands[0]),)
        charge = charges[0]

        try:
            # Even a disabled resource (limit 0) asks the store: an operator's override may lift it.
            # A Decision is a non-empty tuple: `or` awaits the store only when it cannot answer in process.
            decision = (self.decides_in_process and self._decide_nowait(action, charge)) \
                or await self._decide(action, charge, charge.limit.value)
            if not decision.admitted:
                self.record_outcome(resource, "shadow_rejected" if shadow else "rejected", project)
                if not shadow:
                    return charge.rejection(decision, now)
                # Shadow mode: what enforcement would refuse is recorded, admitted, and counted,
                # so that usage stays true for the day enforcement starts.
                self._shadow_log.refused(project, resource, charge.rejection(decision).description)
                decision = await self._decide(action, charge, UNLIMITED)
        except StoreError as exc:
            return self._store_failed(exc, project, resource, shadow)
        if self.metrics is not None:
            self.metrics.admitted(resource, project, decision.used, decision.limit)
        return tuple.__new__(Admitted, (charges, (decision,)))

    def admit_nowait(self, project: str, demands: tuple[Demand, ...],
                     plans: dict[str, _Plan] | None = None) -> Admitted | None:
        """``admit`` of consume demands when everything is at hand: the quotas (and any parent)
        fresh in process, and a store that decides in process (the memory store, an open local
        lease). Only an admission is answered here; None: await ``admit`` (which also decides
        refusals, failures and shadow mode). No coroutine, no I/O: most requests of a warm project.
        ``plans``: ``fast_plans(demands)``, for demands that are always the same (a rule's)."""
        if not self.decides_in_process or self.metrics is not None:
            # A store that needs I/O would make admit() look everything up again; with metrics, a
            # refusal would count its cache lookup twice.
            return None
        now = self.clock()
        plan = self._plan_nowait(project, demands, None, now) if plans is None \
            else self._armed_plan(project, demands, plans, now)
        if plan is None:
            return None
        charges = plan.charges(now)
        if len(plan.claims) == 1:
            bucket, cost, limit, scale = plan.claims[0]
            decision = self._reserve_nowait(bucket, cost, limit, self.lease_ms, scale)
            if decision is None or not decision.admitted:
                return None  # nothing was reserved: admit() decides it again, and answers the refusal
            # tuple.__new__: half the cost of a named tuple's own constructor, on every request.
            return tuple.__new__(Admitted, (charges, (decision,)))
        decisions = self._reserve_all_nowait(plan.claims, self.lease_ms)
        if decisions is None or not decisions[0].admitted:  # all or nothing: the first says for all
            return None
        return tuple.__new__(Admitted, (charges, tuple(decisions)))

    def fast_plans(self, demands: tuple[Demand, ...]) -> dict[str, _Plan]:
        """Where the plans of ``demands`` (fixed ones: a rule's) are kept by project, armed (see
        take_nowait): for ``take_nowait`` and ``admit(..., plans=)``. Ask once, keep it beside
        the demands."""
        return self._armed.setdefault(demands, {})

    def take_nowait(self, project: str, demands: tuple[Demand, ...],
                    plans: dict[str, _Plan]) -> Hold | None:
        """``admit_nowait`` in plain values: the plan and what the store took, one Taken for a plan
        of one bucket, a list for several (no Admitted, Decision or Reservation made: they cost more
        to make than the rest of the decision). ``plans``: ``fast_plans(demands)``. None: ask
        ``admit`` (a store that cannot take in process, a refusal, a cold project, a window ending
        mid-second, metrics). Settle with ``settle_taken``.

        A plan checked as admit_nowait checks it is *armed*: served until the second ends (or
        sooner: its window ends, its quotas go stale or are replaced) without looking anything
        else up."""
        # Shadow mode changes only refusals, which this leaves to admit(); metrics count in admit().
        if not self.takes_in_process or self.metrics is not None:
            return None
        now = self.clock()
        plan = plans.get(project)  # _armed_plan, written out: every warm request comes here
        if plan is None or not now < plan.armed_until:
            plan = self._arm(project, demands, plans, now)  # checked now: good for this request
            if plan is None:
                return None
        taking = plan.taking
        if taking is not None:
            bucket, cost, limit, scale = taking
            taken = self._take_nowait(bucket, cost, limit, self.lease_ms, scale)
            return None if taken is None else (plan, taken)
        if plan.taking_all is None or self._take_all_nowait is None:  # a charge made per request
            return None
        group = self._take_all_nowait(plan.taking_all, self.lease_ms)
        return None if group is None else (plan, group)

    def take_later(self, project: str, demands: tuple[Demand, ...],
                   plans: dict[str, _Plan]) -> tuple[_Plan, Awaitable[Any]] | None:
        """``take_nowait`` for a store that must be awaited (``takes_later``: Redis, leases off):
        the armed plan, and the store's own awaitable of what it took, a Taken for one bucket and a
        list for several (None when refused: ask ``admit``, which answers the refusal; it raises
        StoreError: see ``take_failed``). None: ask ``admit`` (a cold project, a window ending
        mid-second, metrics). Settle with ``settle_taken``."""
        if self._take is None or self.metrics is not None:
            return None
        plan = self._armed_plan(project, demands, plans, self.clock())
        if plan is None:
            return None
        taking = plan.taking
        taken: Awaitable[Any] | None  # of a Taken (one bucket) or a list (several), as Hold holds
        if taking is not None:
            bucket, cost, limit, scale = taking
            taken = self._take(bucket, cost, limit, self.lease_ms, scale)
        elif plan.taking_all is not None and self._take_all is not None:
            taken = self._take_all(plan.taking_all, self.lease_ms)
        else:  # a charge made per request
            return None
        return None if taken is None else (plan, taken)

    def take_failed(self, exc: StoreError, project: str, demands: tuple[Demand, ...],
                    shadow: bool) -> Rejection | None:
        """What ``admit`` answers when the store fails (``on_store_error``): a Rejection (fail
        closed), or None (fail open: let the request through, uncounted)."""
        return self._store_failed(exc, project, demands[0].resource, shadow or self.shadow)

    def _armed_plan(self, project: str, demands: tuple[Demand, ...], plans: dict[str, _Plan],
                    now: float) -> _Plan | None:
        """The plan of the demands from ``plans`` while it is armed, else checked now (``_arm``)."""
        plan = plans.get(project)
        if plan is None or not now < plan.armed_until:
            return self._arm(project, demands, plans, now)
        return plan

    def _arm(self, project: str, demands: tuple[Demand, ...], plans: dict[str, _Plan], now: float) -> _Plan | None:
        """The plan of the demands, checked now as _plan_nowait checks it (None: not at hand); kept
        in ``plans`` and armed: served without checking until the second ends, or sooner (its
        windows end, its quotas or its parent's go stale, the parent's TTL ends; quotas replaced
        in process disarm it at once, see _disarm)."""
        plan = self._plan_nowait(project, demands, None, now)
        if plan is None:
            return None
        plan.charges(now)  # this second's charges, in plan.at_second (for windows ending on a whole second)
        until = min(now // 1 + 1, plan.until, self.cache.fresh_until(project))
        if self._parents is not None:
            until = min(until, self._parents[project][1])  # _plan_nowait found it, unexpired
            if plan.parent is not None:
                until = min(until, self.cache.fresh_until(plan.parent))
                if len(self._children) >= self._cache_size:  # bounded: every plan is checked again
                    self._children.clear()
                    self._disarm_all()
                self._children.setdefault(plan.parent, set()).add(project)
        plan.armed_until = until
        plan.taking = plan.taking_all = None
        # Taken in plain values (take_nowait) when its charges hold for the rest of the second (a
        # window ending mid-second has its charges made per request). Plain tuples: unpacking a
        # named tuple (a Claim) goes the slow way, through an iterator. Made once per plan: the
        # very same tuple every second (the Redis store keeps its group by the claims' identity).
        if plan.until == INF or plan.second == now // 1:
            plain = plan.plain
            if plain is None:
                plain = plan.plain = tuple([(bucket, cost, limit, scale) for bucket, cost, limit, scale in plan.claims])
            if len(plain) == 1:
                plan.taking = plain[0]
            else:
                plan.taking_all = plain
        if len(plans) >= self._cache_size:  # bounded, as _plans is
            plans.clear()
        plans[project] = plan
        return plan

    def _disarm_all(self) -> None:
        for plans in self._armed.values():
            plans.clear()

    def _disarm(self, project: str) -> None:
        """The project's quotas in process were replaced or dropped: its armed plans, and those of
        the projects it is the parent of, are not to be served."""
        projects = {project, *self._children.pop(project, ())}
        for plans in self._armed.values():
            for each in projects:
                plans.pop(each, None)

    def settle_taken(self, held: Hold, keep: bool) -> tuple[Reservation, ...]:
        """Keep or give back what ``take_nowait`` admitted; returns the Reservations the store
        could not settle in process (await ``settle`` for each), as ``settle_nowait`` does."""
        plan, taken = held  # one Taken, or a list of them (see Hold)
        if type(taken) is tuple:  # one bucket
            bucket, cost, _, _ = plan.taking or plan.claims[0]  # (a plain tuple unpacks faster)
            try:
                if self._settle_taken_nowait(bucket, cost, taken[2], keep):
                    return ()
            except StoreError as exc:  # logged, as settle() does: the lease expires
                _settle_failed(bucket, exc)
                return ()
            return (reservation_of(bucket, cost, taken),)
        claims = plan.taking_all or plan.claims
        if self._settle_taken_all_nowait is not None:  # a store that must be awaited: one settlement
            try:
                if self._settle_taken_all_nowait(claims, taken, keep):
                    return ()
            except StoreError as exc:
                _settle_failed(claims[0][0], exc)
                return ()
        left: tuple[Reservation, ...] = ()
        for (bucket, cost, _, _), each in zip(claims, taken, strict=True):
            try:
                if not self._settle_taken_nowait(bucket, cost, each[2], keep):
                    left += (reservation_of(bucket, cost, each),)
            except StoreError as exc:
                _settle_failed(bucket, exc)
        return left

    @staticmethod
    def taken_headers(held: Hold, kept: bool) -> RawHeaders | None:
        """RateLimit headers of what ``take_nowait`` admitted (None: an unlimited resource);
        a refunded request's usage without it."""
        plan, taken = held  # one Taken, or a list of them (see Hold)
        # The plan's charges of the second it was last armed in (the response's, or its request's):
        # their t= is their windows' seconds left then.
        charges = plan.made if plan.until == INF else plan.at_second
        if type(taken) is tuple:  # one bucket
            used, limit, _, _ = taken
            return None if limit < 0 else one_policy_headers(charges[0], used, limit, kept)
        return _policies(charges, taken, 0, not kept)

    def settle_nowait(self, admitted: Admitted, keep: bool) -> tuple[Reservation, ...]:
        """``settle_all`` of what the store settles in process or hands over; returns the
        reservations it could not (await ``settle`` for each)."""
        decisions = admitted.decisions
        if len(decisions) > 1 and self._settle_all_nowait is not _not_settled:
            reservations = [d.reservation for d in decisions if d.reservation is not None]
            try:
                settled = len(reservations) > 1 and self._settle_all_nowait(reservations, keep)
            except StoreError as exc:  # logged and counted as each reservation's would be: their leases expire
                _settle_failed(reservations[0].bucket, exc)
                settled = True
            if settled:  # one settlement for the group (the Redis store: one operation)
                if not keep:
                    for held in reservations:
                        self.record_outcome(held.bucket.resource, "refunded", held.bucket.project)
                return ()
        left: tuple[Reservation, ...] = ()
        for decision in decisions:
            reservation = decision.reservation
            if reservation is None:
                continue
            try:
                if not self._settle_nowait(reservation, keep):
                    left += (reservation,)
                    continue
            except StoreError as exc:
                _settle_failed(reservation.bucket, exc)
            if not keep:
                self.record_outcome(reservation.bucket.resource, "refunded", reservation.bucket.project)
        return left

    async def _admit_all(self, project: str, demands: tuple[Demand, ...], headers: RawHeaders, action: Action,
                         shadow: bool, parent: str | None,
                         plans: dict[str, _Plan] | None = None) -> Admitted | Rejection | None:
        """Several demands, or a hierarchy: every bucket reserved in one atomic step, or none."""
        if not demands:
            raise ValueError("admit() needs at least one Demand")
        if action != "consume":
            raise ValueError("only consume demands combine; a metered request meters one resource")
        resource = demands[0].resource
        now = self.clock()
        try:
            plan = self._plan_nowait(project, demands, parent, now) if plans is None \
                else self._armed_plan(project, demands, plans, now)
            if plan is None:
                plan = await self._plan(project, demands, headers, parent)
                now = self.clock()
            charges, claims = plan.charges(now), plan.claims
        except SourceError as exc:
            refusal = self._source_failed(exc, project, resource, shadow)
            if not isinstance(refusal, _CountUnlimited):
                return refusal
            charges = tuple(_merged([self._unlimited(project, demand) for demand in demands]))
            claims = tuple(Claim(c.bucket, c.units, c.limit.value, c.limit.scale) for c in charges)
        try:
            decisions = await self.store.reserve_all(claims, self.lease_ms)
            if not all(map(_ADMITTED, decisions)):
                refused = _refusing(claims, decisions)
                charge, decision = charges[refused], decisions[refused]
                self.record_outcome(charge.bucket.resource, "shadow_rejected" if shadow else "rejected",
                                    charge.bucket.project)
                rejection = charge.rejection(decision, now)
                if not shadow:
                    # The answer carries every policy the request met (RateLimit fields are lists).
                    return replace(rejection, headers=combined_headers(charges, decisions, refused=True))
                self._shadow_log.refused(charge.bucket.project, charge.bucket.resource, rejection.description)
                decisions = await self.store.reserve_all([c._replace(limit=UNLIMITED) for c in claims],
                                                         self.lease_ms)
        except StoreError as exc:
            return self._store_failed(exc, project, resource, shadow)
        if self.metrics is not None:
            for charge, decision in zip(charges, decisions, strict=True):
                self.metrics.admitted(charge.bucket.resource, charge.bucket.project, decision.used, decision.limit)
        return tuple.__new__(Admitted, (charges, tuple(decisions)))

    def _plan_nowait(self, project: str, demands: tuple[Demand, ...], parent: str | None,
                     now: float) -> _Plan | None:
        """The plan of the demands when everything it needs is at hand (None: await _plan)."""
        key_parent = parent
        if parent is None and self._parents is not None:
            known = self._parents.get(project)
            if known is None or now >= known[1]:
                return None
            parent = known[0]
        quotas = self.cache.fresh(project)
        if quotas is None:
            return None
        parent_quotas = None
        if parent is not None:
            parent_quotas = self.cache.fresh(parent)
            if parent_quotas is None or parent == project:
                return None
        plan = self._plans.get((project, key_parent, demands))
        if plan is not None and now < plan.until and plan.quotas is quotas and plan.parent == parent \
                and plan.parent_quotas is parent_quotas:
            return plan
        return self._new_plan(project, demands, key_parent, parent, quotas, parent_quotas, now)

    async def _plan(self, project: str, demands: tuple[Demand, ...], headers: RawHeaders,
                    parent: str | None) -> _Plan:
        """The plan of the demands, looking up what is not at hand (the parent, the quotas)."""
        key_parent = parent
        if parent is None:
            parent = await self.parent_of(project, headers)
        if parent == project:
            raise SourceInvalid(f"project {project!r} is its own parent")
        quotas = self.cache.fresh(project) or await self.cache.get(project, headers)
        parent_quotas = None if parent is None else self.cache.fresh(parent) or await self.cache.get(parent, headers)
        return self._new_plan(project, demands, key_parent, parent, quotas, parent_quotas, self.clock())

    def _new_plan(self, project: str, demands: tuple[Demand, ...], key_parent: str | None, parent: str | None,
                  quotas: Quotas, parent_quotas: Quotas | None, now: float) -> _Plan:
        """Every bucket the demands charge: the project's, and its parent's (strict two-level: a
        parent's limit covers its own usage and its children's); a bucket named twice once."""
        charges = [self.charge(quotas, project, demand, now) for demand in demands]
        if parent is not None and parent_quotas is not None:
            # A limit written on a rule is the project's own (a rate limit): not the parent's.
            charges += [self.charge(parent_quotas, parent, d, now) for d in demands if d.limit is None]
        charges = _merged(charges)
        for charge in charges:
            charge.policy = _policy_of(charge, project)
        until = min((c.bucket.window.end for c in charges if c.bucket.window is not None), default=INF)
        plan = _Plan(quotas, parent, parent_quotas, tuple(charges),
                     tuple(Claim(c.bucket, c.units, c.limit.value, c.limit.scale) for c in charges), until)
        if len(self._plans) >= self._cache_size:  # bounded: a flood of projects starts it afresh
            self._plans.clear()
        self._plans[(project, key_parent, demands)] = plan
        return plan

    async def parent_of(self, project: str, headers: RawHeaders = []) -> str | None:  # noqa: B006
        """The project's parent: from the engine's ``parent`` function, else from the source (None:
        a project of its own). Remembered for the cache's TTL."""
        if self._parents is None:
            return None
        known = self._parents.get(project)
        if known is not None and self.clock() < known[1]:
            return known[0]
        if self._parent_fn is not None:
            found = self._parent_fn(project)
            parent = await found if inspect.isawaitable(found) else found
        else:
            parent = await self.source.parent_of(project, self.cache.forwarded(headers))
        if parent is not None and (not isinstance(parent, str) or not parent):
            raise SourceInvalid(f"the parent of project {project!r} is not a project id: {parent!r}")
        if len(self._parents) >= self._cache_size:  # bounded: every plan is checked again
            self._parents.clear()
            self._disarm_all()
        self._parents[project] = (parent, self.clock() + self._cache_ttl)
        return parent

    def _source_failed(self, exc: SourceError, project: str, resource: str,
                       shadow: bool) -> Rejection | None | _CountUnlimited:
        """The policy for a source that gave no quotas: a Rejection, None (let through uncounted),
        or COUNT_UNLIMITED (fail open: admit, still counting)."""
        if isinstance(exc, SourceRejected):
            if shadow:  # the quota service refused the caller's credential; enforcement is not on yet
                logger.info(SHADOW_PASSED, project, resource, exc, extra=_fields(project, resource, "shadow_passed"))
                return None
            return Rejection(exc.caller_status, f"Quota service refused the request: {exc}",
                             project=project, resource=resource)
        if self.on_source_error == "fail_closed" and not shadow:
            logger.warning("quota API failed for project %r: %s", project, exc,
                           extra=_fields(project, resource, "failed_closed"))
            self.record_outcome(resource, "failed_closed", project)
            return Rejection(503, SOURCE_FAILED, project=project, resource=resource,
                             retry_after=exc.retry_after or self.retry_after)
        logger.warning(FAILED_OPEN, project, resource, exc, extra=_fields(project, resource, "failed_open"))
        self.record_outcome(resource, "failed_open", project)
        return COUNT_UNLIMITED

    def _unlimited(self, project: str, demand: Demand) -> Charge:
        """Failing open: still counted (in the demand's window, if it has one), so that usage stays
        true for when the source is back."""
        now = self.clock()
        return Charge(Bucket(project, demand.resource, current_window(demand.period, now)), Limit(UNLIMITED),
                      to_store_units(demand.cost, 1), now)

    def _store_failed(self, exc: StoreError, project: str, resource: str, shadow: bool) -> Rejection | None:
        if self.on_store_error == "fail_closed" and not shadow:
            logger.warning("quota store failed for project %r: %s", project, exc,
                           extra=_fields(project, resource, "failed_closed"))
            self.record_outcome(resource, "failed_closed", project)
            return Rejection(503, STORE_FAILED, project=project, resource=resource, retry_after=self.retry_after)
        logger.warning(FAILED_OPEN, project, resource, exc, extra=_fields(project, resource, "failed_open"))
        self.record_outcome(resource, "failed_open", project)
        return None

    def charge(self, quotas: Quotas, project: str, demand: Demand, now: float | None = None) -> Charge:
        """The demand against the project's effective limit, in the window it counts in now."""
        if demand.limit is not None:
            limit = Limit(UNLIMITED if demand.limit < 0 else demand.limit)
        else:
            limit = quotas.limits.get(demand.resource)  # type: ignore[assignment]
            if limit is None:
                limit = self._unreported(demand.resource, quotas)
        if now is None:
            now = self.clock()
        period = limit.period or demand.period
        window = None if period is None else current_window(period, now)  # None: a count quota
        return Charge(Bucket(project, demand.resource, window), limit, to_store_units(demand.cost, limit.scale), now)

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

    # -- from Python --------------------------------------------------------------------------

    def reserve(self, project: str, deltas: Deltas, *, parent: str | None = None) -> Held:
        """Check and reserve ``deltas`` for ``project``: an async context manager that commits when
        its block ends and refunds when it raises; refused, it raises :class:`QuotaExceeded`.

            async with engine.reserve("p1", {"servers": 1, "ram_mb": 2048}):
                await create_server()
        """
        return Held(self, project, _demands(deltas), parent)

    async def check(self, project: str, deltas: Deltas, *, parent: str | None = None) -> Rejection | None:
        """Would ``deltas`` fit now? None if so, else the Rejection a reservation would get. Reserves
        nothing: another request may take what is left before you reserve it."""
        charges = (await self._plan(project, _demands(deltas), [], parent)).charges(self.clock())
        overrides: dict[str, dict[str, int]] = {}
        for charge in charges:
            bucket = charge.bucket
            if bucket.project not in overrides:
                overrides[bucket.project] = await self.store.overrides(bucket.project)
            limit = _applied(charge.limit, overrides[bucket.project].get(bucket.resource))
            view = await self.store.inspect(bucket)
            if limit >= 0 and view.used + charge.units > limit:
                return charge.rejection(Decision(False, view.used, limit))
        return None

    async def usage(self, project: str, *, headers: RawHeaders = [],  # noqa: B006 - never mutated
                    resources: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """Each resource's ``limit``, ``used``, ``reserved`` and ``remaining`` (quota units; -1 and
        None where unlimited) and its current ``window`` (``{"start", "end"}``, None for a count
        quota): what the source and the overrides allow, and what the store counts. ``resources``
        are shown even where nothing mentions them."""
        quotas = self.cache.fresh(project) or await self.cache.get(project, headers)
        overrides = await self.store.overrides(project)
        names = set(quotas.limits) | set(overrides) | set(resources) | {
            v.bucket.resource for v in await self.store.buckets(project) if v.bucket.window is None}
        now = self.clock()
        report: dict[str, dict[str, Any]] = {}
        for name in sorted(names):
            limit = quotas.limits.get(name) or self._default
            window = None if limit.period is None else current_window(limit.period, now)
            view = await self.store.inspect(Bucket(project, name, window))
            applied = _applied(limit, overrides.get(name))
            report[name] = {
                "limit": UNLIMITED if applied < 0 else in_quota_units(applied, limit.scale),
                "used": in_quota_units(view.used, limit.scale),
                "reserved": in_quota_units(view.reserved, limit.scale),
                "remaining": None if applied < 0 else in_quota_units(max(0, applied - view.used), limit.scale),
                "window": None if window is None else {"start": window.start, "end": window.end},
            }
        return report

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
            _settle_failed(reservation.bucket, exc)

    async def settle_all(self, admitted: Admitted, keep: bool) -> None:
        """Keep or give back every reservation of an admitted request, together (see settle)."""
        for reservation in self.settle_nowait(admitted, keep):
            await self.settle(reservation, keep)

    async def release(self, bucket: Bucket, units: int) -> None:
        """Give ``units`` back after a delete, never below zero (a store failure is logged)."""
        self.record_outcome(bucket.resource, "released", bucket.project)
        try:
            await self.store.release(bucket, units)
        except StoreError as exc:
            # The Redis store keeps sending it until it is applied (once).
            _settle_failed(bucket, exc)

    async def meter(self, bucket: Bucket, amount: int) -> None:
        """Charge what a metered request used, after the fact (a store failure is logged)."""
        try:
            await self.store.charge(bucket, amount)
        except StoreError as exc:
            _settle_failed(bucket, exc)

    async def aclose(self) -> None:
        """Apply pending settlements and close the store and the source's connections."""
        await self.store.aclose()
        await self.source.aclose()


def _settle_failed(bucket: Bucket, exc: StoreError) -> None:
    """Logged, never raised: the work is done either way, and the store (or a lease) catches up."""
    logger.warning(SETTLE_FAILED, bucket.project, exc, extra=_fields(bucket.project, bucket.resource, "settle_failed"))


def _fields(project: str | None, resource: str | None, outcome: str) -> dict[str, Any]:
    """Log record fields (``extra``) that a structured log handler can index."""
    return {"quota_project": project, "quota_resource": resource, "quota_outcome": outcome}


Deltas = Mapping[str, Number] | Sequence[Demand]


def _demands(deltas: Deltas) -> tuple[Demand, ...]:
    """``{"servers": 1, "ram_mb": 2048}`` (or Demands) as Demands, their costs checked."""
    demands = tuple(Demand(name, cost) for name, cost in deltas.items()) if isinstance(deltas, Mapping) \
        else tuple(deltas)
    if not demands:
        raise ValueError("nothing to reserve: give at least one resource")
    for demand in demands:
        if not isinstance(demand, Demand) or not isinstance(demand.resource, str) or not demand.resource:
            raise ValueError(f"not a resource and its cost: {demand!r}")
        to_store_units(demand.cost, 1)  # a ValueError for a cost that is not a number >= 0
    return demands


def _applied(limit: Limit, override: int | None) -> int:
    """The limit a decision applies, in store units: an operator's override wins (see Store.reserve)."""
    if override is None:
        return limit.value
    return UNLIMITED if override < 0 else override * limit.scale


class Held:
    """``async with engine.reserve(...)``: reserved on entry, committed or refunded on exit."""

    def __init__(self, engine: QuotaEngine, project: str, demands: tuple[Demand, ...], parent: str | None) -> None:
        self._engine = engine
        self._project = project
        self._demands = demands
        self._parent = parent
        self.admitted: Admitted | None = None

    async def __aenter__(self) -> Admitted | None:
        """What was admitted (None: let through uncounted, failing open)."""
        outcome = await self._engine.admit(self._project, *self._demands, parent=self._parent)
        if isinstance(outcome, Rejection):
            raise QuotaExceeded(outcome)
        self.admitted = outcome
        return outcome

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.admitted is not None:
            await self._engine.settle_all(self.admitted, keep=kind is None)


class ShadowLog:
    """Shadow refusals at WARNING, at most SHADOW_LOG_PER_MINUTE a minute; then one line says how
    many were left out."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._since = 0.0
        self._logged = 0
        self._left_out = 0

    def refused(self, project: str, resource: str, description: str) -> None:
        now = self._clock()
        if now - self._since >= 60.0:
            if self._left_out:
                logger.warning(SHADOW_SUPPRESSED, self._left_out, now - self._since,
                               extra=_fields(None, None, "shadow_rejected"))
            self._since, self._logged, self._left_out = now, 0, 0
        if self._logged >= SHADOW_LOG_PER_MINUTE:
            self._left_out += 1
            return
        self._logged += 1
        logger.warning(SHADOW_REJECTED, project, resource, description,
                       extra=_fields(project, resource, "shadow_rejected"))


@dataclass(slots=True, eq=False)
class _Plan:
    """The buckets one project's demands charge, worked out once and reused while the quotas it
    was made from are the cache's (the very objects), its parent the same and its windows current."""

    quotas: Quotas
    parent: str | None
    parent_quotas: Quotas | None
    #: The charge of each bucket (a bucket named twice once), made at the plan's time: served as
    #: it is for a count quota; a window's is made again with the request's time (it says when
    #: the window ends).
    made: tuple[Charge, ...]
    claims: tuple[Claim, ...]
    #: When the plan is over: its first window's end.
    until: float
    #: The windowed charges made last, and the whole second they were made in (see charges).
    second: float = math.nan  # equal to no second
    at_second: tuple[Charge, ...] = ()
    #: Until when take_nowait serves the plan without checking it again (see QuotaEngine._arm).
    armed_until: float = -INF
    #: Its one claim, what take_nowait takes: (bucket, cost, limit, scale); None: not taken.
    taking: tuple[Bucket, int, int, int] | None = None
    #: Its claims, when it has several, as take_nowait takes them; None: not taken.
    taking_all: tuple[tuple[Bucket, int, int, int], ...] | None = None
    #: Its claims as plain tuples, made the first time it is armed to be taken.
    plain: tuple[tuple[Bucket, int, int, int], ...] | None = None

    def charges(self, now: float) -> tuple[Charge, ...]:
        if self.until == INF:  # count quotas only: the same charges for every request
            return self.made
        # A window's charge carries the request's time for its header's t= (the seconds left,
        # rounded up). Windows end on a whole second (Period's always do), so t= is the same all
        # second long: the charges made at the second's first request serve the rest of it.
        second = now // 1
        if second == self.second:
            return self.at_second
        made = tuple([c if c.bucket.window is None else Charge(c.bucket, c.limit, c.units, now, c.policy)
                      for c in self.made])
        if all(c.bucket.window is None or c.bucket.window.end % 1 == 0 for c in made):
            self.second, self.at_second = second, made
        return made


#: What take_nowait admitted: the plan and what the store took, for its one claim (a Taken) or for
#: each of its claims (a list).
Hold = tuple[_Plan, Any]


class _CountUnlimited:
    """What _source_failed answers for "fail open: admit, counting against no limit"."""


COUNT_UNLIMITED = _CountUnlimited()


def _policy_of(charge: Charge, own: str, limit: int | None = None) -> tuple[bytes, bytes] | None:
    """The charge's (encoded name, RateLimit-Policy item); a parent's policy is named with its
    project: "acme/servers". None: unlimited."""
    limit = charge.limit.value if limit is None else limit
    if limit < 0:
        return None
    bucket = charge.bucket
    label = bucket.resource if bucket.project == own else f"{bucket.project}/{bucket.resource}"
    return limit_policy(label, limit, charge.limit.scale, bucket.window)


def _merged(charges: list[Charge]) -> list[Charge]:
    """One charge per bucket: a bucket two demands name is charged their sum, and decided once."""
    by_bucket: dict[Bucket, Charge] = {}
    for charge in charges:
        seen = by_bucket.get(charge.bucket)
        by_bucket[charge.bucket] = charge if seen is None else Charge(seen.bucket, seen.limit,
                                                                      seen.units + charge.units, seen.now)
    return list(by_bucket.values())


def _refusing(claims: Sequence[Claim], decisions: Sequence[Decision]) -> int:
    """Which claim's limit refused an all-or-nothing decision (the first, if several did)."""
    for i, (claim, decision) in enumerate(zip(claims, decisions, strict=True)):
        if decision.limit >= 0 and decision.used + claim.cost > decision.limit:
            return i
    return 0


def combined_headers(charges: Sequence[Charge], decisions: Sequence[Decision], *, refused: bool = False) -> RawHeaders:
    """One ``RateLimit-Policy`` and one ``RateLimit`` field listing every limited policy."""
    return _policies(charges, decisions, 1, refused)


def _policies(charges: Sequence[Charge], rows: Sequence[Any], used_at: int, refused: bool) -> RawHeaders:
    """combined_headers of Decisions (``used_at`` 1: admitted, used, limit, ...) or of what
    take_nowait took (``used_at`` 0: used, limit, ...; every one admitted). A refused request's
    usage is without it where it was admitted."""
    policies: list[bytes] = []
    states: list[bytes] = []
    own = charges[0].bucket.project
    for charge, row in zip(charges, rows, strict=True):
        used, limit = row[used_at], row[used_at + 1]
        if limit < 0:
            continue  # unlimited: no policy to state
        if refused and (used_at == 0 or row[0]):
            used -= charge.units
        policy, state = charge.items(limit, used, own)
        policies.append(policy)
        states.append(state)
    if not policies:
        return []
    return [(b"ratelimit-policy", b", ".join(policies)), (b"ratelimit", b", ".join(states))]
