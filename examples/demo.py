"""Demo: a project fills its quota in the example secret store and is refused.

Runs in one process with no server: the app is driven through httpx.ASGITransport, quotas come
from static configuration and usage lives in memory (set REDIS_URL to use Redis instead).

    python -m examples.demo
"""

from __future__ import annotations

import asyncio
import os

import httpx

from examples.barbican_store import DEMO_QUOTAS, create_app
from middleware import Bucket, MemoryStore, RedisStore, StaticSource, Store


def show(response: httpx.Response) -> None:
    request = response.request
    limit_headers = "  ".join(f"{name}: {response.headers[name]}" for name in ("ratelimit-policy", "ratelimit")
                              if name in response.headers)
    print(f"  {request.method} {request.url.path:<12} -> {response.status_code}  {limit_headers}")
    if response.status_code >= 400:
        print(f"      {response.text}")


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    store: Store = RedisStore(redis_url) if redis_url else MemoryStore()
    app = create_app(StaticSource(DEMO_QUOTAS), store, secrets_per_minute=30)
    headers = {"X-Project-Id": "demo-project"}
    print(f"Quotas of every project: {DEMO_QUOTAS}; and at most 30 secrets created per minute")
    print(f"Usage store: {'Redis at ' + redis_url if redis_url else 'in-memory (no server)'}\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://barbican.local") as client:
        if redis_url:
            print("Resetting the demo project's usage in Redis.\n")
            for resource in DEMO_QUOTAS:
                await store.set_usage(Bucket("demo-project", resource), 0)
            for view in await store.buckets("demo-project"):  # the per-minute windows too
                await store.set_usage(view.bucket, 0)

        print("1. A failed creation (invalid JSON) costs nothing: the next one still sees 4 left.")
        show(await client.post("/v1/secrets", content=b"{oops", headers=headers))
        refs = []
        response = await client.post("/v1/secrets", json={"name": "first"}, headers=headers)
        show(response)
        refs.append(response.json()["secret_ref"])

        print("\n2. demo-project creates secrets until its quota of 5 is reached, and is refused:")
        for i in range(5):
            response = await client.post("/v1/secrets", json={"name": f"secret-{i}"}, headers=headers)
            show(response)
            if response.status_code == 201:
                refs.append(response.json()["secret_ref"])

        print("\n3. Deleting a secret gives one back:")
        show(await client.delete(httpx.URL(refs[0]).path, headers=headers))
        show(await client.post("/v1/secrets", json={"name": "again"}, headers=headers))

        print("\n4. Another project has its own quota:")
        show(await client.post("/v1/secrets", json={}, headers={"X-Project-Id": "other-project"}))

        print("\n5. Orders allow 2; the 3rd is refused:")
        for _ in range(3):
            show(await client.post("/v1/orders", json={"type": "key"}, headers=headers))

        print("\n6. No project identity is a clear 401, not a 500:")
        show(await client.post("/v1/secrets", json={}))
    await store.aclose()


if __name__ == "__main__":
    asyncio.run(main())
