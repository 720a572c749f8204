"""Several limits on one request, all or nothing: several rules, several resources, a parent's cap,
and the same from Python (reserve, check, usage). Every store: memory, fakeredis, Redis, Cluster."""

from __future__ import annotations

import math
from typing import Any

import fakeredis
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware import (
    Bucket,
    ConfigurationError,
    Demand,
    Limit,
    Period,
    QuotaEngine,
    QuotaExceeded,
    QuotaMiddleware,
    Quotas,
    QuotaSource,
    RedisStore,
    Rejection,
    Rule,
    StaticSource,
    Store,
    Window,
)
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio
HEADERS = {"X-Project-Id": "p"}


async def create(request: Request) -> Response:
    status = int(request.query_params.get("status", "201"))
    return JSONResponse({}, status_code=status)


APP = Starlette(routes=[Route("/things", create, methods=["POST"]), Route("/containers", create, methods=["POST"])])


def secrets_in(scope: dict[str, Any]) -> int:
    return int(dict(scope["headers"]).get(b"x-secrets", b"0"))


def guarded(store: Store, clock: FakeClock, rules: list[Rule], limits: dict[str, int], **options: Any) -> Any:
    engine = QuotaEngine(source=StaticSource(limits), store=store, clock=clock, **options)
    return QuotaMiddleware(APP, rules=rules, engine=engine)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def used(store: Store, *buckets: Bucket) -> list[int]:
    await store.flush()
    return [await store.usage(bucket) for bucket in buckets]


async def test_a_rate_limit_beside_a_count_quota(store: Store, clock: FakeClock) -> None:
    rules = [Rule("POST", "/things", "things"), Rule("POST", "/things", "things:rate", limit="3/minute")]
    app = guarded(store, clock, rules, {"things": 4})
    async with client(app) as c:
        answers = [await c.post("/things", headers=HEADERS) for _ in range(4)]
        assert [a.status_code for a in answers] == [201, 201, 201, 429]
        # Every policy in one field each; the refusal names the limit that refused.
        assert answers[0].headers["ratelimit-policy"] == '"things";q=4, "things:rate";q=3;w=60'
        assert answers[0].headers["ratelimit"].startswith('"things";r=3, "things:rate";r=2;t=')
        assert "things:rate allows 3 per window" in answers[3].json()["description"]
        clock.advance(60)
        assert (await c.post("/things", headers=HEADERS)).status_code == 201  # a new minute
        assert (await c.post("/things", headers=HEADERS)).status_code == 403  # the count quota
        assert "things allows 4, 4 already in use" in (await c.post("/things", headers=HEADERS)).json()["description"]
    assert (await used(store, Bucket("p", "things")))[0] == 4


@pytest.mark.parametrize("end", [1_800_000_060.0, 1_800_000_059.5], ids=["whole-second", "fractional"])
async def test_the_seconds_left_of_a_window_are_exact_from_request_to_request(store: Store, clock: FakeClock,
                                                                               end: float) -> None:
    # Windowed charges are made once a second when the window ends on a whole second (t= is the
    # same all second long); a billing period ending mid-second gets its own every request.
    rules = [Rule("POST", "/things", "things"), Rule("POST", "/things", "credits")]
    app = guarded(store, clock, rules, {"things": 100, "credits": Limit(100, period=Window(clock.now, end))})
    async with client(app) as c:
        for step in (0.0, 0.3, 0.4, 0.3, 0.5, 0.5, 0.25):
            clock.advance(step)
            answer = await c.post("/things", headers=HEADERS)
            assert answer.status_code == 201
            left = answer.headers["ratelimit"].split(", ")[1]
            assert left.endswith(f";t={math.ceil(end - clock.now)}"), (clock.now, left)


@pytest.mark.parametrize("rules", [
    [Rule("POST", "/things", "things:rate", limit="1/minute")],
    [Rule("POST", "/things", "things"), Rule("POST", "/things", "things:rate", limit="1/minute")],
], ids=["one-charge", "two-charges"])
async def test_retry_after_is_the_refused_requests_own_within_a_second(store: Store, clock: FakeClock,
                                                                       rules: list[Rule]) -> None:
    # The charges made at 10.2 s serve the rest of that second; a refusal at 10.9 s still says
    # round(60 - 10.9) = 49, not the 50 of the charges' own time.
    app = guarded(store, clock, rules, {"things": 100})
    async with client(app) as c:
        clock.advance(10.2)
        assert (await c.post("/things", headers=HEADERS)).status_code == 201
        clock.advance(0.7)
        refused = await c.post("/things", headers=HEADERS)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "49"


