"""QuotaMiddleware: the one path a guarded request takes.

    match a rule  ->  identify the project  ->  effective limit (cache, then upstream)
    ->  one atomic check-and-reserve in the store  ->  run the app  ->  settle on the way out
        (commit on 2xx; refund on any other status, an exception or a client gone first)

Requests no rule matches, and non-HTTP scopes, go straight to the app.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Literal

from .cache import QuotaCache
from .errors import ConfigurationError, IdentityError, SourceError, SourceRejected, StoreError
from .identity import Identity, IdentityFn
from .quotas import UNLIMITED
from .rendering import Rejection, Renderer, barbican_error, ratelimit_headers
from .rules import Rule, RuleTable
from .sources.base import QuotaSource
from .stores.base import Bucket, Decision, Store
from .stores.memory import MemoryStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Policy = Literal["fail_closed", "fail_open"]

logger = logging.getLogger("middleware")

OVER_QUOTA = "Quota exceeded for project {project}: {resource} allows {limit}, {used} already in use."
DISABLED = "Quota exceeded for project {project}: {resource} is disabled (quota 0)."
SOURCE_FAILED = "Quota service unavailable: the effective quotas could not be read. Try again later."
STORE_FAILED = "Quota store unavailable: usage could not be checked. Try again later."
FAILED_OPEN = "admitting %s %s for project %r without a quota check (fail_open): %s"
SETTLE_FAILED = "could not settle a reservation of project %r: %s"


def _check_policy(name: str, value: str) -> Policy:
    if value not in ("fail_closed", "fail_open"):
        raise ConfigurationError(f"{name} must be 'fail_closed' or 'fail_open', got {value!r}")
    return value  # type: ignore[return-value]


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
        on_source_error: Policy = "fail_closed",
        on_store_error: Policy = "fail_closed",
        retry_after: float = 5.0,
        renderer: Renderer = barbican_error,
        key_prefix: str = "quota:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(source, QuotaSource):
            raise ConfigurationError(f"source must be a QuotaSource (BarbicanSource, StaticSource, ...), got {source!r}")
        if lease_seconds <= 0 or cache_ttl <= 0 or stale_ttl < 0:
            raise ConfigurationError("lease_seconds and cache_ttl must be positive, stale_ttl not negative")
        self.app = app
        self.rules = RuleTable(rules)
        self.source = source
        self.store = store if store is not None else MemoryStore(clock=clock)
        self.identity = Identity(identity)
        self.default_limit = UNLIMITED if default_limit < 0 else default_limit
        self.cache = QuotaCache(source, self.store, ttl=cache_ttl, jitter=cache_jitter, stale=stale_ttl,
                                maxsize=cache_size, prefix=key_prefix, clock=clock)
        self.lease_ms = int(lease_seconds * 1000)
        self.on_source_error = _check_policy("on_source_error", on_source_error)
        self.on_store_error = _check_policy("on_store_error", on_store_error)
        self.retry_after = retry_after
        self.renderer = renderer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_on_shutdown(send))
            else:
                await self.app(scope, receive, send)
            return
        rule = self.rules.match(scope["method"], scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
            return
        try:
            project = self.identity(scope)
        except IdentityError as exc:
            await self._reject(scope, receive, send, Rejection(exc.status_code, str(exc)))
            return
        bucket = Bucket(project, rule.resource)
        if rule.action == "release":
            await self._release(scope, receive, send, bucket, rule.cost)
            return

        try:
            limit = (await self.cache.get(project, scope["headers"])).limit(rule.resource, self.default_limit)
        except SourceRejected as exc:
            status = exc.status_code if exc.status_code in (401, 403) else 403
            await self._reject(scope, receive, send, Rejection(status, f"Quota service refused the request: {exc}",
                                                                 project=project, resource=rule.resource))
            return
        except SourceError as exc:
            if self.on_source_error == "fail_closed":
                logger.warning("quota API failed for project %r: %s", project, exc)
                await self._reject(scope, receive, send, Rejection(
                    503, SOURCE_FAILED, project=project, resource=rule.resource,
                    retry_after=exc.retry_after or self.retry_after))
                return
            logger.warning(FAILED_OPEN, scope["method"], scope["path"], project, exc)
            limit = UNLIMITED  # still counted, so usage stays true for when the source returns

        if limit == 0:
            await self._reject(scope, receive, send, Rejection(
                403, DISABLED.format(project=project, resource=rule.resource), project=project,
                resource=rule.resource, limit=0, used=0, headers=ratelimit_headers(rule.resource, 0, 0)))
            return
        try:
            decision = await self.store.reserve(bucket, rule.cost, limit, self.lease_ms)
        except StoreError as exc:
            if self.on_store_error == "fail_closed":
                logger.warning("quota store failed for project %r: %s", project, exc)
                await self._reject(scope, receive, send, Rejection(
                    503, STORE_FAILED, project=project, resource=rule.resource, retry_after=self.retry_after))
                return
            logger.warning(FAILED_OPEN, scope["method"], scope["path"], project, exc)
            await self.app(scope, receive, send)
            return
        if not decision.admitted:
            await self._reject(scope, receive, send, Rejection(
                403, OVER_QUOTA.format(project=project, resource=rule.resource, limit=limit, used=decision.used),
                project=project, resource=rule.resource, limit=limit, used=decision.used,
                headers=ratelimit_headers(rule.resource, limit, decision.used)))
            return
        await self._run_reserved(scope, receive, send, decision, rule.resource)

    async def _run_reserved(self, scope: Scope, receive: Receive, send: Send, decision: Decision,
                            resource: str) -> None:
        """Run the app holding a reservation; keep it only for a 2xx the client was sent."""
        status = 0
        client_gone = False
        cost = decision.reservation.cost if decision.reservation else 0

        async def receive_watching() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and status == 0:
                client_gone = True
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # A failed creation is refunded, so its headers show the usage without it.
                used = decision.used if 200 <= status < 300 else decision.used - cost
                headers = ratelimit_headers(resource, decision.limit, used)
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
            await send(message)

        keep = False
        try:
            await self.app(scope, receive_watching, send_with_headers)
            keep = 200 <= status < 300 and not client_gone
        finally:
            reservation = decision.reservation
            if reservation is not None:  # admitted decisions always carry one
                try:
                    await (self.store.commit(reservation) if keep else self.store.refund(reservation))
                except StoreError as exc:
                    logger.warning(SETTLE_FAILED, reservation.bucket.project, exc)

    async def _release(self, scope: Scope, receive: Receive, send: Send, bucket: Bucket, cost: int) -> None:
        status = 0

        async def send_watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_watching)
        if 200 <= status < 300:
            try:
                await self.store.release(bucket, cost)
            except StoreError as exc:
                logger.warning("could not release %s of project %r: %s", bucket.resource, bucket.project, exc)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, rejection: Rejection) -> None:
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
