"""Reconciliation: correct usage counters from the application's own truth.

Counters drift when something happens behind the middleware's back (a resource deleted by a
cron job, a database restored, a commit given up after an outage). Like oslo.limit's usage
callback, you provide a function that returns the true usage of one project's resource; the
reconciler sets the counter to it. Reservations in flight are kept on top of the true count, so a
reconciliation never frees quota that a running request holds.

    reconciler = Reconciler(store, count_secrets, targets=lambda: [("p1", "secrets"), ...])
    await reconciler.reconcile("p1", "secrets")   # on demand
    reconciler.start(interval=300)                # and every five minutes (stop() to end)

Creations that commit while the true count is being read are counted on top of it (they may
already be in it): a reconciliation under load can over-count for a moment, never under-count, so
it never lets a project past its limit. Run it periodically and counters converge whenever
traffic pauses.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .errors import QuotaError
from .stores.base import Bucket, Store

logger = logging.getLogger("quota_middleware.reconcile")

UsageFn = Callable[[str, str], "int | Awaitable[int]"]
TargetsFn = Callable[[], "Iterable[tuple[str, str]] | Awaitable[Iterable[tuple[str, str]]]"]


@dataclass(frozen=True, slots=True)
class Correction:
    project: str
    resource: str
    before: int
    after: int


class Reconciler:
    def __init__(self, store: Store, usage: UsageFn, *, targets: TargetsFn | Iterable[tuple[str, str]] = ()) -> None:
        self.store = store
        self.usage = usage
        self.targets = targets
        self._task: asyncio.Task[None] | None = None
        # A store that lost its data (Redis restarted empty, evicting) heals from the app's truth:
        # every target at once, in the one process the store picks.
        store.on_data_loss(self.run_once, heal=True)

    async def reconcile(self, project: str, resource: str) -> Correction:
        """Set one counter to the true usage; returns what it was and what it is now."""
        bucket = Bucket(project, resource)
        before = await self.store.usage(bucket)
        # Commits that land while the truth is read may or may not be in it: counting them again
        # can only over-count until the next run, never let a project past its limit.
        commits = await self.store.commits(bucket)
        true = self.usage(project, resource)
        if inspect.isawaitable(true):
            true = await true
        if isinstance(true, bool) or not isinstance(true, int) or true < 0:
            raise ValueError(f"usage callback returned {true!r} for {project!r}/{resource!r}; expected an int >= 0")
        await self.store.set_usage(bucket, true, commits_since=commits)
        after = await self.store.usage(bucket)
        if before != after:
            logger.info("reconciled %s of project %r: %d -> %d", resource, project, before, after)
        return Correction(project, resource, before, after)

    async def run_once(self) -> list[Correction]:
        """Reconcile every target; one failing target does not stop the others."""
        targets = self.targets() if callable(self.targets) else self.targets
        if inspect.isawaitable(targets):
            targets = await targets
        corrections = []
        for project, resource in targets:
            try:
                corrections.append(await self.reconcile(project, resource))
            except (QuotaError, ValueError) as exc:
                logger.warning("could not reconcile %s of project %r: %s", resource, project, exc)
        return corrections

    def start(self, interval: float) -> None:
        """Reconcile every target every ``interval`` seconds, in the background."""
        if self._task is not None and not self._task.done():
            return

        async def loop() -> None:
            while True:
                await self.run_once()
                await asyncio.sleep(interval)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
