"""QuotaMiddleware driven as users meet it: an ASGI app called through httpx or raw ASGI messages."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import fakeredis
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from middleware import (
    BarbicanSource,
    Bucket,
    ConfigurationError,
    Limit,
    MemoryStore,
    QuotaMiddleware,
    Quotas,
    QuotaSource,
    RedisStore,
    Rule,
    StaticSource,
    Store,
    problem_json,
)
from middleware.identity import MAX_REMEMBERED
from tests.conftest import FakeClock
from tests.upstreams import FakeBarbican

pytestmark = pytest.mark.anyio

RULES = [Rule("POST", "/things", "things"), Rule("DELETE", "/things/{id}", "things", action="release"),
         Rule("POST", "/stream", "things"), Rule("POST", "/boom", "things"), Rule("POST", "/fail", "things")]
HEADERS = {"X-Project-Id": "p", "X-Auth-Token": "tok"}


async def create(request: Request) -> Response:
    return JSONResponse({"ok": True}, status_code=201)


async def delete(request: Request) -> Response:
    return Response(status_code=204)


async def fail(request: Request) -> Response:
    return JSONResponse({"error": "nope"}, status_code=int(request.query_params.get("status", "409")))


async def boom(request: Request) -> Response:
    raise RuntimeError("app crashed")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk{i};".encode()

    return StreamingResponse(chunks(), status_code=201)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def inner_app() -> Starlette:
    return Starlette(routes=[Route("/things", create, methods=["POST"]),
                             Route("/things/{id}", delete, methods=["DELETE"]),
                             Route("/fail", fail, methods=["POST"]), Route("/boom", boom, methods=["POST"]),
                             Route("/stream", stream, methods=["POST"]), Route("/health", health)])


def guarded(store: Store | None = None, limit: int = 2, **options: Any) -> QuotaMiddleware:
    options.setdefault("source", StaticSource({"things": limit}))
    return QuotaMiddleware(inner_app(), rules=RULES, store=store, **options)


def client_for(app: Any, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://app.test")


async def usage(mw: QuotaMiddleware, project: str = "p") -> int:
    await mw.store.flush()
    return await mw.store.usage(Bucket(project, "things"))


# -- pass-through ---------------------------------------------------------------------------------

async def test_unguarded_routes_pass_untouched(store: Store) -> None:
    async with client_for(guarded(store)) as client:
        response = await client.get("/health")  # no project header needed
    assert response.status_code == 200 and response.text == "ok"
    assert "ratelimit" not in response.headers


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})

    mw = QuotaMiddleware(app, rules=RULES, source=StaticSource({}))
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mw({"type": "lifespan"}, receive, send)
    await mw({"type": "websocket", "path": "/things", "headers": []}, receive, send)
    assert seen == ["lifespan", "websocket"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_streaming_response_is_not_buffered() -> None:
    mw = guarded()
    sent: list[dict[str, Any]] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/stream", "headers": [(b"x-project-id", b"p")],
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("t", 80), "http_version": "1.1"}
    await mw(scope, receive, send)
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert b"chunk0;" in bodies and b"chunk1;" in bodies  # chunks arrive as separate messages
    start = sent[0]
    assert start["status"] == 201 and (b"ratelimit", b'"things";r=1') in start["headers"]
    assert await usage(mw) == 1


# -- identity -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("project", "status"), [(None, 401), ("", 401), ("a\x01b", 400), ("x" * 256, 400),
                                                 (" padded", 400)])
async def test_bad_identity_is_a_clear_4xx(project: str | None, status: int) -> None:
    headers = {} if project is None else {"X-Project-Id": project}
    async with client_for(guarded()) as client:
        response = await client.post("/things", headers=headers)
    assert response.status_code == status
    body = response.json()
    assert body["code"] == status and "X-Project-Id" in body["description"]


async def test_identities_checked_once_stay_checked_and_bounded() -> None:
    mw = guarded(limit=-1)
    async with client_for(mw) as client:
        for _ in range(2):  # a bad id is refused every time, never remembered as good
            assert (await client.post("/things", headers={"X-Project-Id": "a\x01b"})).status_code == 400
        many = [f"p{i}" for i in range(MAX_REMEMBERED + 10)]
        statuses = {(await client.post("/things", headers={"X-Project-Id": p})).status_code for p in many}
    assert statuses == {201}
    assert len(mw.identity._valid) <= MAX_REMEMBERED  # a flood of distinct ids does not grow it
    assert await usage(mw, "p1") == 1 and await usage(mw, many[-1]) == 1


async def test_identity_from_a_callable() -> None:
    mw = guarded(limit=1, identity=lambda scope: scope["query_string"].decode().removeprefix("tenant="))
    async with client_for(mw) as client:
        assert (await client.post("/things?tenant=t1")).status_code == 201
        assert (await client.post("/things?tenant=t1")).status_code == 403
        assert (await client.post("/things?tenant=t2")).status_code == 201


# -- settlement -----------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 409, 500, 503, 302])
async def test_non_2xx_answer_refunds(store: Store, status: int) -> None:
    mw = guarded(store)
    async with client_for(mw) as client:
        response = await client.post(f"/fail?status={status}", headers=HEADERS)
    assert response.status_code == status
    assert await usage(mw) == 0


async def test_app_exception_refunds_and_propagates(store: Store) -> None:
    mw = guarded(store)
    async with client_for(mw) as client:
        with pytest.raises(RuntimeError, match="app crashed"):
            await client.post("/boom", headers=HEADERS)
    assert await usage(mw) == 0


async def test_client_gone_before_the_answer_refunds(store: Store) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = QuotaMiddleware(app, rules=RULES, source=StaticSource({"things": 5}), store=store)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await mw({"type": "http", "method": "POST", "path": "/things", "headers": [(b"x-project-id", b"p")]}, receive, send)
    assert await usage(mw) == 0


async def test_cancelled_request_refunds(store: Store) -> None:
    started = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started.set()
        await asyncio.sleep(30)

    mw = QuotaMiddleware(app, rules=RULES, source=StaticSource({"things": 5}), store=store)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    task = asyncio.ensure_future(mw({"type": "http", "method": "POST", "path": "/things",
                                     "headers": [(b"x-project-id", b"p")]}, receive, send))
    await started.wait()
    assert await usage(mw) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await usage(mw) == 0


async def test_release_never_goes_below_zero(store: Store) -> None:
    mw = guarded(store)
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        for _ in range(3):
            assert (await client.delete("/things/1", headers=HEADERS)).status_code == 204
        assert await usage(mw) == 0
        assert [(await client.post("/things", headers=HEADERS)).status_code for _ in range(3)] == [201, 201, 403]


async def test_concurrent_requests_admit_exactly_the_limit(store: Store) -> None:
    mw = guarded(store, limit=7)
    async with client_for(mw) as client:
        responses = await asyncio.gather(*(client.post("/things", headers=HEADERS) for _ in range(40)))
    assert sorted(r.status_code for r in responses) == [201] * 7 + [403] * 33
    assert await usage(mw) == 7


# -- limits and rendering -------------------------------------------------------------------------

async def test_resource_the_source_omits_uses_the_default_limit() -> None:
    mw = guarded(source=StaticSource({"other": 1}), default_limit=1)
    async with client_for(mw) as client:
        assert [(await client.post("/things", headers=HEADERS)).status_code for _ in range(2)] == [201, 403]


async def test_per_project_static_quotas() -> None:
    mw = guarded(source=StaticSource({"things": 1}, projects={"big": {"things": 3}}))
    async with client_for(mw) as client:
        big = [(await client.post("/things", headers={"X-Project-Id": "big"})).status_code for _ in range(4)]
        small = [(await client.post("/things", headers={"X-Project-Id": "small"})).status_code for _ in range(2)]
    assert big == [201, 201, 201, 403] and small == [201, 403]


async def test_an_uncached_source_without_an_in_memory_answer_is_asked_every_time() -> None:
    class LiveSource(QuotaSource):  # e.g. quotas read from the service's own database
        cacheable = False

        def __init__(self) -> None:
            self.fetches = 0
            self.limit = 3

        async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
            self.fetches += 1
            return Quotas({"things": Limit(self.limit)})

    source = LiveSource()
    async with client_for(guarded(source=source)) as client:
        first = [(await client.post("/things", headers=HEADERS)).status_code for _ in range(2)]
        source.limit = 2  # takes effect on the next request: nothing was cached
        second = [(await client.post("/things", headers=HEADERS)).status_code for _ in range(2)]
    assert first == [201, 201] and second == [403, 403] and source.fetches == 4


async def test_a_subclass_that_overrides_the_coroutines_has_them_called() -> None:
    calls: list[str] = []

    class AuditedStore(MemoryStore):  # overrides reserve/commit/refund, not their *_nowait fast paths
        async def reserve(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("reserve")
            return await super().reserve(*args, **kwargs)

        async def commit(self, reservation: Any) -> None:
            calls.append("commit")
            await super().commit(reservation)

        async def refund(self, reservation: Any) -> None:
            calls.append("refund")
            await super().refund(reservation)

    class AuditedSource(StaticSource):
        async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
            calls.append("fetch")
            return await super().fetch(project, headers)

    mw = guarded(AuditedStore(), source=AuditedSource({"things": 5}))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        assert (await client.post("/fail", headers=HEADERS)).status_code == 409
    assert calls == ["fetch", "reserve", "commit", "fetch", "reserve", "refund"]
    assert await usage(mw) == 1


async def test_disabled_resource_rejects_every_create(store: Store) -> None:
    async with client_for(guarded(store, limit=0)) as client:
        responses = [await client.post("/things", headers=HEADERS) for _ in range(2)]
    assert [r.status_code for r in responses] == [403, 403]
    assert "disabled" in responses[0].json()["description"]
    assert responses[0].headers["ratelimit-policy"] == '"things";q=0'


async def test_an_override_takes_precedence_over_the_source_at_once(store: Store) -> None:
    mw = guarded(store, limit=0)
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 403
        await store.set_overrides("p", {"things": 2})
        created = await client.post("/things", headers=HEADERS)
        assert created.status_code == 201 and created.headers["ratelimit-policy"] == '"things";q=2'
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        refused = await client.post("/things", headers=HEADERS)
        assert refused.status_code == 403 and "allows 2" in refused.json()["description"]
        await store.set_overrides("p", {"things": -1})
        assert (await client.post("/things", headers=HEADERS)).status_code == 201  # unlimited
        await store.set_overrides("p", {"things": None})  # back to the source's 0
        assert (await client.post("/things", headers=HEADERS)).status_code == 403
    assert await store.overrides("p") == {} and await store.overridden_projects() == []


async def test_problem_json_renderer() -> None:
    async with client_for(guarded(limit=0, renderer=problem_json)) as client:
        response = await client.post("/things", headers=HEADERS)
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["status"] == 403 and doc["project"] == "p" and doc["resource"] == "things" and doc["limit"] == 0


@pytest.mark.parametrize("bad", [
    {"rules": [Rule("POST", "/x", "x")], "source": {"things": 1}},
    {"rules": [Rule("POST", "/x", "x")], "source": StaticSource({}), "on_store_error": "maybe"},
    {"rules": [Rule("POST", "/x", "x")], "source": StaticSource({}), "lease_seconds": 0},
])
async def test_configuration_errors_are_raised_at_start(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        QuotaMiddleware(inner_app(), **bad)


@pytest.mark.parametrize("rule", [lambda: Rule("POST", "things", "t"), lambda: Rule("POST", "/a/{b", "t"),
                                  lambda: Rule("POST", "/a", "t", cost=-1), lambda: Rule("POST", "/a", "t", cost="abc"),
                                  lambda: Rule("POST", "/a", "t", action="eat"),  # type: ignore[arg-type]
                                  lambda: StaticSource({"t": "3"}),  # type: ignore[dict-item]
                                  lambda: RedisStore("redis://127.0.0.1:1/0", pipeline=0)])
def test_bad_rules_and_static_limits_are_configuration_errors(rule: Any) -> None:
    with pytest.raises(ConfigurationError):
        rule()


# -- quota cache ----------------------------------------------------------------------------------

async def test_one_upstream_fetch_per_project_per_ttl_under_a_burst(clock: FakeClock) -> None:
    upstream = FakeBarbican({"tok": {"secrets": 1000}})
    mw = QuotaMiddleware(inner_app(), rules=[Rule("POST", "/things", "secrets")],
                         source=BarbicanSource("http://q.test", client=upstream.client()), cache_ttl=60, clock=clock)
    async with client_for(mw) as client:
        responses = await asyncio.gather(*(client.post("/things", headers=HEADERS) for _ in range(50)))
        assert {r.status_code for r in responses} == {201}
        assert upstream.calls == 1
        clock.advance(30)
        await client.post("/things", headers=HEADERS)
        assert upstream.calls == 1
        clock.advance(31)
        await client.post("/things", headers=HEADERS)
        assert upstream.calls == 2


async def test_workers_sharing_redis_share_the_cached_quotas(clock: FakeClock) -> None:
    upstream = FakeBarbican({"tok": {"secrets": 10}})
    redis = fakeredis.FakeAsyncRedis()

    def worker() -> QuotaMiddleware:
        return QuotaMiddleware(inner_app(), rules=[Rule("POST", "/things", "secrets")],
                               source=BarbicanSource("http://q.test", client=upstream.client()),
                               store=RedisStore(redis, clock=clock), clock=clock)

    for _ in range(3):
        async with client_for(worker()) as client:
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
    assert upstream.calls == 1


async def test_upstream_401_is_never_cached(clock: FakeClock) -> None:
    upstream = FakeBarbican({})
    mw = QuotaMiddleware(inner_app(), rules=RULES, clock=clock,
                         source=BarbicanSource("http://q.test", client=upstream.client(), resources=["things"]))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 401
        upstream.quotas_by_token["tok"] = {"things": 5}
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
    assert upstream.calls == 2


async def test_missing_token_is_401_without_asking_upstream() -> None:
    upstream = FakeBarbican({"tok": {"things": 5}})
    mw = QuotaMiddleware(inner_app(), rules=RULES,
                         source=BarbicanSource("http://q.test", client=upstream.client(), resources=["things"]))
    async with client_for(mw) as client:
        response = await client.post("/things", headers={"X-Project-Id": "p"})
    assert response.status_code == 401 and upstream.calls == 0


# -- failure policies -----------------------------------------------------------------------------

def broken_upstream(body: bytes = b"<html>oops</html>", status: int = 200,
                    content_type: str = "text/html") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(
        lambda request: httpx.Response(status, content=body, headers={"Content-Type": content_type})))


@pytest.mark.parametrize(("body", "status", "content_type"), [
    (b"<html>oops</html>", 200, "text/html"),
    (b"not json", 200, "application/json"),
    (b'{"quotas": {"things": "5"}}', 200, "application/json"),
    (b'{"quotas": {"things": true}}', 200, "application/json"),
    (b'{"quotas": {"things": 1.5}}', 200, "application/json"),
    (b'{"quotas": null}', 200, "application/json"),
    (b'{"quotas": {"things": 99999999999999999999}}', 200, "application/json"),
    (b"", 500, "text/plain"),
    (b"", 429, "text/plain"),
])
async def test_bad_upstream_fails_closed_with_503(body: bytes, status: int, content_type: str) -> None:
    source = BarbicanSource("http://q.test", client=broken_upstream(body, status, content_type),
                            resources=["things"])
    async with client_for(guarded(source=source)) as client:
        response = await client.post("/things", headers=HEADERS)
    assert response.status_code == 503
    assert response.json()["code"] == 503 and response.headers["retry-after"].isdigit()


async def test_upstream_failure_fails_open_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    source = BarbicanSource("http://q.test", client=broken_upstream())
    mw = guarded(source=source, on_source_error="fail_open")
    with caplog.at_level(logging.WARNING, logger="quota_middleware"):
        async with client_for(mw) as client:
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
    assert "fail_open" in caplog.text
    assert await usage(mw) == 1  # still counted


async def test_stale_quotas_are_served_within_the_bound(clock: FakeClock) -> None:
    upstream = FakeBarbican({"tok": {"things": 1}})
    healthy = upstream.transport
    state = {"up": True}

    def handler(request: httpx.Request) -> httpx.Response:
        return healthy.handler(request) if state["up"] else httpx.Response(502)  # type: ignore[attr-defined]

    source = BarbicanSource("http://q.test", client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
                            resources=["things"])
    mw = guarded(source=source, cache_ttl=10, stale_ttl=100, clock=clock)
    async with client_for(mw) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201
        state["up"] = False
        clock.advance(50)
        assert (await client.post("/things", headers=HEADERS)).status_code == 403  # stale limit 1 still enforced
        clock.advance(70)
        assert (await client.post("/things", headers=HEADERS)).status_code == 503  # past the stale bound


async def test_store_down_fails_closed_and_unguarded_routes_keep_working() -> None:
    from tests.servers import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    async with client_for(guarded(store)) as client:
        response = await client.post("/things", headers=HEADERS)
        assert response.status_code == 503 and response.json()["code"] == 503
        assert "retry-after" in response.headers
        assert (await client.get("/health")).status_code == 200


async def test_store_down_fails_open_when_asked() -> None:
    from tests.servers import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    async with client_for(guarded(store, on_store_error="fail_open")) as client:
        assert (await client.post("/things", headers=HEADERS)).status_code == 201


async def test_token_never_reaches_redis_or_logs(real_redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    secret = "tok-SUPER-SECRET-123"
    upstream = FakeBarbican({secret: {"things": 3}})
    mw = QuotaMiddleware(inner_app(), rules=RULES, store=RedisStore(real_redis),
                         source=BarbicanSource("http://q.test", client=upstream.client(), resources=["things"]))
    with caplog.at_level(logging.DEBUG):
        async with client_for(mw) as client:
            for path in ("/things", "/things", "/fail", "/things", "/things"):
                await client.post(path, headers={"X-Project-Id": "p", "X-Auth-Token": secret})
            await mw.store.flush()
    assert upstream.seen_tokens == [secret]
    dump = []
    async for key in real_redis.scan_iter("*"):
        dump.append(key)
        kind = await real_redis.type(key)
        if kind == b"string":
            dump.append(await real_redis.get(key))
        elif kind == b"zset":
            dump.extend(await real_redis.zrange(key, 0, -1))
    assert dump, "the scan must see the keys the requests wrote"
    assert not [item for item in dump if secret.encode() in item]
    assert secret not in caplog.text
    assert json.dumps(caplog.text).find(secret) == -1


async def test_failed_creation_headers_show_the_refunded_usage() -> None:
    async with client_for(guarded(limit=5)) as client:
        failed = await client.post("/fail", headers=HEADERS)
        created = await client.post("/things", headers=HEADERS)
    assert failed.status_code == 409 and failed.headers["ratelimit"] == '"things";r=5'
    assert created.status_code == 201 and created.headers["ratelimit"] == '"things";r=4'
