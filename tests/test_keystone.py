"""KeystoneLimitsSource against a fake Keystone that follows the unified limits API."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from examples.fake_upstreams import FakeKeystone
from middleware import (
    Bucket,
    Demand,
    KeystoneLimitsSource,
    QuotaEngine,
    Rejection,
    SourceInvalid,
    SourceRejected,
    Store,
)

pytestmark = pytest.mark.anyio
TOKEN = "service-token"
REGISTERED = [("nova", None, "servers", 10), ("nova", None, "ram_mb", -1), ("nova", "r2", "servers", 1),
              ("cinder", None, "volumes", 5)]
LIMITS = [("p1", "nova", None, "servers", 3), ("org", "nova", None, "servers", 4), ("p2", "cinder", None, "volumes", 0)]
PARENTS = {"p1": "org", "p2": "org"}


def source(keystone: FakeKeystone, **options: Any) -> KeystoneLimitsSource:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=keystone))
    options.setdefault("token", TOKEN)
    options.setdefault("service_id", "nova")
    return KeystoneLimitsSource("http://keystone", client=client, **options)


def fake(**options: Any) -> FakeKeystone:
    return FakeKeystone(token=TOKEN, registered=REGISTERED, limits=LIMITS, parents=PARENTS, **options)


async def test_project_limits_override_registered_defaults_for_the_service_and_region() -> None:
    quotas = await source(fake()).fetch("p1", {})
    assert {name: limit.value for name, limit in quotas.limits.items()} == {"servers": 3, "ram_mb": -1}
    other = await source(fake()).fetch("p9", {})  # no limits of its own: the defaults
    assert {name: limit.value for name, limit in other.limits.items()} == {"servers": 10, "ram_mb": -1}
    region = await source(fake(), region_id="r2").fetch("p9", {})
    assert {name: limit.value for name, limit in region.limits.items()} == {"servers": 1}


async def test_parents_under_strict_two_level_and_none_when_flat() -> None:
    strict = source(fake())
    assert [await strict.parent_of(p, {}) for p in ("p1", "org")] == ["org", None]  # org's parent is its domain
    assert await source(fake(model="flat")).parent_of("p1", {}) is None
    with pytest.raises(SourceRejected):
        await strict.parent_of("unknown", {})


@pytest.mark.parametrize(("keystone", "error"), [
    (FakeKeystone(token="another"), SourceRejected),
    (FakeKeystone(token=TOKEN, model="hierarchical"), SourceInvalid),
])
async def test_a_refused_credential_or_an_unknown_model_is_a_clear_source_error(keystone: FakeKeystone,
                                                                                 error: type[Exception]) -> None:
    with pytest.raises(error):
        ks = source(keystone)
        await ks.fetch("p1", {})
        await ks.parent_of("p1", {})


async def test_garbage_is_invalid() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b'{"registered_limits": [{"default_limit": 3}]}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    with pytest.raises(SourceInvalid, match="resource_name"):
        await KeystoneLimitsSource("http://k", token=TOKEN, service_id="nova", client=client).fetch("p", {})


async def test_children_racing_for_their_parents_cap_admit_exactly_the_cap(store: Store) -> None:
    keystone = fake()
    engine = QuotaEngine(source=source(keystone), store=store)
    # org allows 4 servers; p1 allows 3 of them, p2 the default 10: together they get 4.
    outcomes = await asyncio.gather(*(engine.admit(p, Demand("servers")) for p in ["p1", "p2"] * 10))
    admitted = [o for o in outcomes if o is not None and not isinstance(o, Rejection)]
    assert len(admitted) == 4
    refused = [o for o in outcomes if isinstance(o, Rejection)]
    assert {r.resource for r in refused} == {"servers"} and len(refused) == 16
    await store.flush()
    usage = [await store.usage(Bucket(p, "servers")) for p in ("p1", "p2", "org")]
    assert usage[2] == 4 and usage[0] + usage[1] == 4 and usage[0] <= 3
    # The service credential went to Keystone, once per project per TTL (and the model once).
    assert keystone.calls.count("/v3/limits/model") == 1
