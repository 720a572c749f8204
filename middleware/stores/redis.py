"""Usage in Redis, shared by every worker and host.

All operations one process issues within one event-loop tick (and while the previous round trip
is in flight) go to Redis as a single script call: one round trip decides a whole batch of
requests, atomically and in order. At low load a batch holds one operation and costs one round
trip; under load the Redis cost per request falls. Only one batch is in flight at a time, so a
later operation (a usage read, say) always sees the settlements handed over before it.

Commits and refunds are handed over without waiting for the answer: the response is already on
its way and the lease protects the count if the settlement is lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ..errors import StoreError
from ..keys import counter_keys
from .base import Bucket, Decision, Reservation, Store, new_member

logger = logging.getLogger("middleware.store")

SETTLEMENT_LOST = "quota settlement was not applied; the lease will settle it: %s"
BATCH_SCRIPT = resources.files(__package__).joinpath("lua/batch.lua").read_text()
UNLOCK_SCRIPT = resources.files(__package__).joinpath("lua/unlock.lua").read_text()
#: Operations per script call: bounds the time one call blocks Redis.
MAX_BATCH = 256



class _Op(NamedTuple):
    counter: str
    leases: str
    kind: str
    member: str
    amount: int
    limit: int
    lease_until: int
    expires: int
    #: None for settlements, which nobody waits for.
    future: asyncio.Future[tuple[int, int]] | None


def _op(prefix: str, bucket: Bucket, kind: str, amount: int, limit: int, member: str = "", lease_until: int = 0,
        future: asyncio.Future[tuple[int, int]] | None = None) -> _Op:
    counter, leases = _keys(prefix, bucket)
    return _Op(counter, leases, kind, member or "-", amount, limit, lease_until, bucket.expires_ms, future)


@functools.lru_cache(maxsize=16_384)
def _keys(prefix: str, bucket: Bucket) -> tuple[str, str]:
    # Percent-encoding is the costliest part of building an operation; hot buckets repeat.
    window = None if bucket.window is None else int(bucket.window.start)
    return counter_keys(prefix, bucket.project, bucket.resource, window)


def _fail(op: _Op, error: StoreError) -> None:
    if op.future is None:
        logger.warning(SETTLEMENT_LOST, error)
    elif not op.future.done():
        op.future.set_exception(error)


class RedisStore(Store):
    shares_cache = True

    def __init__(self, redis: str | aioredis.Redis | RedisCluster, *, prefix: str = "quota:",
                 timeout: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        if isinstance(redis, str):
            redis = aioredis.Redis.from_url(redis, socket_timeout=timeout, socket_connect_timeout=timeout)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = redis
        self.prefix = prefix
        self.timeout = timeout
        self._clock = clock
        # register_script does no I/O; each call tries EVALSHA and reloads the script on NOSCRIPT.
        self._script = redis.register_script(BATCH_SCRIPT)
        self._unlock_script = redis.register_script(UNLOCK_SCRIPT)
        self._cluster = isinstance(redis, RedisCluster)
        self._queue: list[_Op] = []
        self._worker: asyncio.Task[None] | None = None

    # -- the contract ---------------------------------------------------------------------------

    async def reserve(self, bucket: Bucket, cost: int, limit: int, lease_ms: int) -> Decision:
        member = new_member(cost)
        lease_until = int(self._clock() * 1000) + lease_ms
        flag, used = await self._call(bucket, "r", cost, limit, member, lease_until)
        if flag != 1:
            return Decision(False, used, limit)
        return Decision(True, used, limit, Reservation(bucket, cost, member, lease_until))

    async def check(self, bucket: Bucket, limit: int) -> Decision:
        flag, used = await self._call(bucket, "m", 0, limit)
        return Decision(flag == 1, used, limit)

    async def charge(self, bucket: Bucket, amount: int) -> int:
        return (await self._call(bucket, "a", amount))[1]

    async def seed(self, bucket: Bucket, used: int) -> int:
        return (await self._call(bucket, "x", used))[1]

    async def commit(self, reservation: Reservation) -> None:
        self._enqueue(_op(self.prefix, reservation.bucket, "c", reservation.cost, 0, reservation.member))

    async def refund(self, reservation: Reservation) -> None:
        self._enqueue(_op(self.prefix, reservation.bucket, "f", reservation.cost, 0, reservation.member))

    async def release(self, bucket: Bucket, cost: int) -> int:
        return (await self._call(bucket, "l", cost))[1]

    async def usage(self, bucket: Bucket) -> int:
        return (await self._call(bucket, "u", 0))[1]

    async def set_usage(self, bucket: Bucket, value: int) -> None:
        await self._call(bucket, "s", value)

    async def load_shared(self, key: str) -> bytes | None:
        return await self._guard(self.client.get(key))  # type: ignore[no-any-return]

    async def save_shared(self, key: str, blob: bytes, ttl_ms: int) -> None:
        await self._guard(self.client.set(key, blob, px=max(1, ttl_ms)))

    async def try_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._guard(self.client.set(key, token, nx=True, px=max(1, ttl_ms))))

    async def unlock(self, key: str, token: str) -> None:
        await self._guard(self._unlock_script(keys=[key], args=[token]))

    async def flush(self) -> None:
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def aclose(self) -> None:
        await self.flush()
        if self._owns_client:
            await self.client.aclose()

    # -- batching -------------------------------------------------------------------------------

    async def _call(self, bucket: Bucket, kind: str, amount: int, limit: int = 0, member: str = "",
                    lease_until: int = 0) -> tuple[int, int]:
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._enqueue(_op(self.prefix, bucket, kind, amount, limit, member, lease_until, future))
        return await future

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        # Started with create_task, so it first runs after the current tick: everything enqueued
        # in that tick, and during each round trip, travels together.
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            groups = self._by_slot(batch) if self._cluster else [batch]
            await asyncio.gather(*(self._send(group) for group in groups))

    def _by_slot(self, batch: list[_Op]) -> list[list[_Op]]:
        # On a cluster one script call may only touch one hash slot; keys of a project share one.
        groups: dict[int, list[_Op]] = {}
        for op in batch:
            groups.setdefault(key_slot(op.counter.encode()), []).append(op)
        return list(groups.values())

    async def _send(self, ops: Sequence[_Op]) -> None:
        keys: list[str] = []
        args: list[Any] = [int(self._clock() * 1000)]
        for op in ops:
            keys += (op.counter, op.leases)
            args.append(f"{op.kind} {op.member} {op.amount} {op.limit} {op.lease_until} {op.expires}")
        try:
            reply = await self._guard(self._script(keys=keys, args=args))
            if not isinstance(reply, list) or len(reply) != 2 * len(ops):
                raise StoreError(f"store script answered {reply!r:.80} for {len(ops)} operations")
        except StoreError as exc:
            for op in ops:
                _fail(op, exc)
            return
        for i, op in enumerate(ops):
            flag, used = reply[2 * i], reply[2 * i + 1]
            if flag == -1:
                _fail(op, StoreError(f"store script failed: {_text(used)}"))
            elif op.future is None:
                continue
            elif op.future.cancelled():
                # The caller went away while its reservation was in flight: give it straight back.
                if op.kind == "r" and flag == 1:
                    self._enqueue(op._replace(kind="f", future=None))
            elif not op.future.done():
                op.future.set_result((flag, used))

    async def _guard(self, awaitable: Any) -> Any:
        """Bound every Redis call in time and turn its failures into StoreError."""
        try:
            async with asyncio.timeout(self.timeout):
                return await awaitable
        except TimeoutError as exc:
            raise StoreError(f"Redis did not answer within {self.timeout}s") from exc
        except redis_errors.RedisError as exc:
            raise StoreError(f"Redis failed: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"Redis unreachable: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
