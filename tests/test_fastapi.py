"""FastAPI: the example app, guarded by the middleware and by a dependency sharing its engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from examples import fastapi_app
from middleware import Bucket, Decision, QuotaMiddleware, RedisStore, StaticSource, Store
from middleware.fastapi import QuotaRefused, guard, quota_refused_handler
from tests.servers import free_port

pytestmark = pytest.mark.anyio
H = {"X-Project-Id": "p"}


@pytest.fixture
def app(store: Store) -> QuotaMiddleware:
    return fastapi_app.create_app(store)


@pytest.fixture
def client(app: QuotaMiddleware) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


async def test_middleware_rules_guard_fastapi_routes(client: httpx.AsyncClient) -> None:
    async with client:
        statuses = [(await client.post("/v1/secrets", headers=H)).status_code for _ in range(4)]
        refused = await client.post("/v1/secrets", headers=H)
    assert statuses == [201, 201, 201, 403]
    assert refused.json()["code"] == 403 and refused.headers["ratelimit"] == '"secrets";r=0'


async def test_dependency_guards_a_route_in_its_signature(app: QuotaMiddleware, client: httpx.AsyncClient) -> None:
    async with client:
        first = await client.post("/v1/reports?title=a", headers=H)
        failed = await client.post("/v1/reports?title=", headers=H)  # endpoint raises: refunded
        second = await client.post("/v1/reports?title=b", headers=H)
        refused = await client.post("/v1/reports?title=c", headers=H)
        anonymous = await client.post("/v1/reports?title=d")
    assert (first.status_code, first.json()["remaining"]) == (201, 1)
    assert failed.status_code == 400
    assert (second.status_code, second.json()["remaining"]) == (201, 0)
    assert refused.status_code == 403
    assert refused.json() == {"code": 403, "title": "Forbidden", "description": refused.json()["description"]}
    assert "reports allows 2" in refused.json()["description"]
    assert refused.headers["ratelimit-policy"] == '"reports";q=2'
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 401
    await app.store.flush()
    assert await app.store.usage(Bucket("p", "reports")) == 2


def _reports_app(**options: Any) -> QuotaMiddleware:
    """A FastAPI app whose one route is guarded by the dependency only."""
    api = FastAPI()
    api.add_exception_handler(QuotaRefused, quota_refused_handler)
    quota = QuotaMiddleware(api, rules=[], source=StaticSource({"reports": 1}), **options)

    @api.post("/v1/reports", status_code=201)
    async def create_report(decision: Decision = Depends(guard(quota, "reports"))) -> dict[str, object]:
        return {"counted": decision.reservation is not None}

    return quota


async def _post(app: QuotaMiddleware, headers: dict[str, str] = H) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        return await client.post("/v1/reports", headers=headers)


async def test_the_dependency_follows_the_store_failure_policy() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    closed = _reports_app(store=RedisStore(dead, timeout=0.3))
    refused = await _post(closed)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    opened = _reports_app(store=RedisStore(dead, timeout=0.3), on_store_error="fail_open")
    let_through = await _post(opened)
    assert let_through.status_code == 201 and let_through.json() == {"counted": False}
    for app in (closed, opened):
        await app.aclose()


async def test_the_dependency_in_shadow_mode_admits_and_counts_past_the_limit() -> None:
    app = _reports_app(shadow=True)
    responses = [await _post(app) for _ in range(3)]
    assert [r.status_code for r in responses] == [201, 201, 201]
    assert await app.store.usage(Bucket("p", "reports")) == 3
    anonymous = await _post(app, headers={})
    assert anonymous.status_code == 201 and anonymous.json() == {"counted": False}
