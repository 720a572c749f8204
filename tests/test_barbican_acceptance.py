"""Barbican's quota acceptance table, through the example app over HTTP, on every store."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from examples.barbican_store import create_app
from middleware import BarbicanSource, Store
from tests.upstreams import FakeBarbican

pytestmark = pytest.mark.anyio

RESOURCES = ("secrets", "containers", "orders", "consumers")
LIMITS = (-1, 0, 1, 5)


def token(limit: int, resource: str = "secrets") -> str:
    return f"token-{resource}-{limit}"


@pytest.fixture
async def client(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    # Each token's project has one resource at the tested limit and every other one unlimited.
    upstream = FakeBarbican({token(limit, resource): {r: -1 for r in RESOURCES} | {resource: limit}
                             for limit in LIMITS for resource in RESOURCES})
    app = create_app(BarbicanSource("http://quota.test", client=upstream.client()), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://barbican.test") as c:
        yield c


async def create(client: httpx.AsyncClient, resource: str, project: str, tok: str) -> httpx.Response:
    headers = {"X-Project-Id": project, "X-Auth-Token": tok}
    if resource == "consumers":
        # Consumers hang off a container (unlimited for this token's project).
        container = await client.post("/v1/containers", json={"name": "c"}, headers=headers)
        assert container.status_code == 201
        path = httpx.URL(container.json()["container_ref"]).path + "/consumers"
        return await client.post(path, json={"name": "svc", "URL": "http://svc"}, headers=headers)
    return await client.post(f"/v1/{resource}", json={"name": "x"}, headers=headers)


SUCCESS = {"secrets": 201, "containers": 201, "orders": 202, "consumers": 200}


@pytest.mark.parametrize("resource", RESOURCES)
@pytest.mark.parametrize(("limit", "attempts", "admitted"), [(-1, 5, 5), (0, 1, 0), (1, 2, 1), (5, 6, 5)])
async def test_acceptance_table(client: httpx.AsyncClient, resource: str, limit: int, attempts: int,
                                admitted: int) -> None:
    project = f"proj-{resource}-{limit}"
    statuses = [(await create(client, resource, project, token(limit, resource))).status_code
                for _ in range(attempts)]
    assert statuses == [SUCCESS[resource]] * admitted + [403] * (attempts - admitted)


async def test_rejection_is_barbican_shaped_and_names_project_resource_and_limit(client: httpx.AsyncClient) -> None:
    for _ in range(1):
        assert (await create(client, "secrets", "p1", token(1))).status_code == 201
    response = await create(client, "secrets", "p1", token(1))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == 403 and body["title"] == "Forbidden"
    assert "p1" in body["description"] and "secrets" in body["description"] and "1" in body["description"]
    # Both policies the create met: the quota, and the example's rate written on its rule.
    assert response.headers["ratelimit-policy"] == '"secrets";q=1, "secrets:per-minute";q=6000;w=60'
    assert re.fullmatch(r'"secrets";r=0, "secrets:per-minute";r=5999;t=\d+', response.headers["ratelimit"])


async def test_admitted_response_carries_ratelimit_headers(client: httpx.AsyncClient) -> None:
    response = await create(client, "secrets", "p2", token(5))
    assert response.status_code == 201
    assert response.headers["location"] == response.json()["secret_ref"]
    assert response.headers["ratelimit-policy"] == '"secrets";q=5, "secrets:per-minute";q=6000;w=60'
    assert re.fullmatch(r'"secrets";r=4, "secrets:per-minute";r=5999;t=\d+', response.headers["ratelimit"])


async def test_delete_gives_quota_back(client: httpx.AsyncClient) -> None:
    headers = {"X-Project-Id": "p3", "X-Auth-Token": token(1)}
    first = await client.post("/v1/secrets", json={}, headers=headers)
    assert (await client.post("/v1/secrets", json={}, headers=headers)).status_code == 403
    assert (await client.delete(httpx.URL(first.json()["secret_ref"]).path, headers=headers)).status_code == 204
    assert (await client.post("/v1/secrets", json={}, headers=headers)).status_code == 201


async def test_failed_creation_uses_no_quota(client: httpx.AsyncClient) -> None:
    headers = {"X-Project-Id": "p4", "X-Auth-Token": token(1)}
    for _ in range(3):
        bad = await client.post("/v1/secrets", content=b"{not json", headers=headers)
        assert bad.status_code == 400
        assert bad.json()["code"] == 400
    assert (await client.post("/v1/secrets", json={}, headers=headers)).status_code == 201


async def test_failed_delete_gives_nothing_back(client: httpx.AsyncClient) -> None:
    headers = {"X-Project-Id": "p5", "X-Auth-Token": token(1)}
    assert (await client.post("/v1/secrets/", json={}, headers=headers)).status_code == 201
    assert (await client.delete("/v1/secrets/no-such-secret", headers=headers)).status_code == 404
    assert (await client.post("/v1/secrets", json={}, headers=headers)).status_code == 403


async def test_trailing_slash_is_the_same_collection(client: httpx.AsyncClient) -> None:
    headers = {"X-Project-Id": "p6", "X-Auth-Token": token(1)}
    assert (await client.post("/v1/secrets/", json={}, headers=headers)).status_code == 201
    assert (await client.post("/v1/secrets", json={}, headers=headers)).status_code == 403


async def test_bad_token_is_the_callers_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/secrets", json={}, headers={"X-Project-Id": "p7", "X-Auth-Token": "nope"})
    assert response.status_code == 401
    assert response.json()["code"] == 401
    assert "nope" not in response.text
