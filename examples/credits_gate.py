"""A Captain Data style credits gate: each route costs credits out of the workspace's monthly quota.

The limit is Captain Data's ``credits_max`` for the billing period ``[current_month_start,
current_month_end)``; ``credits_used`` seeds the local counter; fractional costs stay exact.
Over the quota, callers get 429 with ``Retry-After`` until the period ends.

    python -m examples.credits_gate                  # in process, against the local fake upstream
    CAPTAINDATA_URL=https://api.captaindata.com CAPTAINDATA_API_KEY=... uvicorn examples.credits_gate:app
"""

from __future__ import annotations

import asyncio
import os

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.fake_upstreams import captaindata
from middleware import CaptainDataSource, MemoryStore, QuotaMiddleware, RedisStore, Rule, Store

RULES = [
    Rule("POST", "/v1/people/enrich", "credits", cost=1),
    Rule("POST", "/v1/companies/search", "credits", cost=0.25),
]


async def enrich(request: Request) -> Response:
    return JSONResponse({"person": {"name": "Ada"}})


async def search(request: Request) -> Response:
    return JSONResponse({"companies": []})


def create_app(source: CaptainDataSource, store: Store | None = None) -> Starlette:
    return Starlette(routes=[Route("/v1/people/enrich", enrich, methods=["POST"]),
                             Route("/v1/companies/search", search, methods=["POST"])],
                     middleware=[Middleware(QuotaMiddleware, rules=RULES, source=source, store=store,
                                            cache_ttl=60)])


def _store() -> Store:
    url = os.environ.get("REDIS_URL")
    return RedisStore(url) if url else MemoryStore()


def local_source() -> CaptainDataSource:
    """Captain Data's API played by the local fake, which serves the seed's example body."""
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=captaindata))
    return CaptainDataSource("http://captaindata.local", api_key="demo-key", client=client)


def from_env() -> Starlette:
    url = os.environ.get("CAPTAINDATA_URL")
    source = CaptainDataSource(url, api_key=os.environ["CAPTAINDATA_API_KEY"]) if url else local_source()
    return create_app(source, _store())


app = from_env()


async def main() -> None:
    source = local_source()
    demo = create_app(source, MemoryStore())
    headers = {"X-Project-Id": "workspace-1"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=demo), base_url="http://gate.local") as client:
        print("The upstream says: credits_max 100 for the period 2023-10-01 .. 2023-10-31 (the seed's example).")
        print("That period is over, so credits count in the current calendar month until it reports the next.\n")
        for i in range(200):
            path = "/v1/companies/search" if i % 2 else "/v1/people/enrich"
            response = await client.post(path, headers=headers)
            if i < 3 or response.status_code != 200:
                print(f"  POST {path:<22} -> {response.status_code}  {response.headers.get('ratelimit', '')}")
                if response.status_code != 200:
                    print(f"      Retry-After: {response.headers['retry-after']} s")
                    print(f"      {response.text}")
                    break
            elif i == 3:
                print("  ...")
    await source.aclose()


if __name__ == "__main__":
    asyncio.run(main())
