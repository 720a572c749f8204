"""Any JSON quota API: a URL, headers, and JSON pointers (RFC 6901) from the answer to the limits.

    JSONSource(
        "https://quota.example.com/projects/{project}/limits",
        headers={"Authorization": "Bearer ..."},
        limits={"widgets": "/limits/widgets", "gadgets": "/limits/gadgets"},
        used={"widgets": "/usage/widgets"},            # optional: seeds the local counters
        window=("/period/start", "/period/end"),       # optional: ISO 8601 or epoch seconds
    )

``{project}`` in the URL is replaced by the percent-encoded project id. Limits must be integers
(negative: unlimited); a pointer that resolves to nothing leaves that resource to the default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import ConfigurationError, SourceInvalid
from ..quotas import Limit, Quotas, parse_limit
from ..windows import Window
from .base import DEFAULT_TIMEOUT, HTTPSource

_MISSING = object()
#: An array index (RFC 6901, section 4): "0", or ASCII digits without a leading zero. Not "01",
#: "+1", "-1", " 1", "1.0" or other scripts' digits (str.isdigit() takes "١", int() takes "+1").
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
#: "~" escapes only "~0" and "~1" (section 3); anything else is not a JSON pointer.
_BAD_ESCAPE = re.compile(r"~(?![01])")


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """The reference tokens of an RFC 6901 JSON pointer; ConfigurationError if it is not one."""
    if not isinstance(pointer, str):
        raise ConfigurationError(f"JSON pointer must be a string, got {pointer!r}")
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ConfigurationError(f"JSON pointer must be empty or start with '/': {pointer!r}")
    if _BAD_ESCAPE.search(pointer):
        raise ConfigurationError(f"JSON pointer {pointer!r} has a '~' not followed by '0' or '1' "
                                 "(write '~0' for '~' and '~1' for '/')")
    # "~1" first, then "~0": "~01" is the key "~1", never "/".
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/"))


def resolve_tokens(doc: Any, tokens: tuple[str, ...]) -> Any:
    """The value the tokens reference in ``doc`` (parsed JSON), or _MISSING.

    What RFC 6901 calls an error while evaluating (a member that is not there, an index past the
    end, "-" which names the element after the last, a token that is no array index applied to
    an array, a token applied to a string or a number) resolves to nothing.
    """
    for token in tokens:
        if isinstance(doc, dict):
            if token not in doc:
                return _MISSING
            doc = doc[token]
        elif isinstance(doc, list):
            if _ARRAY_INDEX.fullmatch(token) is None:
                return _MISSING
            index = int(token)
            if index >= len(doc):
                return _MISSING
            doc = doc[index]
        else:
            return _MISSING
    return doc


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON pointer, or _MISSING (ConfigurationError: not a pointer)."""
    return resolve_tokens(doc, parse_pointer(pointer))


class JSONSource(HTTPSource):
    def __init__(self, url: str, *, limits: Mapping[str, str], headers: Mapping[str, str] | None = None,
                 used: Mapping[str, str] | None = None, window: tuple[str, str] | None = None,
                 forward_headers: tuple[str, ...] = (), namespace: str = "json",
                 client: httpx.AsyncClient | None = None, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 deadline: float | None = None) -> None:
        super().__init__("", client=client, timeout=timeout, deadline=deadline)
        if not limits:
            raise ConfigurationError("JSONSource needs at least one limit pointer")
        # Parsed once, at start-up: a malformed pointer is a configuration error, not a bad answer.
        self._tokens = {pointer: parse_pointer(pointer)
                        for pointer in [*limits.values(), *(used or {}).values(), *(window or ())]}
        self.url = url
        self.headers = dict(headers or {})
        self.limits = dict(limits)
        self.used = dict(used or {})
        self.window = window
        self.forward_headers = tuple(h.lower() for h in forward_headers)
        self.namespace = namespace

    async def fetch(self, project: str, headers: Mapping[str, str]) -> Quotas:
        url = self.url.replace("{project}", quote(project, safe=""))
        doc = await self.get_json(url, headers={"Accept": "application/json", **self.headers, **headers})
        return self.parse(doc)

    def parse(self, doc: Any) -> Quotas:
        window = None
        if self.window is not None:
            start, end = (_instant(resolve_tokens(doc, self._tokens[p]), p) for p in self.window)
            if start is not None and end is not None:
                if end <= start:
                    raise SourceInvalid("quota window ends before it starts")
                window = Window(start, end)
        limits: dict[str, Limit] = {}
        for resource, pointer in self.limits.items():
            value = resolve_tokens(doc, self._tokens[pointer])
            if value is _MISSING:
                continue
            used_pointer = self.used.get(resource)
            used = None if used_pointer is None else resolve_tokens(doc, self._tokens[used_pointer])
            reported = None if used in (None, _MISSING) else max(0, parse_limit(used, str(used_pointer)))
            limits[resource] = Limit(parse_limit(value, pointer), period=window, used=reported)
        return Quotas(limits)


def _instant(value: Any, where: str) -> float | None:
    if value is None or value is _MISSING:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is not None:
                return moment.timestamp()
    raise SourceInvalid(f"{where} is not an ISO 8601 date-time with a time zone or epoch seconds")
