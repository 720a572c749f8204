"""An organisation's cap over its projects, with Keystone's unified limits (strict-two-level).

Keystone (here a local stand-in that follows its API, examples/fake_upstreams.py) registers a
default of 10 servers per project and sets limits of its own: the organisation ``acme`` may run 5
servers in all, its project ``acme-web`` 4. ``acme-web`` and ``acme-batch`` are children of
``acme``: every server they create is charged to the project and to ``acme``, in one atomic step,
so together they never pass 5, whichever of them asks first.

    python -m examples.org_cap
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.fake_upstreams import FakeKeystone
from middleware import KeystoneLimitsSource, MemoryStore, QuotaEngine, QuotaMiddleware, Rule, Store

SERVICE_TOKEN = "a-service-token"  # what the quota service authenticates to Keystone with


def keystone() -> FakeKeystone:
    return FakeKeystone(token=SERVICE_TOKEN, model="strict-two-level",
                        registered=[("compute", None, "servers", 10)],
                        limits=[("acme", "compute", None, "servers", 5), ("acme-web", "compute", None, "servers", 4)],
                        parents={"acme-web": "acme", "acme-batch": "acme"})


def create_app(store: Store, keystone_app: FakeKeystone) -> QuotaMiddleware:
    async def create_server(request: Request) -> Response:
        return JSONResponse({"server": {"status": "BUILD"}}, status_code=202)

    app = Starlette(routes=[Route("/servers", create_server, methods=["POST"])])
    source = KeystoneLimitsSource("http://keystone.local", token=SERVICE_TOKEN, service_id="compute",
                                  client=httpx.AsyncClient(transport=httpx.ASGITransport(app=keystone_app)))
    return QuotaMiddleware(app, rules=[Rule("POST", "/servers", "servers")],
                           engine=QuotaEngine(source=source, store=store))


async def main() -> None:
    app = create_app(MemoryStore(), keystone())
    print("Keystone: acme may run 5 servers in all; acme-web 4 of them; acme-batch the default 10.\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://compute.local") as client:
        for project, count in (("acme-web", 4), ("acme-batch", 3)):
            print(f"{project} asks for {count} servers:")
            for _ in range(count):
                response = await client.post("/servers", headers={"X-Project-Id": project})
                print(f"  POST /servers -> {response.status_code}  ratelimit: {response.headers.get('ratelimit')}")
                if response.status_code >= 400:
                    print(f"      {response.json()['description']}")
    await app.aclose()


if __name__ == "__main__":
    asyncio.run(main())
