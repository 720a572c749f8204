"""Usage in Redis, shared by every worker and host.

All operations one process issues within one event-loop tick (and while earlier round trips are
in flight) go to Redis as a single script call: one round trip decides a whole batch of
requests, atomically and in order. At low load a batch holds one operation and costs one round
trip; under load the Redis cost per request falls. On one Redis, calls travel on one connection
(up to ``pipeline`` in flight at once), which Redis runs in the order they were written, so a
later operation (a usage read, say) always sees the settlements handed over before it. (On a
cluster, one batch at a time, split by hash slot.)

Commits and refunds are handed over without waiting for the answer: the response is already on
its way. The commits of one bucket and cost travel as one operation per call (see _take). Every
settlement (commit, refund, release) is idempotent in the script, so one that fails
(Redis down, a timeout, a write Redis refused: out of memory, read-only) is sent again, with a
back-off, until Redis applies it (they wait in the process's memory: they survive an outage, not a
restart of the worker). Until then the reservation's lease holds the count; a commit that arrives
after its lease expired counts the creation again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple, cast
from urllib.parse import unquote

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from hiredis import pack_command
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from ..errors import ConfigurationError, StoreError
from ..keys import (
    commits_key,
    counter_keys,
    escape,
    member,
    member_cost,
    member_id,
    overridden_projects_key,
    overrides_key,
    parse_counter_key,
    parse_quotas_key,
    project_pattern,
    shared_key,
)
from ..windows import Window
from .base import (
    WINDOW_GRACE_MS,
    Bucket,
    BucketUsage,
    Claim,
    ClaimLike,
    Decision,
    Reservation,
    SharedPart,
    SharedState,
    Store,
    Taken,
    new_id,
    new_member,
)
from .batch_connection import BatchConnection, PooledConnection
from .integrity import IntegrityWatch

logger = logging.getLogger("middleware.store")

SETTLEMENT_DELAYED = "quota settlements could not be applied (%s); sending them again in %.1fs"
SETTLEMENT_LOST = "gave up on a quota settlement (%s): %s"
#: Failed settlements are sent again with a back-off from RETRY_MIN to RETRY_MAX seconds, for at
#: most RETRY_FOR seconds (well within the day the script remembers settled members).
RETRY_MIN, RETRY_MAX, RETRY_FOR = 0.1, 5.0, 6 * 3600.0
MAX_RETRY_QUEUE = 100_000
#: The script's flag for an operation Redis refused to write (see batch.lua): sent again.
REFUSED = -2
MAX_CALLS_IN_FLIGHT = 32
#: Groups of claims formatted for the script, at most (see reserve_all).
MAX_GROUPS = 4096
BATCH_SCRIPT = resources.files(__package__).joinpath("lua/batch.lua").read_text()
UNLOCK_SCRIPT = resources.files(__package__).joinpath("lua/unlock.lua").read_text()
OVERRIDES_SCRIPT = resources.files(__package__).joinpath("lua/overrides.lua").read_text()
LOAD_BATCH_SCRIPT = pack_command(cast(Any, ("SCRIPT", "LOAD", BATCH_SCRIPT)))  # hiredis's stub: a 1-tuple
# What an operation does, as batch.lua knows it: one letter on the wire (see the script's header).
RESERVE, COMMIT, REFUND, RELEASE, USAGE = "r", "c", "f", "l", "u"
#: A reserve in several buckets at once, all or nothing: one operation (see _Group); and the
#: commit or refund of every reservation it made, one operation too.
GROUP, COMMIT_GROUP, REFUND_GROUP = "G", "C", "F"
RESERVING = (RESERVE, GROUP)
SET_USAGE, COMMITS, METER, CHARGE, SEED = "s", "k", "m", "a", "x"
#: The operations an operator's override applies to.
_OVERRIDABLE = frozenset((RESERVE, METER))
#: Operations per script call: bounds the time one call blocks Redis.
MAX_BATCH = 256
#: With ``pipeline`` > 1, the first call from idle takes only a share of what waits (at least
#: FIRST_CALL_MIN operations): its answers come back, and their requests get going again, while
#: Redis still runs the rest.
FIRST_CALL_MIN = 8



class _Op(NamedTuple):
    #: counter, leases, settled, overrides, commits: every key of the bucket, in the script's order.
    keys: tuple[str, str, str, str, str]
    kind: str
    member: str
    amount: int
    limit: int
    lease_until: int
    #: "<key expiry> <scale> <field>": the operation's last fields, the same for every request of
    #: its bucket (field: the resource's in the overrides hash, "-" where no override can apply).
    tail: str
    #: None for settlements, which nobody waits for.
    future: asyncio.Future[Any] | None
    #: Settlements are sent again until Redis applies them (each is idempotent); since when.
    retry_since: float | None = None
    #: A reserve's bucket: its future is answered with the Decision itself.
    bucket: Bucket | None = None
    #: A group's buckets (kind GROUP; member is the group's id): answered with their Decisions.
    group: _Group | None = None
    #: A take (see RedisStore.take and take_all): answered in plain values instead.
    plain: bool = False


class _Group(NamedTuple):
    """The buckets of a group, made once per claims (see _group_of)."""

    #: Every bucket's five keys, one bucket after another.
    keys: tuple[str, ...]
    buckets: tuple[Bucket, ...]
    costs: tuple[int, ...]
    #: What follows the group's id in each bucket's lease member: ":<cost>" (see keys.member).
    suffixes: tuple[str, ...]
    #: "<n> <amount limit key-expiry scale field>;..." : the operation's fields after its id and
    #: lease expiry, the same for every request of these claims.
    tail: str
    #: "<n> <amount key-expiry>;...": the fields of its settlement after its id.
    settle_tail: str


def _op(prefix: str, bucket: Bucket, kind: str, amount: int, limit: int, member: str = "", lease_until: int = 0,
        future: asyncio.Future[Any] | None = None, retry_since: float | None = None,
        scale: int = 1, taking: bool = False) -> _Op:
    keys, field, expires, overridable, plain = _keys(prefix, bucket)
    if kind not in _OVERRIDABLE:
        field, tail = "-", plain
    else:
        tail = overridable
    if scale != 1:
        tail = f"{expires} {scale} {field}"
    # tuple.__new__: a named tuple's own constructor is a Python function; two or more per request.
    return tuple.__new__(_Op, (keys, kind, member or "-", amount, limit, lease_until, tail, future, retry_since,
                               bucket if kind == RESERVE else None, None, taking))


def _refused(claim: Claim, decision: Decision | None) -> Decision:
    """A claim of a group that was refused: not admitted, its usage without this request."""
    if decision is None:  # in a slot never asked
        return Decision(False, 0, claim.limit)
    used = decision.used - claim.cost if decision.admitted else decision.used
    return Decision(False, used, decision.limit)


def _reserved(op: _Op, flag: int, used: int, limit: int) -> Decision:
    """A single reserve's answer: admitted, it holds its reservation."""
    if flag != 1:
        return Decision(False, used, limit)
    # tuple.__new__: half the cost of a named tuple's own constructor, on every request.
    return tuple.__new__(Decision, (True, used, limit, tuple.__new__(Reservation, (op.bucket, op.amount, op.member,
                                                                                 op.lease_until))))


