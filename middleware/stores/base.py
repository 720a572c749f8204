"""The store contract: where usage lives, decided atomically.

A *bucket* is one project's usage of one resource (optionally in one time window). Usage counts
committed creations plus live reservations. ``reserve`` checks and reserves in one atomic step;
each reservation carries a lease: ``commit`` keeps its cost, ``refund`` gives it back, and a lease
never settled (a worker killed mid-request) is given back by the store once it expires.

Every store implements this whole contract, and one contract test suite runs over all of them.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple

from ..keys import member
from ..windows import Window

#: A window's counters outlive it this long, so that settlements arriving late still find them.
WINDOW_GRACE_MS = 10 * 60 * 1000


# Bucket, Reservation and Decision are built on every guarded request: named tuples, which cost a
# fraction of a frozen dataclass to make, and are just as immutable and hashable.
class Bucket(NamedTuple):
    """One project's usage of one resource; with a window, only within that window."""

    project: str
    resource: str
    window: Window | None = None

    @property
    def expires_ms(self) -> int:
        """When the bucket's keys may go (0: never): after its window, plus a grace for late settlements."""
        return 0 if self.window is None else int(self.window.end * 1000) + WINDOW_GRACE_MS


class Reservation(NamedTuple):
    bucket: Bucket
    cost: int
    #: Unique per reservation, with the cost appended so that an expiring lease knows what to give back.
    member: str
    #: Epoch milliseconds after which the store may give the reservation back by itself.
    expires_ms: int


class Claim(NamedTuple):
    """One bucket a decision must reserve in: ``cost`` store units against ``limit`` (see reserve)."""

    bucket: Bucket
    cost: int
    limit: int
    scale: int = 1


#: An admission decided in process, as plain values: (used, limit, member, expires_ms), what a
#: Decision and its Reservation would hold (see Store.take_nowait).
Taken = tuple[int, int, str, int]


#: A Claim, or the same four values in a plain tuple (unpacked faster: see take_all_nowait).
ClaimLike = Claim | tuple[Bucket, int, int, int]


class Decision(NamedTuple):
    admitted: bool
    #: Usage of the bucket after this decision (including the reservation when admitted).
    used: int
    limit: int
    reservation: Reservation | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


_new = tuple.__new__

# Members must be unique across every process sharing a store: a random prefix per process, then
# a counter (a system call for randomness on every request costs more than the rest of the id).
_PROCESS = os.urandom(6).hex()
_SEQUENCE = itertools.count()


def _new_process() -> None:
    """A forked child (gunicorn --preload, multiprocessing) is a new process: a prefix of its own.

    Without this, children forked after ``import middleware`` share the parent's prefix and
    counter, and hand out the very same ids.
    """
    global _PROCESS, _SEQUENCE
    _PROCESS = os.urandom(6).hex()
    _SEQUENCE = itertools.count()


os.register_at_fork(after_in_child=_new_process)


def new_id() -> str:
    """An id no other reservation, release or block of any process shares."""
    return f"{_PROCESS}{next(_SEQUENCE):x}"


def new_member(cost: int) -> str:
    """A reservation's lease member: a new id with the cost appended (see Reservation.member)."""
    return member(new_id(), cost)


def reservation_of(bucket: Bucket, cost: int, taken: Taken) -> Reservation:
    """The Reservation that ``take_nowait`` admitted as plain values."""
    return Reservation(bucket, cost, taken[2], taken[3])


def decision_of(bucket: Bucket, cost: int, taken: Taken) -> Decision:
    """``reserve_nowait``'s answer for what ``take_nowait`` admitted."""
    used, limit, member, expires_ms = taken
    # tuple.__new__: half the cost of a named tuple's own constructor.
    return _new(Decision, (True, used, limit, _new(Reservation, (bucket, cost, member, expires_ms))))


class BucketUsage(NamedTuple):
    """One bucket as the next decision would see it (expired leases already given back): read only."""

    bucket: Bucket
    #: Committed units plus live reservations: what a decision compares with the limit.
    used: int
    #: Units held by live reservations, and how many there are.
    reserved: int = 0
    reservations: int = 0

    @property
    def committed(self) -> int:
        return max(0, self.used - self.reserved)