async def test_one_request_charging_several_resources_is_all_or_nothing(store: Store, clock: FakeClock) -> None:
    rules = [Rule("POST", "/containers", charges={"containers": 1, "secrets": secrets_in})]
    app = guarded(store, clock, rules, {"containers": 10, "secrets": 5})
    async with client(app) as c:
        assert (await c.post("/containers", headers={**HEADERS, "X-Secrets": "3"})).status_code == 201
        refused = await c.post("/containers", headers={**HEADERS, "X-Secrets": "3"})  # 6 secrets > 5
        assert refused.status_code == 403 and "secrets allows 5, 3 already in use" in refused.json()["description"]
        assert await used(store, Bucket("p", "containers"), Bucket("p", "secrets")) == [1, 3]  # nothing held
        # A failed creation gives every charge back.
        assert (await c.post("/containers?status=500", headers={**HEADERS, "X-Secrets": "2"})).status_code == 500
        assert await used(store, Bucket("p", "containers"), Bucket("p", "secrets")) == [1, 3]
        assert (await c.post("/containers", headers={**HEADERS, "X-Secrets": "2"})).status_code == 201
        assert await used(store, Bucket("p", "containers"), Bucket("p", "secrets")) == [2, 5]
        bad = await c.post("/containers", headers={**HEADERS, "X-Secrets": "lots"})
        assert bad.status_code == 400 and "cost" in bad.json()["description"]


async def test_a_failed_creation_of_fixed_charges_gives_every_bucket_back(store: Store, clock: FakeClock) -> None:
    # Fixed charges (no cost read from the request): a warm request is taken in one step in process.
    rules = [Rule("POST", "/containers", charges={"containers": 1, "secrets": 2}),
             Rule("POST", "/containers", "calls", limit="10/minute")]
    app = guarded(store, clock, rules, {"containers": 10, "secrets": 5})
    buckets = Bucket("p", "containers"), Bucket("p", "secrets")
    async with client(app) as c:
        assert (await c.post("/containers", headers=HEADERS)).status_code == 201
        failed = [await c.post("/containers?status=409", headers=HEADERS) for _ in range(2)]
        assert await used(store, *buckets) == [1, 2]
        created = await c.post("/containers", headers=HEADERS)
        assert await used(store, *buckets) == [2, 4]
    assert [r.status_code for r in failed] == [409, 409] and created.status_code == 201
    # A failed request's headers state the usage without it: of every policy it met.
    assert failed[1].headers["ratelimit"] == '"containers";r=9, "secrets";r=3, "calls";r=9;t=60'
    assert created.headers["ratelimit"] == '"containers";r=8, "secrets";r=1, "calls";r=8;t=60'


async def test_a_bucket_two_rules_charge_is_charged_their_sum_once(store: Store, clock: FakeClock) -> None:
    rules = [Rule("POST", "/things", "things"), Rule("POST", "/{kind}", "things", cost=2)]
    app = guarded(store, clock, rules, {"things": 7})
    async with client(app) as c:
        statuses = [(await c.post("/things", headers=HEADERS)).status_code for _ in range(3)]
    assert statuses == [201, 201, 403]  # 3 each: 6 of 7, then 9 > 7
    assert await used(store, Bucket("p", "things")) == [6]


async def test_a_parents_cap_covers_its_children(store: Store, clock: FakeClock) -> None:
    parents = {"p1": "org", "p2": "org"}
    app = guarded(store, clock, [Rule("POST", "/things", "things")], {"things": 3}, parent=parents.get)
    # Each project allows 3 and so does the organisation: together the children get 3.
    async with client(app) as c:
        statuses = [(await c.post("/things", headers={"X-Project-Id": p})).status_code
                    for p in ("p1", "p2", "p1", "p2", "p1")]
    assert statuses == [201, 201, 201, 403, 403]
    assert await used(store, Bucket("p1", "things"), Bucket("p2", "things"), Bucket("org", "things")) == [2, 1, 3]


async def test_a_project_that_is_its_own_parent_is_a_503_not_a_500(store: Store, clock: FakeClock) -> None:
    app = guarded(store, clock, [Rule("POST", "/things", "things")], {"things": 3}, parent=lambda p: p)
    async with client(app) as c:
        answer = await c.post("/things", headers=HEADERS)
    assert answer.status_code == 503 and answer.json()["code"] == 503


