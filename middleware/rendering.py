"""How the middleware answers when it will not let a request through, and its RateLimit headers.

The default body is Barbican's error shape ``{"code", "title", "description"}``; pass another
renderer (``problem_json`` or your own) to the middleware to change it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from http import HTTPStatus

from .quotas import Limit
from .types import RawHeaders
from .windows import Window


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was refused; what a renderer turns into a response."""

    status: int
    description: str
    project: str | None = None
    resource: str | None = None
    limit: float | None = None
    used: float | None = None
    retry_after: float | None = None
    headers: RawHeaders = field(default_factory=list)

    @property
    def title(self) -> str:
        return HTTPStatus(self.status).phrase


@dataclass(frozen=True, slots=True)
class Rendered:
    status: int
    headers: RawHeaders
    body: bytes


Renderer = Callable[[Rejection], Rendered]


def _with_retry_after(rejection: Rejection, content_type: bytes, body: bytes) -> Rendered:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *rejection.headers]
    if rejection.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(rejection.retry_after))).encode()))
    return Rendered(rejection.status, headers, body)


def barbican_error(rejection: Rejection) -> Rendered:
    """Barbican's error body: ``{"code": 403, "title": "Forbidden", "description": "..."}``."""
    body = json.dumps({"code": rejection.status, "title": rejection.title,
                       "description": rejection.description}).encode()
    return _with_retry_after(rejection, b"application/json", body)


def problem_json(rejection: Rejection) -> Rendered:
    """RFC 9457 problem details, with the quota facts as extension members."""
    doc: dict[str, object] = {"type": "about:blank", "title": rejection.title, "status": rejection.status,
                              "detail": rejection.description}
    for name in ("project", "resource", "limit", "used"):
        value = getattr(rejection, name)
        if value is not None:
            doc[name] = value
    return _with_retry_after(rejection, b"application/problem+json", json.dumps(doc).encode())


def iso_time(epoch: float) -> str:
    """Epoch seconds as an ISO 8601 UTC time, for people and JSON bodies."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _sf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_amount(units: int, scale: int) -> str:
    """Store units as quota units for people: 1500 thousandths -> "1.5"."""
    if scale == 1:
        return str(units)
    return format((Decimal(units) / scale).normalize(), "f")


def ratelimit_headers(resource: str, limit: Limit, used: int, window: Window | None = None,
                      now: float = 0.0) -> RawHeaders:
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers) for one limit.

    Quantities are whole quota units (remaining rounded down). A count quota has no window, so
    neither ``w`` nor ``t`` is sent; an unlimited one sends nothing.
    """
    return limit_headers(resource, limit.value, limit.scale, used, window, now)


def limit_headers(resource: str, value: int, scale: int, used: int, window: Window | None, now: float) -> RawHeaders:
    """``ratelimit_headers`` of a limit of ``value`` store units, ``scale`` to a quota unit."""
    if value < 0:
        return []
    name, policy = limit_policy(resource, value, scale, window)
    return [(b"ratelimit-policy", policy), (b"ratelimit", limit_state(name, value, scale, used, window, now))]


def limit_policy(resource: str, value: int, scale: int, window: Window | None) -> tuple[bytes, bytes]:
    """(the encoded name, the ``RateLimit-Policy`` item) of a limit of ``value`` >= 0 store units."""
    return _policy(resource, value // scale, None if window is None else max(1, round(window.end - window.start)))


def limit_state(name: bytes, value: int, scale: int, used: int, window: Window | None, now: float) -> bytes:
    """The ``RateLimit`` item: what remains, in whole quota units (rounded down), and for a window
    the seconds until it ends (rounded up). Written without max() and math.ceil(): it runs for
    every policy of every limited request."""
    remaining = value - used
    if remaining <= 0:
        remaining = 0
    elif scale != 1:
        remaining //= scale
    if window is None:
        return b"%s;r=%d" % (name, remaining)
    left = window.end - now
    seconds = int(left)
    if seconds < left:
        seconds += 1
    return b"%s;r=%d;t=%d" % (name, remaining, seconds if seconds > 0 else 0)


@functools.lru_cache(maxsize=4096)
def _policy(resource: str, quota: int, seconds: int | None) -> tuple[bytes, bytes]:
    """(the encoded name, the whole policy): the same for every request until the limit changes."""
    name = _sf_string(resource).encode("ascii", "backslashreplace")
    policy = name + b";q=" + str(quota).encode()
    return name, policy if seconds is None else policy + b";w=" + str(seconds).encode()
