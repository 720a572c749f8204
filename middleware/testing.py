"""Quotas for your own test suite: an engine on an in-memory store, with the limits you set.

    from middleware.testing import QuotaFixture

    quota = QuotaFixture({"secrets": 5})          # every project's limits
    quota.set_quota("p1", "secrets", 1)           # one project's own limit
    app = QuotaMiddleware(inner_app, rules=rules, engine=quota.engine)
    ... drive the app ...
    assert quota.usage("p1", "secrets") == 1

Like oslo.limit's ``LimitFixture``, it stands in for the quota service: limits for every project
(``defaults``, Keystone's registered limits) and per project (``set_quota``, its project limits),
changed at any time and read on the next request (nothing is cached). Usage lives in a
:class:`~middleware.MemoryStore` that the fixture reads synchronously, so the same calls work in a
plain test, an ``async`` test, and around Starlette's ``TestClient``. No server, no network.

An app that builds its own middleware takes the fixture's parts (``create_app(quota.source,
quota.store)``); one that was built already (a module-level ``app``) can be pointed at the fixture
for the length of a test with ``with quota.installed(middleware): ...``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from .asgi import QuotaMiddleware
from .engine import QuotaEngine
from .errors import ConfigurationError
from .quotas import Limit, Quotas, in_quota_units, parse_limit, to_store_units
from .rules import Rule
from .sources.base import QuotaSource
from .stores.base import Bucket
from .stores.memory import MemoryStore
from .types import ASGIApp
from .windows import Period, current_window

__all__ = ["FixtureSource", "QuotaFixture"]

T = TypeVar("T")
LimitLike = int | Limit


class FixtureSource(QuotaSource):
    """A quota source whose answers a test changes: defaults for every project, and per project."""

    namespace = "fixture"
    cacheable = False  # read on every decision: a change applies to the next request

    def __init__(self, defaults: Mapping[str, LimitLike] | None = None, *,
                 projects: Mapping[str, Mapping[str, LimitLike]] | None = None) -> None:
        self.defaults: dict[str, Limit] = {k: _limit(v, k) for k, v in (defaults or {}).items()}
        self.projects: dict[str, dict[str, Limit]] = {
            project: {k: _limit(v, k) for k, v in own.items()} for project, own in (projects or {}).items()}

    def limit(self, project: str, resource: str) -> Limit | None:
        """What the source reports for one resource of ``project``; None: nothing (the default limit applies)."""
        own = self.projects.get(project, {})
        return own[resource] if resource in own else self.defaults.get(resource)

    def fetch_nowait(self, project: str) -> Quotas:
        return Quotas({**self.defaults, **self.projects.get(project, {})})

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        return self.fetch_nowait(project)


class QuotaFixture:
    """An engine (:class:`~middleware.QuotaEngine`) on a fresh :class:`~middleware.MemoryStore`,
    answering from a :class:`FixtureSource`.

    ``defaults`` are every project's limits; ``projects`` maps a project to its own. Limits follow
    the middleware's semantics: negative is unlimited, ``0`` disables, a resource nobody set gets
    ``default_limit`` (unlimited unless you pass one). A :class:`~middleware.Limit` sets a window
    (``Limit(3, period=Period.parse("minute"))``) or a scale. ``clock`` is the engine's and the
    store's (inject one to move windows and leases without sleeping); the other keyword arguments
    go to the engine (``shadow=True``, ``metrics=...``).
    """

    def __init__(self, defaults: Mapping[str, LimitLike] | None = None, *,
                 projects: Mapping[str, Mapping[str, LimitLike]] | None = None,
                 clock: Callable[[], float] = time.time, **engine_options: Any) -> None:
        if "store" in engine_options or "source" in engine_options:
            raise ConfigurationError("QuotaFixture makes its own source and in-memory store")
        self.clock = clock
        self.source = FixtureSource(defaults, projects=projects)
        self.store = MemoryStore(clock=clock)
        self.engine = QuotaEngine(source=self.source, store=self.store, clock=clock, **engine_options)

    # -- limits ------------------------------------------------------------------------------------

    def set_quota(self, project: str, resource: str, limit: LimitLike | None) -> None:
        """``project``'s own limit of ``resource`` as the quota service reports it; None removes it
        (the default applies again). Applies to the next decision."""
        own = self.source.projects.setdefault(project, {})
        if limit is None:
            own.pop(resource, None)
        else:
            own[resource] = _limit(limit, resource)

    def set_default(self, resource: str, limit: LimitLike | None) -> None:
        """Every project's limit of ``resource`` (unless the project has its own); None removes it."""
        if limit is None:
            self.source.defaults.pop(resource, None)
        else:
            self.source.defaults[resource] = _limit(limit, resource)

    def set_override(self, project: str, resource: str, limit: int | None) -> None:
        """An operator's override in the store (what the admin API and CLI set), in store units: it
        takes precedence over the source. None removes it."""
        _now(self.store.set_overrides(project, {resource: limit}))

    # -- usage -------------------------------------------------------------------------------------

    def usage(self, project: str, resource: str, *, window: str | float | Period | None = None) -> int | float:
        """What ``project`` uses of ``resource`` now, in quota units (committed plus reservations
        in flight). A windowed quota counts in the current window: of the limit's own period, or
        of ``window`` (for a rule's ``window="minute"``)."""
        bucket, scale = self._bucket(project, resource, window)
        return in_quota_units(_now(self.store.usage(bucket)), scale)

    def set_usage(self, project: str, resource: str, used: int | float, *,
                  window: str | float | Period | None = None) -> None:
        """Start ``project`` with ``used`` of ``resource`` already in use (in quota units)."""
        bucket, scale = self._bucket(project, resource, window)
        _now(self.store.set_usage(bucket, to_store_units(used, scale)))

    def _bucket(self, project: str, resource: str, window: str | float | Period | None) -> tuple[Bucket, int]:
        limit = self.source.limit(project, resource)
        period = limit.period if limit is not None and limit.period is not None else (
            None if window is None else Period.parse(window))
        return Bucket(project, resource, current_window(period, self.clock())), 1 if limit is None else limit.scale

    # -- plugging it in ----------------------------------------------------------------------------

    def middleware(self, app: ASGIApp, rules: list[Rule], **options: Any) -> QuotaMiddleware:
        """``QuotaMiddleware(app, rules=rules, engine=self.engine, **options)``."""
        return QuotaMiddleware(app, rules=rules, engine=self.engine, **options)

    @contextmanager
    def installed(self, middleware: QuotaMiddleware) -> Iterator[QuotaFixture]:
        """Point a QuotaMiddleware that exists already at this fixture's engine, until the block ends."""
        if not isinstance(middleware, QuotaMiddleware):
            raise ConfigurationError(f"installed() takes a QuotaMiddleware, got {middleware!r}")
        previous = middleware.engine
        middleware.engine = self.engine
        try:
            yield self
        finally:
            middleware.engine = previous

    def __enter__(self) -> QuotaFixture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        _now(self.engine.aclose())

    async def __aenter__(self) -> QuotaFixture:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.engine.aclose()


def _limit(value: LimitLike, resource: str) -> Limit:
    if isinstance(value, Limit):
        return value
    try:
        return Limit(parse_limit(value, f"limit {resource!r}"))
    except Exception as exc:
        raise ConfigurationError(str(exc)) from None


def _now(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a memory-store coroutine to its end here: the memory store never suspends (each call is
    its own critical section), so no event loop is needed, and a running one is not disturbed."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the in-memory store suspended; QuotaFixture cannot read it synchronously")