class Store(ABC):
    """Usage: counters, reservations and quota overrides, what a decision reads and writes atomically."""

    @abstractmethod
    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        """Admit and reserve ``cost`` if ``used + cost <= limit`` (a negative limit admits all).

        An override set for the bucket's project and resource replaces ``limit`` (its value is in
        quota units: ``scale`` store units each); the decision carries the limit applied.

        Callers await what it returns; a store may return any awaitable (RedisStore returns a
        future, and so does its ``reserve_all``): ``asyncio.ensure_future`` takes either, not
        ``create_task``.
        """

    @abstractmethod
    async def reserve_all(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision]:
        """Reserve in every bucket or in none, atomically: one decision per claim, in order.

        Admitted only when every claim fits (each decision then holds its reservation). When one
        does not, nothing is held anywhere; a claim that did not fit is one whose ``used + cost``
        exceeds its (applied) ``limit``. Buckets must be distinct (the engine sums repeats).
        """

    def reserve_all_nowait(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision] | None:
        """``reserve_all`` when the store can decide in process (the memory store); None: await it."""
        return None

    def reserve_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision | None:
        """``reserve`` when the store can decide in process, with no I/O; None: await ``reserve``.

        The middleware asks this first: a store that keeps the answer at hand (the memory store,
        an open local lease) then costs no coroutine at all.
        """
        return None

    def take_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Taken | None:
        """``reserve_nowait``'s admission as plain values (no Decision, no Reservation: the two
        cost more to make than the rest of the decision); None: refused, or not decidable in
        process (ask ``reserve``, which answers both). Settle it with ``settle_taken_nowait``.

        The engine's path for most requests of a warm project, used when a store defines this pair
        at least as far down its class hierarchy as ``reserve_nowait`` and ``settle_nowait``.
        """
        return None

    def take(self, bucket: Bucket, cost: int, limit: int, lease_ms: int,
             scale: int = 1) -> Awaitable[Taken | None] | None:
        """``reserve`` in plain values, for a store that must be awaited (Redis): an awaitable
        of the Taken when admitted, of None when refused (nothing held: ask ``reserve``, which
        answers the refusal); it raises StoreError as ``reserve`` does. None: not offered (await
        ``reserve``). Settle it with ``settle_taken_nowait``.

        The engine's path for a warm project on such a store (``QuotaEngine.take_later``): the
        middleware awaits the store's own awaitable, with no coroutine of the engine's between.
        Used when a store defines ``take`` and ``settle_taken_nowait`` at least as far down its
        class hierarchy as ``reserve``, ``settle_nowait``, ``commit`` and ``refund``.
        """
        return None

    def take_all(self, claims: Sequence[ClaimLike], lease_ms: int) -> Awaitable[list[Taken] | None] | None:
        """``reserve_all`` in plain values, for a store that must be awaited: ``take`` for several
        buckets at once, all or nothing (an awaitable of a Taken per claim, or of None when refused:
        nothing held). None: not offered. Settle each with ``settle_taken_nowait``."""
        return None

    def take_all_nowait(self, claims: Sequence[ClaimLike], lease_ms: int) -> list[Taken] | None:
        """``reserve_all_nowait``'s admission as plain values, one Taken per claim; None: refused
        (nothing held), or not decidable in process. Settle each with ``settle_taken_nowait``."""
        return None

    def settle_taken_all_nowait(self, claims: Sequence[ClaimLike], taken: Sequence[Taken], keep: bool) -> bool:
        """Settle what ``take_all`` took for ``claims`` (the very claims it was given) at once; False:
        nothing done, settle each with ``settle_taken_nowait``."""
        return False

    def settle_taken_nowait(self, bucket: Bucket, cost: int, member: str, keep: bool) -> bool:
        """``settle_nowait`` of what ``take_nowait`` admitted (its member); False: nothing done,
        await ``commit`` or ``refund`` of its Reservation (``reservation_of``)."""
        return False

    @abstractmethod
    async def check(self, bucket: Bucket, limit: int, scale: int = 1) -> Decision:
        """Admit a metered request while usage is below ``limit`` (or its override); reserves nothing."""

    @abstractmethod
    async def charge(self, bucket: Bucket, amount: int) -> int:
        """Add what a request used, after the fact and whatever the limit; returns the new usage."""

    @abstractmethod
    async def seed(self, bucket: Bucket, used: int) -> int:
        """Raise usage to at least ``used`` (what the upstream counted); never lowers it."""

    @abstractmethod
    async def commit(self, reservation: Reservation) -> None:
        """Keep the reservation's cost for good. A commit after the lease expired counts it again."""

    @abstractmethod
    async def refund(self, reservation: Reservation) -> None:
        """Give the reservation's cost back (once, even if the lease already expired)."""

    def settle_nowait(self, reservation: Reservation, keep: bool) -> bool:
        """``commit`` (keep) or ``refund`` when nothing needs awaiting (done in process, or handed
        over to be applied later); False: nothing done, await the coroutine instead."""
        return False

    def settle_all_nowait(self, reservations: Sequence[Reservation], keep: bool) -> bool:
        """Settle every reservation of one ``reserve_all`` together, handed over as one (the Redis
        store: one operation); False: nothing done, settle each."""
        return False

    @abstractmethod
    async def release(self, bucket: Bucket, cost: int) -> int:
        """Give ``cost`` back after a delete, never below zero; returns the new usage."""

    @abstractmethod
    async def usage(self, bucket: Bucket) -> int:
        """Current usage, after expired leases were given back."""

    @abstractmethod
    async def inspect(self, bucket: Bucket) -> BucketUsage:
        """The bucket's usage and live reservations, read without changing anything."""

    @abstractmethod
    async def buckets(self, project: str) -> list[BucketUsage]:
        """Every bucket of ``project`` the store holds (windows included), read only: for
        operators and usage reads, not for the request path (it may scan)."""

    @abstractmethod
    async def set_usage(self, bucket: Bucket, value: int, *, commits_since: int | None = None) -> None:
        """Overwrite usage with ``value`` committed units; live leases are kept on top.

        ``commits_since``: a :meth:`commits` total read before ``value`` was counted; commits that
        landed since are added, so a creation that lands while the truth is being read is not lost.
        """

    @abstractmethod
    async def commits(self, bucket: Bucket) -> int:
        """A running total of units committed in the bucket (only differences between reads mean anything)."""

    @abstractmethod
    async def overrides(self, project: str) -> dict[str, int]:
        """The project's quota overrides: resource -> limit in quota units (negative: unlimited)."""

    @abstractmethod
    async def set_overrides(self, project: str, values: dict[str, int | None], *, replace: bool = False) -> None:
        """Set overrides; None removes one (the source's limit applies again). ``replace`` drops the rest."""

    @abstractmethod
    async def overridden_projects(self) -> list[str]:
        """Every project with at least one override, sorted."""

    def on_data_loss(self, callback: Callable[[], Any], *, heal: bool = False) -> None:
        """Call ``callback`` (a function, or one returning an awaitable) when the store notices it lost
        usage data; with ``heal``, only in the one process chosen to repair it. A store that cannot
        lose data without its process (the memory store) never calls it."""

    async def flush(self) -> None:
        """Wait until every settlement handed to the store so far is applied."""

    async def aclose(self) -> None:
        """Flush and release connections."""
        await self.flush()