def _group_of(prefix: str, claims: Sequence[ClaimLike]) -> _Group:
    """The claims of one request as a group operation's parts: formatted once, sent for each request."""
    keys: list[str] = []
    parts: list[str] = []
    settling: list[str] = []
    for bucket, cost, limit, scale in claims:
        bucket_keys, field, expires, _, _ = _keys(prefix, bucket)
        keys += bucket_keys
        parts.append(f"{cost} {limit} {expires} {scale} {field}")
        settling.append(f"{cost} {expires}")
    return _Group(tuple(keys), tuple(c[0] for c in claims), tuple(c[1] for c in claims),
                  tuple(member("", c[1]) for c in claims), f"{len(claims)} {';'.join(parts)}",
                  f"{len(claims)} {';'.join(settling)}")


@functools.lru_cache(maxsize=16_384)
def _encoded(keys: tuple[str, ...]) -> bytes:
    """A bucket's keys (a group's) as the arguments of a command in Redis's protocol."""
    return b"".join(b"$%d\r\n%b\r\n" % (len(data), data) for data in (key.encode() for key in keys))


@functools.lru_cache(maxsize=16_384)
def _keys(prefix: str, bucket: Bucket) -> tuple[tuple[str, str, str, str, str], str, int, str, str]:
    """The bucket's keys, its field in the overrides hash, its keys' expiry, and an operation's
    tail (see _Op) at scale 1 where an override applies and where none does. Percent-encoding
    and formatting are the costliest parts of building an operation; hot buckets repeat."""
    window = None if bucket.window is None else int(bucket.window.start)
    counter, leases, settled = counter_keys(prefix, bucket.project, bucket.resource, window)
    keys = (counter, leases, settled, overrides_key(prefix, bucket.project),
            commits_key(prefix, bucket.project, bucket.resource, window))
    field, expires = escape(bucket.resource), bucket.expires_ms
    return keys, field, expires, f"{expires} 1 {field}", f"{expires} 1 -"




