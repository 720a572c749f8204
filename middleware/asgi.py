"""QuotaMiddleware: the one path a guarded request takes.

    match a rule  ->  identify the project  ->  effective limit (cache, then upstream)
    ->  one atomic decision in the store  ->  run the app  ->  settle on the way out

Settling depends on the rule's action: ``consume`` commits its reservation on a 2xx answer and
refunds it on anything else (another status, an exception, a client gone first); ``release``
gives quota back after a 2xx delete; ``meter`` charges the bytes the response sent.
Requests no rule matches, and non-HTTP scopes, go straight to the app.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, Protocol

from . import options
from .cache import QuotaCache
from .errors import ConfigurationError, IdentityError, SourceError, SourceRejected, StoreError
from .identity import Identity, IdentityFn
from .nowait import nowait_usable
from .quotas import UNLIMITED, Limit, Quotas
from .rendering import Rejection, Renderer, barbican_error, format_amount, ratelimit_headers
from .rules import RELEASE_CONFIRMED, Rule, RuleTable, route_path
from .sources.base import QuotaSource
from .stores.base import Bucket, Decision, Reservation, Store
from .stores.leasing import LeasingStore
from .stores.memory import MemoryStore
from .windows import current_window

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Policy = Literal["fail_closed", "fail_open"]


class QuotaMetricsLike(Protocol):
    """What the middleware reports to (middleware.metrics.QuotaMetrics implements it)."""

    def decision(self, resource: str, outcome: str, project: str) -> None: ...
    def admitted(self, resource: str, project: str, used: int, limit: int) -> None: ...
    def fetch(self, source: str, status: str, seconds: float) -> None: ...
    def cache(self, result: str) -> None: ...
    def store(self, operation: str, seconds: float, failed: bool = False) -> None: ...

_METRICS_METHODS = ("decision", "admitted", "fetch", "cache", "store")

logger = logging.getLogger("middleware")

OVER_QUOTA = "Quota exceeded for project {project}: {resource} allows {limit}{per}, {used} already in use."
DISABLED = "Quota exceeded for project {project}: {resource} is disabled (quota 0)."
SOURCE_FAILED = "Quota service unavailable: the effective quotas could not be read. Try again later."
STORE_FAILED = "Quota store unavailable: usage could not be checked. Try again later."
FAILED_OPEN = "admitting %s %s for project %r without a quota check (fail_open): %s"
SHADOW_REJECTED = "shadow mode: would have refused project %r %s: %s"
SHADOW_PASSED = "shadow mode: letting %s %s through: %s"
SETTLE_FAILED = "could not settle usage of project %r: %s"
UNREPORTED = ("quota source %r reports no limit for resource %r (it reported: %s); the default limit applies "
              "(%s). Check the rule's resource name, or the resources the source reads (resources=...).")
#: Resource names are bounded by the rules, but a computed one (from a path parameter) is not.
MAX_WARNED = 1024


def _check_policy(name: str, value: str) -> Policy:
    if value not in ("fail_closed", "fail_open"):
        raise ConfigurationError(f"{name} must be 'fail_closed' or 'fail_open', got {value!r}")
    return value  # type: ignore[return-value]


# Built on every guarded request, and never changed: a plain slotted class costs about 60% of a
# named tuple to make (Admitted, which callers of admit() may unpack, stays one).
@dataclass(slots=True, eq=False)
class _Check:
    """What one guarded request is checked against."""

    bucket: Bucket
    limit: Limit
    units: int
    now: float

    def headers(self, decision: Decision, used: int | None = None) -> list[tuple[bytes, bytes]]:
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
            per = "" if window is None else f" per window ending {_iso(window.end)}"
            unit = f" {limit.unit}" if limit.unit else ""
            description = OVER_QUOTA.format(project=bucket.project, resource=bucket.resource, per=per,
                                             limit=format_amount(limit.value, limit.scale) + unit,
                                             used=format_amount(used, limit.scale) + unit)
        # A count quota is Barbican's 403; a windowed one frees up at the window's end: 429.
        return Rejection(403 if window is None else 429, description, project=bucket.project,
                         resource=bucket.resource, limit=_in_quota_units(limit.value, limit.scale),
                         used=_in_quota_units(used, limit.scale),
                         retry_after=None if window is None else window.end - self.now, headers=self.headers(decision))


class Admitted(NamedTuple):
    """A request the store admitted: what it was checked against, and the decision."""

    check: _Check
    decision: Decision


def _no_answer(*args: Any) -> None:
    return None  # the store's own reserve() must decide (see middleware/nowait.py)


def _not_settled(*args: Any) -> bool:
    return False  # the store's own commit() / refund() must settle


def _in_quota_units(units: int, scale: int) -> float:
    return units // scale if units % scale == 0 else units / scale


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class QuotaMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Iterable[Rule],
        source: QuotaSource,
        store: Store | None = None,
        identity: IdentityFn | None = None,
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
        renderer: Renderer = barbican_error,
        key_prefix: str = "quota:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(source, QuotaSource):
            raise ConfigurationError(f"source must be a QuotaSource (BarbicanSource, StaticSource, ...), got {source!r}")
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError(f"store must be a Store (MemoryStore, RedisStore, ...) or None, got {store!r}")
        options.function("app", app, "an ASGI app")
        default_limit = options.integer("default_limit", default_limit)
        for name, value in (("cache_ttl", cache_ttl), ("lease_seconds", lease_seconds), ("retry_after", retry_after)):
            options.number(name, value, positive=True)
        options.number("stale_ttl", stale_ttl, minimum=0)
        options.number("cache_jitter", cache_jitter, minimum=0, maximum=1)
        options.integer("cache_size", cache_size, minimum=1)
        options.flag("local_leases", local_leases)
        options.flag("shadow", shadow)
        options.function("renderer", renderer, "a callable taking a Rejection (barbican_error, problem_json)")
        options.function("clock", clock, "a callable returning epoch seconds")
        options.text("key_prefix", key_prefix)
        if metrics is not None and not all(callable(getattr(metrics, name, None)) for name in _METRICS_METHODS):
            raise ConfigurationError(f"metrics must be a QuotaMetrics (or have {', '.join(_METRICS_METHODS)}), "
                                     f"got {metrics!r}")
        self.app = app
        self.rules = RuleTable(rules)
        self.source = source
        store = store if store is not None else MemoryStore(clock=clock)
        # Local leases only pay where a round trip is saved: around a shared store.
        self.store = LeasingStore(store) if local_leases and store.shares_cache else store
        self._reserve_nowait = self.store.reserve_nowait if nowait_usable(self.store, "reserve_nowait", "reserve") \
            else _no_answer
        self._settle_nowait = self.store.settle_nowait \
            if nowait_usable(self.store, "settle_nowait", "commit", "refund") else _not_settled
        self.identity = Identity(identity)
        self.default_limit = UNLIMITED if default_limit < 0 else default_limit
        self._default = Limit(self.default_limit)
        #: Resources the source did not report, already warned about (see _unreported).
        self._warned: set[str] = set()
        self.cache = QuotaCache(source, self.store, ttl=cache_ttl, jitter=cache_jitter, stale=stale_ttl,
                                maxsize=cache_size, prefix=key_prefix, clock=clock, metrics=metrics)
        self.lease_ms = int(lease_seconds * 1000)
        self.on_source_error = _check_policy("on_source_error", on_source_error)
        self.on_store_error = _check_policy("on_store_error", on_store_error)
        self.retry_after = retry_after
        self.renderer = renderer
        self.clock = clock
        #: Decide and count as in enforcement, but never refuse (per rule: Rule(..., shadow=True)).
        self.shadow = shadow
        self.metrics = metrics
        data_lost = getattr(metrics, "data_lost", None)
        if callable(data_lost):
            self.store.on_data_loss(data_lost)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_on_shutdown(send))
            else:
                await self.app(scope, receive, send)
            return
        rule = self.rules.match(scope["method"], route_path(scope))
        if rule is None:
            await self.app(scope, receive, send)
            return
        try:
            project = self.identity(scope)
            resource = rule.resource_for(scope)
            units = rule.units(scope, 1) if rule.action == "release" else 0
        except IdentityError as exc:
            if self.shadow or rule.shadow:  # nothing to count without a project; let it through
                logger.info(SHADOW_PASSED, scope["method"], scope["path"], exc)
                await self.app(scope, receive, send)
            else:
                await self._reject(send, Rejection(exc.status_code, str(exc)))
            return
        if rule.action == "release":
            await self._release(scope, receive, send, Bucket(project, resource), units, rule.confirm)
            return
        outcome = await self.admit(scope, rule, project, resource)
        if outcome is None:
            await self.app(scope, receive, send)
        elif isinstance(outcome, Rejection):
            await self._reject(send, outcome)
        elif rule.action == "meter":
            await self._run_metered(scope, receive, send, outcome.check, outcome.decision)
        else:
            await self._run_reserved(scope, receive, send, outcome.check, outcome.decision)

    async def admit(self, scope: Scope, rule: Rule, project: str, resource: str) -> Admitted | Rejection | None:
        """Decide one request of ``project`` against ``rule`` before the app runs.

        Returns what was admitted (holding a reservation, for ``consume`` rules), the Rejection to
        answer with, or None: let the request through uncounted (shadow mode where nothing can be
        counted, or ``fail_open`` while the store fails). The failure policies, shadow mode and
        metrics apply here, for the middleware and the FastAPI dependency alike.
        """
        shadow = self.shadow or rule.shadow
        try:
            quotas = self.cache.fresh(project)  # a warm project: no coroutine
            if quotas is None:
                quotas = await self.cache.get(project, scope["headers"])
            check = self._check_for(quotas, scope, rule, project, resource)
        except IdentityError as exc:  # a cost the request made impossible to compute
            if shadow:
                logger.info(SHADOW_PASSED, scope["method"], scope["path"], exc)
                return None
            return Rejection(exc.status_code, str(exc))
        except SourceRejected as exc:
            if shadow:  # the quota service refused the caller's credential; enforcement is not on yet
                logger.info(SHADOW_PASSED, scope["method"], scope["path"], exc)
                return None
            return Rejection(exc.caller_status, f"Quota service refused the request: {exc}",
                             project=project, resource=resource)
        except SourceError as exc:
            if self.on_source_error == "fail_closed" and not shadow:
                logger.warning("quota API failed for project %r: %s", project, exc)
                self.record_outcome(resource, "failed_closed", project)
                return Rejection(503, SOURCE_FAILED, project=project, resource=resource,
                                 retry_after=exc.retry_after or self.retry_after)
            logger.warning(FAILED_OPEN, scope["method"], scope["path"], project, exc)
            self.record_outcome(resource, "failed_open", project)
            # Still counted (in the rule's window, if it has one), so that usage stays true for when
            # the source is back.
            now = self.clock()
            try:
                check = _Check(Bucket(project, resource, current_window(rule.period, now)), Limit(UNLIMITED),
                               rule.units(scope, 1), now)
            except IdentityError as bad_cost:
                return Rejection(bad_cost.status_code, str(bad_cost))

        try:
            # Even a disabled resource (limit 0) asks the store: an operator's override may lift it.
            # A Decision is a non-empty tuple: `or` awaits the store only when it cannot answer in process.
            decision = self._decide_nowait(rule, check) or await self._decide(rule, check, check.limit.value)
            if not decision.admitted:
                self.record_outcome(resource, "shadow_rejected" if shadow else "rejected", project)
                if not shadow:
                    return check.rejection(decision)
                # Shadow mode: what enforcement would refuse is recorded, admitted, and counted,
                # so that usage stays true for the day enforcement starts.
                logger.info(SHADOW_REJECTED, project, resource, check.rejection(decision).description)
                decision = await self._decide(rule, check, UNLIMITED)
        except StoreError as exc:
            if self.on_store_error == "fail_closed" and not shadow:
                logger.warning("quota store failed for project %r: %s", project, exc)
                self.record_outcome(resource, "failed_closed", project)
                return Rejection(503, STORE_FAILED, project=project, resource=resource, retry_after=self.retry_after)
            logger.warning(FAILED_OPEN, scope["method"], scope["path"], project, exc)
            self.record_outcome(resource, "failed_open", project)
            return None
        if self.metrics is not None:
            self.metrics.admitted(resource, project, decision.used, decision.limit)
        return Admitted(check, decision)

    def _decide_nowait(self, rule: Rule, check: _Check) -> Decision | None:
        """The decision when the store has it in process (an open local lease, the memory store)."""
        if rule.action == "meter":
            return None
        started = time.perf_counter() if self.metrics is not None else 0.0
        decision = self._reserve_nowait(check.bucket, check.units, check.limit.value, self.lease_ms,
                                        check.limit.scale)
        if decision is not None and self.metrics is not None:
            self.metrics.store(rule.action, time.perf_counter() - started)
        return decision

    def _decide(self, rule: Rule, check: _Check, limit: int) -> Awaitable[Decision]:
        """One atomic decision in the store (timed, when metrics are on)."""
        if rule.action == "meter":
            decision = self.store.check(check.bucket, limit, check.limit.scale)
        else:
            decision = self.store.reserve(check.bucket, check.units, limit, self.lease_ms, check.limit.scale)
        # Without metrics the caller awaits the store's own coroutine: no frame of ours in between.
        return decision if self.metrics is None else self._timed(rule.action, decision)

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

    def _check_for(self, quotas: Quotas, scope: Scope, rule: Rule, project: str, resource: str) -> _Check:
        limit = quotas.limits.get(resource)
        if limit is None:
            limit = self._unreported(resource, quotas)
        now = self.clock()
        period = limit.window or rule.period
        window = None if period is None else current_window(period, now)  # None: a count quota
        return _Check(Bucket(project, resource, window), limit, rule.units(scope, limit.scale), now)

    def _unreported(self, resource: str, quotas: Quotas) -> Limit:
        """The default limit, for a resource the source did not report; said once per resource.

        Most often a typo in a rule, or a source told to read other resources (``resources=``):
        silently unlimited is the worst way to find out.
        """
        if resource not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add(resource)
            logger.warning(UNREPORTED, self.source.namespace, resource, ", ".join(sorted(quotas.limits)) or "none",
                           "unlimited" if self.default_limit < 0 else self.default_limit)
        return self._default

    async def _run_reserved(self, scope: Scope, receive: Receive, send: Send, check: _Check,
                            decision: Decision) -> None:
        """Run the app holding a reservation; keep it only for a 2xx the client was sent."""
        status = 0
        client_gone = False

        async def receive_watching() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and status == 0:
                client_gone = True
            return message

        def send_with_headers(message: Message) -> Awaitable[None]:
            # Not a coroutine of its own: the app awaits the server's send directly.
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if decision.limit >= 0:  # an unlimited resource adds no headers
                    # A failed creation is refunded, so its headers show the usage without it.
                    used = decision.used if 200 <= status < 300 else decision.used - check.units
                    message = {**message, "headers": [*message.get("headers", ()), *check.headers(decision, used)]}
            return send(message)

        keep = False
        try:
            await self.app(scope, receive_watching, send_with_headers)
            keep = 200 <= status < 300 and not client_gone
        finally:
            if decision.reservation is not None:  # admitted decisions always carry one
                await self.settle(decision.reservation, keep)

    async def settle(self, reservation: Reservation, keep: bool) -> None:
        """Keep (commit) or give back (refund) an admitted request's reservation, for the middleware
        and the FastAPI dependency alike; a store failure is logged, never raised (the response is
        already on its way, and an unsettled lease expires by itself)."""
        if not keep:
            self.record_outcome(reservation.bucket.resource, "refunded", reservation.bucket.project)
        try:
            if not self._settle_nowait(reservation, keep):
                await (self.store.commit(reservation) if keep else self.store.refund(reservation))
        except StoreError as exc:
            logger.warning(SETTLE_FAILED, reservation.bucket.project, exc)

    async def _run_metered(self, scope: Scope, receive: Receive, send: Send, check: _Check,
                           decision: Decision) -> None:
        """Run the app counting the body bytes it sends (streamed, never buffered); charge them after."""
        sent = 0

        async def send_counting(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                headers = check.headers(decision)
                if headers:
                    message = {**message, "headers": [*message.get("headers", ()), *headers]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            if sent:
                try:
                    # A metered resource counts bytes: its store unit is one byte.
                    await self.store.charge(check.bucket, sent)
                except StoreError as exc:
                    logger.warning(SETTLE_FAILED, check.bucket.project, exc)

    async def _release(self, scope: Scope, receive: Receive, send: Send, bucket: Bucket, units: int,
                       confirm: bool) -> None:
        status = 0
        state: MutableMapping[str, Any] | None = None
        if confirm:
            # Made here, so that the app's state is this very dict even if something copies the scope;
            # a mark already there (from an outer layer) is not the app's.
            state = scope.setdefault("state", {})
            state.pop(RELEASE_CONFIRMED, None)

        async def send_watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_watching)
        if 200 <= status < 300 and (state is None or state.get(RELEASE_CONFIRMED) is True):
            self.record_outcome(bucket.resource, "released", bucket.project)
            try:
                await self.store.release(bucket, units)
            except StoreError as exc:
                # The Redis store keeps sending it until it is applied (once).
                logger.warning(SETTLE_FAILED, bucket.project, exc)

    async def _reject(self, send: Send, rejection: Rejection) -> None:
        rendered = self.renderer(rejection)
        await send({"type": "http.response.start", "status": rendered.status, "headers": rendered.headers})
        await send({"type": "http.response.body", "body": rendered.body})

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def send_closing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.aclose()
            await send(message)

        return send_closing

    async def aclose(self) -> None:
        """Apply pending settlements and close the store and the source's connections."""
        await self.store.aclose()
        await self.source.aclose()

