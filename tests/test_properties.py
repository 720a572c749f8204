"""Property-based tests (hypothesis): hostile upstream documents, identities and resource names.

- ``parse_barbican`` over thousands of generated bodies: the only exception is SourceInvalid, and
  what it accepts is exactly what Barbican's rules allow.
- Key building: distinct (project, resource) pairs never share a key; the hash tag is exactly the
  escaped project, so one project's keys share one slot and different projects get different tags.
- Identity through the middleware: any bytes in X-Project-Id get a 201 or a clear 4xx JSON.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from middleware import Bucket, MemoryStore, QuotaMiddleware, Rule, StaticSource
from middleware.errors import SourceInvalid
from middleware.keys import counter_keys, escape, project_tag, quotas_key
from middleware.quotas import MAX_LIMIT, UNLIMITED, Quotas
from middleware.sources.barbican import BARBICAN_RESOURCES, parse_barbican

# -- parse_barbican -------------------------------------------------------------------------------

HUGE = st.integers(min_value=-(2**80), max_value=2**80)
EDGE_INTS = st.sampled_from([0, 1, -1, -2, MAX_LIMIT, MAX_LIMIT + 1, -MAX_LIMIT, 2**63, -(2**63), 2**64 + 1])
SCALARS = st.one_of(st.none(), st.booleans(), HUGE, EDGE_INTS, st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1.0, 0.0, -1.0, 5.0, 1e300]), st.text(max_size=8),
                    st.sampled_from(["5", "-1", "", "NaN", "1e3"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
NAMES = st.one_of(st.sampled_from(BARBICAN_RESOURCES), st.text(max_size=6))
QUOTA_OBJECTS = st.dictionaries(NAMES, st.one_of(JSON, HUGE, EDGE_INTS), max_size=8)
DOCUMENTS = st.one_of(
    JSON,
    st.builds(lambda q: {"quotas": q}, QUOTA_OBJECTS),
    st.builds(lambda q, extra: {**extra, "quotas": q}, QUOTA_OBJECTS, st.dictionaries(st.text(max_size=6), JSON,
                                                                                      max_size=3)),
    st.builds(lambda q: {"quotas": q}, JSON),
    # Not what json.loads returns, but what a custom client or a subclass might hand over.
    st.tuples(JSON, JSON), st.binary(max_size=8), st.builds(lambda q: {"quotas": tuple(q.items())}, QUOTA_OBJECTS),
)


def valid_limit(value: Any) -> bool:
    return type(value) is int and value <= MAX_LIMIT


def int_of(limit: Any) -> Any:
    """The integer a parsed limit holds (Quotas keeps ``Limit`` objects; older code kept ints)."""
    return getattr(limit, "value", limit)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCUMENTS, through_json=st.booleans())
@example(doc={"quotas": {"secrets": True}}, through_json=False)
@example(doc={"quotas": {"secrets": 2**53}}, through_json=False)
@example(doc={"quotas": {"secrets": -(2**200)}}, through_json=False)
@example(doc={"quotas": {"secrets": 5.0}}, through_json=False)
@example(doc={"quotas": {"secrets": None, "other": "x"}}, through_json=False)
def test_parse_barbican_accepts_only_what_barbican_allows(doc: Any, through_json: bool) -> None:
    if through_json:
        try:
            doc = json.loads(json.dumps(doc))  # exactly what the HTTP source hands over
        except (TypeError, ValueError):
            assume(False)
    try:
        quotas = parse_barbican(doc)
    except SourceInvalid:
        # Refused: then the document really is not a usable Barbican quota document.
        assert not isinstance(doc, dict) or not isinstance(doc.get("quotas"), dict) or any(
            not valid_limit(v) for k, v in doc["quotas"].items() if k in BARBICAN_RESOURCES)
        return
    assert isinstance(quotas, Quotas)
    for name, limit in quotas.limits.items():
        assert name in BARBICAN_RESOURCES
        value = int_of(limit)
        assert type(value) is int and not isinstance(value, bool)
        assert UNLIMITED <= value <= MAX_LIMIT
    # Accepted: every Barbican resource the upstream mentions is read, by Barbican's rules.
    given_limits = {k: v for k, v in doc["quotas"].items() if k in BARBICAN_RESOURCES}
    assert set(quotas.limits) == set(given_limits)
    for name, value in given_limits.items():
        assert int_of(quotas.limit(name)) == (UNLIMITED if value < 0 else value)


@settings(max_examples=300, deadline=None)
@given(resources=st.lists(st.text(max_size=6), max_size=5), quota_object=QUOTA_OBJECTS)
def test_parse_barbican_reads_only_the_configured_resources(resources: list[str], quota_object: dict[str, Any]) -> None:
    try:
        quotas = parse_barbican({"quotas": quota_object}, resources)
    except SourceInvalid:
        assert any(not valid_limit(quota_object[r]) for r in resources if r in quota_object)
        return
    assert set(quotas.limits) == {r for r in resources if r in quota_object}
    values = [int_of(limit) for limit in quotas.limits.values()]
    assert all(type(v) is int and UNLIMITED <= v <= MAX_LIMIT for v in values)


# -- keys -----------------------------------------------------------------------------------------

#: Characters that would break a naive key scheme, plus a few ordinary ones to build near-misses.
NASTY = "{}:*%\n\r\t\x00 ?[]\\\"'/25AaFf~.-_\u00e9\u2028\U0001f600"
NASTY_TEXT = st.text(alphabet=NASTY, max_size=12)
ANY_TEXT = st.one_of(st.text(max_size=40), NASTY_TEXT, st.text(min_size=300, max_size=1200),
                     st.builds(lambda s, n: s * n, NASTY_TEXT, st.integers(0, 100)))
PREFIXES = st.sampled_from(["quota:", "q:", "app:quota:", ""])
WINDOWS = st.one_of(st.none(), st.integers(min_value=0, max_value=2**40))


def hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes: the text between the first '{' and the next '}', if non-empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1:end]


NAMESPACES = ("barbican", "static", "source")


def all_keys(prefix: str, project: str, resource: str, window: int | None) -> list[str]:
    """Every key the middleware derives for one bucket (the unwindowed pair twice when window is None)."""
    return [*counter_keys(prefix, project, resource), *counter_keys(prefix, project, resource, window),
            quotas_key(prefix, project, "barbican"), quotas_key(prefix, project, "static") + ":lock"]


@settings(max_examples=1000, deadline=None)
@given(prefix=PREFIXES, project=ANY_TEXT, resource=ANY_TEXT, window=WINDOWS)
def test_every_key_of_a_project_carries_exactly_its_escaped_tag(prefix: str, project: str, resource: str,
                                                                window: int | None) -> None:
    escaped = escape(project)
    assert unquote(escaped, errors="strict") == project  # the escape is reversible: injective
    for forbidden in "{}:*\n\r\t\x00 ":
        assert forbidden not in escaped
    keys = all_keys(prefix, project, resource, window)
    tag_slot = key_slot(escaped.encode())
    for key in keys:
        assert key.startswith(project_tag(prefix, project))
        if project:  # (the identity layer never hands over an empty project)
            assert hash_tag(key) == escaped
            assert key_slot(key.encode()) == tag_slot  # one project, one slot
    # counter, leases and settled set, windowed ones, two shared quota copies: all different.
    assert len(set(keys)) == (5 if window is None else 8)


@settings(max_examples=1000, deadline=None)
@given(prefix=PREFIXES, a=st.tuples(ANY_TEXT, ANY_TEXT, WINDOWS), b=st.tuples(ANY_TEXT, ANY_TEXT, WINDOWS))
@example(prefix="quota:", a=("a:b", "c", None), b=("a", "b:c", None))
@example(prefix="quota:", a=("a}", "x", None), b=("a", "}x", None))
@example(prefix="quota:", a=("%41", "x", None), b=("A", "x", None))
@example(prefix="quota:", a=("p", "r:w1", None), b=("p", "r", 1))
@example(prefix="quota:", a=("p", "r:used", None), b=("p", "r", None))
def test_distinct_buckets_never_share_a_key(prefix: str, a: tuple[str, str, int | None],
                                            b: tuple[str, str, int | None]) -> None:
    assume(a != b)
    keys_a, keys_b = counter_keys(prefix, *a), counter_keys(prefix, *b)
    assert not set(keys_a) & set(keys_b), f"{a} and {b} collide: {keys_a} / {keys_b}"
    assert len(set(keys_a)) == 3  # counter, lease set and settled set differ
    if a[0] != b[0]:
        assert hash_tag(keys_a[0]) != hash_tag(keys_b[0])  # different identities, different tags
        assert quotas_key(prefix, a[0], "barbican") != quotas_key(prefix, b[0], "barbican")


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(NASTY_TEXT, NASTY_TEXT), min_size=2, max_size=60, unique=True))
def test_many_near_miss_buckets_map_to_as_many_keys(pairs: list[tuple[str, str]]) -> None:
    counters = {counter_keys("quota:", p, r)[0] for p, r in pairs}
    leases = {counter_keys("quota:", p, r)[1] for p, r in pairs}
    settled = {counter_keys("quota:", p, r)[2] for p, r in pairs}
    windowed = {k for p, r in pairs for k in counter_keys("quota:", p, r, 1)}
    projects = {p for p, _ in pairs}
    shared = {quotas_key("quota:", p, ns) + suffix for p in projects for ns in NAMESPACES for suffix in ("", ":lock")}
    assert len(counters) == len(leases) == len(settled) == len(pairs) and len(windowed) == 3 * len(pairs)
    assert len(shared) == 2 * len(NAMESPACES) * len(projects)
    everything = counters | leases | settled | windowed | shared
    assert len(everything) == len(counters) + len(leases) + len(settled) + len(windowed) + len(shared)


# -- identities through the middleware ------------------------------------------------------------

RULES = [Rule("POST", "/things", "things")]


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _call(mw: QuotaMiddleware, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mw({"type": "http", "method": "POST", "path": "/things", "headers": headers, "query_string": b""},
             receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.anyio
@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda s: s.encode("utf-8")),
                     st.binary(min_size=256, max_size=5000)))
@example(raw=b"\xff\xfe")
@example(raw=b"ok\x00")
@example(raw=b"a\x7fb")
@example(raw="line\u2028sep".encode())
@example(raw="\u00e9".encode() * 255)  # 255 characters, 510 bytes: accepted
@example(raw="\u00e9".encode() * 256)
async def test_any_project_header_gets_a_201_or_a_clear_4xx(raw: bytes) -> None:
    mw = QuotaMiddleware(_ok, rules=RULES, source=StaticSource({"things": -1}), store=MemoryStore())
    status, headers, body = await _call(mw, [(b"x-project-id", raw)])
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    acceptable = text is not None and 0 < len(text) <= 255 and text.isprintable() and text == text.strip()
    if acceptable:
        assert status == 201
        assert await mw.store.usage(Bucket(text, "things")) == 1  # type: ignore[arg-type]
        return
    assert status == (401 if raw == b"" else 400)
    assert headers[b"content-type"] == b"application/json"
    doc = json.loads(body)
    assert doc["code"] == status and "X-Project-Id" in doc["description"]


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["surrogate\udcff", "nul\x00", "tab\there", "x" * 256, b"\xc3", b"\xed\xb3\xbf"])
async def test_identity_callables_returning_hostile_values_get_a_4xx_not_a_crash(value: Any) -> None:
    """Scope state or a callable may hand over anything a client sent; the answer is still a 4xx JSON."""
    mw = QuotaMiddleware(_ok, rules=RULES, source=StaticSource({"things": -1}), identity=lambda scope: value)
    status, headers, body = await _call(mw, [])
    assert status == 400
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["code"] == 400
