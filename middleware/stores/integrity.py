"""Noticing a Redis that lost its data: restarted without persistence, flushed, or evicting keys.

Counters that vanish read as zero, so a project silently starts over: 155 live resources against
a limit of 100, and nothing says so. Each process remembers a *marker*: a key with a random value,
written at first use on every Redis primary (one key per primary, whatever slots it serves). Every
``interval`` seconds, and whenever the batch connection was re-established (a restart always
shows up as one), the process reads the markers back and Redis's own count of evicted keys:

- a marker gone, or replaced by another value, means that node's data is gone (a restart without
  persistence, FLUSHALL, eviction of the marker itself): ERROR log, the store's data-loss
  callbacks (the middleware's metric), and, in the one process that takes a short lock, its
  reconcilers (so the counters heal from the application's truth once, not once per worker);
- ``evicted_keys`` growing means Redis is evicting under ``maxmemory`` (policy not
  ``noeviction``): counters may be among them. ERROR log, callbacks, one reconciliation.

At first use the ``maxmemory-policy`` is read (where the server allows CONFIG GET) and anything but
``noeviction`` is a WARNING. What cannot be seen: data lost while no process that had seen the
marker was running (every worker restarted with Redis). Persistence is the cure for that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

logger = logging.getLogger("quota_middleware.store")

DATA_LOST = ("Redis lost quota data (%s): usage counters restarted from zero, so projects may now be "
             "admitted past their limits. Give Redis persistence (appendonly yes) and maxmemory-policy "
             "noeviction; run a Reconciler to restore counters from the application's own truth.")
EVICTING = ("Redis maxmemory-policy is %r: under memory pressure it may evict quota counters, and "
            "projects would start over from zero. Use maxmemory-policy noeviction for quotas.")
#: How long the right to heal (reconcile after a loss) is held: one process heals, the others don't.
HEAL_LOCK_MS = 60_000
#: How many candidate hash tags are tried to find a marker key on every primary of a cluster.
MAX_TAGS = 100_000

Callback = Callable[[], "Awaitable[Any] | None"]


class IntegrityWatch:
    def __init__(self, client: Any, prefix: str, *, interval: float = 10.0) -> None:
        self.client = client
        self.prefix = prefix
        self.interval = interval
        #: Marker key -> the value this process saw there.
        self._seen: dict[str, bytes] = {}
        self._evicted: dict[str, int] = {}
        self._next = 0.0
        self._task: asyncio.Task[None] | None = None
        self._on_loss: list[Callback] = []
        self._on_heal: list[Callback] = []
        self._policy_checked = False
        self._cluster = isinstance(client, RedisCluster)

    def on_loss(self, callback: Callback, *, heal: bool = False) -> None:
        """Call ``callback`` whenever a loss is seen; with ``heal``, only in the process that heals."""
        (self._on_heal if heal else self._on_loss).append(callback)

    def soon(self) -> None:
        """Check at the next occasion (the batch connection was re-established)."""
        self._next = 0.0

    def poll(self) -> None:
        """Start a check in the background when one is due; costs a clock read otherwise."""
        if time.monotonic() < self._next or (self._task is not None and not self._task.done()):
            return
        self._next = time.monotonic() + self.interval
        self._task = asyncio.get_running_loop().create_task(self._check_quietly())

    async def aclose(self) -> None:
        """Stop a check under way (the store is closing its connections)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _check_quietly(self) -> None:
        try:
            await self.check()
        except (TimeoutError, redis_errors.RedisError, OSError) as exc:
            logger.debug("could not check Redis for lost data: %s", exc)

    async def check(self) -> bool:
        """Read the markers and eviction counts now; True when a loss was seen (and reported)."""
        if not self._policy_checked:
            self._policy_checked = True
            await self._warn_about_eviction_policy()
        losses: list[str] = []
        for key in await self._marker_keys():
            value = await self.client.get(key)
            if value is None:
                mine = os.urandom(8).hex().encode()
                if await self.client.set(key, mine, nx=True):
                    value = mine
                else:
                    value = await self.client.get(key)  # another process wrote it a moment ago
            seen = self._seen.get(key)
            if seen is not None and value != seen:
                losses.append(f"marker {key} gone")
            if value is not None:
                self._seen[key] = value
        for node, evicted in (await self._evictions()).items():
            known = self._evicted.get(node)
            if known is not None and evicted > known:
                losses.append(f"{evicted - known} keys evicted on {node}")
            self._evicted[node] = evicted
        if not losses:
            return False
        logger.error(DATA_LOST, "; ".join(losses))
        await self._call(self._on_loss)
        # Every process that saw the loss says so; the one that takes the lock heals it.
        if await self.client.set(f"{self.prefix}healing", b"1", nx=True, px=HEAL_LOCK_MS):
            await self._call(self._on_heal)
        return True

    async def _call(self, callbacks: list[Callback]) -> None:
        for callback in callbacks:
            try:
                result = callback()
                if result is not None:
                    await result
            except Exception:  # noqa: BLE001 - one failing callback must not hide the loss from the others
                logger.exception("a data-loss callback failed")

    async def _marker_keys(self) -> list[str]:
        if not self._cluster:
            return [f"{self.prefix}marker"]
        # One key per primary: a hash tag whose slot that primary serves (looked up each time, so
        # the markers follow a resharding).
        await self.client.initialize()
        primaries = {node.name for node in self.client.get_primaries()}
        keys: dict[str, str] = {}
        for i in range(MAX_TAGS):
            key = f"{self.prefix}{{marker-{i}}}"
            node = self.client.get_node_from_key(key)
            if node is not None and node.name in primaries and node.name not in keys:
                keys[node.name] = key
                if len(keys) == len(primaries):
                    break
        return list(keys.values())

    async def _per_node(self, call: Callable[..., Awaitable[Any]], *args: Any) -> dict[str, Any]:
        """One answer per primary (a cluster) or the one server's."""
        if not self._cluster:
            return {"redis": await call(*args)}
        return {node.name: await call(*args, target_nodes=node) for node in self.client.get_primaries()}

    async def _evictions(self) -> dict[str, int]:
        try:
            infos = await self._per_node(self.client.info, "stats")
        except redis_errors.ResponseError:
            return {}  # INFO renamed or refused (some managed Redis): markers alone then
        return {node: int(info.get("evicted_keys", 0)) for node, info in infos.items()}

    async def _warn_about_eviction_policy(self) -> None:
        try:
            answers = await self._per_node(self.client.config_get, "maxmemory-policy")
        except redis_errors.ResponseError:
            return  # CONFIG refused (managed Redis): nothing to read
        policies = {_text(value) for answer in answers.values() for value in answer.values()}
        for policy in sorted(policies - {"noeviction"}):
            logger.warning(EVICTING, policy)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
