"""Each source against the seed documents' own example bodies, byte for byte, and their errors."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from middleware import (
    BarbicanSource,
    CaptainDataSource,
    JSONSource,
    LatitudeSource,
    Period,
    SourceInvalid,
    SourceRejected,
    SourceUnavailable,
    Window,
)
from middleware.sources import bounded
from middleware.sources.base import MAX_BODY_BYTES
from middleware.sources.bounded import MAX_DEPTH
from middleware.sources.latitude import BYTES_PER_MBPS_WINDOW, BYTES_PER_TB
from tests.upstreams.fault_server import gzip_bomb

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).resolve().parent.parent / "examples" / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class Upstream:
    """Serves one canned answer and records the requests it got."""

    def __init__(self, body: bytes, status: int = 200, media_type: str = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.body, self.status, self.media_type, self.headers = body, status, media_type, headers or {}

    def client(self) -> httpx.AsyncClient:
        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return httpx.Response(self.status, content=self.body,
                                  headers={"Content-Type": self.media_type, **self.headers})

        return httpx.AsyncClient(transport=httpx.MockTransport(handle))


# -- Barbican -------------------------------------------------------------------------------------

async def test_barbican_seed_example() -> None:
    upstream = Upstream(fixture("barbican_quotas.json"))
    quotas = await BarbicanSource("http://barbican", client=upstream.client()).fetch("p", {"x-auth-token": "t"})
    assert {k: v.value for k, v in quotas.limits.items()} == {"secrets": 1000, "cas": 0, "orders": 0,
                                                              "containers": 1000, "consumers": 1000}
    request = upstream.requests[0]
    assert request.url == "http://barbican/v1/quotas" and request.headers["x-auth-token"] == "t"


async def test_barbican_ignores_unknown_fields_and_keeps_negative_as_unlimited() -> None:
    body = json.dumps({"quotas": {"secrets": -7, "links": [{"rel": "self"}]}, "extra": True}).encode()
    quotas = await BarbicanSource("http://b", client=Upstream(body).client()).fetch("p", {"x-auth-token": "t"})
    assert dict(quotas.limits) == {"secrets": quotas.limit("secrets")} and quotas.limit("secrets").value == -1


# -- Latitude.sh ----------------------------------------------------------------------------------

async def test_latitude_seed_example_normal_billing_is_monthly_tb_in_bytes() -> None:
    upstream = Upstream(fixture("latitude_traffic_quota.json"), media_type="application/vnd.api+json")
    source = LatitudeSource("https://api.latitude.test", token="lat-key", client=upstream.client())
    quotas = await source.fetch("proj_lkg1DekRdvZE5", {})
    limit = quotas.limit("traffic:brazil")
    assert limit.value == 20 * BYTES_PER_TB and limit.scale == BYTES_PER_TB and limit.unit == "TB"
    assert limit.period == Period(None)  # calendar month
    assert quotas.limit("traffic:reg_9QDB5qag") == limit
    request = upstream.requests[0]
    assert request.url.path == "/traffic/quota"
    assert request.url.params["filter[project]"] == "proj_lkg1DekRdvZE5"
    assert request.headers["authorization"] == "lat-key"
    assert request.headers["accept"] == "application/vnd.api+json"


async def test_latitude_project_matches_by_slug() -> None:
    upstream = Upstream(fixture("latitude_traffic_quota.json"), media_type="application/vnd.api+json")
    quotas = await LatitudeSource("http://l", token="k", client=upstream.client()).fetch("incredible-bronze-knife", {})
    assert quotas.limit("traffic:brazil").value == 20 * BYTES_PER_TB


def latitude_doc(method: str, tb: Any, mbps: Any) -> bytes:
    doc = json.loads(fixture("latitude_traffic_quota.json"))
    entry = doc["data"]["attributes"]["quota_per_project"][0]
    entry["billing_method"] = method
    entry["quota_per_region"][0]["quota_in_tb"] = tb
    entry["quota_per_region"][0]["quota_in_mbps"] = mbps
    return json.dumps(doc).encode()


async def test_latitude_95th_percentile_is_a_bandwidth_rate_and_ignores_the_tb_object() -> None:
    body = latitude_doc("95th percentile", {"granted": 0, "additional": 0, "total": 0},
                        {"granted": 80, "additional": 20, "total": 100})
    quotas = await LatitudeSource("http://l", token="k", client=Upstream(body).client()).fetch("proj_lkg1DekRdvZE5", {})
    limit = quotas.limit("traffic:brazil")
    assert limit.value == 100 * BYTES_PER_MBPS_WINDOW == 100 * 125_000 * 60
    assert limit.period == Period(60.0) and limit.unit == "Mbps"


@pytest.mark.parametrize(("method", "tb", "mbps"), [
    ("Normal", {"granted": 20, "additional": 0, "total": 20}, None),  # the other object may be null
    ("Normal", {"granted": 20, "additional": 0, "total": 20}, {"total": 0}),
])
async def test_latitude_object_that_does_not_apply_is_never_read_as_disabled(method: str, tb: Any, mbps: Any) -> None:
    body = latitude_doc(method, tb, mbps)
    quotas = await LatitudeSource("http://l", token="k", client=Upstream(body).client()).fetch("proj_lkg1DekRdvZE5", {})
    assert quotas.limit("traffic:brazil").value == 20 * BYTES_PER_TB


async def test_latitude_applicable_zero_total_means_no_quota_set() -> None:
    body = latitude_doc("Normal", {"granted": 0, "additional": 0, "total": 0}, {"total": 0})
    quotas = await LatitudeSource("http://l", token="k", client=Upstream(body).client()).fetch("proj_lkg1DekRdvZE5", {})
    assert "traffic:brazil" not in quotas.limits


@pytest.mark.parametrize("body", [
    latitude_doc("Normal", {"total": "20"}, None),
    latitude_doc("Normal", {"total": True}, None),
    latitude_doc("Normal", None, {"total": 5}),
    latitude_doc("Flat rate", {"total": 20}, None),
    latitude_doc("Normal", {"total": 10**6}, None),  # 10^18 bytes: more than the store counts exactly
    b'{"data": null}',
])
async def test_latitude_malformed_answers_are_upstream_errors(body: bytes) -> None:
    source = LatitudeSource("http://l", token="k", client=Upstream(body).client())
    with pytest.raises(SourceInvalid):
        await source.fetch("proj_lkg1DekRdvZE5", {})


async def test_latitude_unknown_project_and_jsonapi_errors_are_reported() -> None:
    upstream = Upstream(fixture("latitude_traffic_quota.json"), media_type="application/vnd.api+json")
    with pytest.raises(SourceRejected, match="no traffic quota for project 'other'"):
        await LatitudeSource("http://l", token="k", client=upstream.client()).fetch("other", {})
    errors = json.dumps({"errors": [{"status": "401", "code": "UNAUTHORIZED", "title": "Unauthorized",
                                     "detail": "Invalid API key"}]}).encode()
    source = LatitudeSource("http://l", token="k", client=Upstream(errors, 401, "application/vnd.api+json").client())
    with pytest.raises(SourceRejected, match="Unauthorized: Invalid API key") as info:
        await source.fetch("proj_lkg1DekRdvZE5", {})
    assert info.value.status_code == 401


async def test_latitude_wrong_media_type_is_an_upstream_error() -> None:
    upstream = Upstream(fixture("latitude_traffic_quota.json"), media_type="text/html")
    with pytest.raises(SourceInvalid, match="media type"):
        await LatitudeSource("http://l", token="k", client=upstream.client()).fetch("proj_lkg1DekRdvZE5", {})


# -- Captain Data ---------------------------------------------------------------------------------

async def test_captaindata_seed_example() -> None:
    upstream = Upstream(fixture("captaindata_quotas.json"))
    quotas = await CaptainDataSource("https://api.cd.test", api_key="cd-key", client=upstream.client()).fetch("p", {})
    limit = quotas.limit("credits")
    assert limit.value == 100_000 and limit.scale == 1000 and limit.used == 50_000 and limit.unit == "credits"
    assert limit.period == Window(1696118400.0, 1698796799.0)  # 2023-10-01T00:00:00Z .. 2023-10-31T23:59:59Z
    request = upstream.requests[0]
    assert str(request.url) == "https://api.cd.test/v1/quotas" and request.headers["x-api-key"] == "cd-key"


async def test_captaindata_fractional_usage_stays_exact_and_null_period_is_a_calendar_month() -> None:
    doc = json.loads(fixture("captaindata_quotas.json")) | {"credits_used": 12.345, "current_month_start": None,
                                                            "current_month_end": None}
    quotas = await CaptainDataSource(api_key="k", client=Upstream(json.dumps(doc).encode()).client()).fetch("p", {})
    assert quotas.limit("credits").used == 12_345
    assert quotas.limit("credits").period == Period(None)


@pytest.mark.parametrize(("name", "label"), [("captaindata_workspace_404.json", "WORKSPACE_404_NOT_FOUND"),
                                             ("captaindata_admin_404.json", "WORKSPACE_ADMIN_404_NOT_FOUND")])
async def test_captaindata_404_names_the_error_label(name: str, label: str) -> None:
    source = CaptainDataSource(api_key="k", client=Upstream(fixture(name), status=404).client())
    with pytest.raises(SourceRejected, match=label) as info:
        await source.fetch("p", {})
    assert info.value.status_code == 404


async def test_captaindata_429_carries_retry_after() -> None:
    source = CaptainDataSource(api_key="k", client=Upstream(b"{}", 429, headers={"Retry-After": "42"}).client())
    with pytest.raises(SourceUnavailable) as info:
        await source.fetch("p", {})
    assert info.value.retry_after == 42


async def test_captaindata_key_per_project() -> None:
    upstream = Upstream(fixture("captaindata_quotas.json"))
    source = CaptainDataSource(api_key={"p1": "key-1"}, client=upstream.client())
    await source.fetch("p1", {})
    assert upstream.requests[0].headers["x-api-key"] == "key-1"
    with pytest.raises(SourceRejected, match="no Captain Data workspace"):
        await source.fetch("p2", {})


@pytest.mark.parametrize("change", [{"credits_max": "100"}, {"credits_max": 1.5}, {"credits_max": None},
                                    {"credits_used": "50"}, {"credits_used": True}, {"credits_used": -1},
                                    {"current_month_start": "yesterday"}, {"current_month_end": None},
                                    {"current_month_end": "2023-09-01T00:00:00Z"}, {"credits_max": 2**60}])
async def test_captaindata_wrong_types_are_upstream_errors(change: dict[str, Any]) -> None:
    doc = json.loads(fixture("captaindata_quotas.json")) | change
    source = CaptainDataSource(api_key="k", client=Upstream(json.dumps(doc).encode()).client())
    with pytest.raises(SourceInvalid):
        await source.fetch("p", {})


# -- generic JSON ---------------------------------------------------------------------------------

async def test_json_source_reads_pointers() -> None:
    body = json.dumps({"plan": {"limits": {"widgets": 10, "a/b": 3}}, "usage": {"widgets": 4},
                       "period": {"from": "2030-01-01T00:00:00+00:00", "to": 1893456000 + 86400}}).encode()
    upstream = Upstream(body)
    source = JSONSource("http://q.test/projects/{project}/limits", headers={"Authorization": "Bearer s"},
                        limits={"widgets": "/plan/limits/widgets", "ab": "/plan/limits/a~1b", "gone": "/nope"},
                        used={"widgets": "/usage/widgets"}, window=("/period/from", "/period/to"),
                        client=upstream.client())
    quotas = await source.fetch("team/1", {})
    widgets = quotas.limit("widgets")
    assert widgets.value == 10 and widgets.used == 4 and widgets.period == Window(1893456000.0, 1893542400.0)
    assert quotas.limit("ab").value == 3 and "gone" not in quotas.limits
    assert upstream.requests[0].url.raw_path == b"/projects/team%2F1/limits"
    assert upstream.requests[0].headers["authorization"] == "Bearer s"


async def test_json_source_rejects_wrong_types() -> None:
    source = JSONSource("http://q.test", limits={"w": "/w"}, client=Upstream(b'{"w": "10"}').client())
    with pytest.raises(SourceInvalid):
        await source.fetch("p", {})


# -- bounds every source shares: nesting depth ----------------------------------------------------

def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


SOURCES = {
    "barbican": lambda client: BarbicanSource("http://b", client=client),
    "latitude": lambda client: LatitudeSource("http://l", token="k", client=client),
    "captaindata": lambda client: CaptainDataSource(api_key="k", client=client),
    "json": lambda client: JSONSource("http://q.test", limits={"w": "/w"}, client=client),
}


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("body", [b"[" * 4096, nested(4096), b'{"a": ' * 4096, nested(MAX_DEPTH + 1)],
                         ids=["4 KB of [", "4096 levels", "4096 objects", "65 levels"])
async def test_json_nested_deeper_than_the_bound_is_invalid_never_a_recursion_error(name: str, body: bytes) -> None:
    source = SOURCES[name](Upstream(body, media_type="application/json").client())
    with pytest.raises(SourceInvalid, match="nested deeper than 64") as info:
        await source.fetch("proj_lkg1DekRdvZE5", {"x-auth-token": "t"})
    assert info.value.status_code == 200


async def test_nesting_up_to_the_bound_is_parsed_and_brackets_in_strings_do_not_count() -> None:
    deep = json.dumps({"quotas": {"secrets": 3}, "deep": json.loads(nested(MAX_DEPTH - 1)),
                       "note": '[{"\\"' * 2000}).encode()  # 64 levels; brackets and escaped quotes in a string
    quotas = await BarbicanSource("http://b", client=Upstream(deep).client()).fetch("p", {"x-auth-token": "t"})
    assert quotas.limit("secrets").value == 3


def test_a_recursion_error_the_depth_scan_missed_is_still_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bounded, "_deeper_than", lambda text, limit: False)
    with pytest.raises(SourceInvalid, match="not JSON") as info:
        bounded.parse_json(nested(100_000), status_code=200)
    assert isinstance(info.value.__cause__, RecursionError)


async def test_deeply_nested_error_body_keeps_the_status_mapping() -> None:
    deep = b"[" * 4096
    source = LatitudeSource("http://l", token="k", client=Upstream(deep, 429, headers={"Retry-After": "9"}).client())
    with pytest.raises(SourceUnavailable, match="answered 429$") as info:
        await source.fetch("p", {})
    assert info.value.retry_after == 9
    source = CaptainDataSource(api_key="k", client=Upstream(deep, 404).client())
    with pytest.raises(SourceRejected, match="answered 404$"):
        await source.fetch("p", {})


# -- bounds every source shares: body size, decoded, as it streams in -----------------------------

class Streamed:
    """An upstream whose body is made piece by piece as the client reads it; records how far it got."""

    def __init__(self, pieces: Callable[[], Iterable[bytes]], status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.pieces, self.status, self.headers = pieces, status, headers or {}
        self.sent = 0
        self.finished = False
        self.requests: list[httpx.Request] = []

    def client(self) -> httpx.AsyncClient:
        async def body() -> AsyncIterator[bytes]:
            for piece in self.pieces():
                self.sent += len(piece)
                yield piece
            self.finished = True

        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return httpx.Response(self.status, headers={"Content-Type": "application/json", **self.headers},
                                  content=body())

        return httpx.AsyncClient(transport=httpx.MockTransport(handle))


#: What fetching one answer may allocate at most (the body limit is 1 MiB).
MEMORY_BOUND = 8 << 20
SPACES = b" " * (64 << 10)


async def fetch_traced(source: Any) -> tuple[BaseException, int]:
    """The error ``fetch`` raised, and the peak of what was allocated meanwhile (tracemalloc)."""
    tracemalloc.start()
    try:
        await source.fetch("p", {"x-auth-token": "t"})
    except Exception as exc:  # noqa: BLE001 - returned for the test to check
        error: BaseException = exc
    else:
        raise AssertionError("the fetch succeeded")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def in_reads(pieces: Iterable[bytes], size: int = 64 << 10) -> Iterator[bytes]:
    """``pieces`` as a socket hands them over when the client lags: ``size`` bytes at a time."""
    pending = b""
    for piece in pieces:
        pending += piece
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


HUGE = {
    # 1 GiB of zeros, 1 MiB on the wire: a client that inflates it whole needs 1 GiB twice over,
    # one that inflates each 64 KiB read whole (as httpx's decoders do) 64 MiB at once.
    "gzip bomb": (lambda: in_reads(gzip_bomb(1024)), {"Content-Encoding": "gzip"}),
    "300 MiB, chunked": (lambda: (SPACES for _ in range(300 * 16)), {}),
}


@pytest.mark.parametrize("status", [200, 503, 404])
@pytest.mark.parametrize("body", list(HUGE))
async def test_a_huge_body_is_read_no_further_than_the_limit(body: str, status: int) -> None:
    pieces, headers = HUGE[body]
    upstream = Streamed(pieces, status, headers={**headers, "Retry-After": "9"})
    error, peak = await fetch_traced(BarbicanSource("http://b", client=upstream.client()))
    expected = {200: SourceInvalid, 503: SourceUnavailable, 404: SourceRejected}[status]
    assert type(error) is expected and error.status_code == status
    if status == 200:
        assert "oversized body" in str(error)
    if status == 503:
        assert error.retry_after == 9  # an error body too big to describe still maps as before
    assert peak < MEMORY_BOUND, f"fetching allocated {peak / 2**20:.1f} MiB at its peak"
    assert not upstream.finished and upstream.sent <= 2 * MAX_BODY_BYTES  # read no further than needed


async def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    upstream = Streamed(HUGE["300 MiB, chunked"][0], headers={"Content-Length": str(300 << 20)})
    error, peak = await fetch_traced(BarbicanSource("http://b", client=upstream.client()))
    assert isinstance(error, SourceInvalid) and "oversized body" in str(error)
    assert upstream.sent == 0 and peak < MEMORY_BOUND


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(("encoding", "encode"), [("gzip", gzip.compress), ("deflate", zlib.compress),
                                                  ("deflate", raw_deflate), ("identity", bytes)],
                         ids=["gzip", "deflate", "raw deflate", "identity"])
async def test_compressed_answers_are_inflated_in_pieces(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    wire = encode(fixture("barbican_quotas.json"))
    upstream = Streamed(lambda: (wire[i:i + 7] for i in range(0, len(wire), 7)), headers={"Content-Encoding": encoding})
    quotas = await BarbicanSource("http://b", client=upstream.client()).fetch("p", {"x-auth-token": "t"})
    assert quotas.limit("secrets").value == 1000 and upstream.finished
    assert upstream.requests[0].headers["accept-encoding"] == "gzip, deflate"


async def test_a_compressed_error_body_is_still_described() -> None:
    errors = json.dumps({"errors": [{"title": "Unauthorized", "detail": "Invalid API key"}]}).encode()
    upstream = Streamed(lambda: [gzip.compress(errors)], 401, headers={"Content-Encoding": "gzip"})
    with pytest.raises(SourceRejected, match="Unauthorized: Invalid API key"):
        await LatitudeSource("http://l", token="k", client=upstream.client()).fetch("p", {})


async def test_a_corrupt_compressed_body_is_invalid() -> None:
    upstream = Streamed(lambda: [b"\x1f\x8b not gzip at all"], headers={"Content-Encoding": "gzip"})
    with pytest.raises(SourceInvalid, match="gzip"):
        await BarbicanSource("http://b", client=upstream.client()).fetch("p", {"x-auth-token": "t"})
