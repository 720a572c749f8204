"""The operator command line (``python -m middleware``), run in a subprocess against a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from middleware import BarbicanSource, Bucket, Period, QuotaMiddleware, RedisStore, Rule
from middleware.cli import main
from tests.servers import ROOT, RedisServer, free_port
from tests.upstreams import FakeBarbican

pytestmark = pytest.mark.anyio


def _env(url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT)
    if url is not None:
        env["REDIS_URL"] = url
    return env


def cli_all(*calls: Sequence[str], url: str | None, cwd: Path = ROOT,
            expect: int | None = 0) -> list[subprocess.CompletedProcess[str]]:
    """Run ``python -m middleware ARGS`` once per call, all at once (they must not depend on each other)."""
    started = [(list(args), subprocess.Popen([sys.executable, "-m", "middleware", *args], cwd=cwd, env=_env(url),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for args in calls]
    done = []
    for args, process in started:
        stdout, stderr = process.communicate(timeout=30)
        result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
        assert "Traceback" not in stdout + stderr, stderr
        if expect is not None:
            assert result.returncode == expect, (args, stdout, stderr)
        done.append(result)
    return done


def cli(*args: str, url: str | None, cwd: Path = ROOT, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    return cli_all(args, url=url, cwd=cwd, expect=expect)[0]


def cli_json(*args: str, url: str) -> Any:
    return json.loads(cli(*args, "--json", url=url).stdout)


@pytest.fixture
async def store(redis_server: RedisServer, real_redis: aioredis.Redis) -> AsyncIterator[RedisStore]:
    """What a worker sees (real_redis has flushed the server)."""
    client = aioredis.Redis(port=redis_server.port, socket_timeout=2)
    redis_store = RedisStore(client)
    yield redis_store
    await redis_store.aclose()
    await client.aclose()


async def test_overrides_set_show_clear_list(redis_server: RedisServer, store: RedisStore) -> None:
    url = redis_server.url
    done, _, _ = cli_all(("overrides", "set", "p", "secrets", "50"), ("overrides", "set", "p", "orders", "-3"),
                         ("overrides", "set", "q", "cas", "0"), url=url)
    assert "secrets" in done.stdout
    assert await store.overrides("p") == {"orders": -1, "secrets": 50}  # what every worker now decides with
    shown, listed, table, other = cli_all(("overrides", "show", "p", "--json"), ("overrides", "list", "--json"),
                                          ("overrides", "list"), ("--prefix", "other:", "--json", "overrides", "list"),
                                          url=url)
    assert json.loads(shown.stdout) == {"project": "p", "overrides": {"orders": -1, "secrets": 50}}
    assert json.loads(listed.stdout) == {"projects": [
        {"project": "p", "overrides": {"orders": -1, "secrets": 50}}, {"project": "q", "overrides": {"cas": 0}}]}
    assert "PROJECT" in table.stdout and "orders=unlimited, secrets=50" in table.stdout
    assert "cas=0 (disabled)" in table.stdout
    assert json.loads(other.stdout) == {"projects": []}  # another prefix is another deployment

    cleared = cli_json("overrides", "clear", "p", "orders", url=url)
    assert cleared == {"project": "p", "removed": ["orders"], "overrides": {"secrets": 50}}
    assert "the source's limits apply" in cli("overrides", "clear", "p", url=url).stdout
    assert await store.overrides("p") == {} and await store.overridden_projects() == ["q"]


async def test_usage_set_and_reset_keep_live_reservations(redis_server: RedisServer, store: RedisStore) -> None:
    bucket = Bucket("p", "secrets")
    held = await store.reserve(bucket, 1, 100, 60_000)
    assert held.admitted
    doc = cli_json("usage", "set", "p", "secrets", "5", url=redis_server.url)
    assert doc["after"] == {"used": 6, "committed": 5} and doc["reservations"] == {"count": 1, "cost": 1}
    assert await store.usage(bucket) == 6
    assert "committed 5 -> 0" in cli("usage", "reset", "p", "secrets", url=redis_server.url).stdout
    assert await store.usage(bucket) == 1  # the reservation in flight
    assert held.reservation is not None
    await store.commit(held.reservation)
    await store.flush()
    assert await store.usage(bucket) == 1


async def test_show_reports_cached_quotas_overrides_usage_and_reservations(
        redis_server: RedisServer, store: RedisStore) -> None:
    # A worker fetches Barbican quotas (shared copy in Redis) and admits two creations.
    fake = FakeBarbican({"tok": {"secrets": 10, "orders": 0}})
    http = fake.client()

    async def create(request: Request) -> Response:
        return JSONResponse({}, status_code=201)

    worker = QuotaMiddleware(Starlette(routes=[Route("/v1/secrets", create, methods=["POST"])]),
                             rules=[Rule("POST", "/v1/secrets", "secrets")],
                             source=BarbicanSource("http://barbican.test", client=http), store=store)
    transport = httpx.ASGITransport(app=worker)
    async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
        for _ in range(2):
            created = await client.post("/v1/secrets", headers={"X-Project-Id": "p", "X-Auth-Token": "tok"})
            assert created.status_code == 201
    await http.aclose()
    # One creation in flight, a windowed bucket, and an override.
    assert (await store.reserve(Bucket("p", "secrets"), 1, 10, 60_000)).admitted
    window = Period.parse("hour").window_at(time.time())
    assert (await store.reserve(Bucket("p", "calls", window), 2, 100, 60_000)).admitted
    await store.set_overrides("p", {"orders": 4})
    await store.flush()

    doc = cli_json("show", "p", url=redis_server.url)
    assert doc["project"] == "p" and doc["prefix"] == "quota:" and doc["notes"] == []
    barbican = doc["cached_quotas"]["barbican"]
    assert barbican["limits"]["secrets"]["limit"] == 10 and barbican["limits"]["orders"]["limit"] == 0
    assert 0 <= barbican["age_seconds"] < 60
    assert doc["overrides"] == {"orders": 4}
    assert doc["effective"]["orders"] == {"limit": 4, "from": "override"}
    assert doc["effective"]["secrets"] == {"limit": 10, "from": "cached:barbican"}
    usage = {(u["resource"], u["window"] is not None): u for u in doc["usage"]}
    secrets = usage[("secrets", False)]
    assert (secrets["used"], secrets["committed"], secrets["reservations"]) == (3, 2, {"count": 1, "cost": 1})
    calls = usage[("calls", True)]
    assert calls["window"] == {"start": int(window.start), "end": window.end}
    assert (calls["used"], calls["reservations"]) == (2, {"count": 1, "cost": 2})
    assert usage[("orders", False)]["used"] == 0

    only, table, nobody = cli_all(("show", "p", "--resource", "secrets", "--json"), ("show", "p"),
                                  ("show", "nobody"), url=redis_server.url)
    only_doc = json.loads(only.stdout)
    assert [u["resource"] for u in only_doc["usage"]] == ["secrets"] and only_doc["overrides"] == {}
    for text in ("Cached quotas from barbican", "Overrides:", "LIVE RESERVATIONS", "1 (cost 1)", "4 (override)"):
        assert text in table.stdout
    assert "Overrides: none." in nobody.stdout and "Usage: nothing counted." in nobody.stdout


async def test_reconcile_with_a_count_or_a_counting_function(
        redis_server: RedisServer, store: RedisStore, tmp_path: Path) -> None:
    bucket = Bucket("p", "secrets")
    await store.set_usage(bucket, 40)  # drifted
    assert (await store.reserve(bucket, 1, 100, 60_000)).admitted  # in flight
    doc = cli_json("reconcile", "p", "secrets", "--count", "7", url=redis_server.url)
    assert doc["before"] == {"used": 41, "committed": 40} and doc["after"] == {"used": 8, "committed": 7}
    assert await store.usage(bucket) == 8

    (tmp_path / "truth.py").write_text(
        "import asyncio\n"
        "def count(project, resource):\n    return {'secrets': 3}[resource]\n"
        "async def acount(project, resource):\n    await asyncio.sleep(0)\n    return 5\n"
        "def bad(project, resource):\n    return '5'\n"
        "def boom(project, resource):\n    raise RuntimeError('db down')\n")
    done = cli("reconcile", "p", "secrets", "--from", "truth:count", url=redis_server.url, cwd=tmp_path)
    assert "reconciled to 3" in done.stdout
    assert await store.usage(bucket) == 4
    cli("reconcile", "p", "secrets", "--from", "truth:acount", url=redis_server.url, cwd=tmp_path)
    assert await store.usage(bucket) == 6
    cases = [("truth:bad", 1, "must return an integer"), ("truth:boom", 1, "db down"),
             ("nowhere:count", 2, "cannot import")]
    failures = cli_all(*(("reconcile", "p", "secrets", "--from", spec) for spec, _, _ in cases),
                       url=redis_server.url, cwd=tmp_path, expect=None)
    for (spec, code, message), failed in zip(cases, failures, strict=True):
        assert failed.returncode == code and message in failed.stderr, (spec, failed.stderr)
    assert await store.usage(bucket) == 6  # failures change nothing


@pytest.mark.parametrize("args, message", [
    (("overrides", "set", "p", "secrets", "ten"), "must be an integer"),
    (("overrides", "set", "p", "secrets", "1.5"), "must be an integer"),
    (("overrides", "set", "p", "secrets", str(2**53)), "larger than the store can count"),
    (("usage", "set", "p", "secrets", "-1"), ">= 0"),
    (("usage", "set", "p", "secrets", "nan"), ">= 0"),
    (("reconcile", "p", "secrets", "--count", "x"), "must be a number"),
    (("reconcile", "p", "secrets", "--from", "truth"), "MODULE:FUNCTION"),
    (("reconcile", "p", "secrets", "--from", "middleware.cli:nothing"), "no attribute"),
    (("usage", "reset", "p", "secrets", "--window", "20", "10"), "END must be after START"),
    (("usage", "reset", "p", "secrets", "--window", "0", "60"), "window is over"),
    (("usage", "reset", "p", "secrets", "--scale", "0"), "--scale"),
    (("show", "bad\tproject"), "control characters"),
    (("show", " padded"), "surrounding spaces"),
    (("show", "x" * 256), "longer than 255"),
    (("show", "p", "--resource", ""), "resource name is empty"),
    (("overrides", "set", "p", "r" * 256, "1"), "longer than 255"),
    (("--timeout", "0", "overrides", "list"), "--timeout"),
])
def test_bad_input_is_refused_before_touching_redis(args: tuple[str, ...], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # In process, for speed: nothing listens on this port, and validation comes first anyway.
    assert main([*args, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("quota-middleware: error: ") and message in err


async def test_bad_input_in_a_subprocess_exits_2_with_one_clear_line(redis_server: RedisServer,
                                                                   store: RedisStore) -> None:
    bad_value, no_redis, unknown, no_truth = cli_all(
        ("overrides", "set", "p", "secrets", "ten"), ("overrides", "list"), ("frobnicate",),
        ("reconcile", "p", "secrets"), url=None, expect=2)
    assert bad_value.stderr == "quota-middleware: error: VALUE must be an integer, got 'ten'\n"
    assert "set REDIS_URL or pass --redis-url" in no_redis.stderr
    assert "invalid choice" in unknown.stderr and "required" in no_truth.stderr
    assert cli("--help", url=None).stdout.startswith("usage: quota-middleware")
    assert await store.overridden_projects() == []


async def test_unreachable_redis_exits_1_with_a_clear_message() -> None:
    port = free_port()  # nothing listens there
    url = f"redis://user:s3cret@127.0.0.1:{port}/0"
    for failed in cli_all(("show", "p", "--timeout", "0.5"), ("overrides", "list", "--timeout", "0.5"), url=url,
                          expect=1):
        assert failed.stderr.startswith("quota-middleware: error: cannot reach Redis at redis://user:***@127.0.0.1")
        assert "s3cret" not in failed.stderr and failed.stdout == ""
