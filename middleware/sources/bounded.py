"""Reading an upstream's answer within bounds: whatever it sends, it costs bounded memory and stack.

Size: at most MAX_BODY_BYTES, counted decoded, as the body streams in. httpx's own decoders
inflate each network read whole (64 KiB of a gzip bomb is 64 MiB), so the raw bytes are inflated
here, never to more than what the bound still allows (zlib's ``max_length``), and the reading
stops there. A Content-Length over the bound is refused before anything is read.

Depth: ``json.loads`` recurses once per nested array or object, so 4 KB of ``[`` raises
RecursionError (an HTTP 500 and no back-off, had it escaped). Documents nested deeper than
MAX_DEPTH are refused before they are parsed, by a scan that does not recurse.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import httpx

from ..errors import SourceInvalid

#: Quota documents are small; anything larger is not one.
MAX_BODY_BYTES = 1 << 20
#: Quota documents nest a handful of levels; anything deeper than this is not one.
MAX_DEPTH = 64
#: The codings read_body inflates. Sent explicitly: httpx would also offer br and zstd when those
#: packages are installed, and read_body could not undo them.
ACCEPT_ENCODING = "gzip, deflate"
_WBITS = {"gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}

_ESCAPE = re.compile(r"\\.", re.DOTALL)
#: With every escape gone, a string is a quote, no quote, a quote. Neither pattern backtracks.
_STRING = re.compile(r'"[^"]*"')
_RUN = re.compile(r"[\[{]+|[\]}]+")


async def read_body(response: httpx.Response, limit: int = MAX_BODY_BYTES) -> bytes:
    """The decoded body of a streamed response. SourceInvalid as soon as it exceeds ``limit``
    bytes (the rest is never read; closing the response drops it), or when it does not inflate."""
    oversized = SourceInvalid(f"quota API answered an oversized body (over {limit} bytes)",
                              status_code=response.status_code)
    try:
        body = response.content  # already in memory: an httpx.Response made from bytes
    except httpx.ResponseNotRead:
        pass
    else:
        if len(body) > limit:
            raise oversized
        return body
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise oversized
    # Undone in the reverse of the order they were applied; others pass through, as in httpx.
    codings = [c.strip().lower() for c in response.headers.get_list("content-encoding", split_commas=True)]
    stages = [_Inflate(coding, response.status_code) for coding in reversed(codings) if coding in _WBITS]
    chunks: list[bytes] = []
    size = 0
    # aiter_raw() is an async generator: aclosing() ends it (and the response) if we stop early.
    async with aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as raw_chunks:
        async for chunk in raw_chunks:
            room = limit - size
            for stage in stages:
                chunk = stage(chunk, room)
                if len(chunk) > room:
                    break  # what the stage left uninflated is over the bound anyway
            if len(chunk) > room:
                raise oversized
            size += len(chunk)
            chunks.append(chunk)
    return b"".join(chunks)


class _Inflate:
    """One Content-Encoding undone a piece at a time, each piece to at most ``room + 1`` bytes:
    one byte past the room is enough to tell that the body is too big (and zlib reads a
    ``max_length`` of 0 as no limit at all)."""

    def __init__(self, coding: str, status_code: int) -> None:
        self.coding = coding
        self.status_code = status_code
        self._zlib = zlib.decompressobj(_WBITS[coding])
        self._started = False

    def __call__(self, data: bytes, room: int) -> bytes:
        started, self._started = self._started, True
        try:
            try:
                return self._zlib.decompress(data, room + 1)
            except zlib.error:
                if started or self.coding != "deflate":
                    raise
                # Some servers send deflate without its zlib header; httpx reads those too.
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._zlib.decompress(data, room + 1)
        except zlib.error as exc:
            raise SourceInvalid(f"quota API answered a {self.coding} body that does not inflate ({exc})",
                                status_code=self.status_code) from exc


def parse_json(body: bytes, *, status_code: int | None = None) -> Any:
    """``json.loads(body)``, but every failure (bad bytes, bad JSON, too deep) is a SourceInvalid."""
    try:
        # What json.loads(bytes) does itself; decoded first so that the scan sees characters.
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        if _deeper_than(text, MAX_DEPTH):
            raise SourceInvalid(f"quota API answered JSON nested deeper than {MAX_DEPTH} levels",
                                status_code=status_code)
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: should the scan ever miss one
        raise SourceInvalid("quota API answered a body that is not JSON", status_code=status_code) from exc


def _deeper_than(text: str, limit: int) -> bool:
    """True when arrays and objects nest more than ``limit`` deep (or open more than that unclosed).

    Brackets inside strings do not count: escapes go first, then strings. Linear in the text,
    with no recursion; a document with fewer openings than ``limit`` is not scanned at all.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    skeleton = _STRING.sub("", _ESCAPE.sub("", text))
    for run in _RUN.finditer(skeleton):
        if skeleton[run.start()] in "[{":
            depth += run.end() - run.start()
            if depth > limit:
                return True
        else:
            depth -= run.end() - run.start()
    return False