#: What the quota cache keeps per project and source: the effective quotas, and the source's back-off.
SharedPart = Literal["quotas", "backoff"]


class SharedState(ABC):
    """What processes share besides usage, per project and quota source (``namespace``): the quota
    cache's copy of the effective quotas, the source's back-off after a failure, and a short lock
    so that one process at a time asks the source. A store that serves several processes (Redis)
    implements it beside :class:`Store`; one process needs none. Key names stay the store's own."""

    @abstractmethod
    async def load(self, project: str, namespace: str, part: SharedPart) -> bytes | None:
        """What was saved, if it has not expired."""

    @abstractmethod
    async def save(self, project: str, namespace: str, part: SharedPart, blob: bytes, ttl_ms: int) -> None:
        """Share ``blob`` with every process for ``ttl_ms``."""

    @abstractmethod
    async def try_lock(self, project: str, namespace: str, token: str, ttl_ms: int) -> bool:
        """Take the fetch lock for ``ttl_ms`` at most; True if taken."""

    @abstractmethod
    async def unlock(self, project: str, namespace: str, token: str) -> None:
        """Give the fetch lock back if ``token`` still holds it."""

    @abstractmethod
    async def namespaces(self, project: str) -> list[str]:
        """The sources (namespaces) with a shared copy of ``project``'s quotas: for operators."""