async def test_what_a_request_charges_follows_its_quotas_its_parent_and_the_window(store: Store,
                                                                                     clock: FakeClock) -> None:
    """The buckets and limits of a request are worked out once and reused (middleware/engine.py's
    _Plan): a refreshed limit, a new parent and a new window must each be seen at once."""

    class Changing(QuotaSource):
        limits = {"things": 5}

        async def fetch(self, project: str, headers: Any) -> Quotas:
            return Quotas(dict(self.limits))

    parents = {"p": "org1"}
    rules = [Rule("POST", "/things", "things"), Rule("POST", "/things", "things:rate", limit="3/hour")]
    app = guarded(store, clock, rules, {}, parent=parents.get, cache_ttl=10)
    app.engine.cache.source = app.engine.source = Changing()
    hour = Period.parse("hour")
    async with client(app) as c:
        assert (await c.post("/things", headers=HEADERS)).status_code == 201
        Changing.limits, parents["p"] = {"things": 1}, "org2"
        assert (await c.post("/things", headers=HEADERS)).status_code == 201  # within the TTL: as before
        clock.advance(11)  # the same hour, a new TTL: limit 1 (2 in use), parent org2
        refused = await c.post("/things", headers=HEADERS)
        assert refused.status_code == 403 and "things allows 1, 2 already in use" in refused.json()["description"]
        Changing.limits = {"things": 4}
        clock.advance(11)
        assert (await c.post("/things", headers=HEADERS)).status_code == 201
        first_hour = hour.window_at(clock.now)
        assert (await c.post("/things", headers=HEADERS)).status_code == 429  # 3 an hour
        clock.advance(3600)
        assert (await c.post("/things", headers=HEADERS)).status_code == 201  # a new hour
    assert await used(store, Bucket("p", "things"), Bucket("org1", "things"), Bucket("org2", "things"),
                      Bucket("p", "things:rate", first_hour),
                      Bucket("p", "things:rate", hour.window_at(clock.now))) == [4, 2, 2, 3, 1]


async def test_several_charges_follow_a_refreshed_limit_at_once(store: Store, clock: FakeClock) -> None:
    class Changing(QuotaSource):
        limits = {"things": 5}

        async def fetch(self, project: str, headers: Any) -> Quotas:
            return Quotas(dict(self.limits))

    rules = [Rule("POST", "/things", "things"), Rule("POST", "/things", "things:rate", limit="9/hour"),
             Rule("POST", "/containers", "things")]
    app = guarded(store, clock, rules, {}, cache_ttl=10)
    app.engine.cache.source = app.engine.source = Changing()
    async with client(app) as c:
        assert [(await c.post("/things", headers=HEADERS)).status_code for _ in range(2)] == [201, 201]
        Changing.limits = {"things": 2}
        clock.advance(11)
        # Another route refreshes the project's quotas first; /things must see them too.
        assert (await c.post("/containers", headers=HEADERS)).status_code == 403
        refused = await c.post("/things", headers=HEADERS)
        assert refused.status_code == 403 and "things allows 2, 2 already in use" in refused.json()["description"]


async def test_several_charges_follow_a_new_parent_at_once(store: Store, clock: FakeClock) -> None:
    parents = {"p": "org1"}
    rules = [Rule("POST", "/things", "things"), Rule("POST", "/things", "things:rate", limit="9/hour"),
             Rule("POST", "/containers", "things")]
    app = guarded(store, clock, rules, {"things": 9}, parent=parents.get, cache_ttl=10)
    async with client(app) as c:
        assert (await c.post("/things", headers=HEADERS)).status_code == 201
        parents["p"] = "org2"
        clock.advance(11)
        # Another route looks the parent up first; /things must charge the new one too.
        assert (await c.post("/containers", headers=HEADERS)).status_code == 201
        assert (await c.post("/things", headers=HEADERS)).status_code == 201
    assert await used(store, Bucket("org1", "things"), Bucket("org2", "things")) == [1, 2]


async def test_the_headers_of_several_charges_state_an_operators_override(store: Store, clock: FakeClock) -> None:
    rules = [Rule("POST", "/things", "things"), Rule("POST", "/things", "things:rate", limit="3/minute")]
    app = guarded(store, clock, rules, {"things": 4})
    async with client(app) as c:
        assert (await c.post("/things", headers=HEADERS)).headers["ratelimit-policy"].startswith('"things";q=4,')
        await store.set_overrides("p", {"things": 9})
        answer = await c.post("/things", headers=HEADERS)
    assert answer.headers["ratelimit-policy"] == '"things";q=9, "things:rate";q=3;w=60'
    assert answer.headers["ratelimit"].startswith('"things";r=7, "things:rate";r=1;t=')


