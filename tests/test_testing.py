"""middleware.testing.QuotaFixture: what users' own suites get."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware import ConfigurationError, Limit, Period, QuotaMiddleware, Rule
from middleware.testing import QuotaFixture
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio
H = {"X-Project-Id": "p1"}
RULES = [Rule("POST", "/things", "things"), Rule("DELETE", "/things/{id}", "things", action="release"),
         Rule("POST", "/calls", "calls", window="minute")]


def inner() -> Starlette:
    async def create(request: Request) -> Response:
        return JSONResponse({"ok": True}, status_code=201)

    async def delete(request: Request) -> Response:
        return Response(status_code=204)

    return Starlette(routes=[Route("/things", create, methods=["POST"]), Route("/things/{id}", delete,
                                                                              methods=["DELETE"]),
                             Route("/calls", create, methods=["POST"])])


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")  # type: ignore[arg-type]


async def test_limits_per_project_and_usage() -> None:
    quota = QuotaFixture({"things": 2})
    quota.set_quota("p1", "things", 1)
    async with client_for(quota.middleware(inner(), RULES)) as client:
        assert (await client.post("/things", headers=H)).status_code == 201
        refused = await client.post("/things", headers=H)
        assert refused.status_code == 403 and "things allows 1, 1 already in use" in refused.json()["description"]
        p2 = [(await client.post("/things", headers={"X-Project-Id": "p2"})).status_code for _ in range(3)]
        assert p2 == [201, 201, 403]
        assert (quota.usage("p1", "things"), quota.usage("p2", "things")) == (1, 2)
        quota.set_quota("p1", "things", None)  # back to the default: applies to the next request
        assert (await client.post("/things", headers=H)).status_code == 201
        assert (await client.delete("/things/x", headers=H)).status_code == 204
    assert quota.usage("p1", "things") == 1
    assert quota.usage("nobody", "things") == 0


async def test_async_context_overrides_and_preset_usage() -> None:
    async with QuotaFixture({"things": 5}) as quota:
        app = QuotaMiddleware(inner(), rules=RULES, engine=quota.engine)
        quota.set_usage("p1", "things", 4)
        quota.set_override("p1", "things", 6)  # an operator's override beats the source
        async with client_for(app) as client:
            statuses = [(await client.post("/things", headers=H)).status_code for _ in range(3)]
        assert statuses == [201, 201, 403]
        assert quota.usage("p1", "things") == 6
        quota.set_default("things", 0)
        quota.set_override("p1", "things", None)
        async with client_for(app) as client:
            disabled = await client.post("/things", headers=H)
        assert disabled.status_code == 403 and "disabled" in disabled.json()["description"]


async def test_windowed_quotas_count_in_the_current_window(clock: FakeClock) -> None:
    quota = QuotaFixture({"calls": 2, "credits": Limit(3000, scale=1000, period=Period.parse("minute"))},
                         clock=clock)
    clock.now = 1_800_000_000.0 - 1_800_000_000.0 % 60  # the start of a minute
    async with client_for(quota.middleware(inner(), RULES)) as client:
        statuses = [(await client.post("/calls", headers=H)).status_code for _ in range(3)]
        assert statuses == [201, 201, 429]
        assert quota.usage("p1", "calls", window="minute") == 2
        assert quota.usage("p1", "calls") == 0  # the count bucket: nothing there
        clock.advance(60)
        assert quota.usage("p1", "calls", window="minute") == 0
        assert (await client.post("/calls", headers=H)).status_code == 201
    quota.set_usage("p1", "credits", 2.5)  # the limit's own period and scale
    assert quota.usage("p1", "credits") == 2.5


async def test_installed_points_an_existing_middleware_at_the_fixture() -> None:
    from examples import fastapi_app

    app = fastapi_app.create_app()
    original = app.engine
    with QuotaFixture({"secrets": 1, "reports": 1}) as quota, quota.installed(app):
        async with client_for(app) as client:
            assert [(await client.post("/v1/secrets", headers=H)).status_code for _ in range(2)] == [201, 403]
            # The FastAPI dependency decides with the same (installed) engine.
            assert [(await client.post("/v1/reports", headers=H)).status_code for _ in range(2)] == [201, 403]
        assert (quota.usage("p1", "secrets"), quota.usage("p1", "reports")) == (1, 1)
    assert app.engine is original


async def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        QuotaFixture({"things": "many"})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError):
        QuotaFixture(store=None)
    with pytest.raises(ConfigurationError):
        QuotaFixture().installed(object()).__enter__()  # type: ignore[arg-type]
