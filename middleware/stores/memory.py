"""The embedded store: one process, no server.

Every method runs without awaiting anything in between, so on one event loop each call is its own
critical section: no lock is needed for check-and-reserve to be atomic. (It is not thread-safe;
ASGI apps run on one loop.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from .base import Bucket, BucketUsage, Claim, ClaimLike, Decision, Reservation, Store, Taken, decision_of

#: How often (in the store's clock, ms) buckets of windows that are over are dropped.
SWEEP_EVERY_MS = 60_000
#: How long an expired lease is remembered, so that a late commit still counts (once).
REMEMBER_MS = 86_400_000


class _Slot:
    """One bucket's state. One object per bucket, so that a request looks its bucket up once to
    reserve and once to settle (a windowed bucket's key hashes its window's floats every time)."""

    __slots__ = ("used", "leases", "commits")

    def __init__(self) -> None:
        #: Committed units plus live leases: what a decision compares with the limit.
        self.used = 0
        #: member -> (expires_ms, cost) of every live lease.
        self.leases: dict[str, tuple[int, int]] = {}
        #: Units ever committed (reconciliation reads them, see ``commits``).
        self.commits = 0


class MemoryStore(Store):
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._slots: dict[Bucket, _Slot] = {}
        # (bucket, member) -> forget-after ms: leases that expired unsettled, so that a late commit
        # counts once (a group's reservations share their member, one in each bucket).
        self._expired: dict[tuple[Bucket, str], int] = {}
        self._overrides: dict[str, dict[str, int]] = {}
        # Members as strings straight from C: no str() call of ours per reservation.
        self._members = map(str, itertools.count())
        self._next_sweep = 0

    def _now_ms(self) -> int:
        now = int(self._clock() * 1000)
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _slot(self, bucket: Bucket) -> _Slot:
        slot = self._slots.get(bucket)
        if slot is None:
            slot = self._slots[bucket] = _Slot()
        return slot

    def _sweep(self, now: int) -> None:
        """Forget windowed buckets whose keys would have expired in Redis; give back expired leases.

        Admissions look for expired leases only when one stands in the way: the sweep bounds how
        long the others are still counted, and kept.
        """
        self._next_sweep = now + SWEEP_EVERY_MS
        for bucket in [b for b in self._slots if 0 < b.expires_ms <= now]:
            del self._slots[bucket]
        for bucket, slot in self._slots.items():
            if slot.leases:
                self._purge(bucket, slot, now)
        for lease in [m for m, until in self._expired.items() if until <= now]:
            del self._expired[lease]

    def _purge(self, bucket: Bucket, slot: _Slot, now_ms: int) -> int:
        """Give back the slot's expired leases; its usage after."""
        leases = slot.leases
        if leases:
            expired = [m for m, (exp, _) in leases.items() if exp <= now_ms]
            for member in expired:
                slot.used -= leases.pop(member)[1]
                self._expired[bucket, member] = now_ms + REMEMBER_MS
            slot.used = max(0, slot.used)
        return slot.used

    def _purged(self, bucket: Bucket) -> _Slot:
        """The bucket's slot (made if new), expired leases given back: for a write."""
        now = self._now_ms()  # first: a sweep it runs may drop the bucket's old slot
        slot = self._slot(bucket)
        self._purge(bucket, slot, now)
        return slot

    def _used_now(self, bucket: Bucket) -> int:
        """The bucket's usage, expired leases given back: for a read (which makes no slot)."""
        now = self._now_ms()
        slot = self._slots.get(bucket)
        return 0 if slot is None else self._purge(bucket, slot, now)

    def _effective(self, bucket: Bucket, limit: int, scale: int) -> int:
        override = self._overrides.get(bucket.project, {}).get(bucket.resource)
        if override is None:
            return limit
        return -1 if override < 0 else override * scale

    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        return self.reserve_nowait(bucket, cost, limit, lease_ms, scale)

    def reserve_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        taken = self.take_nowait(bucket, cost, limit, lease_ms, scale)
        if taken is None:  # refused: its usage (expired leases given back) and the limit applied
            return Decision(False, self._used_now(bucket), self._effective(bucket, limit, scale))
        return decision_of(bucket, cost, taken)

    def take_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Taken | None:
        if self._overrides:  # most deployments set none: no lookup per request then
            limit = self._effective(bucket, limit, scale)
        now = int(self._clock() * 1000)  # _now_ms, written out: every admission reads it
        if now >= self._next_sweep:
            self._sweep(now)
        slot = self._slots.get(bucket)
        if slot is None:
            if 0 <= limit < cost:  # refused on its first request (a disabled resource): nothing to keep
                return None
            slot = self._slots[bucket] = _Slot()
        used = slot.used + cost
        if 0 <= limit < used:
            # Expired leases only matter when they stand between a request and its limit: look
            # for them then (and on every read of the usage), not on every admission.
            used = self._purge(bucket, slot, now) + cost
            if limit < used:
                return None
        # The reservation, here rather than in a method of its own: every admitted request takes one.
        # A member unique in this process is enough: no other process shares the store.
        slot.used = used
        member = next(self._members)
        expires = now + lease_ms
        slot.leases[member] = (expires, cost)
        return used, limit, member, expires

    async def reserve_all(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision]:
        return self.reserve_all_nowait(claims, lease_ms)

    def reserve_all_nowait(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision]:
        taken = self.take_all_nowait(claims, lease_ms)
        if taken is None:
            return self._refused(claims)
        return [decision_of(claim[0], claim[1], each) for claim, each in zip(claims, taken, strict=True)]

    def take_all_nowait(self, claims: Sequence[ClaimLike], lease_ms: int) -> list[Taken] | None:
        """All or nothing, in one pass: each bucket is taken in turn, and if one falls short the
        ones taken before it are given back (no await in between: nobody saw them)."""
        now = self._now_ms()
        slots = self._slots
        expires, member = now + lease_ms, next(self._members)  # one member: each bucket has its own leases
        taken: list[Taken] = []
        for bucket, cost, limit, scale in claims:
            if self._overrides:
                limit = self._effective(bucket, limit, scale)
            slot = slots.get(bucket)
            if slot is None:
                if 0 <= limit < cost:
                    self._undo(claims, len(taken), member)
                    return None
                slot = slots[bucket] = _Slot()
            used = slot.used + cost
            if 0 <= limit < used:
                used = self._purge(bucket, slot, now) + cost
                if limit < used:
                    self._undo(claims, len(taken), member)
                    return None
            if member in slot.leases:  # the group's one member is in this bucket already
                self._undo(claims, len(taken), member)
                raise ValueError(f"reserve_all: {bucket} is claimed twice; buckets must be distinct "
                                 f"(sum their costs)")
            slot.used = used
            slot.leases[member] = (expires, cost)
            taken.append((used, limit, member, expires))
        return taken

    def _undo(self, claims: Sequence[ClaimLike], count: int, member: str) -> None:
        """Undo what a group took from its first ``count`` buckets, exactly (no slot it made is kept)."""
        for bucket, cost, _, _ in claims[:count]:
            slot = self._slots[bucket]
            del slot.leases[member]
            slot.used -= cost
            if slot.used == 0 and not slot.leases and slot.commits == 0:
                del self._slots[bucket]  # as good as none: the slot this group made, maybe

    def _refused(self, claims: Sequence[Claim]) -> list[Decision]:
        """Every bucket's refusal, with its usage (the group holds nothing)."""
        now = self._now_ms()
        refused = []
        for bucket, cost, limit, scale in claims:
            if self._overrides:
                limit = self._effective(bucket, limit, scale)
            found = self._slots.get(bucket)
            used = 0 if found is None else found.used
            if found is not None and 0 <= limit < used + cost:
                used = self._purge(bucket, found, now)
            refused.append(Decision(False, used, limit))
        return refused

    async def check(self, bucket: Bucket, limit: int, scale: int = 1) -> Decision:
        limit = self._effective(bucket, limit, scale)
        used = self._used_now(bucket)
        return Decision(limit < 0 or used < limit, used, limit)

    async def charge(self, bucket: Bucket, amount: int) -> int:
        slot = self._purged(bucket)
        slot.used += amount
        return slot.used

    async def seed(self, bucket: Bucket, used: int) -> int:
        current = self._used_now(bucket)
        if used > current:
            self._slot(bucket).used = current = used
        return current

    async def commit(self, reservation: Reservation) -> None:
        self.settle_nowait(reservation, True)

    async def refund(self, reservation: Reservation) -> None:
        self.settle_nowait(reservation, False)

    def settle_nowait(self, reservation: Reservation, keep: bool) -> bool:
        return self.settle_taken_nowait(reservation[0], reservation[1], reservation[2], keep)

    def settle_taken_nowait(self, bucket: Bucket, cost: int, member: str, keep: bool) -> bool:
        slot = self._slots.get(bucket)
        if not keep:
            if slot is None or slot.leases.pop(member, None) is None:
                self._expired.pop((bucket, member), None)  # already given back when its lease expired
            else:
                slot.used = max(0, slot.used - cost)
            return True
        # The commit, here rather than in a method of its own: it ends every admitted request.
        if slot is not None and slot.leases.pop(member, None) is not None:
            slot.commits += cost
        # The lease expired and was given back: the creation happened, so count it again (once).
        elif self._expired.pop((bucket, member), None) is not None:
            slot = self._slot(bucket)
            slot.used += cost
            slot.commits += cost
        return True

    def settle_all_nowait(self, reservations: Sequence[Reservation], keep: bool) -> bool:
        settle = self.settle_nowait
        for reservation in reservations:
            settle(reservation, keep)
        return True

    async def release(self, bucket: Bucket, cost: int) -> int:
        slot = self._purged(bucket)
        slot.used = max(0, slot.used - cost)
        return slot.used

    async def usage(self, bucket: Bucket) -> int:
        return self._used_now(bucket)

    async def inspect(self, bucket: Bucket) -> BucketUsage:
        now = int(self._clock() * 1000)
        slot = self._slots.get(bucket)
        if slot is None:
            return BucketUsage(bucket, 0)
        live = [cost for expires, cost in slot.leases.values() if expires > now]
        expired = sum(cost for expires, cost in slot.leases.values() if expires <= now)
        return BucketUsage(bucket, max(0, slot.used - expired), sum(live), len(live))

    async def buckets(self, project: str) -> list[BucketUsage]:
        # A scan of every bucket: for operators, never on the request path.
        now = int(self._clock() * 1000)
        found = [b for b in self._slots if b.project == project and not 0 < b.expires_ms <= now]
        return [await self.inspect(bucket) for bucket in sorted(found, key=_order)]

    async def set_usage(self, bucket: Bucket, value: int, *, commits_since: int | None = None) -> None:
        slot = self._purged(bucket)
        since = 0 if commits_since is None else slot.commits - commits_since
        slot.used = value + since + sum(cost for _, cost in slot.leases.values())

    async def commits(self, bucket: Bucket) -> int:
        slot = self._slots.get(bucket)
        return 0 if slot is None else slot.commits

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
