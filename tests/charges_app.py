"""A guarded app whose requests charge 1 to 3 buckets, configured by environment; serve it with
uvicorn for the multi-worker races (tests/test_charges_race.py).

- ``REDIS_URL`` (required), ``REDIS_CLUSTER=1`` for a Redis Cluster;
- ``COUNT`` (each project's ``things``), ``RATE`` (``things:rate`` per minute, written on the
  rules), ``ORG_CAP`` (``things`` of the parent ``org``, over ``kid1`` and ``kid2``).

Routes (all ``POST``; ``?fail=1`` answers 500 after admission, so its charges are refunded):
``/one`` charges the project's count; ``/two`` and ``/three`` its count and its rate. A kid's
requests charge ``org``'s cap too (``solo`` has no parent): 1 to 3 buckets a request. ``GET /``.
"""

from __future__ import annotations

import os

from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from middleware import QuotaEngine, QuotaMiddleware, RedisStore, Rule, StaticSource

PARENTS = {"kid1": "org", "kid2": "org"}


async def root(request: Request) -> Response:
    return PlainTextResponse("ok")


async def create(request: Request) -> Response:
    if request.query_params.get("fail"):
        return JSONResponse({"error": "failed after admission"}, status_code=500)
    return JSONResponse({"pid": os.getpid()}, status_code=201)


def build() -> QuotaMiddleware:
    url, rate = os.environ["REDIS_URL"], os.environ["RATE"]
    client = RedisCluster.from_url(url) if os.environ.get("REDIS_CLUSTER") == "1" else None
    store = RedisStore(client if client is not None else url)
    source = StaticSource({"things": int(os.environ["COUNT"])},
                          projects={"org": {"things": int(os.environ["ORG_CAP"])}})
    engine = QuotaEngine(source=source, store=store, parent=PARENTS.get)
    rules = [Rule("POST", "/{route}", "things"),
             Rule("POST", "/two", "things:rate", limit=f"{rate}/minute"),
             Rule("POST", "/three", "things:rate", limit=f"{rate}/minute")]
    inner = Starlette(routes=[Route("/", root), Route("/{route}", create, methods=["POST"])])
    return QuotaMiddleware(inner, rules=rules, engine=engine)


app = build()
