"""The built-in load generators, each run as a process of its own by the harness:

    python bench/harness/loadgen.py closed SPEC   # closed loop, saturating (when wrk is missing)
    python bench/harness/loadgen.py fixed SPEC    # open loop at a fixed rate, for latency

SPEC is JSON: ``port``, ``connections``, ``duration``, ``requests`` (raw HTTP/1.1 requests, sent in
rotation) and, for ``fixed``, ``rate``. Prints one line, ``BENCHJSON {...}`` (see load.py).
Standard library only, so that it starts fast and loads nothing it does not need.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

HOST = "127.0.0.1"
LOAD_MARK = "BENCHJSON "
ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


async def _read_response(reader: asyncio.StreamReader) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return head[9:12].decode("latin-1")


def _emit(statuses: Counter[str], errors: Counter[str], seconds: float, **extra: Any) -> None:
    result = {"requests": sum(statuses.values()), "seconds": seconds, "statuses": [dict(statuses)],
              "socket_errors": {k: errors[k] for k in ("connect", "read", "write", "timeout")}, **extra}
    print(LOAD_MARK + json.dumps(result), flush=True)


async def closed(spec: dict[str, Any]) -> None:
    """Closed loop: every connection sends its next request as soon as the previous one is answered."""
    requests = [r.encode("latin-1") for r in spec["requests"]]
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    start = time.monotonic()
    deadline = start + spec["duration"]

    async def connection(first: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, spec["port"])
        except OSError:
            errors["connect"] += 1
            return
        i = first
        try:
            while time.monotonic() < deadline:
                writer.write(requests[i % len(requests)])
                i += 1
                statuses[await _read_response(reader)] += 1
        except ERRORS:
            errors["read"] += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection(n)) for n in range(spec["connections"])]
    _, pending = await asyncio.wait(tasks, timeout=spec["duration"] + 10)
    for task in pending:
        task.cancel()
        errors["timeout"] += 1
    _emit(statuses, errors, time.monotonic() - start)


async def fixed(spec: dict[str, Any]) -> None:
    """Open loop at a fixed rate: request i is due at start + i/rate, whatever came back before.

    Each of the keep-alive connections, whenever it is idle, takes the next due request, waits for
    its scheduled time and sends it. A request that finds every connection busy is sent late, and
    its latency still counts from its scheduled time (no coordinated omission). Reports, per
    request, answer time - scheduled time, and the generator's own lateness (send - scheduled).
    """
    requests = [r.encode("latin-1") for r in spec["requests"]]
    rate, total = float(spec["rate"]), int(spec["rate"] * spec["duration"])
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latency: list[int] = []
    lag: list[int] = []
    conns = []
    for k in range(spec["connections"]):
        try:
            reader, writer = await asyncio.open_connection(HOST, spec["port"])
            writer.write(requests[k % len(requests)])  # one unmeasured request: the connection is warm
            await _read_response(reader)
            conns.append((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors["connect"] += 1
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.02
    next_i = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal next_i
        try:
            while next_i < total:
                i = next_i
                next_i += 1
                due = start + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = loop.time()
                writer.write(requests[i % len(requests)])
                status = await _read_response(reader)
                latency.append(int((loop.time() - due) * 1e6))
                lag.append(int((sent - due) * 1e6))
                statuses[status] += 1
        except ERRORS:
            errors["read"] += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(connection(r, w)) for r, w in conns]
    _, pending = await asyncio.wait(tasks, timeout=spec["duration"] + 10) if tasks else (set(), set())
    for task in pending:
        task.cancel()
        errors["timeout"] += 1
    _emit(statuses, errors, loop.time() - start, latency_us=latency, lag_us=lag)


if __name__ == "__main__":
    modes = {"closed": closed, "fixed": fixed}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        raise SystemExit(f"usage: {sys.argv[0]} closed|fixed SPEC")
    asyncio.run(modes[sys.argv[1]](json.loads(sys.argv[2])))
