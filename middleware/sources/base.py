"""What a quota source is, and the HTTP plumbing the upstream sources share."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..errors import SourceInvalid, SourceRejected, SourceUnavailable
from ..quotas import Quotas
from .bounded import ACCEPT_ENCODING, MAX_BODY_BYTES, parse_json, read_body

DEFAULT_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
DEFAULT_DEADLINE = 10.0


class QuotaSource(ABC):
    """Answers "what are the effective quotas of project P"."""

    #: Names this source's entries in the shared quota cache.
    namespace: str = "source"
    #: Request headers the source needs from the caller (e.g. Barbican's X-Auth-Token).
    forward_headers: tuple[str, ...] = ()
    #: False for sources that answer from memory: caching them gains nothing.
    cacheable: bool = True
    #: True for a source that answers each project with the same Quotas for good, from memory
    #: (StaticSource): the engine keeps what it works out from them (a subclass that overrides
    #: ``fetch_nowait`` is not taken for one unless it says so again).
    constant: bool = False

    @abstractmethod
    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        """Effective quotas of ``project``; ``headers`` holds the ``forward_headers`` present."""

    #: True for a source that knows projects' parents (parent_of answers).
    has_parents: bool = False

    async def parent_of(self, project: str, headers: Mapping[str, str]) -> str | None:
        """The project's parent in a hierarchy (Keystone's parent project), None for a top-level one."""
        return None

    def fetch_nowait(self, project: str) -> Quotas | None:
        """``fetch`` for a source that answers from memory, with no I/O; None: await ``fetch``."""
        return None

    async def aclose(self) -> None:
        """Release connections; called when the middleware shuts down."""


class HTTPSource(QuotaSource):
    """A source behind an HTTP API, fetched with one shared ``httpx.AsyncClient``."""

    def __init__(self, base_url: str, *, client: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, deadline: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # httpx times each read, not the whole response: a body dripping one byte at a time would
        # never time out. The deadline bounds the whole fetch.
        per_read = timeout.read if isinstance(timeout, httpx.Timeout) else timeout
        self.deadline = deadline if deadline is not None else 2 * (per_read or DEFAULT_DEADLINE)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def get_json(self, path: str, *, headers: Mapping[str, str], params: Mapping[str, str] | None = None,
                       media_types: tuple[str, ...] = ("application/json",)) -> Any:
        """GET a JSON document, mapping every failure to a SourceError subclass.

        The body is streamed and read within MAX_BODY_BYTES, decoded (see ``bounded``): no answer
        costs more memory than that, however large or however compressed.
        """
        url = f"{self.base_url}{path}"
        request_headers = httpx.Headers({"Accept-Encoding": ACCEPT_ENCODING})
        request_headers.update(headers)
        try:
            # The deadline covers reading the body too: one dripping in must not hold the caller.
            async with asyncio.timeout(self.deadline):
                async with self._client.stream("GET", url, headers=request_headers, params=params) as response:
                    body = await self._read_answer(response, media_types)
        except TimeoutError as exc:
            raise SourceUnavailable(f"quota API did not answer within {self.deadline}s") from exc
        except httpx.TimeoutException as exc:
            raise SourceUnavailable(f"quota API timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"quota API unreachable ({type(exc).__name__})") from exc
        return parse_json(body, status_code=response.status_code)

    async def _read_answer(self, response: httpx.Response, media_types: tuple[str, ...]) -> bytes:
        """The body of a 200 of an expected media type; any other answer raises its SourceError."""
        status = response.status_code
        if status == 429 or status >= 500:
            raise SourceUnavailable(f"quota API answered {status}{await self._describe(response)}",
                                    status_code=status, retry_after=retry_after(response))
        if status in (401, 403, 404):
            raise SourceRejected(f"quota API answered {status}{await self._describe(response)}", status_code=status)
        if status != 200:
            raise SourceInvalid(f"quota API answered unexpected status {status}", status_code=status)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in media_types:
            raise SourceInvalid(f"quota API answered media type {content_type or 'none'!r}, "
                                f"expected {' or '.join(media_types)}", status_code=status)
        return await read_body(response, MAX_BODY_BYTES)

    def describe_error(self, response: httpx.Response) -> str:
        """A short, safe summary of an upstream error body (overridden per API; read the body
        with ``parse_json``, which bounds its depth)."""
        return ""

    async def _describe(self, response: httpx.Response) -> str:
        """describe_error on the error body, read within the same bound; the status alone answers
        when the body is too big, does not inflate, or the override trips over it."""
        try:
            body = await read_body(response, MAX_BODY_BYTES)
        except SourceInvalid:
            return ""
        # describe_error reads response.content: give it the body already read, decoded (so
        # without the headers that described it on the wire).
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k not in ("content-encoding", "content-length", "transfer-encoding")]
        read = httpx.Response(response.status_code, headers=headers, content=body, request=response.request)
        try:
            return self.describe_error(read)
        except RecursionError:  # an override that parsed a deep body itself
            return ""


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), None when absent or bad."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
