"""Peak memory of a process fetching quotas from an upstream that answers far too much.

Serves tests/upstreams/fault_server.py under uvicorn, then for each case starts a fresh Python
process that fetches once healthy (imports, connection), switches the upstream to the case,
fetches again through ``BarbicanSource`` and reports the growth of its peak RSS
(``ru_maxrss``) over that second fetch, how long it took and what it raised.

Cases: a gzip bomb (1 GiB of zeros, about 1 MiB on the wire), a 300 MiB plain body sent
chunked, and the same with its Content-Length. ``middleware`` is imported from wherever Python
finds it, so an older build can be measured with ``PYTHONPATH=<its checkout>``::

    .venv/bin/python bench/hostile_upstream.py
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [("gzip_bomb", {"mib": 1024}), ("huge_body", {"mib": 300}),
         ("huge_body", {"mib": 300, "declare_length": True})]


async def measure(base: str, mode: str, behaviour: dict[str, object]) -> str:
    import httpx

    import middleware
    from middleware import BarbicanSource

    name = f"bench{time.monotonic_ns()}"
    source = BarbicanSource(f"{base}/s/{name}", timeout=30)
    async with httpx.AsyncClient(base_url=base) as control:
        (await control.put(f"/_control/{name}", json={"mode": "ok", "quotas": {"things": 1}})).raise_for_status()
        await source.fetch("p", {"x-auth-token": "t"})
        (await control.put(f"/_control/{name}", json={"mode": mode, **behaviour})).raise_for_status()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        await source.fetch("p", {"x-auth-token": "t"})
        outcome = "no error"
    except Exception as exc:  # noqa: BLE001 - reported
        outcome = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    await source.aclose()
    return (f"{mode} {json.dumps(behaviour)}: peak RSS +{grown / 1024:.1f} MiB in {elapsed:.2f}s; {outcome[:90]} "
            f"[{Path(middleware.__file__).parent}]")


def main() -> None:
    if len(sys.argv) == 4:  # one case, in this fresh process
        print(asyncio.run(measure(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from tests.servers import uvicorn_server

    with uvicorn_server("tests.upstreams.fault_server:app", env={}, extra=["--timeout-graceful-shutdown", "1"]) as base:
        for mode, behaviour in CASES:
            subprocess.run([sys.executable, __file__, base, mode, json.dumps(behaviour)], check=True)


if __name__ == "__main__":
    main()
