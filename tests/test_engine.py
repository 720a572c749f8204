"""QuotaEngine used without HTTP: a background job reserving quota for what it creates, and one
engine shared by the middleware and such a job."""

from __future__ import annotations

import httpx
import pytest

from middleware import (
    Admitted,
    Bucket,
    ConfigurationError,
    Demand,
    MemoryStore,
    Period,
    QuotaEngine,
    QuotaMiddleware,
    Rejection,
    Rule,
    StaticSource,
)
from tests.conftest import FakeClock
from tests.test_middleware import HEADERS, inner_app

pytestmark = pytest.mark.anyio


async def create_in_background(engine: QuotaEngine, project: str, n: int, *, fail_at: int = -1) -> list[str]:
    """A job that creates n things, each paid for before it is made; a failed creation costs nothing."""
    outcomes = []
    for i in range(n):
        outcome = await engine.admit(project, Demand("things"))
        if isinstance(outcome, Rejection):
            outcomes.append(f"refused {outcome.status}")
            continue
        assert isinstance(outcome, Admitted) and outcome.decision.reservation is not None
        created = i != fail_at
        await engine.settle(outcome.decision.reservation, keep=created)
        outcomes.append("created" if created else "failed")
    return outcomes


async def test_a_job_is_held_to_the_limit_and_failed_creations_cost_nothing() -> None:
    engine = QuotaEngine(source=StaticSource({"things": 3}))
    assert await create_in_background(engine, "p", 5, fail_at=1) == [
        "created", "failed", "created", "created", "refused 403"]
    assert await engine.store.usage(Bucket("p", "things")) == 3


async def test_one_engine_shared_by_the_middleware_and_a_job_counts_once() -> None:
    engine = QuotaEngine(source=StaticSource({"things": 3}), store=MemoryStore())
    app = QuotaMiddleware(inner_app(), rules=[Rule("POST", "/things", "things")], engine=engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        assert await create_in_background(engine, "p", 3) == ["created", "created", "refused 403"]
        assert (await client.post("/things", headers=HEADERS)).status_code == 403


async def test_a_windowed_demand_frees_up_in_the_next_window(clock: FakeClock) -> None:
    engine = QuotaEngine(source=StaticSource({"calls": 2}), clock=clock)
    minute = Demand("calls", 1, Period.parse("minute"))
    statuses = []
    for _ in range(3):
        outcome = await engine.admit("p", minute)
        statuses.append(outcome.status if isinstance(outcome, Rejection) else 200)
        if isinstance(outcome, Admitted) and outcome.decision.reservation is not None:
            await engine.settle(outcome.decision.reservation, keep=True)
    assert statuses == [200, 200, 429]
    clock.advance(60)
    assert isinstance(await engine.admit("p", minute), Admitted)


async def test_fractional_costs_round_up_to_store_units() -> None:
    from middleware import Limit, Quotas
    from middleware.sources.base import QuotaSource

    class Credits(QuotaSource):
        cacheable = False

        async def fetch(self, project: str, headers: object) -> Quotas:
            return Quotas({"credits": Limit(1000, scale=1000)})  # one credit, in thousandths

    engine = QuotaEngine(source=Credits())
    first = await engine.admit("p", Demand("credits", "0.3333"))
    assert isinstance(first, Admitted) and first.charge.units == 334
    assert isinstance(await engine.admit("p", Demand("credits", 0.6)), Admitted)
    assert isinstance(await engine.admit("p", Demand("credits", 0.1)), Rejection)


def test_an_engine_or_a_source_not_both() -> None:
    engine = QuotaEngine(source=StaticSource({}))
    with pytest.raises(ConfigurationError, match="not both"):
        QuotaMiddleware(inner_app(), rules=[], engine=engine, source=StaticSource({}))
    with pytest.raises(ConfigurationError, match="not both"):
        QuotaMiddleware(inner_app(), rules=[], engine=engine, default_limit=3)
    with pytest.raises(ConfigurationError, match="needs a source"):
        QuotaMiddleware(inner_app(), rules=[])
