"""The operator API (middleware.admin.QuotaAdmin) against Barbican's quotas and project-quotas API.

Status codes follow Barbican's reference: GET /v1/quotas 200; GET /v1/project-quotas 200;
GET /v1/project-quotas/{id} 200/404; PUT 204/400 (and 415 for a body that is not JSON);
DELETE 204/404. Every error is ``{"code", "title", "description"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from middleware import (
    Limit,
    MemoryStore,
    Period,
    QuotaMiddleware,
    Quotas,
    QuotaSource,
    RedisStore,
    Rule,
    SharedState,
    SourceRejected,
    SourceUnavailable,
    StaticSource,
    Store,
)
from middleware.admin import QuotaAdmin
from tests.conftest import FakeClock
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.anyio

BARBICAN_RESOURCES = ("secrets", "orders", "containers", "consumers", "cas")
P = {"X-Project-Id": "p"}


class CountingSource(QuotaSource):
    """A cacheable upstream that counts its fetches (so a test can tell the shared copy was used)."""

    namespace = "counting"

    def __init__(self, limits: Mapping[str, int | Limit], error: Exception | None = None) -> None:
        self.quotas = Quotas(dict(limits))
        self.error = error
        self.calls = 0

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.quotas


def client_for(app: Any) -> httpx.AsyncClient:
    # raise_app_exceptions stays on: an exception escaping the admin app fails the test.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin.test")


def things_app() -> Starlette:
    async def create(request: Request) -> Response:
        return JSONResponse({}, status_code=201)

    return Starlette(routes=[Route("/things", create, methods=["POST"])])


def put(client: httpx.AsyncClient, project: str, body: Any) -> Any:
    return client.put(f"/v1/project-quotas/{project}", content=json.dumps(body),
                      headers={"Content-Type": "application/json"})


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "title", "description"} and body["code"] == status
    assert body["description"] and "Traceback" not in response.text
    return body


# -- GET /v1/quotas -------------------------------------------------------------------------------

async def test_effective_quotas_in_barbicans_shape(store: Store) -> None:
    source = StaticSource({"secrets": 10, "orders": 0,
                           "credits": Limit(500_000, scale=1000, period=Period.parse("month"), unit="credits"),
                           "traffic": Limit(-1, scale=10**12)})
    admin = QuotaAdmin(store, source=source, resources=BARBICAN_RESOURCES)
    await store.set_overrides("p", {"containers": 7, "orders": -1})
    async with client_for(admin) as client:
        response = await client.get("/v1/quotas", headers=P)
        other = await client.get("/v1/quotas", headers={"X-Project-Id": "q"})
        missing = await client.get("/v1/quotas")
        malformed = await client.get("/v1/quotas", headers={"X-Project-Id": "x" * 256})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    quotas = response.json()["quotas"]
    # Configured resources first, in their order; the source's limits in quota units (-1 stays -1);
    # overrides on top; resources nobody mentions at the default (-1).
    assert quotas == {"secrets": 10, "orders": -1, "containers": 7, "consumers": -1, "cas": -1,
                      "credits": 500, "traffic": -1}
    assert list(quotas) == [*BARBICAN_RESOURCES, "credits", "traffic"]
    assert other.json()["quotas"]["orders"] == 0 and other.json()["quotas"]["containers"] == -1
    assert "X-Project-Id" in assert_error(missing, 401)["description"]
    assert_error(malformed, 400)


async def test_without_a_source_overrides_and_defaults_are_shown() -> None:
    store = MemoryStore()
    await store.set_overrides("p", {"secrets": 3})
    async with client_for(QuotaAdmin(store, resources=["secrets", "orders"], default_limit=5)) as client:
        assert (await client.get("/v1/quotas", headers=P)).json() == {"quotas": {"secrets": 3, "orders": 5}}


async def test_effective_quotas_read_the_shared_copy_the_workers_keep(store: Store, clock: FakeClock) -> None:
    source = CountingSource({"things": 4})
    worker = QuotaMiddleware(things_app(), rules=[Rule("POST", "/things", "things")], source=source, store=store,
                             clock=clock)
    admin = QuotaAdmin(store, source=source, clock=clock)
    async with client_for(worker) as w, client_for(admin) as a:
        assert (await w.post("/things", headers=P)).status_code == 201
        assert source.calls == 1
        assert (await a.get("/v1/quotas", headers=P)).json() == {"quotas": {"things": 4}}
    # A store shared by processes keeps a copy that the admin reads instead of asking the upstream.
    assert source.calls == (1 if isinstance(store, SharedState) else 2)


async def test_source_failures_are_json_errors() -> None:
    store = MemoryStore()
    for error, status in [(SourceUnavailable("down", retry_after=7), 503),
                          (SourceRejected("bad token", status_code=401), 401),
                          (SourceRejected("unknown project", status_code=404), 403)]:
        async with client_for(QuotaAdmin(store, source=CountingSource({}, error))) as client:
            response = await client.get("/v1/quotas", headers=P)
        assert_error(response, status)
        if status == 503:
            assert response.headers["retry-after"] == "7"


# -- /v1/project-quotas: Barbican's status-code table ---------------------------------------------

async def test_project_quotas_status_codes_and_put_replaces_the_whole_set(store: Store) -> None:
    admin = QuotaAdmin(store, resources=BARBICAN_RESOURCES)
    async with client_for(admin) as client:
        assert_error(await client.get("/v1/project-quotas/p"), 404)
        assert_error(await client.delete("/v1/project-quotas/p"), 404)
        assert (await client.get("/v1/project-quotas")).json() == {"project_quotas": [], "total": 0}

        # A resource outside `resources` (a typo) would enforce nothing: refused, nothing written.
        unknown = await put(client, "p", {"project_quotas": {"secrets": 50, "credits": 0}})
        assert_error(unknown, 400)
        assert "'credits'" in unknown.json()["description"]
        assert await store.overrides("p") == {}

        created = await put(client, "p", {"project_quotas": {"secrets": 50, "orders": None, "containers": -5,
                                                             "cas": 0}})
        assert created.status_code == 204 and created.content == b""
        shown = await client.get("/v1/project-quotas/p")
        assert shown.status_code == 200
        # Barbican's shape: null where the default applies; any negative value reads as -1.
        assert shown.json() == {"project_quotas": {"secrets": 50, "orders": None, "containers": -1,
                                                   "consumers": None, "cas": 0}}
        assert await store.overrides("p") == {"secrets": 50, "containers": -1, "cas": 0}

        # PUT replaces: what the body does not name (or names null) falls back to the source.
        assert (await put(client, "p", {"project_quotas": {"orders": 3}})).status_code == 204
        assert await store.overrides("p") == {"orders": 3}
        assert (await client.get("/v1/project-quotas/p")).json()["project_quotas"] == {
            "secrets": None, "orders": 3, "containers": None, "consumers": None, "cas": None}
        listed = (await client.get("/v1/project-quotas")).json()
        assert listed == {"project_quotas": [{"project_id": "p", "project_quotas": {
            "secrets": None, "orders": 3, "containers": None, "consumers": None, "cas": None}}], "total": 1}

        # Only nulls: nothing configured any more, as after a DELETE.
        assert (await put(client, "p", {"project_quotas": {"orders": None}})).status_code == 204
        assert_error(await client.get("/v1/project-quotas/p"), 404)
        assert (await client.get("/v1/project-quotas")).json()["total"] == 0
        assert await store.overridden_projects() == []

        assert (await put(client, "p", {"project_quotas": {"secrets": 1}})).status_code == 204
        deleted = await client.delete("/v1/project-quotas/p")
        assert deleted.status_code == 204 and deleted.content == b""
        assert_error(await client.delete("/v1/project-quotas/p"), 404)
        assert_error(await client.get("/v1/project-quotas/p"), 404)

        # 400 and 415 change nothing.
        assert (await put(client, "p", {"project_quotas": {"secrets": 9}})).status_code == 204
        assert_error(await put(client, "p", {"project_quotas": {"secrets": True}}), 400)
        assert_error(await client.put("/v1/project-quotas/p", content=b'{"project_quotas": {}}',
                                      headers={"Content-Type": "text/plain"}), 415)
    assert await store.overrides("p") == {"secrets": 9}
    assert await store.overridden_projects() == ["p"]


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[]", "project_quotas"),
    (b'{"quotas": {"secrets": 1}}', "project_quotas"),
    (b'{"project_quotas": {"secrets": 1}, "extra": 1}', "extra"),
    (b'{"project_quotas": [1]}', "object"),
    (b'{"project_quotas": {"secrets": true}}', "integer"),
    (b'{"project_quotas": {"secrets": false}}', "integer"),
    (b'{"project_quotas": {"secrets": "10"}}', "integer"),
    (b'{"project_quotas": {"secrets": 1.5}}', "integer"),
    (b'{"project_quotas": {"secrets": 10.0}}', "integer"),
    (b'{"project_quotas": {"secrets": NaN}}', "integer"),
    (b'{"project_quotas": {"secrets": {"value": 1}}}', "integer"),
    (b'{"project_quotas": {"secrets": 9007199254740992}}', "larger"),
    (b'{"project_quotas": {"": 1}}', "is empty"),
    (b'{"project_quotas": {"' + b"r" * 256 + b'": 1}}', "longer than 255"),
    (b'{"project_quotas": {"a\\u0000b": 1}}', "control"),
])
async def test_invalid_put_bodies_are_400_and_change_nothing(body: bytes, fragment: str) -> None:
    store = MemoryStore()
    await store.set_overrides("p", {"orders": 2})
    async with client_for(QuotaAdmin(store)) as client:
        response = await client.put("/v1/project-quotas/p", content=body,
                                    headers={"Content-Type": "application/json"})
    assert fragment in assert_error(response, 400)["description"]
    assert await store.overrides("p") == {"orders": 2}


async def test_media_type_size_and_project_id_checks() -> None:
    store = MemoryStore()
    body = b'{"project_quotas": {"secrets": 1}}'
    async with client_for(QuotaAdmin(store)) as client:
        assert_error(await client.put("/v1/project-quotas/p", content=body), 415)  # no Content-Type
        assert_error(await client.put("/v1/project-quotas/p", content=body,
                                      headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)
        ok = await client.put("/v1/project-quotas/p", content=body,
                              headers={"Content-Type": "application/json; charset=utf-8"})
        assert ok.status_code == 204
        big = b'{"project_quotas": {"secrets": 1, "pad": "' + b"x" * 70_000 + b'"}}'
        assert_error(await client.put("/v1/project-quotas/p", content=big,
                                      headers={"Content-Type": "application/json"}), 413)
        # Project ids are validated like the middleware's identity.
        for bad in ("x" * 256, "a%01b", "%20padded"):
            for method in ("GET", "PUT", "DELETE"):
                response = await client.request(method, f"/v1/project-quotas/{bad}", content=body,
                                                headers={"Content-Type": "application/json"})
                assert "project id" in assert_error(response, 400)["description"]
        assert (await client.get("/v1/project-quotas/" + "x" * 255)).status_code == 404
        # Unknown paths and methods answer in the same JSON shape.
        assert_error(await client.get("/v1/nothing"), 404)
        not_allowed = await client.post("/v1/project-quotas/p", content=body)
        assert_error(not_allowed, 405)
        assert set(not_allowed.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    assert await store.overrides("p") == {"secrets": 1}


async def test_paging_like_barbican(store: Store) -> None:
    for i in range(25):
        await store.set_overrides(f"p{i:02}", {"secrets": i})
    admin = Starlette(routes=[Mount("/admin", app=QuotaAdmin(store))])
    base = "http://admin.test/admin/v1/project-quotas"
    async with client_for(admin) as client:
        first = (await client.get("/admin/v1/project-quotas")).json()
        assert first["total"] == 25 and "previous" not in first
        assert [p["project_id"] for p in first["project_quotas"]] == [f"p{i:02}" for i in range(10)]
        assert first["project_quotas"][3] == {"project_id": "p03", "project_quotas": {"secrets": 3}}
        assert first["next"] == f"{base}?offset=10&limit=10"

        middle = (await client.get("/admin/v1/project-quotas", params={"offset": 5, "limit": 5})).json()
        assert [p["project_id"] for p in middle["project_quotas"]] == [f"p{i:02}" for i in range(5, 10)]
        assert middle["previous"] == f"{base}?offset=0&limit=5" and middle["next"] == f"{base}?offset=10&limit=5"

        last = (await client.get(first["next"].replace("offset=10", "offset=20"))).json()
        assert len(last["project_quotas"]) == 5 and "next" not in last
        assert last["previous"] == f"{base}?offset=10&limit=10"
        beyond = (await client.get("/admin/v1/project-quotas", params={"offset": 99})).json()
        assert beyond["project_quotas"] == [] and beyond["total"] == 25

        clamped = (await client.get("/admin/v1/project-quotas", params={"limit": 1000})).json()
        assert len(clamped["project_quotas"]) == 25 and "next" not in clamped  # limit capped at 100
        for params in ({"offset": "-1"}, {"offset": "x"}, {"offset": "1.5"}, {"limit": "0"},
                       {"limit": "-3"}, {"limit": ""}, {"limit": "+5"}, {"offset": "9" * 40}):
            assert_error(await client.get("/admin/v1/project-quotas", params=params), 400)


async def test_store_failures_are_503_never_a_traceback() -> None:
    dead = aioredis.Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2,
                          retry=Retry(NoBackoff(), 0))
    store = RedisStore(dead, timeout=0.3)
    admin = QuotaAdmin(store, source=StaticSource({"secrets": 1}), resources=["secrets"])
    try:
        async with client_for(admin) as client:
            responses = [await client.get("/v1/quotas", headers=P), await client.get("/v1/project-quotas"),
                         await client.get("/v1/project-quotas/p"), await client.delete("/v1/project-quotas/p"),
                         await put(client, "p", {"project_quotas": {"secrets": 5}})]
    finally:
        await store.aclose()
        await dead.aclose()
    for response in responses:
        assert "unavailable" in assert_error(response, 503)["description"]
        assert response.headers["retry-after"] == "5"


# -- overrides change decisions at once -----------------------------------------------------------

async def test_a_put_applies_to_the_next_guarded_request(store: Store, clock: FakeClock) -> None:
    worker = QuotaMiddleware(things_app(), rules=[Rule("POST", "/things", "things")],
                             source=StaticSource({"things": 1}), store=store, clock=clock)
    admin = QuotaAdmin(store, source=StaticSource({"things": 1}), clock=clock)
    async with client_for(worker) as w, client_for(admin) as a:
        assert [(await w.post("/things", headers=P)).status_code for _ in range(2)] == [201, 403]
        assert (await put(a, "p", {"project_quotas": {"things": 3}})).status_code == 204
        assert (await a.get("/v1/quotas", headers=P)).json() == {"quotas": {"things": 3}}
        allowed = await w.post("/things", headers=P)
        assert allowed.status_code == 201 and allowed.headers["ratelimit-policy"] == '"things";q=3'
        assert [(await w.post("/things", headers=P)).status_code for _ in range(2)] == [201, 403]
        assert (await put(a, "p", {"project_quotas": {"things": 0}})).status_code == 204
        assert "disabled" in (await w.post("/things", headers=P)).json()["description"]
        assert (await put(a, "p", {"project_quotas": {"things": -1}})).status_code == 204
        assert (await w.post("/things", headers=P)).status_code == 201  # unlimited
        assert (await a.delete("/v1/project-quotas/p")).status_code == 204
        refused = await w.post("/things", headers=P)  # the source's limit of 1 again, 4 in use
        assert refused.status_code == 403 and "allows 1" in refused.json()["description"]
        assert (await a.get("/v1/quotas", headers=P)).json() == {"quotas": {"things": 1}}


async def test_two_workers_over_one_redis_see_a_change_on_their_next_request(
        redis_server: RedisServer, real_redis: aioredis.Redis) -> None:
    clients = [aioredis.Redis(port=redis_server.port, socket_timeout=2) for _ in range(3)]
    stores = [RedisStore(client) for client in clients]
    source = StaticSource({"things": 1})
    workers = [QuotaMiddleware(things_app(), rules=[Rule("POST", "/things", "things")], source=source, store=s)
               for s in stores[:2]]
    admin = QuotaAdmin(stores[2], source=source)
    try:
        async with client_for(workers[0]) as w1, client_for(workers[1]) as w2, client_for(admin) as a:
            assert (await w1.post("/things", headers=P)).status_code == 201
            assert (await w2.post("/things", headers=P)).status_code == 403
            assert (await put(a, "p", {"project_quotas": {"things": 3}})).status_code == 204
            assert (await w2.post("/things", headers=P)).status_code == 201
            assert (await w1.post("/things", headers=P)).status_code == 201
            assert (await w2.post("/things", headers=P)).status_code == 403  # 3 of 3
            assert (await put(a, "p", {"project_quotas": {"things": 4}})).status_code == 204
            assert (await w1.post("/things", headers=P)).status_code == 201
            assert (await a.delete("/v1/project-quotas/p")).status_code == 204
            assert (await w1.post("/things", headers=P)).status_code == 403
            assert (await w2.post("/things", headers=P)).status_code == 403
            listed = (await a.get("/v1/project-quotas")).json()
            assert listed == {"project_quotas": [], "total": 0}
    finally:
        for s in stores:
            await s.aclose()
        for client in clients:
            await client.aclose()


# -- usage for clients ------------------------------------------------------------------------------

async def test_usage_of_the_caller_and_of_any_project(store: Store, clock: FakeClock) -> None:
    from middleware import Demand, Limit, Period, QuotaEngine

    source = StaticSource({"secrets": 3, "calls": Limit(10, period=Period.parse("minute"))})
    engine = QuotaEngine(source=source, store=store, clock=clock)
    async with engine.reserve("p", [Demand("secrets", 2), Demand("calls", 4, Period.parse("minute"))]):
        pass
    await store.flush()
    admin = QuotaAdmin(store, source=source, resources=["secrets", "orders"], clock=clock)
    async with client_for(admin) as client:
        mine = await client.get("/v1/usage", headers={"X-Project-Id": "p"})
        other = await client.get("/v1/project-usage/p")
        nobody = await client.get("/v1/project-usage/q")
        assert_error(await client.get("/v1/usage"), 401)
        assert_error(await client.get("/v1/project-usage/%20bad"), 400)
    assert mine.status_code == 200 and mine.json() == other.json()
    usage = mine.json()["usage"]
    assert list(usage) == ["secrets", "orders", "calls"]  # configured resources first
    assert usage["secrets"] == {"limit": 3, "used": 2, "reserved": 0, "remaining": 1, "window": None, "reset": None}
    assert usage["orders"]["limit"] == -1 and usage["orders"]["remaining"] is None
    assert usage["calls"]["used"] == 4 and usage["calls"]["remaining"] == 6
    assert usage["calls"]["reset"].endswith("Z") and usage["calls"]["window"]["end"] > clock()
    assert nobody.json()["usage"]["secrets"]["used"] == 0
