"""A Barbican-compatible quota API that misbehaves on demand; run it under uvicorn (one worker).

Each test uses its own *scenario*: a source built on ``{base}/s/<scenario>`` asks
``GET /s/<scenario>/v1/quotas``. What that answers is switched at run time through the control
endpoint, so one running server serves many independent tests:

- ``PUT /_control/<scenario>`` with a JSON object: ``{"mode": ..., ...}`` (fields below);
- ``GET /_control/<scenario>``: ``{"calls": n}``, how many quota requests it has seen.

Modes (``quotas`` is the ``{"secrets": 5, ...}`` object the healthy answer carries):

- ``ok``: 200 ``application/json`` ``{"quotas": quotas}``
- ``sleep``: waits ``delay`` seconds before answering at all, then answers like ``ok``
- ``status``: answers ``status`` with body ``body`` and, when given, ``Retry-After: retry_after``
- ``garbage``: 200 ``application/json`` whose body is ``body`` (default: not JSON)
- ``media``: 200 with a valid quota document but ``Content-Type: content_type`` (default text/html)
- ``stall_body``: headers at once, then nothing for ``delay`` seconds, then the body
- ``drip_body``: headers at once, then the valid body one byte every ``delay`` seconds
- ``gzip_bomb``: 200 ``application/json``, ``Content-Encoding: gzip``: ``mib`` MiB of zeros
  compressed (about a thousandth of that on the wire)
- ``huge_body``: 200 ``application/json`` of ``mib`` MiB of spaces, chunked (no Content-Length)
  unless ``declare_length`` is true
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

SCENARIOS: dict[str, dict[str, Any]] = {}
CALLS: dict[str, int] = {}


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                  content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    parts = scope["path"].strip("/").split("/")
    if parts[0] == "_control" and len(parts) == 2:
        if scope["method"] == "PUT":
            SCENARIOS[parts[1]] = json.loads(await _read_body(receive))
            await _answer(send, 200, b"{}")
        else:
            await _answer(send, 200, json.dumps({"calls": CALLS.get(parts[1], 0)}).encode())
        return
    if len(parts) == 4 and parts[0] == "s" and parts[2:] == ["v1", "quotas"]:
        await _quota(parts[1], dict(scope["headers"]), receive, send)
        return
    await _answer(send, 200 if scope["path"] == "/" else 404, b"{}")


async def _quota(name: str, headers: dict[bytes, bytes], receive: Any, send: Any) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1
    scenario = SCENARIOS.get(name, {"mode": "ok"})
    mode = scenario.get("mode", "ok")
    delay = float(scenario.get("delay", 0))
    if not headers.get(b"x-auth-token"):
        await _answer(send, 401, b'{"code": 401, "title": "Unauthorized", "description": "Authentication required"}')
        return
    good = json.dumps({"quotas": scenario.get("quotas", {})}).encode()
    if mode == "ok":
        await _answer(send, 200, good)
    elif mode == "sleep":
        await asyncio.sleep(delay)
        await _answer(send, 200, good)
    elif mode == "status":
        extra = [(b"retry-after", str(scenario["retry_after"]).encode())] if "retry_after" in scenario else []
        await _answer(send, int(scenario["status"]), scenario.get("body", "").encode(), extra,
                      content_type=b"text/plain")
    elif mode == "garbage":
        await _answer(send, 200, scenario.get("body", "<<not json>>").encode())
    elif mode == "media":
        await _answer(send, 200, good, content_type=scenario.get("content_type", "text/html").encode())
    elif mode in ("stall_body", "drip_body"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(good)).encode())]})
        try:
            if mode == "stall_body":
                await send({"type": "http.response.body", "body": good[:1], "more_body": True})
                await asyncio.sleep(delay)
                await send({"type": "http.response.body", "body": good[1:]})
            else:
                for i in range(len(good)):
                    await send({"type": "http.response.body", "body": good[i:i + 1],
                                "more_body": i + 1 < len(good)})
                    await asyncio.sleep(delay)
        except OSError:
            pass  # the client gave up (its timeout): exactly what these modes provoke
    elif mode == "gzip_bomb":
        await _stream(receive, send, [(b"content-encoding", b"gzip")], gzip_bomb(int(scenario["mib"])))
    elif mode == "huge_body":
        size = int(scenario["mib"]) << 20
        length = [(b"content-length", str(size).encode())] if scenario.get("declare_length") else []
        await _stream(receive, send, length, (b" " * (64 << 10) for _ in range(size >> 16)))
    else:
        await _answer(send, 500, f"unknown mode {mode!r}".encode(), content_type=b"text/plain")


def gzip_bomb(mib: int) -> Iterator[bytes]:
    """A valid gzip stream of ``mib`` MiB of zeros, made as it is sent (about 1 KiB per MiB).

    After a full flush, deflate compresses every further MiB of zeros to the same block: it is
    made once and repeated, and only the trailer's CRC is computed on the way.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1 << 20)
    yield compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(zeros)
    for _ in range(mib - 1):
        crc = zlib.crc32(zeros, crc)
        yield block
    yield b"\x03\x00" + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)  # empty last block, trailer


async def _stream(receive: Any, send: Any, headers: list[tuple[bytes, bytes]], pieces: Iterable[bytes]) -> None:
    """Sends ``pieces`` until they end or the client goes away (what a bounded client does)."""
    async def client_gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(client_gone())
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        for piece in pieces:
            await asyncio.sleep(0)  # lets the disconnect be noticed
            if gone.done():
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()
