"""A guarded app mounted under a prefix: rules match the path the application routes on.

Starlette's ``Mount``, a FastAPI sub-application and a server's ``--root-path`` all put the prefix
in ``root_path`` and leave ``path`` whole; consume and release rules must match all the same.
(The same shapes run under real servers in tests/test_deployments.py.)
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from middleware import MemoryStore, QuotaMiddleware, Rule, StaticSource
from middleware.rules import route_path
from tests.test_middleware import HEADERS, inner_app

pytestmark = pytest.mark.anyio

RULES = [Rule("POST", "/things", "things"), Rule("DELETE", "/things/{id}", "things", action="release"),
         Rule("POST", "/regions/{region}/things", "things:{region}")]


def guarded(store: MemoryStore) -> QuotaMiddleware:
    return QuotaMiddleware(inner_app(), rules=RULES, source=StaticSource({"things": 2}), store=store)


def starlette_mount(store: MemoryStore) -> tuple[Any, str, str]:
    return Starlette(routes=[Mount("/api", app=guarded(store))]), "", "/api"


def fastapi_sub_application(store: MemoryStore) -> tuple[Any, str, str]:
    parent = FastAPI()
    parent.mount("/sub", guarded(store))
    return parent, "", "/sub"


def root_path(store: MemoryStore) -> tuple[Any, str, str]:
    # What `uvicorn --root-path /api` hands the app: the prefix in root_path, and in path too.
    return guarded(store), "/api", "/api"


SHAPES = [starlette_mount, fastapi_sub_application, root_path]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
async def test_a_mounted_app_is_guarded_and_releases_apply(shape: Any) -> None:
    store = MemoryStore()
    app, server_root, prefix = shape(store)
    transport = httpx.ASGITransport(app=app, root_path=server_root)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await client.post(f"{prefix}/things", headers=HEADERS)).status_code for _ in range(5)]
        assert statuses == [201, 201, 403, 403, 403]
        assert (await client.delete(f"{prefix}/things/1", headers=HEADERS)).status_code == 204
        assert (await client.post(f"{prefix}/things", headers=HEADERS)).status_code == 201
        assert (await client.post(f"{prefix}/things", headers=HEADERS)).status_code == 403


@pytest.mark.parametrize(("path", "root", "expected"), [
    ("/things", "", "/things"),
    ("/api/things", "/api", "/things"),
    ("/api", "/api", ""),
    ("/apix/things", "/api", "/apix/things"),  # a prefix of the name, not of the path
    ("/things", "/api", "/things"),            # a server that already stripped the prefix
])
def test_route_path_strips_the_root_path_as_starlettes_router_does(path: str, root: str, expected: str) -> None:
    from starlette._utils import get_route_path

    scope = {"path": path, "root_path": root}
    assert route_path(scope) == expected == get_route_path(scope)  # type: ignore[arg-type]


async def test_path_parameters_of_a_resource_are_read_under_a_prefix() -> None:
    store = MemoryStore()
    app = guarded(store)
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create(request: Request) -> JSONResponse:
        return JSONResponse({}, status_code=201)

    app.app = Starlette(routes=[Route("/regions/{region}/things", create, methods=["POST"])])
    mounted = Starlette(routes=[Mount("/api", app=app)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mounted), base_url="http://t") as client:
        assert (await client.post("/api/regions/eu/things", headers=HEADERS)).status_code == 201
    assert store._slots  # noqa: SLF001 - the bucket's name is what this test is about
    assert {bucket.resource for bucket in store._slots} == {"things:eu"}  # noqa: SLF001
