"""The quota cache across workers: two QuotaCache instances on one shared store are two workers.

Time is an injected clock; the upstream is a scripted source, so that what each worker asks it
(and when) is counted exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import fakeredis
import pytest
import redis.asyncio as aioredis

from middleware import Limit, Quotas, QuotaSource, RedisStore, SourceError, SourceUnavailable
from middleware.cache import QuotaCache
from tests.conftest import FakeClock
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


class Scripted(QuotaSource):
    """Answers ``answer`` (quotas, or an error to raise); counts the fetches."""

    namespace = "scripted"

    def __init__(self, answer: Quotas | SourceError) -> None:
        self.answer = answer
        self.calls = 0

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        self.calls += 1
        if isinstance(self.answer, SourceError):
            raise self.answer
        return self.answer


@pytest.fixture(params=["fakeredis", "redis"])
async def shared(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two workers' stores on one Redis: each has its own client, as separate processes would."""
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        clients = [fakeredis.FakeAsyncRedis(server=server) for _ in range(2)]
    else:
        real: RedisServer = request.getfixturevalue("redis_server")
        clients = [aioredis.Redis(port=real.port, socket_timeout=2) for _ in range(2)]
        await clients[0].flushall()
    stores = (RedisStore(clients[0], clock=clock), RedisStore(clients[1], clock=clock))
    yield stores
    for store, client in zip(stores, clients, strict=True):
        await store.aclose()
        await client.aclose()


async def test_a_worker_without_a_local_copy_serves_the_shared_stale_one_while_backing_off(
        shared: tuple[RedisStore, RedisStore], clock: FakeClock) -> None:
    quotas = Quotas({"things": Limit(5)})
    source = Scripted(quotas)
    options = {"ttl": 10.0, "jitter": 0.0, "stale": 100.0, "clock": clock}
    first, second = (QuotaCache(source, store, shared=store, **options) for store in shared)
    assert await first.get("p", []) == quotas  # the first worker fetches; the copy is shared
    source.answer = SourceUnavailable("quota API answered 429", status_code=429, retry_after=60)

    clock.advance(30)  # past the TTL, within the stale bound: a refresh is due
    # The second worker never held the project: it refreshes first, is told to wait 60 s, and
    # answers with the shared copy; so does every request of it during the back-off.
    assert await second.get("p", []) == quotas
    clock.advance(1)
    assert await second.get("p", []) == quotas
    clock.advance(40)
    assert await second.get("p", []) == quotas
    assert await first.get("p", []) == quotas  # the first worker honours the shared back-off
    assert source.calls == 2  # the one fetch, and the one refresh that got the 429

    clock.advance(30)  # 101 s after the fetch: back-off over, the upstream is asked again
    assert await second.get("p", []) == quotas and source.calls == 3
    clock.advance(10)  # 111 s: past TTL + stale bound, and backing off after that new failure
    with pytest.raises(SourceUnavailable, match="not asking again"):
        await second.get("p", [])
    assert source.calls == 3
