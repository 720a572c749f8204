"""Reconciliation: the counter ends equal to the true count, under concurrent load."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware import Bucket, QuotaMiddleware, Rule, StaticSource, Store
from middleware.reconcile import Reconciler

pytestmark = pytest.mark.anyio
H = {"X-Project-Id": "p"}


def app_with_db() -> tuple[Starlette, set[int]]:
    db: set[int] = set()

    async def create(request: Request) -> Response:
        await asyncio.sleep(0.001)
        db.add(len(db) + 1000 * len(db) + id(request))
        return JSONResponse({}, status_code=201)

    return Starlette(routes=[Route("/things", create, methods=["POST"])]), db


async def test_reconcile_sets_the_true_count_and_keeps_reservations_in_flight(store: Store) -> None:
    bucket = Bucket("p", "things")
    held = await store.reserve(bucket, 1, 100, 30_000)
    await store.set_usage(bucket, 40)  # drifted: 40 committed (+1 in flight)
    reconciler = Reconciler(store, lambda project, resource: 7)
    correction = await reconciler.reconcile("p", "things")
    assert (correction.before, correction.after) == (41, 8)  # 7 true + the reservation in flight
    assert held.reservation
    await store.commit(held.reservation)
    await store.flush()
    assert await store.usage(bucket) == 8


async def test_bad_usage_callbacks_are_refused(store: Store) -> None:
    for bad in (-1, "3", True, None):
        with pytest.raises(ValueError):
            await Reconciler(store, lambda p, r, bad=bad: bad).reconcile("p", "things")  # type: ignore[misc]


async def test_counter_ends_equal_to_the_truth_under_concurrent_load(store: Store) -> None:
    app, db = app_with_db()
    mw = QuotaMiddleware(app, rules=[Rule("POST", "/things", "things")], source=StaticSource({"things": 60}),
                         store=store)
    await store.set_usage(Bucket("p", "things"), 25)  # drift: 25 counted that do not exist

    async def true_usage(project: str, resource: str) -> int:
        await asyncio.sleep(0)
        return len(db)

    reconciler = Reconciler(store, true_usage, targets=[("p", "things")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t") as client:
        async def load() -> list[int]:
            return [r.status_code for r in await asyncio.gather(*(client.post("/things", headers=H)
                                                                  for _ in range(40)))]

        reconciler.start(interval=0.005)
        statuses = [s for _ in range(3) for s in await load()]
        await reconciler.stop()
    await store.flush()
    await reconciler.run_once()
    assert statuses.count(201) == len(db) <= 60  # never past the limit, even while counters moved
    assert await store.usage(Bucket("p", "things")) == len(db)
