"""Local leases: admit most requests in process, from blocks of quota reserved in the store.

While a project is far from its limit, a worker reserves a *block* of quota in the inner store (one
reservation of many units, with a lease) and admits requests from it with no round trip. Blocks
are sized as a small fraction of what remains, so they shrink as the project nears its limit; once
a block would be too small to matter every decision goes to the inner store, one by one. A block
admits for ``block_seconds``; then, once its requests have settled, it is settled in the store:
the units its requests kept are committed and the rest given back. A killed worker's block expires
with its lease like any other reservation.

What this trades: the store counts whole blocks while they are open, so other workers may refuse a
request for a moment while this one still holds unused units (never the other way round: nothing
is ever admitted past the limit), usage read from the store includes open blocks, and the
``RateLimit`` remaining value is this worker's estimate. Do not use it where every single
admission must be decided centrally; it is off unless you ask for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from ..errors import StoreError
from ..nowait import nowait_usable
from .base import Bucket, BucketUsage, Claim, Decision, Reservation, Store, Taken, decision_of, new_id

logger = logging.getLogger("quota_middleware.store")

_LOCAL = "~"  # starts the members of reservations taken from a local block (never the inner store's)


@dataclass(eq=False, slots=True)
class _Block:
    id: str
    bucket: Bucket
    limit: int
    reservation: Reservation
    #: Store usage right after the block was granted (the block included).
    used_at_grant: int
    committed: int = 0
    inflight: int = 0
    open: bool = True

    @property
    def available(self) -> int:
        return self.reservation.cost - self.committed - self.inflight


class LeasingStore(Store):
    def __init__(self, inner: Store, *, divisor: int = 64, max_block: int = 1000, block_seconds: float = 1.0,
                 max_buckets: int = 16_384) -> None:
        self.inner = inner
        self._inner_settles_nowait = nowait_usable(inner, "settle_nowait", "commit", "refund")
        self._inner_settles_all_nowait = nowait_usable(inner, "settle_all_nowait", "settle_nowait", "commit", "refund")
        #: A block is at most 1/divisor of what remains in the store.
        self.divisor = divisor
        self.max_block = max_block
        self.block_seconds = block_seconds
        self._open: dict[Bucket, _Block] = {}
        self._unsettled: dict[str, _Block] = {}
        #: Reservations taken from blocks and not settled yet: member -> (block, cost).
        self._lent: dict[str, tuple[_Block, int]] = {}
        # "~0", "~1", ...: made in C, no formatting of ours per reservation.
        self._members = map(_LOCAL.__add__, map(str, itertools.count()))
        self._granting: dict[Bucket, asyncio.Future[None]] = {}
        #: Store usage last seen per bucket, to size its next block. Bounded: one entry per bucket
        #: ever seen would grow with every project; a bucket that fell out is decided in the store
        #: once more before it is leased again.
        self._last_used: LRUCache[Bucket, int] = LRUCache(maxsize=max_buckets)
        self._tasks: set[asyncio.Task[None]] = set()
        self._settling: dict[Bucket, asyncio.Task[None]] = {}

    # -- admission ------------------------------------------------------------------------------

    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> Decision:
        taken = self.reserve_nowait(bucket, cost, limit)
        if taken is not None:
            return taken
        settling = self._settling.get(bucket)
        if settling is not None:  # a block just closed: its unused units go back before we decide
            await asyncio.shield(settling)
        granting = self._granting.get(bucket)
        if granting is not None:  # another request is fetching a block for this bucket: share it
            await asyncio.shield(granting)
            taken = self.reserve_nowait(bucket, cost, limit)
            if taken is not None:
                return taken
        size = self._block_size(bucket, limit)
        if size >= 2 * cost and granting is None:
            taken = await self._grant(bucket, size, cost, limit, lease_ms, scale)
            if taken is not None:
                return taken
        decision = await self.inner.reserve(bucket, cost, limit, lease_ms, scale)
        self._last_used[bucket] = decision.used
        return decision

    def _block_size(self, bucket: Bucket, limit: int) -> int:
        if limit < 0:
            return self.max_block
        used = self._last_used.get(bucket)
        if used is None:
            return 0  # know where the project stands before leasing anything
        return min(self.max_block, (limit - used) // self.divisor)

    def reserve_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int = 0,
                       scale: int = 1) -> Decision | None:
        """Admit from the bucket's open block, in process; None when there is none or it falls short."""
        taken = self.take_nowait(bucket, cost, limit)
        return None if taken is None else decision_of(bucket, cost, taken)

    def take_nowait(self, bucket: Bucket, cost: int, limit: int, lease_ms: int = 0, scale: int = 1) -> Taken | None:
        block = self._open.get(bucket)
        if block is None:
            return None
        available = block.available
        if block.limit != limit or available < cost:
            self._close(block)  # a changed limit, or not enough left: no more admissions from it
            return None
        block.inflight += cost
        member = next(self._members)
        self._lent[member] = (block, cost)
        return block.used_at_grant - available + cost, limit, member, block.reservation.expires_ms

    async def _grant(self, bucket: Bucket, size: int, cost: int, limit: int, lease_ms: int,
                     scale: int) -> Decision | None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._granting[bucket] = done
        try:
            decision = await self.inner.reserve(bucket, size, limit, lease_ms + int(self.block_seconds * 1000), scale)
        finally:
            del self._granting[bucket]
            done.set_result(None)
        self._last_used[bucket] = decision.used
        if not decision.admitted or decision.reservation is None or decision.limit != limit:
            if decision.reservation is not None:  # an override changed the limit: decide one by one
                await self.inner.refund(decision.reservation)
            return None
        block = _Block(new_id(), bucket, limit, decision.reservation, decision.used)
        previous = self._open.get(bucket)
        if previous is not None:
            self._close(previous)
        self._open[bucket] = block
        self._unsettled[block.id] = block
        asyncio.get_running_loop().call_later(self.block_seconds, self._close, block)
        return self.reserve_nowait(bucket, cost, limit)

    # -- settlement -----------------------------------------------------------------------------

    async def commit(self, reservation: Reservation) -> None:
        if not self.settle_nowait(reservation, True):
            await self.inner.commit(reservation)

    async def refund(self, reservation: Reservation) -> None:
        if not self.settle_nowait(reservation, False):
            await self.inner.refund(reservation)

    def settle_nowait(self, reservation: Reservation, keep: bool) -> bool:
        """Settle a reservation taken from a local block (in process); False for the inner store's own."""
        if self.settle_taken_nowait(reservation.bucket, reservation.cost, reservation.member, keep):
            return True
        return self._inner_settles_nowait and self.inner.settle_nowait(reservation, keep)

    def settle_taken_nowait(self, bucket: Bucket, cost: int, member: str, keep: bool) -> bool:
        """Settle a reservation taken from a local block; False for any other."""
        lent = self._lent.pop(member, None)
        if lent is None:
            return False
        block, cost = lent  # what it took, whatever the caller says
        block.inflight -= cost  # refunded: back to the block's available units
        if keep:
            block.committed += cost
        if not block.open:
            self._settle_if_done(block)
        return True

    def settle_all_nowait(self, reservations: Sequence[Reservation], keep: bool) -> bool:
        """A group's reservations are the inner store's (reserve_all is its own)."""
        if not self._inner_settles_all_nowait or any(reservation.member in self._lent for reservation in reservations):
            return False
        return self.inner.settle_all_nowait(reservations, keep)

    def _close(self, block: _Block) -> None:
        if block.open:
            block.open = False
            if self._open.get(block.bucket) is block:
                del self._open[block.bucket]
        self._settle_if_done(block)

    def _settle_if_done(self, block: _Block) -> None:
        if block.open or block.inflight or self._unsettled.pop(block.id, None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._settle(block))
        self._tasks.add(task)
        self._settling[block.bucket] = task
        task.add_done_callback(lambda t: self._forget(block.bucket, t))

    def _forget(self, bucket: Bucket, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._settling.get(bucket) is task:
            del self._settling[bucket]

    async def _settle(self, block: _Block) -> None:
        """Keep what the block's requests kept; give the rest back."""
        unused = block.reservation.cost - block.committed
        try:
            await self.inner.commit(block.reservation)
            if unused:
                used = await self.inner.release(block.bucket, unused)
                self._last_used[block.bucket] = used
        except StoreError as exc:
            logger.warning("could not settle a block of project %r (its lease will): %s", block.bucket.project, exc)

    # -- the rest of the contract goes to the inner store -----------------------------------------

    async def usage(self, bucket: Bucket) -> int:
        held = sum(b.available for b in self._unsettled.values() if b.bucket == bucket)
        return max(0, await self.inner.usage(bucket) - held)

    async def inspect(self, bucket: Bucket) -> BucketUsage:
        return self._without_open_blocks(await self.inner.inspect(bucket))

    async def buckets(self, project: str) -> list[BucketUsage]:
        return [self._without_open_blocks(view) for view in await self.inner.buckets(project)]

    def _without_open_blocks(self, view: BucketUsage) -> BucketUsage:
        """The store counts a block whole while it is open: what its requests have not taken is not in use."""
        held = sum(b.available for b in self._unsettled.values() if b.bucket == view.bucket)
        return view._replace(used=max(0, view.used - held), reserved=max(0, view.reserved - held))

    def reserve_all(  # type: ignore[override]  # the inner store's awaitable, no coroutine of ours
            self, claims: Sequence[Claim], lease_ms: int) -> Awaitable[list[Decision]]:
        # Several buckets at once are decided in the store: a block admits one bucket's requests.
        return self.inner.reserve_all(claims, lease_ms)

    async def check(self, bucket: Bucket, limit: int, scale: int = 1) -> Decision:
        return await self.inner.check(bucket, limit, scale)

    async def charge(self, bucket: Bucket, amount: int) -> int:
        return await self.inner.charge(bucket, amount)

    async def seed(self, bucket: Bucket, used: int) -> int:
        return await self.inner.seed(bucket, used)

    async def release(self, bucket: Bucket, cost: int) -> int:
        return await self.inner.release(bucket, cost)

    async def set_usage(self, bucket: Bucket, value: int, *, commits_since: int | None = None) -> None:
        await self.inner.set_usage(bucket, value, commits_since=commits_since)

    async def commits(self, bucket: Bucket) -> int:
        return await self.inner.commits(bucket)

    async def overrides(self, project: str) -> dict[str, int]:
        return await self.inner.overrides(project)

    async def set_overrides(self, project: str, values: dict[str, int | None], *, replace: bool = False) -> None:
        await self.inner.set_overrides(project, values, replace=replace)

    async def overridden_projects(self) -> list[str]:
        return await self.inner.overridden_projects()

    def on_data_loss(self, callback: Callable[[], Any], *, heal: bool = False) -> None:
        self.inner.on_data_loss(callback, heal=heal)

    async def flush(self) -> None:
        """Close every block; settle those whose requests are done; then flush the inner store."""
        for block in list(self._open.values()):
            self._close(block)
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
        await self.inner.flush()

    async def aclose(self) -> None:
        await self.flush()
        await self.inner.aclose()
