"""Effective quotas, cached: in-process LRU in front of a shared copy in the store.

A warm project costs one dict lookup: no Redis, no upstream. A cold one reads the shared copy
(one Redis GET) and only then asks the upstream, once per project per process however many
requests arrive meanwhile (single flight). Freshness carries jitter so that workers do not all
refresh at once. While the upstream fails, a copy past its TTL is still served up to a stale
bound; after that the error goes to the caller's failure policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cachetools import LRUCache

from .errors import SourceError, SourceInvalid, SourceRejected, SourceUnavailable, StoreError
from .nowait import nowait_usable
from .quotas import Quotas
from .sources.base import QuotaSource
from .stores.base import Bucket, SharedState, Store
from .types import QuotaMetricsLike, RawHeaders
from .windows import Window, current_window

logger = logging.getLogger("quota_middleware.cache")

SERVING_STALE = "quota API failed (%s); serving quotas of project %r cached %.0fs ago"
SHARED_COPY_UNUSABLE = "shared quota copy unusable (%s); asking the quota API"

Headers = RawHeaders
#: How often a worker waiting for another worker's fetch looks for the shared copy.
LOCK_POLL = 0.05
#: After an upstream failure, nobody asks it again for at least this long (or its Retry-After).
MIN_BACKOFF = 1.0


@dataclass(frozen=True, slots=True)
class _Entry:
    quotas: Quotas
    fetched_at: float
    fresh_until: float
    stale_until: float


class QuotaCache:
    def __init__(self, source: QuotaSource, store: Store, *, shared: SharedState | None = None, ttl: float = 60.0,
                 jitter: float = 0.1, stale: float = 300.0, maxsize: int = 10_000, lock_wait: float = 10.0,
                 clock: Callable[[], float] = time.time, metrics: QuotaMetricsLike | None = None) -> None:
        self.source = source
        #: Where usage the source reports is seeded.
        self.store = store
        #: Where the copy every process shares lives; None: this process alone (the memory store).
        self.shared = shared
        self.ttl = ttl
        self.jitter = jitter
        self.stale = stale
        #: How long a fetch lock is held at most, and how long others wait for its result.
        self.lock_wait = lock_wait
        self._clock = clock
        self._metrics = metrics
        self._local = _Evicting(maxsize=maxsize)
        self._local.on_evict = self._changed
        self._inflight: dict[str, asyncio.Future[Quotas]] = {}
        #: project -> clock time before which the upstream is not asked again (after a failure).
        self._backoff: LRUCache[str, float] = LRUCache(maxsize=maxsize)
        self._forward = tuple(h.lower().encode("latin-1") for h in source.forward_headers)
        self._fetch_nowait = nowait_usable(source, "fetch_nowait", "fetch")
        #: A source whose answers never change, from memory (StaticSource): what fresh() answers
        #: holds for good.
        self._constant = self._fetch_nowait and source.constant \
            and nowait_usable(source, "constant", "fetch_nowait", "fetch")
        #: Called with a project whose quotas in process were just replaced or dropped (see fresh_until).
        self.on_change: Callable[[str], None] = _ignore

    def fresh(self, project: str) -> Quotas | None:
        """The project's quotas when they are at hand (no I/O, no coroutine); else None: await get().

        At hand: a fresh copy in process, or a source that answers from memory.
        """
        if not self.source.cacheable:
            return self.source.fetch_nowait(project) if self._fetch_nowait else None
        entry = self._local.get(project)
        if entry is not None and self._clock() < entry.fresh_until:
            if self._metrics is not None:
                self._metrics.cache("hit")
            return entry.quotas
        return None

    def fresh_until(self, project: str) -> float:
        """Until when ``fresh(project)`` answers with the quotas it answers now, unless
        ``on_change`` says otherwise first; -inf: it may answer differently at any time (a source
        read on every decision)."""
        if not self.source.cacheable:
            return math.inf if self._constant else -math.inf
        entry = self._local.get(project)
        return -math.inf if entry is None else entry.fresh_until

    def _keep(self, project: str, entry: _Entry) -> None:
        self._local[project] = entry
        self.on_change(project)

    def _changed(self, project: str) -> None:
        self.on_change(project)

    async def get(self, project: str, headers: Headers) -> Quotas:
        """Effective quotas of ``project``; ``headers`` are the request's, read only on a miss."""
        quotas = self.fresh(project)
        if quotas is not None:
            return quotas
        if not self.source.cacheable:
            return await self.source.fetch(project, self.forwarded(headers))
        entry = self._local.get(project)
        if self._metrics is not None:
            self._metrics.cache("miss")
        pending = self._inflight.get(project)
        if pending is None:
            pending = asyncio.ensure_future(self._load(project, headers, entry))
            self._inflight[project] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(project, None))
            return await asyncio.shield(pending)
        try:
            return await asyncio.shield(pending)
        except SourceRejected:
            # Another caller's credential was refused; this caller's own may be fine.
            return await self.source.fetch(project, self.forwarded(headers))

    async def _load(self, project: str, headers: Headers, stale: _Entry | None) -> Quotas:
        until = self._backoff.get(project)
        if stale is None and until is not None and self._clock() < until and self.shared is not None:
            # This worker's refresh failed but it never held the project itself (serving a stale
            # copy keeps none locally): the copy other workers share is as good a stale answer.
            stale = await self._read_shared(project)
        waiting = self._while_backing_off(until, stale)
        if waiting is not None:
            return waiting
        if self.shared is None:
            return await self._fetch(project, headers, stale, self._clock())
        # Across processes: whoever takes the fetch lock asks the upstream; the others wait for
        # the shared copy it writes (or serve their stale copy meanwhile).
        deadline = time.monotonic() + self.lock_wait
        while True:
            now = self._clock()
            shared = await self._read_shared(project)
            if shared is not None and now < shared.fresh_until:
                self._keep(project, shared)
                if self._metrics is not None:
                    self._metrics.cache("shared_hit")
                return shared.quotas
            if shared is not None and (stale is None or shared.fetched_at > stale.fetched_at):
                stale = shared
            waiting = self._while_backing_off(await self._read_backoff(project), stale)
            if waiting is not None:
                return waiting
            token = await self._try_lock(project)
            if token is not None:
                try:
                    return await self._fetch(project, headers, stale, now)
                finally:
                    await self._unlock(project, token)
            if stale is not None and now < stale.stale_until:
                return stale.quotas  # another worker is refreshing it
            if time.monotonic() >= deadline:
                raise SourceUnavailable(f"another worker is still fetching the quotas of project {project!r}",
                                        retry_after=self.lock_wait)
            await asyncio.sleep(LOCK_POLL)

    async def _fetch(self, project: str, headers: Headers, stale: _Entry | None, now: float) -> Quotas:
        started = time.perf_counter()
        try:
            quotas = await self.source.fetch(project, self.forwarded(headers))
        except SourceError as exc:
            self._observe(started, type(exc).__name__.removeprefix("Source").lower())
            if isinstance(exc, SourceRejected):
                raise  # a refused credential is the caller's answer, never served from cache
            await self._back_off(project, now + max(exc.retry_after or 0.0, MIN_BACKOFF))
            if stale is not None and now < stale.stale_until:
                logger.warning(SERVING_STALE, exc, project, now - stale.fetched_at)
                return stale.quotas
            raise
        self._observe(started, "ok")
        entry = self._entry(quotas, now)
        self._keep(project, entry)
        await self._seed(project, quotas, now)
        if self.shared is not None:
            blob = encode_shared(quotas, now)
            try:
                await self.shared.save(project, self.source.namespace, "quotas", blob,
                                       int((self.ttl + self.stale) * 1000))
            except StoreError as exc:
                logger.warning("could not share cached quotas of project %r: %s", project, exc)
        return quotas

    async def _seed(self, project: str, quotas: Quotas, now: float) -> None:
        """Usage the upstream reports (Captain Data's credits_used) raises the local counter, once
        per fetch, in whichever process fetched; it never lowers it."""
        for resource, limit in quotas.limits.items():
            # Usage of a billing period that is already over says nothing about the current one.
            if limit.used is None or (isinstance(limit.period, Window) and not limit.period.contains(now)):
                continue
            try:
                await self.store.seed(Bucket(project, resource, current_window(limit.period, now)), limit.used)
            except StoreError as exc:
                logger.warning("could not seed the usage of project %r: %s", project, exc)

    def _observe(self, started: float, status: str) -> None:
        if self._metrics is not None:
            self._metrics.fetch(self.source.namespace, status, time.perf_counter() - started)

    def _while_backing_off(self, until: float | None, stale: _Entry | None) -> Quotas | None:
        """While the upstream asked us to wait (or just failed), do not ask it again: answer with
        the stale copy if there is one within its bound, else fail. None: go ahead and ask."""
        now = self._clock()
        if until is None or now >= until:
            return None
        if stale is not None and now < stale.stale_until:
            return stale.quotas
        raise SourceUnavailable(f"quota API failed moments ago; not asking again for {until - now:.1f}s",
                                retry_after=until - now)

    async def _back_off(self, project: str, until: float) -> None:
        self._backoff[project] = until
        if self.shared is not None:
            try:
                await self.shared.save(project, self.source.namespace, "backoff", repr(until).encode(),
                                       max(1, int((until - self._clock()) * 1000)))
            except StoreError:
                pass  # each process then backs off on its own

    async def _read_backoff(self, project: str) -> float | None:
        if self.shared is None:
            return None
        try:
            blob = await self.shared.load(project, self.source.namespace, "backoff")
            return None if blob is None else float(blob)
        except (StoreError, ValueError):
            return None

    async def _try_lock(self, project: str) -> str | None:
        token = os.urandom(8).hex()
        if self.shared is None:
            return token
        try:
            taken = await self.shared.try_lock(project, self.source.namespace, token, int(self.lock_wait * 1000))
            return token if taken else None
        except StoreError:
            return token  # no shared lock without the store: fetch, as a lone process would

    async def _unlock(self, project: str, token: str) -> None:
        if self.shared is None:
            return
        try:
            await self.shared.unlock(project, self.source.namespace, token)
        except StoreError:
            pass  # the lock expires by itself

    async def _read_shared(self, project: str) -> _Entry | None:
        if self.shared is None:
            return None
        try:
            blob = await self.shared.load(project, self.source.namespace, "quotas")
            if blob is None:
                return None
            fetched_at, quotas = decode_shared(blob)
            return self._entry(quotas, fetched_at)
        except (StoreError, SourceInvalid) as exc:
            logger.warning(SHARED_COPY_UNUSABLE, exc)
            return None

    def _entry(self, quotas: Quotas, fetched_at: float) -> _Entry:
        fresh = self.ttl * (1 - self.jitter * random.random())
        return _Entry(quotas, fetched_at, fetched_at + fresh, fetched_at + self.ttl + self.stale)

    def forwarded(self, headers: Headers) -> Mapping[str, str]:
        """The request headers the source needs (its credential), by name."""
        if not self._forward:
            return {}
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in self._forward}


def _ignore(project: str) -> None:
    pass


class _Evicting(LRUCache[str, _Entry]):
    """An LRU cache that says which project it dropped to make room: whatever was worked out from
    that project's quotas is not to be served any longer (a request for it fetches them again)."""

    on_evict: Callable[[str], None] = _ignore

    def popitem(self) -> tuple[str, _Entry]:
        project, entry = super().popitem()
        self.on_evict(project)
        return project, entry


def encode_shared(quotas: Quotas, fetched_at: float) -> bytes:
    """The shared copy of a project's quotas, as every process (and the CLI) reads it back."""
    return json.dumps({"fetched_at": fetched_at, "quotas": quotas.to_dict()}).encode()


def decode_shared(blob: bytes) -> tuple[float, Quotas]:
    """(fetched_at, quotas) of a shared copy; SourceInvalid when it is not one."""
    try:
        doc = json.loads(blob)
        return float(doc["fetched_at"]), Quotas.from_dict(doc["quotas"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceInvalid(f"shared quota copy is corrupt: {exc}") from exc
