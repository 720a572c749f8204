"""QuotaMiddleware: the one path a guarded request takes, as an ASGI middleware.

    match a rule  ->  identify the project  ->  the engine decides (cached limit, one atomic
    step in the store)  ->  run the app  ->  settle on the way out

Settling depends on the rule's action: ``consume`` commits its reservation on a 2xx answer and
refunds it on anything else (another status, an exception, a client gone first); ``release``
gives quota back after a 2xx delete; ``meter`` charges the bytes the response sent.
Requests no rule matches, and non-HTTP scopes, go straight to the app. The decision itself is
the engine's (middleware/engine.py): this module only speaks ASGI.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from . import options
from .cache import QuotaCache
from .engine import Admitted, Charge, Demand, QuotaEngine
from .errors import ConfigurationError, RequestError, StoreError
from .identity import Identity, IdentityFn
from .quotas import to_store_units
from .rendering import Rejection, Renderer, barbican_error
from .rules import RELEASE_CONFIRMED, Rule, RuleTable
from .sources.base import QuotaSource
from .stores.base import Bucket, Decision, Reservation, Store
from .types import ASGIApp, Message, RawHeaders, Receive, Scope, Send

__all__ = ["Admitted", "QuotaMiddleware"]

logger = logging.getLogger("quota_middleware")

SHADOW_PASSED = "shadow mode: letting %s %s through: %s"


class _Watch:
    """The app's receive and send while it holds reservations: they note the status and a client
    gone first, and add the RateLimit headers. An object, not closures in ``__call__``: a closure's
    variables would be made on every call of it, guarded or not."""

    __slots__ = ("_receive", "_send", "held", "render", "status", "client_gone")

    def __init__(self, receive: Receive, send: Send, held: Any,
                 render: Callable[[Any, bool], RawHeaders | None] | None) -> None:
        self._receive = receive
        self._send = send
        self.held = held
        #: The RateLimit headers of what is held, kept or not (None: none, an unlimited resource).
        self.render = render
        self.status = 0
        self.client_gone = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and self.status == 0:
            self.client_gone = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine of its own: the app awaits the server's send directly.
        if message["type"] == "http.response.start":
            self.status = status = message["status"]
            render = self.render
            if render is not None:
                # A failed creation is refunded, so its headers show the usage without it.
                headers = render(self.held, 200 <= status < 300)
                if headers:
                    message = {**message, "headers": [*message.get("headers", ()), *headers]}
        return self._send(message)


class QuotaMiddleware:
    """Guards the routes ``rules`` name. Either pass ``source`` and the engine's options
    (``store``, ``default_limit``, ``cache_ttl``, ``local_leases``, ``on_source_error``, ... see
    :class:`QuotaEngine`), or an ``engine`` shared with other adapters."""

    def __init__(self, app: ASGIApp, *, rules: Iterable[Rule], source: QuotaSource | None = None,
                 engine: QuotaEngine | None = None, identity: IdentityFn | None = None,
                 renderer: Renderer = barbican_error, **engine_options: Any) -> None:
        options.function("app", app, "an ASGI app")
        options.function("renderer", renderer, "a callable taking a Rejection (barbican_error, problem_json)")
        if engine is None:
            if source is None:
                raise ConfigurationError("QuotaMiddleware needs a source (or an engine)")
            engine = QuotaEngine(source=source, **engine_options)
        elif source is not None or engine_options:
            raise ConfigurationError("pass either an engine, or a source and the engine's options; not both")
        elif not isinstance(engine, QuotaEngine):
            raise ConfigurationError(f"engine must be a QuotaEngine, got {engine!r}")
        self.app = app
        self.engine = engine
        self.rules = RuleTable(rules)
        self.identity = Identity(identity)
        self.renderer = renderer
        #: Guards whose demands are fixed (a rule's) -> where the engine keeps their plans, armed.
        self._fast_plans = {guard: engine.fast_plans(guard.demands) for guard in self.rules.guards()
                            if guard.demands is not None and guard.action == "consume"}

    @property
    def identity(self) -> Identity:
        return self._identity

    @identity.setter
    def identity(self, identity: Identity) -> None:
        self._identity = identity
        # Called through a bound method: calling an instance goes through its class's __call__
        # slot, which packs the arguments in a tuple on every call.
        self._project_of = identity.__call__

    # The engine's parts, as the middleware's users have always reached them.
    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def cache(self) -> QuotaCache:
        return self.engine.cache

    @property
    def source(self) -> QuotaSource:
        return self.engine.source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_on_shutdown(send))
            else:
                await self.app(scope, receive, send)
            return
        guard = self.rules.guard(scope)
        if guard is None:
            await self.app(scope, receive, send)
            return
        shadow = guard.shadow
        try:
            project = self._project_of(scope)
            demands = guard.demands or guard.demands_for(scope)  # a rule's own, or computed
        except RequestError as exc:
            if self.engine.shadow or shadow:  # nothing to count without a project; let it through
                logger.info(SHADOW_PASSED, scope["method"], scope["path"], exc)
                await self.app(scope, receive, send)
            else:
                await self._reject(send, Rejection(exc.status_code, str(exc)))
            return
        if guard.action == "release":
            await self._release(scope, receive, send, project, demands, guard.confirm)
            return
        if guard.action == "meter":
            await self._meter(scope, receive, send, project, demands[0], shadow)
            return
        # consume: written out here, not in a coroutine of its own, because every await of the app
        # (and of the server below it) passes through each of our frames.
        engine = self.engine
        # A warm project on a store that decides in process is admitted without a coroutine: in
        # plain values for a rule's own demands (take_nowait), else as an Admitted.
        plans = self._fast_plans.get(guard)  # None: demands computed per request
        taken = None if plans is None else engine.take_nowait(project, demands, plans)
        if taken is None and plans is not None and engine.takes_later:
            # A store that must be awaited (Redis): its own awaitable, in plain values too.
            later = engine.take_later(project, demands, plans)
            if later is not None:
                try:
                    took = await later[1]
                except StoreError as exc:
                    failed = engine.take_failed(exc, project, demands, shadow)
                    if failed is None:  # failing open: uncounted
                        await self.app(scope, receive, send)
                    else:
                        await self._reject(send, failed)
                    return
                if took is not None:  # refused: admit() decides it again, and answers the refusal
                    taken = (later[0], took)
        if taken is not None:
            # An unlimited resource adds no headers: no work for it.
            took = taken[1]
            watch = _Watch(receive, send, taken, None if type(took) is tuple and took[1] < 0
                           else QuotaEngine.taken_headers)
            settle: Callable[[Any, bool], Iterable[Reservation]] = engine.settle_taken
        else:
            # Not again where take_nowait just asked the store (a refusal): admit() decides it.
            held = engine.admit_nowait(project, demands, plans) if (plans is None or not engine.takes_in_process) \
                and engine.decides_in_process and not shadow and not engine.shadow else None
            if held is None:
                outcome = await engine.admit(project, *demands, headers=scope["headers"], shadow=shadow, plans=plans)
                if outcome is None:  # failing open: uncounted
                    await self.app(scope, receive, send)
                    return
                if isinstance(outcome, Rejection):
                    await self._reject(send, outcome)
                    return
                held = outcome
            # An unlimited resource adds no headers: no work for it.
            watch = _Watch(receive, send, held, None if held.decisions[0].limit < 0 and len(held.decisions) == 1
                           else Admitted.headers)
            settle = engine.settle_nowait
        # Run the app holding the reservations; keep them only for a 2xx the client was sent.
        keep = False
        try:
            await self.app(scope, watch.receive, watch.send)
            keep = 200 <= watch.status < 300 and not watch.client_gone
        finally:
            for reservation in settle(watch.held, keep):
                await engine.settle(reservation, keep)

    async def _meter(self, scope: Scope, receive: Receive, send: Send, project: str, demand: Demand,
                     shadow: bool) -> None:
        """The response's bytes go to one bucket: the first rule's."""
        outcome = await self.engine.admit(project, demand, headers=scope["headers"], action="meter", shadow=shadow)
        if outcome is None:
            await self.app(scope, receive, send)
        elif isinstance(outcome, Rejection):
            await self._reject(send, outcome)
        else:
            await self._run_metered(scope, receive, send, outcome.charge, outcome.decision)

    async def _run_metered(self, scope: Scope, receive: Receive, send: Send, charge: Charge,
                           decision: Decision) -> None:
        """Run the app counting the body bytes it sends (streamed, never buffered); charge them after."""
        sent = 0

        async def send_counting(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                headers = charge.headers(decision)
                if headers:
                    message = {**message, "headers": [*message.get("headers", ()), *headers]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            if sent:  # a metered resource counts bytes: its store unit is one byte
                await self.engine.meter(charge.bucket, sent)

    async def _release(self, scope: Scope, receive: Receive, send: Send, project: str,
                       demands: tuple[Demand, ...], confirm: bool) -> None:
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
            for demand in demands:  # a release counts in store units, one per quota unit
                await self.engine.release(Bucket(project, demand.resource), to_store_units(demand.cost, 1))

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
        await self.engine.aclose()