class RedisStore(Store, SharedState):

    def __init__(self, redis: str | aioredis.Redis | RedisCluster, *, prefix: str = "quota:",
                 timeout: float = 1.0, pipeline: int = 1, integrity_interval: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        if pipeline < 1:
            raise ConfigurationError(f"pipeline must be at least 1, got {pipeline!r}")
        if isinstance(redis, str):
            # No socket timeout (redis-py's default is 5 s): every call is bounded by ``timeout``
            # here (see _guard), and a socket timeout wraps each write and read in a task of its
            # own, which cost more worker CPU than the round trip itself.
            # A pooled connection Redis closed (an idle timeout, a restart) is not always noticed
            # before use (redis-py 8 skips the check while maintenance notifications are on):
            # once more on a new one. Those calls (shared blobs, locks, overrides) bear a repeat.
            redis = aioredis.Redis.from_url(redis, socket_timeout=None, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 1),
                                            retry_on_error=[redis_errors.ConnectionError])
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = redis
        self.prefix = prefix
        self.timeout = timeout
        #: Script calls in flight at once on one Redis. More than one only pays where the worker
        #: would otherwise sit idle through a round trip and the machine has CPU to spare: each
        #: extra call makes batches smaller, and a batch's fixed cost is most of a call's. On this
        #: project's 2-core machine (bench/builds.py, interleaved rounds) 1 was as fast as 3 with one
        #: uvicorn worker and 7% faster with two.
        self.pipeline = pipeline
        self._clock = clock
        # register_script does no I/O; each call tries EVALSHA and reloads the script on NOSCRIPT.
        self._script = redis.register_script(BATCH_SCRIPT)
        self._evalsha = b"$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % self._script.sha.encode()
        self._unlock_script = redis.register_script(UNLOCK_SCRIPT)
        self._overrides_script = redis.register_script(OVERRIDES_SCRIPT)
        self._cluster = isinstance(redis, RedisCluster)
        # On one Redis the batches travel on a connection held from the client's pool and taken
        # over (see batch_connection.py), past redis-py's retry, instrumentation and read layers,
        # which cost several times the round trip's own CPU.
        self._batch_connection: BatchConnection | PooledConnection | None = None
        self._connecting = asyncio.Lock()
        self._queue: list[_Op] = []
        #: Commits handed over since the last call, by bucket and cost or by group (its id): the
        #: operation that will carry them, and their lease members or group ids (see _take).
        self._commits: dict[tuple[Bucket, int] | int, tuple[_Op, list[str]]] = {}
        self._groups: dict[int, tuple[Sequence[Claim], _Group]] = {}
        #: Admitted groups not settled yet, by id (see settle_all_nowait).
        self._held: dict[str, _Group] = {}
        self._worker: asyncio.Task[None] | None = None
        self._retry: list[_Op] = []
        self._retry_delay = RETRY_MIN
        self._retry_timer: asyncio.TimerHandle | None = None
        # A cluster client refuses, rather than waits for, a connection past its pool's size.
        self._sending = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        #: Notices a Redis that lost its data (see integrity.py); checked alongside the batches.
        self.integrity = IntegrityWatch(redis, prefix, interval=integrity_interval)

    # -- the contract ---------------------------------------------------------------------------

    def reserve(  # type: ignore[override]  # an awaitable, as the contract asks, but not a coroutine
            self, bucket: Bucket, cost: int, limit: int, lease_ms: int, scale: int = 1) -> asyncio.Future[Decision]:
        """Not a coroutine: the caller awaits the future that _send answers with the Decision
        itself, one frame fewer for the answer to pass through on every request."""
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._enqueue(_op(self.prefix, bucket, RESERVE, cost, limit, new_member(cost),
                          int(self._clock() * 1000) + lease_ms, future, scale=scale))
        return future

    def take(self, bucket: Bucket, cost: int, limit: int, lease_ms: int,
             scale: int = 1) -> asyncio.Future[Taken | None]:
        """``reserve`` answered in plain values (see Store.take): the future _send answers with
        the Taken, or None when refused."""
        future: asyncio.Future[Taken | None] = asyncio.get_running_loop().create_future()
        self._enqueue(_op(self.prefix, bucket, RESERVE, cost, limit, new_member(cost),
                          int(self._clock() * 1000) + lease_ms, future, scale=scale, taking=True))
        return future

    def reserve_all(  # type: ignore[override]  # an awaitable, as the contract asks (see reserve)
            self, claims: Sequence[Claim], lease_ms: int) -> Awaitable[list[Decision]]:
        if not claims:  # nothing to decide: no operation (a cluster would find no slot for it)
            nothing: asyncio.Future[list[Decision]] = asyncio.get_running_loop().create_future()
            nothing.set_result([])
            return nothing
        if len(claims) == 1:
            return self._reserve_one(claims[0], lease_ms)
        if self._cluster and len({self._slot(claim.bucket) for claim in claims}) > 1:
            return self._reserve_slot_by_slot(claims, lease_ms)
        # One operation for the group, answered with every decision at once (see _send).
        return self._reserve_group(claims, lease_ms, False)

    def take_all(self, claims: Sequence[ClaimLike], lease_ms: int) -> asyncio.Future[list[Taken] | None] | None:
        """``reserve_all`` answered in plain values (see Store.take_all): one operation, whose future
        _send answers with a Taken per claim, or None when refused. None: claims of several hash
        slots on a cluster (reserve_all reserves them slot by slot)."""
        if not claims or self._cluster and len({self._slot(claim[0]) for claim in claims}) > 1:
            return None
        return self._reserve_group(claims, lease_ms, True)

    def _reserve_group(self, claims: Sequence[ClaimLike], lease_ms: int, plain: bool) -> asyncio.Future[Any]:
        """Enqueue the claims' group operation; its future is answered with their Decisions, or
        (``plain``: a take) their Taken values or None (see _answer_group)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        group = self._group(claims)
        self._enqueue(tuple.__new__(_Op, (group.keys, GROUP, new_id(), 0, 0, int(self._clock() * 1000) + lease_ms,
                                          "", future, None, None, group, plain)))
        return future

    def _group(self, claims: Sequence[ClaimLike]) -> _Group:
        """The claims as a group operation's parts. The engine passes a plan's very claims on every
        request of the plan: their keys and fields are formatted once (looked up by identity, which
        costs no hashing of the claims)."""
        known = self._groups.get(id(claims))
        if known is not None and known[0] is claims:
            return known[1]
        group = _group_of(self.prefix, claims)
        if isinstance(claims, tuple):  # a plan's (a list is made for one call: not kept)
            if len(self._groups) >= MAX_GROUPS:
                self._groups.clear()
            self._groups[id(claims)] = (claims, group)  # holding the claims: their id stays theirs
        return group

    async def _reserve_one(self, claim: Claim, lease_ms: int) -> list[Decision]:
        return [await self.reserve(claim.bucket, claim.cost, claim.limit, lease_ms, claim.scale)]

    async def _reserve_slot_by_slot(self, claims: Sequence[Claim], lease_ms: int) -> list[Decision]:
        """Buckets in several hash slots (a child and its parent on a cluster): no script can touch
        them all, so each slot's claims are reserved together, one slot after another, and a slot
        that refuses has the slots before it given back. Nothing is ever admitted past a limit; a
        request racing this one may be refused for a moment by a reservation about to be given
        back (a cost of spanning slots that one slot per tree would avoid)."""
        by_slot: dict[int, list[int]] = {}
        for i, claim in enumerate(claims):
            by_slot.setdefault(self._slot(claim.bucket), []).append(i)
        decisions: list[Decision | None] = [None] * len(claims)
        taken: list[Reservation] = []
        for indexes in by_slot.values():
            answers = await self.reserve_all([claims[i] for i in indexes], lease_ms)
            for i, decision in zip(indexes, answers, strict=True):
                decisions[i] = decision
            if not all(decision.admitted for decision in answers):
                for reservation in taken:
                    self.settle_nowait(reservation, False)
                return [_refused(claim, decision) for claim, decision in zip(claims, decisions, strict=True)]
            held = [decision.reservation for decision in answers if decision.reservation is not None]
            if len(held) > 1:  # a part of the request's group: its reservations are settled one by one
                self._held.pop(member_id(held[0].member), None)
            taken += held
        return [decision for decision in decisions if decision is not None]

    def _slot(self, bucket: Bucket) -> int:
        return key_slot(_keys(self.prefix, bucket)[0][0].encode())

    async def check(self, bucket: Bucket, limit: int, scale: int = 1) -> Decision:
        flag, used, limit = await self._call(bucket, METER, 0, limit, scale=scale)
        return Decision(flag == 1, used, limit)

    async def charge(self, bucket: Bucket, amount: int) -> int:
        return (await self._call(bucket, CHARGE, amount))[1]

    async def seed(self, bucket: Bucket, used: int) -> int:
        return (await self._call(bucket, SEED, used))[1]

    async def commit(self, reservation: Reservation) -> None:
        self.settle_nowait(reservation, True)

    async def refund(self, reservation: Reservation) -> None:
        self.settle_nowait(reservation, False)

    def settle_nowait(self, reservation: Reservation, keep: bool) -> bool:
        """Hand the settlement over; nobody waits for it (it is sent again until Redis applies it)."""
        return self.settle_taken_nowait(reservation.bucket, reservation.cost, reservation.member, keep)

    def settle_taken_nowait(self, bucket: Bucket, cost: int, member: str, keep: bool) -> bool:
        """settle_nowait of what ``take`` admitted (its member). Commits wait for the next call
        beside the others of their bucket and cost: one operation for them all (see _take)."""
        if not keep:
            self._enqueue(_op(self.prefix, bucket, REFUND, cost, 0, member, retry_since=time.monotonic()))
            return True
        waiting = self._commits.get((bucket, cost))
        if waiting is not None:
            waiting[1].append(member)
            return True
        self._commits[(bucket, cost)] = (_op(self.prefix, bucket, COMMIT, cost, 0), [member])
        self._wake()
        return True

    def settle_taken_all_nowait(self, claims: Sequence[ClaimLike], taken: Sequence[Taken], keep: bool) -> bool:
        """What ``take_all`` took, settled in one operation (as settle_all_nowait settles a group)."""
        self._settle_group(self._group(claims), member_id(taken[0][2]), keep)
        return True

    def _settle_group(self, group: _Group, group_id: str, keep: bool) -> None:
        """Hand over the settlement of a group's every reservation: one operation, sent again
        until Redis applies it (each bucket's settlement is idempotent). Commits wait for the next
        call beside the others of the same claims, as single commits do (see _take)."""
        if not keep:
            self._enqueue(_settlement(group, REFUND_GROUP, group_id))
            return
        waiting = self._commits.get(id(group))
        if waiting is not None:
            waiting[1].append(group_id)
            return
        # The operation holds the group: its id stays its own while it waits.
        self._commits[id(group)] = (_settlement(group, COMMIT_GROUP), [group_id])
        self._wake()

    def settle_all_nowait(self, reservations: Sequence[Reservation], keep: bool) -> bool:
        """A group's reservations, settled in one operation (sent again until Redis applies it: each
        bucket's settlement is idempotent). False for reservations of no group this store holds
        whole (of several groups, on a cluster): settle each."""
        group_id = member_id(reservations[0].member)
        group = self._held.pop(group_id, None)
        if group is None or len(group.costs) != len(reservations):
            return False
        self._settle_group(group, group_id, keep)
        return True

    async def release(self, bucket: Bucket, cost: int) -> int:
        """Give ``cost`` back; if Redis fails, the release is sent again until it is applied (once)."""
        future: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        self._enqueue(_op(self.prefix, bucket, RELEASE, cost, 0, new_id(), future=future,
                          retry_since=time.monotonic()))
        return (await future)[1]

    async def usage(self, bucket: Bucket) -> int:
        return (await self._call(bucket, USAGE, 0))[1]

    async def inspect(self, bucket: Bucket) -> BucketUsage:
        window = None if bucket.window is None else int(bucket.window.start)
        counter, leases, _ = counter_keys(self.prefix, bucket.project, bucket.resource, window)
        raw = await self._guard(self.client.get(counter))
        members = await self._guard(self.client.zrange(leases, 0, -1, withscores=True))
        try:
            used = 0 if raw is None else int(raw)
        except ValueError:
            raise StoreError(f"usage counter {counter} is not a number: {raw!r:.40}") from None
        now_ms = int(self._clock() * 1000)
        live = [member_cost(m) for m, expires in members if expires > now_ms]
        expired = sum(member_cost(m) for m, expires in members if expires <= now_ms)
        return BucketUsage(bucket, max(0, used - expired), sum(live), len(live))

    async def buckets(self, project: str) -> list[BucketUsage]:
        parsed = (parse_counter_key(self.prefix, project, key) for key in await self._scan(project))
        found = {bucket for bucket in parsed if bucket is not None}
        views = []
        for resource, start in sorted(found, key=lambda f: (f[0], -1 if f[1] is None else f[1])):
            window = None if start is None else Window(start, await self._window_end(project, resource, start))
            views.append(await self.inspect(Bucket(project, resource, window)))
        return views

    async def _scan(self, project: str) -> list[bytes]:
        async def scan() -> list[bytes]:
            return [key async for key in self.client.scan_iter(match=project_pattern(self.prefix, project), count=500)]

        # A scan takes several round trips: bounded as a whole, more generously than one call.
        return await self._guard(scan(), timeout=10 * self.timeout)  # type: ignore[no-any-return]

    async def _window_end(self, project: str, resource: str, start: int) -> float:
        """A window's end, from the expiry its keys were given (the end plus a grace; see Bucket)."""
        keys = counter_keys(self.prefix, project, resource, start)[:2]
        try:  # the very deadline the store gave the keys (Redis 7)
            at_ms = max([int(await self._guard(self.client.pexpiretime(key))) for key in keys])
        except StoreError:  # older Redis: what is left, on Redis's clock
            at_ms = max([int(await self._guard(self.client.pttl(key))) for key in keys])
            at_ms = at_ms + int(self._clock() * 1000) if at_ms >= 0 else at_ms
        if at_ms < 0:  # no expiry: not a key this store wrote
            return float(start)
        return (at_ms - WINDOW_GRACE_MS) / 1000

    async def set_usage(self, bucket: Bucket, value: int, *, commits_since: int | None = None) -> None:
        await self._call(bucket, SET_USAGE, value, member="-" if commits_since is None else str(commits_since))

    async def commits(self, bucket: Bucket) -> int:
        return (await self._call(bucket, COMMITS, 0))[1]

    async def overrides(self, project: str) -> dict[str, int]:
        raw = await self._guard(self.client.hgetall(overrides_key(self.prefix, project)))
        return {unquote(_text(k)): int(v) for k, v in raw.items()}

    async def set_overrides(self, project: str, values: dict[str, int | None], *, replace: bool = False) -> None:
        args: list[Any] = ["1" if replace else "0"]
        for resource, value in values.items():
            args += (escape(resource), "" if value is None else int(value))
        left = await self._guard(self._overrides_script(keys=[overrides_key(self.prefix, project)], args=args))
        # The index lives outside the project's slot: its own command, after the hash changed.
        index = overridden_projects_key(self.prefix)
        await self._guard(self.client.sadd(index, project) if left else self.client.srem(index, project))

    async def overridden_projects(self) -> list[str]:
        return sorted(_text(p) for p in await self._guard(self.client.smembers(overridden_projects_key(self.prefix))))

    # -- what the quota cache shares (SharedState) ------------------------------------------------

    async def load(self, project: str, namespace: str, part: SharedPart) -> bytes | None:
        return await self._guard(self.client.get(shared_key(self.prefix, project, namespace, part)))  # type: ignore[no-any-return]

    async def save(self, project: str, namespace: str, part: SharedPart, blob: bytes, ttl_ms: int) -> None:
        await self._guard(self.client.set(shared_key(self.prefix, project, namespace, part), blob, px=max(1, ttl_ms)))

    async def try_lock(self, project: str, namespace: str, token: str, ttl_ms: int) -> bool:
        key = shared_key(self.prefix, project, namespace, "lock")
        return bool(await self._guard(self.client.set(key, token, nx=True, px=max(1, ttl_ms))))

    async def namespaces(self, project: str) -> list[str]:
        found = (parse_quotas_key(self.prefix, project, key) for key in await self._scan(project))
        return sorted({namespace for namespace in found if namespace is not None})

    async def unlock(self, project: str, namespace: str, token: str) -> None:
        await self._guard(self._unlock_script(keys=[shared_key(self.prefix, project, namespace, "lock")], args=[token]))

    @property
    def pending_settlements(self) -> int:
        """Settlements waiting to be sent again (Redis failed or refused them); each commit of a
        line of commits counts."""
        return sum(_settlements(op) for op in self._retry)

    def on_data_loss(self, callback: Callable[[], Any], *, heal: bool = False) -> None:
        self.integrity.on_loss(callback, heal=heal)

    async def flush(self) -> None:
        """Wait for what was handed over; settlements waiting to be sent again are not waited for."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def aclose(self) -> None:
        await self.flush()
        await self.integrity.aclose()
        if self._batch_connection is not None:
            connection, self._batch_connection = self._batch_connection, None
            await connection.aclose(self._pool())
        if self._owns_client:
            await self.client.aclose()

    # -- batching -------------------------------------------------------------------------------

    async def _call(self, bucket: Bucket, kind: str, amount: int, limit: int = 0, member: str = "",
                    lease_until: int = 0, scale: int = 1) -> tuple[int, int, int]:
        future: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        self._enqueue(_op(self.prefix, bucket, kind, amount, limit, member, lease_until, future, scale=scale))
        return await future

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        if self._worker is None or self._worker.done():  # asked here first: every operation comes here
            self._wake()

    def _wake(self) -> None:
        """Have what waits sent: start the task that sends it, unless it runs."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        # Started with create_task, so it first runs after the current tick: everything enqueued
        # in that tick, and during each round trip, travels together.
        if self._cluster:
            while self._queue or self._commits:
                batch = self._take(MAX_BATCH)
                await asyncio.gather(*(self._send_bounded(group) for group in self._by_slot(batch)))
            return
        if self.pipeline == 1:  # one call at a time: no task of its own per call
            while self._queue or self._commits:
                await self._send(self._take(MAX_BATCH))
            return
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        while self._queue or self._commits or in_flight:
            if (self._queue or self._commits) and len(in_flight) < self.pipeline:
                size = MAX_BATCH if in_flight else max(FIRST_CALL_MIN, -(-len(self._queue) // self.pipeline))
                in_flight.add(loop.create_task(self._send(self._take(size))))
                continue
            _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)

    def _take(self, size: int) -> list[_Op]:
        """The next ``size`` operations, for one call.

        The commits handed over since the last call go first, one operation per bucket and cost
        (its members joined by commas) or per group of the same claims (its ids joined by commas),
        whatever their number: under load most requests of a call
        commit in one bucket, and each operation costs the worker and the script more than its
        members do. Going ahead of operations handed over before them changes no answer: a commit
        moves a lease to the commit total and leaves the usage as it was (a late one, whose lease
        expired, counts a creation that already happened), and its reservation was answered
        before it was handed over.
        """
        if self._commits:
            since, commits, self._commits = time.monotonic(), self._commits, {}
            self._queue[:0] = [_carrying(op, ",".join(members), since) for op, members in commits.values()]
        batch, self._queue = self._queue[:size], self._queue[size:]
        return batch

    async def _send_bounded(self, ops: Sequence[_Op]) -> None:
        async with self._sending:
            await self._send(ops)

    def _by_slot(self, batch: list[_Op]) -> list[list[_Op]]:
        # On a cluster one script call may only touch one hash slot; keys of a project share one.
        groups: dict[int, list[_Op]] = {}
        for op in batch:
            groups.setdefault(key_slot(op.keys[0].encode()), []).append(op)
        return list(groups.values())

    async def _send(self, ops: Sequence[_Op]) -> None:
        self.integrity.poll()
        # A bucket's keys travel once per call, whatever its operations (a group's: once per
        # group of the same buckets): spans, in KEYS' order.
        spans: list[tuple[str, ...]] = []
        first: dict[str | tuple[str, ...], int] = {}
        lines: list[str] = []
        index = 1  # of the next span's first key in KEYS
        answers = 0  # three per operation; per bucket, for a group
        for op_keys, kind, name, amount, limit, lease_until, tail, _, _, _, group, _ in ops:
            key = op_keys[0] if group is None else op_keys
            at = first.get(key)
            if at is None:
                at = first[key] = index
                index += len(op_keys)
                spans.append(op_keys)
            if group is None:
                lines.append(f"{at} {kind} {name} {amount} {limit} {lease_until} {tail}")
                answers += 3
            else:
                lines.append(f"{at} G {name} {lease_until} {group.tail}" if kind == GROUP else
                             f"{at} {kind} {name} {group.settle_tail}")
                answers += 3 * len(group.costs)
        # ARGV: now, then every operation, a line each (one argument to encode and decode).
        args = (int(self._clock() * 1000), "\n".join(lines))
        written: list[bool] = []  # not empty once the call may have reached Redis
        try:
            reply = await self._guard(self._run_batch(spans, index - 1, args, ops, written))
            if not isinstance(reply, list) or len(reply) != answers:
                raise StoreError(f"store script answered {reply!r:.80} for {len(ops)} operations")
        except BaseException as exc:  # whatever happened, every caller must hear of it
            error = exc if isinstance(exc, StoreError) else StoreError(f"Redis call failed: {exc!r}")
            for op in ops:
                self._fail(op, error, retry=True)
                if written and op.kind in RESERVING:
                    # Redis may still run it (paused, or its answer was lost) for a caller already
                    # answered: give it back like a settlement, until applied (a no-op if it never
                    # ran). Redis reads the reserve's waiting bytes before a new connection's: only
                    # a reserve delayed in the network could land after, and hold its lease until
                    # it expires, as before.
                    for refund in self._give_back(op):
                        self._fail(refund, error, retry=True)
            if not isinstance(exc, Exception):
                raise
            return
        refused = False
        at = 0
        for op in ops:
            if op.group is not None:
                n = 3 * len(op.group.costs)
                refused = self._answer_group(op, reply[at:at + n]) or refused
                at += n
                continue
            flag, used, limit = reply[at], reply[at + 1], reply[at + 2]
            at += 3
            if flag < 0:
                # The script ran; this operation failed and applied nothing (see batch.lua). What
                # Redis refused (out of memory, read-only...) is sent again; a corrupt key is final.
                refused = refused or flag == REFUSED
                self._fail(op, StoreError(f"store script failed: {_text(used)}"), retry=flag == REFUSED)
            elif op.future is None:
                continue
            elif op.future.cancelled():
                # The caller went away while its reservation was in flight: give it straight back.
                if op.kind == RESERVE and flag == 1:
                    self._enqueue(self._give_back(op)[0])
            elif op.kind == RESERVE:
                if not op.future.done():
                    op.future.set_result(_reserved(op, flag, used, limit) if not op.plain  # else a take:
                                         else (used, limit, op.member, op.lease_until) if flag == 1 else None)
            elif not op.future.done():
                op.future.set_result((flag, used, limit))
        if not refused:  # Redis applies again: what waits to be sent again goes now
            self._retry_delay = RETRY_MIN
            if self._retry:
                if self._retry_timer is not None:
                    self._retry_timer.cancel()
                self._resend()

    def _answer_group(self, op: _Op, answers: list[Any]) -> bool:
        """Answer a group with a Decision per bucket: every reservation, or (one refused or failed)
        none; the script took a refused group's back. A group's settlement is sent again when it
        failed. True when Redis refused a write."""
        group, future = op.group, op.future
        assert group is not None
        flags: list[int] = answers[0::3]
        if min(flags) < 0:  # (min and count: no loop of ours over the flags of every group answered)
            # A reserve then holds nothing of its group (see batch.lua); a settlement is sent again
            # whole, each bucket's being idempotent.
            i, flag = next((i, flag) for i, flag in enumerate(flags) if flag < 0)
            self._fail(op, StoreError(f"store script failed: {_text(answers[3 * i + 1])}"), retry=flag == REFUSED)
            return flag == REFUSED
        if future is None:  # a settlement, applied
            return False
        admitted = flags.count(1) == len(flags)
        if future.cancelled():
            if admitted:  # the caller went away while its reservations were in flight
                for refund in self._give_back(op):
                    self._enqueue(refund)
        elif not future.done():
            if op.plain:  # a take (see take_all): plain values, settled bucket by bucket
                future.set_result([(answers[3 * i + 1], answers[3 * i + 2], op.member + group.suffixes[i],
                                    op.lease_until) for i in range(len(flags))] if admitted else None)
            elif admitted:
                group_id, lease_until = op.member, op.lease_until
                if len(self._held) >= MAX_GROUPS:
                    self._held.clear()  # their reservations are then settled one by one
                self._held[group_id] = group
                future.set_result([
                    tuple.__new__(Decision, (True, answers[3 * i + 1], answers[3 * i + 2], tuple.__new__(
                        Reservation, (group.buckets[i], group.costs[i], group_id + group.suffixes[i], lease_until))))
                    for i in range(len(flags))])
            else:
                future.set_result([Decision(False, answers[3 * i + 1], answers[3 * i + 2]) for i in range(len(flags))])
        return False

    def _give_back(self, op: _Op) -> list[_Op]:
        """The refunds of a reserve whose caller never took its answer: each of its leases, only that
        very lease (its expiry says which), sent until applied."""
        since = time.monotonic()
        if op.group is None:
            return [op._replace(kind=REFUND, future=None, retry_since=since)]
        return [_op(self.prefix, bucket, REFUND, cost, 0, member(op.member, cost), op.lease_until, retry_since=since)
                for bucket, cost in zip(op.group.buckets, op.group.costs, strict=True)]

    async def _run_batch(self, spans: list[tuple[str, ...]], count: int, args: tuple[int, str], ops: Sequence[_Op],
                         written: list[bool]) -> Any:
        if self._cluster:  # the cluster client routes the call to the slot's node
            try:
                return await self._script(keys=[key for span in spans for key in span], args=args)
            except asyncio.CancelledError:  # the timeout: what the client had sent is not known
                written.append(True)
                raise
        now, lines = args
        body = lines.encode()
        # The command in Redis's protocol, written here: each span's keys are encoded once (hot
        # buckets repeat), where a general encoder formats every argument of every call.
        command = b"".join((b"*%d\r\n%s$%d\r\n%d\r\n" % (5 + count, self._evalsha, len(str(count)), count),
                            *[_encoded(span) for span in spans],
                            b"$%d\r\n%d\r\n$%d\r\n" % (len(str(now)), now, len(body)), body, b"\r\n"))
        reloaded = reconnected = False
        while True:
            try:
                return await self._pipelined(command, written)
            except redis_errors.NoScriptError:
                if reloaded:
                    raise
                reloaded = True
                # Redis restarted, or SCRIPT FLUSH. Loaded on this connection, which is known to
                # work: a pooled one may be as stale as this one was.
                await self._pipelined(LOAD_BATCH_SCRIPT)
            except (redis_errors.ConnectionError, OSError):
                # The connection failed before the answer came back: Redis closed it (an idle
                # timeout, a restart), most likely before the call arrived, perhaps after it ran.
                # Once more on a fresh one, when applying the batch twice is harmless: every
                # operation but a charge is (a reserve sent again is known by its member and expiry).
                if reconnected or any(op.kind == CHARGE for op in ops):
                    raise
                reconnected = True

    async def _pipelined(self, command: bytes, written: list[bool] | None = None) -> Any:
        """Write one call on the batch connection and await its reply (calls written before it are
        answered before it).

        ``written`` gets an entry once the call may have reached Redis.
        """
        connection = self._batch_connection
        if connection is None or connection.lost:  # first use, or Redis closed it (idle, restart)
            async with self._connecting:
                connection = self._batch_connection
                if connection is None or connection.lost:
                    self._batch_connection = None
                    if connection is not None:
                        await connection.aclose(self._pool())
                    # Held from the client's pool, and closed with it if the store is not closed first.
                    connection = self._batch_connection = await BatchConnection.open(self._pool())
                    self.integrity.soon()  # a new connection may be to a Redis that restarted empty
        if written is not None:
            written.append(True)
        answer = connection.call(command)
        try:
            reply = await answer
        except BaseException:
            # Cut off (the store's timeout) or failed: the calls behind it would wait on a Redis
            # that does not answer, or read a reply that is not theirs. The next call reconnects.
            connection.close()
            raise
        if isinstance(reply, redis_errors.ResponseError):
            raise reply  # an error reply was read: the connection is still in step
        return reply

    def _pool(self) -> aioredis.ConnectionPool:
        """The pool the batch connection comes from (one Redis only: a cluster routes each call)."""
        assert isinstance(self.client, aioredis.Redis)
        return self.client.connection_pool

    def _fail(self, op: _Op, error: StoreError, *, retry: bool) -> None:
        # A group's future: the first failure answers the whole group.
        if op.future is not None and not op.future.done():
            op.future.set_exception(error)
        if op.retry_since is None:
            return
        if not retry or time.monotonic() - op.retry_since > RETRY_FOR or len(self._retry) >= MAX_RETRY_QUEUE:
            settlements = _settlements(op)
            logger.error(SETTLEMENT_LOST, op.kind if settlements == 1 else f"{op.kind} x{settlements}", error)
            return
        self._retry.append(op._replace(future=None))
        if self._retry_timer is None:
            logger.warning(SETTLEMENT_DELAYED, error, self._retry_delay)
            self._retry_timer = asyncio.get_running_loop().call_later(self._retry_delay, self._resend)
            self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    def _resend(self) -> None:
        self._retry_timer = None
        ops, self._retry = self._retry, []
        for op in ops:
            self._enqueue(op)

    async def _guard(self, awaitable: Any, timeout: float | None = None) -> Any:
        """Bound every Redis call in time (the store's ``timeout`` unless told) and turn its failures
        into StoreError."""
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError as exc:
            raise StoreError(f"Redis did not answer within {timeout}s") from exc
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise StoreError(f"Redis failed: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"Redis unreachable: {exc}") from exc


def _carrying(op: _Op, members: str, since: float) -> _Op:
    """``op`` with ``members`` (sent again until applied, from ``since``). tuple.__new__: a named
    tuple's _replace costs several times as much, for each bucket of every call."""
    keys, kind, _, amount, limit, lease_until, tail, future, _, bucket, group, plain = op
    return tuple.__new__(_Op, (keys, kind, members, amount, limit, lease_until, tail, future, since, bucket, group,
                               plain))


def _settlement(group: _Group, kind: str, group_id: str = "-") -> _Op:
    """The commit (COMMIT_GROUP) or refund (REFUND_GROUP) of a group's every reservation, sent
    again until Redis applies it."""
    return tuple.__new__(_Op, (group.keys, kind, group_id, 0, 0, 0, "", None, time.monotonic(), None, group, False))


def _settlements(op: _Op) -> int:
    """How many settlements an operation carries: a line of commits carries one per lease."""
    return op.member.count(",") + 1 if op.kind == COMMIT or op.kind == COMMIT_GROUP else 1


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
