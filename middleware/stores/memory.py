"""The embedded store: one process, no server.

Every method runs without awaiting anything in between, so on one event loop each call is its own
critical section: no lock is needed for check-and-reserve to be atomic. (It is not thread-safe;
ASGI apps run on one loop.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from .base import Bucket, BucketUsage, Claim, Decision, Reservation, Store

#: How often (in the store's clock, ms) buckets of windows that are over are dropped.
SWEEP_EVERY_MS = 60_000
#: How long an expired lease is remembered, so that a late commit still counts (once).
REMEMBER_MS = 86_400_000


class MemoryStore(Store):
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._used: dict[Bucket, int] = {}
        # bucket -> {member: (expires_ms, cost)}; a bucket's dict is dropped once empty.
        self._leases: dict[Bucket, dict[str, tuple[int, int]]] = {}
        # (bucket, member) -> forget-after ms: leases that expired unsettled, so that a late commit
        # counts once (a group's reservations share their member, one in each bucket).
        self._expired: dict[tuple[Bucket, str], int] = {}
        self._overrides: dict[str, dict[str, int]] = {}
        self._commits: dict[Bucket, int] = {}
        # Members as strings straight from C: no str() call of ours per reservation.
        self._members = map(str, itertools.count())
        self._next_sweep = 0

    def _now_ms(self) -> int:
        now = int(self._clock() * 1000)
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: int) -> None:
        """Forget windowed buckets whose keys would have expired in Redis; give back expired leases.

        Admissions look for expired leases only when one stands in the way: the sweep bounds how
        long the others are still counted, and kept.
        """
        self._next_sweep = now + SWEEP_EVERY_MS
        for bucket in [b for b in self._used if 0 < b.expires_ms <= now]:
            del self._used[bucket]
            self._leases.pop(bucket, None)
        for bucket in list(self._leases):
            self._purge(bucket, now)
        for lease in [m for m, until in self._expired.items() if until <= now]:
            del self._expired[lease]

    def _purge(self, bucket: Bucket, now_ms: int) -> int:
        leases = self._leases.get(bucket)
        used = self._used.get(bucket, 0)
        if leases:
            expired = [m for m, (exp, _) in leases.items() if exp <= now_ms]
            for member in expired:
                used -= leases.pop(member)[1]
                self._expired[bucket, member] = now_ms + REMEMBER_MS
            if not leases:
                del self._leases[bucket]
            used = max(0, used)
            self._used[bucket] = used
        return used

    def _effective(self, bucket: Bucket, limit: int, scale: int) -> int:
        override = self._overrides.get(bucket.project, {}).get(bucket.resource)
        if override is None:
            return limit
        return -1 if override < 0 else override * scale

    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        return self.reserve_nowait(bucket, cost, limit, lease_ms, scale)

    def reserve_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        if self._overrides:  # most deployments set none: no lookup per request then
            limit = self._effective(bucket, limit, scale)
        now = self._now_ms()
        used = self._used.get(bucket, 0)
        if 0 <= limit < used + cost:
            # Expired leases only matter when they stand between a request and its limit: look
            # for them then (and on every read of the usage), not on every admission.
            used = self._purge(bucket, now)
            if limit < used + cost:
                return Decision(False, used, limit)
        return self._take(bucket, cost, limit, used, now + lease_ms, next(self._members))

    async def reserve_all(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision]:
        return self.reserve_all_nowait(claims, lease_ms)

    def reserve_all_nowait(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision]:
        now = self._now_ms()
        seen: list[tuple[int, int]] = []
        fits = True
        for bucket, cost, limit, scale in claims:  # every bucket checked before any is touched: all or nothing
            if self._overrides:
                limit = self._effective(bucket, limit, scale)
            used = self._used.get(bucket, 0)
            if 0 <= limit < used + cost:
                used = self._purge(bucket, now)
                fits = fits and used + cost <= limit
            seen.append((used, limit))
        if not fits:
            return [Decision(False, used, limit) for used, limit in seen]
        expires, member = now + lease_ms, next(self._members)  # one member: each bucket has its own leases
        return [self._take(claim[0], claim[1], limit, used, expires, member)
                for claim, (used, limit) in zip(claims, seen, strict=True)]

    def _take(self, bucket: Bucket, cost: int, limit: int, used: int, expires_ms: int, member: str) -> Decision:
        """Count the cost and hold a lease for it. A member unique in this process is enough: no
        other process shares the store."""
        used += cost
        self._used[bucket] = used
        leases = self._leases.get(bucket)
        if leases is None:
            self._leases[bucket] = {member: (expires_ms, cost)}
        else:
            leases[member] = (expires_ms, cost)
        # tuple.__new__: half the cost of a named tuple's own constructor, on every request.
        return tuple.__new__(Decision, (True, used, limit, tuple.__new__(Reservation, (bucket, cost, member,
                                                                                     expires_ms))))

    async def check(self, bucket: Bucket, limit: int, scale: int = 1) -> Decision:
        limit = self._effective(bucket, limit, scale)
        used = self._purge(bucket, self._now_ms())
        return Decision(limit < 0 or used < limit, used, limit)

    async def charge(self, bucket: Bucket, amount: int) -> int:
        used = self._purge(bucket, self._now_ms()) + amount
        self._used[bucket] = used
        return used

    async def seed(self, bucket: Bucket, used: int) -> int:
        current = self._purge(bucket, self._now_ms())
        if used > current:
            self._used[bucket] = current = used
        return current

    async def commit(self, reservation: Reservation) -> None:
        self.settle_nowait(reservation, True)

    async def refund(self, reservation: Reservation) -> None:
        self._refund(reservation)

    def settle_nowait(self, reservation: Reservation, keep: bool) -> bool:
        if not keep:
            self._refund(reservation)
            return True
        # The commit, here rather than in a method of its own: it ends every admitted request.
        bucket = reservation.bucket
        leases = self._leases.get(bucket)
        if leases is not None and leases.pop(reservation.member, None) is not None:
            if not leases:
                del self._leases[bucket]
            self._commits[bucket] = self._commits.get(bucket, 0) + reservation.cost
        # The lease expired and was given back: the creation happened, so count it again (once).
        elif self._expired.pop((bucket, reservation.member), None) is not None:
            self._used[bucket] = self._used.get(bucket, 0) + reservation.cost
            self._commits[bucket] = self._commits.get(bucket, 0) + reservation.cost
        return True

    def _refund(self, reservation: Reservation) -> None:
        leases = self._leases.get(reservation.bucket)
        if leases is None or leases.pop(reservation.member, None) is None:
            self._expired.pop((reservation.bucket, reservation.member), None)
            return  # already given back when its lease expired
        if not leases:
            del self._leases[reservation.bucket]
        self._used[reservation.bucket] = max(0, self._used.get(reservation.bucket, 0) - reservation.cost)

    async def release(self, bucket: Bucket, cost: int) -> int:
        used = max(0, self._purge(bucket, self._now_ms()) - cost)
        self._used[bucket] = used
        return used

    async def usage(self, bucket: Bucket) -> int:
        return self._purge(bucket, self._now_ms())

    async def inspect(self, bucket: Bucket) -> BucketUsage:
        now = int(self._clock() * 1000)
        leases = self._leases.get(bucket, {})
        live = [cost for expires, cost in leases.values() if expires > now]
        expired = sum(cost for expires, cost in leases.values() if expires <= now)
        return BucketUsage(bucket, max(0, self._used.get(bucket, 0) - expired), sum(live), len(live))

    async def buckets(self, project: str) -> list[BucketUsage]:
        # A scan of every bucket: for operators, never on the request path.
        now = int(self._clock() * 1000)
        found = {b for b in (*self._used, *self._leases) if b.project == project and not 0 < b.expires_ms <= now}
        return [await self.inspect(bucket) for bucket in sorted(found, key=_order)]

    async def set_usage(self, bucket: Bucket, value: int, *, commits_since: int | None = None) -> None:
        self._purge(bucket, self._now_ms())
        since = 0 if commits_since is None else self._commits.get(bucket, 0) - commits_since
        self._used[bucket] = value + since + sum(cost for _, cost in self._leases.get(bucket, {}).values())

    async def commits(self, bucket: Bucket) -> int:
        return self._commits.get(bucket, 0)

    async def overrides(self, project: str) -> dict[str, int]:
        return dict(self._overrides.get(project, {}))

    async def set_overrides(self, project: str, values: dict[str, int | None], *, replace: bool = False) -> None:
        current = {} if replace else dict(self._overrides.get(project, {}))
        for resource, value in values.items():
            if value is None:
                current.pop(resource, None)
            else:
                current[resource] = value
        if current:
            self._overrides[project] = current
        else:
            self._overrides.pop(project, None)

    async def overridden_projects(self) -> list[str]:
        return sorted(self._overrides)


def _order(bucket: Bucket) -> tuple[str, float]:
    """Resources in name order; a count bucket before windows, windows in time order."""
    return bucket.resource, -1.0 if bucket.window is None else bucket.window.start
