"""Release rules: deletes give quota back; with confirm=True only deletes the app confirms."""

from __future__ import annotations

import itertools

import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware import Bucket, ConfigurationError, MemoryStore, QuotaMiddleware, Rule, StaticSource, confirm_release
from tests.test_middleware import HEADERS, client_for, usage

pytestmark = pytest.mark.anyio


def idempotent_store(confirm: bool) -> tuple[QuotaMiddleware, set[str]]:
    """A store of things whose DELETE answers 204 for any id, as idempotent deletes do."""
    things: set[str] = set()
    made = itertools.count()

    async def create(request: Request) -> Response:
        new = str(next(made))
        things.add(new)
        return JSONResponse({"id": new}, status_code=201)

    async def delete(request: Request) -> Response:
        if request.path_params["id"] in things:
            things.discard(request.path_params["id"])
            confirm_release(request)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/things", create, methods=["POST"]),
                            Route("/things/{id}", delete, methods=["DELETE"])])
    rules = [Rule("POST", "/things", "things"), Rule("DELETE", "/things/{id}", "things", action="release",
                                                     confirm=confirm)]
    return QuotaMiddleware(app, rules=rules, source=StaticSource({"things": 3}), store=MemoryStore()), things


async def test_without_confirmation_made_up_deletes_drain_the_counter() -> None:
    # The hole confirm=True closes: every 204 gives quota back, whether anything was deleted or not.
    mw, things = idempotent_store(confirm=False)
    async with client_for(mw) as client:
        for _ in range(3):
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
        for made_up in ("x1", "x2", "x3"):
            assert (await client.delete(f"/things/{made_up}", headers=HEADERS)).status_code == 204
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
    assert len(things) == 4  # past the limit of 3


async def test_with_confirmation_only_real_deletes_give_quota_back() -> None:
    mw, things = idempotent_store(confirm=True)
    async with client_for(mw) as client:
        ids = [(await client.post("/things", headers=HEADERS)).json()["id"] for _ in range(3)]
        for made_up in ("x1", "x2", "x3"):
            assert (await client.delete(f"/things/{made_up}", headers=HEADERS)).status_code == 204
        assert await usage(mw) == 3
        assert (await client.post("/things", headers=HEADERS)).status_code == 403
        assert (await client.delete(f"/things/{ids[0]}", headers=HEADERS)).status_code == 204
        assert await usage(mw) == 2
        assert (await client.delete(f"/things/{ids[0]}", headers=HEADERS)).status_code == 204  # again: gone
        assert await usage(mw) == 2
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
    assert len(things) == 3


async def test_a_confirmation_from_a_fastapi_endpoint() -> None:
    app = FastAPI()

    @app.delete("/things/{id}", status_code=204)
    async def delete(id: str, request: FastAPIRequest) -> None:
        if id == "real":
            confirm_release(request)

    store = MemoryStore()
    mw = QuotaMiddleware(app, rules=[Rule("DELETE", "/things/{id}", "things", action="release", confirm=True)],
                         source=StaticSource({"things": 3}), store=store)
    await store.seed(Bucket("p", "things"), 2)
    async with client_for(mw) as client:
        assert (await client.delete("/things/fake", headers=HEADERS)).status_code == 204
        assert await usage(mw) == 2
        assert (await client.delete("/things/real", headers=HEADERS)).status_code == 204
        assert await usage(mw) == 1


async def test_a_confirmation_the_request_brought_in_its_state_does_not_count() -> None:
    mw, _ = idempotent_store(confirm=True)
    await mw.store.seed(Bucket("p", "things"), 2)
    inner = mw.app

    async def outer(scope, receive, send):  # type: ignore[no-untyped-def]
        confirm_release(scope)  # an outer layer (or anything before the middleware) marked it
        await mw(scope, receive, send)

    async with client_for(outer) as client:
        assert (await client.delete("/things/nope", headers=HEADERS)).status_code == 204
    assert inner is mw.app
    assert await usage(mw) == 2


def test_confirm_is_for_release_rules() -> None:
    with pytest.raises(ConfigurationError, match="confirm=True is for release rules"):
        Rule("POST", "/things", "things", confirm=True)
