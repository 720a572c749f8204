"""FastAPI: the example app, guarded by the middleware and by a dependency sharing its engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException

from examples import fastapi_app
from middleware import Bucket, Decision, QuotaMiddleware, RedisStore, Rule, StaticSource, Store, problem_json
from middleware.fastapi import QuotaRefused, guard, quota_refused_handler
from tests.conftest import FakeClock
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


def _twin_app(limit: int = 2, window: str | None = None, **guard_options: Any) -> QuotaMiddleware:
    """One resource guarded twice: by a rule on /by-rule, by the dependency on /by-dependency.
    No exception handler is registered. Time stands still (FakeClock): requests compared with each
    other state the same seconds until their window ends, even across a second's boundary."""
    api = FastAPI()
    rules = [Rule("POST", "/by-rule", "things", window=window)]
    quota = QuotaMiddleware(api, rules=rules, source=StaticSource({"things": limit}), clock=FakeClock())

    @api.post("/by-rule", status_code=201)
    async def by_rule() -> dict[str, str]:
        return {"ok": "rule"}

    @api.post("/by-dependency", status_code=201)
    async def by_dependency(decision: Decision = Depends(guard(quota, "things", window=window,
                                                               **guard_options))) -> dict[str, str]:
        return {"ok": "dependency"}

    return quota


QUOTA_HEADERS = ("ratelimit", "ratelimit-policy", "retry-after", "content-type")


def _quota_headers(response: httpx.Response) -> dict[str, str | None]:
    return {name: response.headers.get(name) for name in QUOTA_HEADERS}


@pytest.mark.parametrize("window", [None, "minute"])
async def test_the_dependency_answers_as_the_middleware_with_no_handler_registered(window: str | None) -> None:
    app = _twin_app(limit=2, window=window)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        first_rule = await client.post("/by-rule", headers=H)
        first_dependency = await client.post("/by-dependency", headers=H)
        refused_by_rule = await client.post("/by-rule", headers=H)
        refused_by_dependency = await client.post("/by-dependency", headers=H)
        anonymous_rule = await client.post("/by-rule")
        anonymous_dependency = await client.post("/by-dependency")
    # Admitted: the same RateLimit headers (1 used, then 2), whichever guard decided.
    assert first_rule.status_code == first_dependency.status_code == 201
    assert first_rule.headers["ratelimit-policy"] == first_dependency.headers["ratelimit-policy"]
    assert first_rule.headers["ratelimit"].startswith('"things";r=1')
    assert first_dependency.headers["ratelimit"].startswith('"things";r=0')
    # Refused: the same status, body and headers.
    expected_status = 403 if window is None else 429
    assert refused_by_rule.status_code == refused_by_dependency.status_code == expected_status
    assert refused_by_dependency.json() == refused_by_rule.json()
    assert refused_by_dependency.json()["code"] == expected_status
    assert _quota_headers(refused_by_dependency) == _quota_headers(refused_by_rule)
    if window is not None:
        assert int(refused_by_dependency.headers["retry-after"]) > 0
    assert anonymous_dependency.status_code == anonymous_rule.status_code == 401
    assert anonymous_dependency.json() == anonymous_rule.json()


async def test_an_unlimited_resource_adds_no_headers_and_a_handler_of_your_own_is_kept() -> None:
    from fastapi.responses import JSONResponse

    unlimited = _twin_app(limit=-1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=unlimited), base_url="http://api") as client:
        response = await client.post("/by-dependency", headers=H)
    assert response.status_code == 201 and "ratelimit" not in response.headers

    app = _twin_app(limit=0)
    api = app.app
    assert isinstance(api, FastAPI)

    async def mine(request: Any, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QuotaRefused)
        return JSONResponse({"mine": exc.rejection.description}, status_code=exc.status_code, headers=exc.headers)

    api.add_exception_handler(QuotaRefused, mine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        refused = await client.post("/by-dependency", headers=H)
    assert refused.status_code == 403 and "disabled" in refused.json()["mine"]
    assert refused.headers["ratelimit-policy"] == '"things";q=0'


async def test_the_problem_json_renderer_is_the_dependencys_too() -> None:
    api = FastAPI()
    quota = QuotaMiddleware(api, rules=[Rule("POST", "/by-rule", "things")], source=StaticSource({"things": 0}),
                            renderer=problem_json)

    @api.post("/by-dependency", status_code=201)
    async def by_dependency(decision: Decision = Depends(guard(quota, "things"))) -> None: ...

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=quota), base_url="http://api") as client:
        by_rule = await client.post("/by-rule", headers=H)
        by_dependency = await client.post("/by-dependency", headers=H)
    assert by_dependency.headers["content-type"] == by_rule.headers["content-type"] == "application/problem+json"
    assert by_dependency.json() == by_rule.json()


async def test_the_dependency_charges_and_settles_a_parent_as_the_middleware_does() -> None:
    """A project under an organisation (the engine's parent function): the dependency's request is
    charged at both levels, answers with both policies, and settles (or refunds) both reservations."""
    api = FastAPI()
    quota = QuotaMiddleware(api, rules=[], source=StaticSource({"reports": 5}, projects={"org": {"reports": 1}}),
                            parent=lambda project: "org" if project.startswith("team-") else None)

    @api.post("/v1/reports", status_code=201)
    async def create(fail: bool = False, decision: Decision = Depends(guard(quota, "reports"))) -> dict[str, bool]:
        if fail:
            raise HTTPException(409, "conflict")
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=quota), base_url="http://api") as client:
        failed = await client.post("/v1/reports?fail=true", headers={"X-Project-Id": "team-a"})
        created = await client.post("/v1/reports", headers={"X-Project-Id": "team-a"})
        refused = await client.post("/v1/reports", headers={"X-Project-Id": "team-b"})  # the organisation's cap
    assert failed.status_code == 409 and created.status_code == 201 and refused.status_code == 403
    assert "org" in created.headers["ratelimit-policy"] and "reports" in created.headers["ratelimit-policy"]
    await quota.store.flush()
    usage = {p: await quota.store.usage(Bucket(p, "reports")) for p in ("team-a", "team-b", "org")}
    assert usage == {"team-a": 1, "team-b": 0, "org": 1}  # the failed request was refunded at both levels
