"""A Latitude.sh style traffic gate: responses are metered in bytes against the project's monthly
traffic quota per region (``Normal`` billing: ``quota_in_tb.total`` TB, 1 TB = 10^12 bytes), or
against a bandwidth rate (``95th percentile`` billing: ``quota_in_mbps.total`` Mbps, per minute).

Bodies are counted while they stream, never buffered. Once a project's traffic reached its quota,
its next downloads get 429 with ``Retry-After`` until the window ends.

    python -m examples.traffic_gate                  # in process, against the local fake upstream
    LATITUDE_URL=https://api.latitude.sh LATITUDE_TOKEN=... uvicorn examples.traffic_gate:app
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from examples.fake_upstreams import latitude
from middleware import Bucket, LatitudeSource, MemoryStore, QuotaMiddleware, RedisStore, Rule, Store

#: The region comes from the route: /regions/brazil/... counts against traffic:brazil.
RULES = [Rule("GET", "/regions/{region}/files/{name}", "traffic:{region}", action="meter")]


async def download(request: Request) -> Response:
    size = int(request.query_params.get("size", "1048576"))

    async def body() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            chunk = min(left, 65536)
            yield b"\0" * chunk
            left -= chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


def create_app(source: LatitudeSource, store: Store | None = None) -> Starlette:
    return Starlette(routes=[Route("/regions/{region}/files/{name}", download)],
                     middleware=[Middleware(QuotaMiddleware, rules=RULES, source=source, store=store)])


def local_source() -> LatitudeSource:
    """Latitude.sh's API played by the local fake, which serves the seed's example body."""
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=latitude))
    return LatitudeSource("http://latitude.local", token="demo-token", client=client)


def from_env() -> Starlette:
    url = os.environ.get("LATITUDE_URL")
    source = LatitudeSource(url, token=os.environ["LATITUDE_TOKEN"]) if url else local_source()
    redis_url = os.environ.get("REDIS_URL")
    return create_app(source, RedisStore(redis_url) if redis_url else MemoryStore())


app = from_env()


async def main() -> None:
    store = MemoryStore()
    source = local_source()
    demo = create_app(source, store)
    project = "proj_lkg1DekRdvZE5"
    headers = {"X-Project-Id": project}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=demo), base_url="http://cdn.local") as client:
        print("The upstream says (the seed's example): project incredible-bronze-knife, billing Normal,")
        print("region brazil: 20 TB per month. The 0 Mbps object does not apply to Normal billing.\n")
        response = await client.get("/regions/brazil/files/video.bin?size=5000000", headers=headers)
        print(f"  GET /regions/brazil/files/video.bin -> {response.status_code}, {len(response.content):,} bytes,"
              f"  {response.headers['ratelimit-policy']}")
        quotas = await source.fetch(project, {})
        month = quotas.limit("traffic:brazil").period.window_at(time.time())  # type: ignore[union-attr]
        bucket = Bucket(project, "traffic:brazil", month)
        print(f"  metered so far this month: {await store.usage(bucket):,} bytes")
        print("\n  Pretend the project already used 20 TB this month:")
        await store.charge(bucket, 20 * 10**12)
        refused = await client.get("/regions/brazil/files/video.bin", headers=headers)
        print(f"  GET /regions/brazil/files/video.bin -> {refused.status_code}, Retry-After: "
              f"{refused.headers['retry-after']} s\n      {refused.text}")
        other = await client.get("/regions/tokyo/files/video.bin?size=10", headers=headers)
        print(f"  GET /regions/tokyo/files/video.bin  -> {other.status_code} (no quota reported for that region)")
    await source.aclose()


if __name__ == "__main__":
    asyncio.run(main())
