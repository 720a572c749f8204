"""The embedded store: one process, no server.

Every method runs without awaiting anything in between, so on one event loop each call is its own
critical section: no lock is needed for check-and-reserve to be atomic. (It is not thread-safe;
ASGI apps run on one loop.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import Bucket, Decision, Reservation, Store, new_member


class MemoryStore(Store):
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._used: dict[Bucket, int] = {}
        # bucket -> {member: (expires_ms, cost)}; a bucket's dict is dropped once empty.
        self._leases: dict[Bucket, dict[str, tuple[int, int]]] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _purge(self, bucket: Bucket, now_ms: int) -> int:
        leases = self._leases.get(bucket)
        used = self._used.get(bucket, 0)
        if leases:
            expired = [m for m, (exp, _) in leases.items() if exp <= now_ms]
            for member in expired:
                used -= leases.pop(member)[1]
            if not leases:
                del self._leases[bucket]
            used = max(0, used)
            self._used[bucket] = used
        return used

    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int) -> Decision:
        now = self._now_ms()
        used = self._purge(bucket, now)
        if 0 <= limit < used + cost:
            return Decision(False, used, limit)
        used += cost
        self._used[bucket] = used
        reservation = Reservation(bucket, cost, new_member(cost), now + lease_ms)
        self._leases.setdefault(bucket, {})[reservation.member] = (reservation.expires_ms, cost)
        return Decision(True, used, limit, reservation)

    async def commit(self, reservation: Reservation) -> None:
        leases = self._leases.get(reservation.bucket)
        if leases is not None and leases.pop(reservation.member, None) is not None:
            if not leases:
                del self._leases[reservation.bucket]
            return
        # The lease expired and was given back: the creation happened, so count it again.
        self._used[reservation.bucket] = self._used.get(reservation.bucket, 0) + reservation.cost

    async def refund(self, reservation: Reservation) -> None:
        leases = self._leases.get(reservation.bucket)
        if leases is None or leases.pop(reservation.member, None) is None:
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

    async def set_usage(self, bucket: Bucket, value: int) -> None:
        self._purge(bucket, self._now_ms())
        self._used[bucket] = value + sum(cost for _, cost in self._leases.get(bucket, {}).values())
