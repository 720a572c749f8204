"""FastAPI: the example app, guarded by the middleware and by a dependency sharing its engine."""

from __future__ import annotations

import httpx
import pytest

from examples import fastapi_app
from middleware import Bucket, QuotaMiddleware, Store

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