def test_rule_limits_are_checked_at_start_up() -> None:
    assert Rule("POST", "/x", "x", limit="10/minute").static_limit == 10
    for bad in ({"limit": "ten/minute"}, {"limit": "10"}, {"limit": "10/minute", "window": "hour"},
                {"limit": "10/fortnight"}, {"limit": True}):
        with pytest.raises(ConfigurationError):
            Rule("POST", "/x", "x", **bad)
    with pytest.raises(ConfigurationError, match="not both"):
        Rule("POST", "/x", "x", charges={"y": 1})
    with pytest.raises(ConfigurationError, match="charge 'y'"):
        Rule("POST", "/x", charges={"y": -1})


# -- from Python ----------------------------------------------------------------------------------

async def test_reserve_commits_on_success_and_refunds_on_an_exception(store: Store, clock: FakeClock) -> None:
    engine = QuotaEngine(source=StaticSource({"servers": 2, "ram_mb": 4096}), store=store, clock=clock)
    async with engine.reserve("p", {"servers": 1, "ram_mb": 2048}) as admitted:
        assert admitted is not None and len(admitted.reservations) == 2
    with pytest.raises(RuntimeError):
        async with engine.reserve("p", {"servers": 1, "ram_mb": 2048}):
            raise RuntimeError("the server failed to boot")
    assert await used(store, Bucket("p", "servers"), Bucket("p", "ram_mb")) == [1, 2048]
    with pytest.raises(QuotaExceeded) as refused:
        async with engine.reserve("p", {"servers": 1, "ram_mb": 4096}):
            raise AssertionError("not reached")
    assert refused.value.rejection.resource == "ram_mb"
    assert await used(store, Bucket("p", "servers"), Bucket("p", "ram_mb")) == [1, 2048]


async def test_check_reserves_nothing_and_usage_reads_every_resource(store: Store, clock: FakeClock) -> None:
    from middleware import Limit, Period

    source = StaticSource({"servers": 2, "calls": Limit(10, period=Period.parse("minute")), "free": -1})
    engine = QuotaEngine(source=source, store=store, clock=clock)
    assert await engine.check("p", {"servers": 2}) is None
    assert await engine.check("p", {"servers": 2}) is None  # still nothing reserved
    too_many = await engine.check("p", {"servers": 3})
    assert isinstance(too_many, Rejection) and too_many.resource == "servers"
    async with engine.reserve("p", [Demand("servers", 1), Demand("calls", 4, Period.parse("minute"))]):
        report = await engine.usage("p")
        assert report["servers"] == {"limit": 2, "used": 1, "reserved": 1, "remaining": 1, "window": None}
        assert report["calls"]["used"] == 4 and report["calls"]["remaining"] == 6
        assert report["calls"]["window"]["end"] - report["calls"]["window"]["start"] == 60
    await store.flush()
    report = await engine.usage("p")
    assert report["servers"]["reserved"] == 0 and report["servers"]["used"] == 1
    assert report["free"] == {"limit": -1, "used": 0, "reserved": 0, "remaining": None, "window": None}
    await store.set_overrides("p", {"servers": 5})
    assert (await engine.usage("p"))["servers"]["limit"] == 5
    assert await engine.check("p", {"servers": 4}) is None
    with pytest.raises(ValueError):
        await engine.check("p", {"servers": -1})


@pytest.mark.parametrize("local_leases", [False, True])
async def test_a_store_subclass_that_overrides_commit_settles_a_group_through_it(
        clock: FakeClock, local_leases: bool) -> None:
    # The Redis store settles a group in one operation; a subclass that audits commit and refund
    # must still see each of them (as for one reservation), with or without local leases around it.
    calls: list[str] = []

    class AuditedRedis(RedisStore):
        async def commit(self, reservation: Any) -> None:
            calls.append(f"commit {reservation.bucket.resource}")
            await super().commit(reservation)

        async def refund(self, reservation: Any) -> None:
            calls.append(f"refund {reservation.bucket.resource}")
            await super().refund(reservation)

    store = AuditedRedis(fakeredis.FakeAsyncRedis(), clock=clock)
    engine = QuotaEngine(source=StaticSource({"servers": 10, "ram_mb": 4096}), store=store, clock=clock,
                         local_leases=local_leases)
    async with engine.reserve("p", {"servers": 1, "ram_mb": 2048}):
        pass
    with pytest.raises(RuntimeError):
        async with engine.reserve("p", {"servers": 1, "ram_mb": 2048}):
            raise RuntimeError("creation failed")
    assert sorted(calls) == ["commit ram_mb", "commit servers", "refund ram_mb", "refund servers"]
    usage = await engine.usage("p")
    assert (usage["servers"]["used"], usage["ram_mb"]["used"]) == (1, 2048)
    await engine.aclose()
