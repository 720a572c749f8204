"""Logging and Prometheus metrics as users see them: under real uvicorn servers, set up as the
README says."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, free_port, stop_process, uvicorn_server, wait_until

pytestmark = pytest.mark.slow
APP = "tests.observability_app:app"
H = {"X-Project-Id": "p1"}


@contextmanager
def uvicorn_logging(env: Mapping[str, str], extra: Sequence[str], log: Path) -> Iterator[str]:
    """One uvicorn worker whose stderr goes to ``log`` (read once it has stopped)."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
           *extra]
    with log.open("wb") as stderr:
        process = subprocess.Popen(cmd, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: process.poll() is None and httpx.get(base + "/", timeout=1).status_code == 200,
                       what="uvicorn")
            yield base
        finally:
            stop_process(process)


@pytest.mark.parametrize("setup", ["basicConfig", "--log-config"])
def test_library_logs_show_under_uvicorn_with_level_and_logger_name(setup: str, tmp_path: Path) -> None:
    env = {"LIMIT": "1", "SHADOW": "1", **({"LOG_SETUP": "basic"} if setup == "basicConfig" else {})}
    extra = ["--log-config", "examples/logging.json"] if setup == "--log-config" else []
    log = tmp_path / "stderr.log"
    with uvicorn_logging(env, extra, log) as base:
        with httpx.Client(base_url=base) as client:
            assert [client.post("/things", headers=H).status_code for _ in range(2)] == [201, 201]  # shadow: admitted
            assert client.post("/typo", headers=H).status_code == 201
    lines = log.read_text().splitlines()
    # basicConfig: "WARNING quota_middleware: ..."; uvicorn's formatter: "WARNING:  quota_middleware: ...".
    level_and_name = r"^(INFO|WARNING):?\s+quota_middleware: "
    shadow = [line for line in lines if re.match(level_and_name, line) and "would have refused" in line]
    unreported = [line for line in lines if re.match(level_and_name, line) and "reports no limit" in line]
    assert len(shadow) == 1 and shadow[0].startswith("WARNING"), lines  # shadow refusals are warnings
    assert "project 'p1'" in shadow[0] and "things allows 1, 1 already in use" in shadow[0]
    assert len(unreported) == 1 and unreported[0].startswith("WARNING") and "'thnigs'" in unreported[0], lines


def decisions(exposition: str, outcome: str) -> float:
    pattern = rf'^quota_decisions_total\{{(?=[^}}]*outcome="{outcome}")(?=[^}}]*resource="things")[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, exposition, re.MULTILINE))


@pytest.mark.anyio
async def test_prometheus_multiprocess_mode_sums_every_worker(tmp_path: Path) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc), "LIMIT": "-1"}
    with uvicorn_server(APP, env=env, workers=2) as base:
        pids: set[int] = set()
        sent = 0

        async def post() -> None:
            nonlocal sent
            # A connection of its own: the kernel hands each new connection to either worker.
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.post("/things", headers=H)
            assert response.status_code == 201
            pids.add(response.json()["pid"])
            sent += 1

        for _ in range(20):  # bounded: 20 bursts of 20 at most
            await asyncio.gather(*(post() for _ in range(20)))
            if len(pids) == 2 and sent >= 100:
                break
        assert len(pids) == 2, "every request went to one worker"
        for _ in range(6):  # whichever worker answers the scrape sees every worker's counts
            async with httpx.AsyncClient(base_url=base) as client:
                exposition = (await client.get("/metrics/")).text
            assert decisions(exposition, "admitted") == sent, exposition
    assert {path.name.split("_")[0] for path in multiproc.iterdir()} >= {"counter", "histogram"}
    assert len({path.name for path in multiproc.iterdir() if path.name.startswith("counter_")}) == 2  # one per pid
