"""Rendering: the rejection bodies (Barbican's, RFC 9457) and the IETF RateLimit headers."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from middleware import Limit, Rejection, Window, barbican_error, problem_json
from middleware.rendering import format_amount, iso_time, limit_state, ratelimit_headers


def test_barbican_error_is_barbicans_shape_with_a_retry_after_when_known() -> None:
    rendered = barbican_error(Rejection(429, "slow down", project="p", resource="r", retry_after=0.2))
    assert rendered.status == 429
    assert json.loads(rendered.body) == {"code": 429, "title": "Too Many Requests", "description": "slow down"}
    headers = dict(rendered.headers)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(rendered.body)).encode()
    assert headers[b"retry-after"] == b"1"  # never 0: a client would retry at once


def test_problem_json_carries_the_quota_facts() -> None:
    rendered = problem_json(Rejection(403, "over", project="p", resource="secrets", limit=5, used=5))
    doc = json.loads(rendered.body)
    assert doc == {"type": "about:blank", "title": "Forbidden", "status": 403, "detail": "over",
                   "project": "p", "resource": "secrets", "limit": 5, "used": 5}
    assert dict(rendered.headers)[b"content-type"] == b"application/problem+json"
    assert b"retry-after" not in dict(rendered.headers)


def test_ratelimit_headers_for_a_count_quota_have_no_window() -> None:
    assert ratelimit_headers("secrets", Limit(5), 2) == [(b"ratelimit-policy", b'"secrets";q=5'),
                                                         (b"ratelimit", b'"secrets";r=3')]


def test_ratelimit_headers_for_a_window_and_a_scale() -> None:
    headers = ratelimit_headers("credits", Limit(10_000, scale=1000), 2_500, Window(0.0, 60.0), now=15.2)
    assert headers == [(b"ratelimit-policy", b'"credits";q=10;w=60'), (b"ratelimit", b'"credits";r=7;t=45')]


def test_unlimited_sends_no_headers_and_names_are_escaped() -> None:
    assert ratelimit_headers("x", Limit(-1), 3) == []
    policy = dict(ratelimit_headers('a"b\\é', Limit(1), 0))[b"ratelimit-policy"]
    assert policy == b'"a\\"b\\\\\\xe9";q=1'  # quotes escaped; ASCII only, as header values must be


def test_amounts_and_times_for_people() -> None:
    assert format_amount(1500, 1000) == "1.5" and format_amount(7, 1) == "7" and format_amount(2000, 1000) == "2"
    assert iso_time(0) == "1970-01-01T00:00:00Z"


@given(value=st.integers(0, 10**13), used=st.integers(0, 10**13), scale=st.sampled_from([1, 100, 10**6]),
       left=st.floats(-120, 120, allow_nan=False))
def test_the_ratelimit_item_rounds_what_remains_down_and_the_seconds_left_up(value: int, used: int, scale: int,
                                                                            left: float) -> None:
    # limit_state is written without max() and math.ceil() (it runs for every policy): the same numbers.
    window = Window(1000.0, 1060.0)
    now = window.end - left
    assert limit_state(b'"r"', value, scale, used, None, now) == b'"r";r=%d' % (max(0, value - used) // scale)
    assert limit_state(b'"r"', value, scale, used, window, now) == (
        b'"r";r=%d;t=%d' % (max(0, value - used) // scale, max(0, math.ceil(window.end - now))))
