"""The deployment matrix: the guarded app run the ways users run it, against a real redis-server.

Each test serves tests/deploy_app.py for real (uvicorn with two workers, gunicorn with --preload,
mounted under a prefix) and races concurrent creates against a small limit, or runs them against
a Redis that misbehaves the way managed ones do (idle connections closed, maxmemory reached, a
restart). Every test asserts what the README promises in each of these places:

- N concurrent creates against a limit L admit exactly min(N, L);
- once every answer is in, the usage in Redis equals the things that really exist (the app keeps
  them in the set ``deploy:live:<project>``): admitted and successful creates, minus deletes;
- Redis trouble the client can recover from (a closed idle connection, a restart) fails no request.

What a test observed is compared whole with what was promised, so a failure shows every figure.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from middleware import Bucket, RedisStore
from tests.conftest import IN_CI
from tests.servers import RedisServer, gunicorn_server, uvicorn_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP = "tests.deploy_app:app"
#: The longest one request may take, held ones included (the app holds them at most 10 s).
REQUEST_TIMEOUT = 15.0
#: Longer than redis-server's ``timeout 1``: every connection left idle is closed by then.
IDLE_GAP = 2.5


# -- a bare HTTP client, and what Redis holds --------------------------------------------------------

class Answer(NamedTuple):
    status: int
    doc: dict[str, Any]


class Connection:
    """One keep-alive HTTP/1.1 connection on a bare asyncio stream (at this scale httpx's pool is
    the slow part; see tests/test_race_4_workers.py). Knows which worker accepted it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pid: int | None = None

    @classmethod
    async def open(cls, port: int) -> Connection:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def ask(self, method: str, path: str, project: str, *, hold: bool = False) -> Answer:
        body = b"{}" if method == "POST" else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Project-Id: {project}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + ("X-Hold: 1\r\n" if hold else "") + "\r\n")
        async with asyncio.timeout(REQUEST_TIMEOUT):
            self.writer.write(head.encode() + body)
            await self.writer.drain()
            lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            fields = dict(line.lower().split(b":", 1) for line in lines[1:] if b":" in line)
            payload = await self.reader.readexactly(int(fields.get(b"content-length", b"0")))
        return Answer(int(lines[0].split(b" ", 2)[1]), json.loads(payload) if payload else {})

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


async def call(port: int, method: str, path: str, project: str, *, hold: bool = False) -> Answer:
    """One request on a connection of its own."""
    connection = await Connection.open(port)
    try:
        return await connection.ask(method, path, project, hold=hold)
    finally:
        await connection.close()


async def spread(port: int, n: int, workers: int = 2, within: float = 10.0) -> list[Connection]:
    """n open connections, shared evenly by the workers.

    Fresh connections mostly land on whichever worker wakes first (and a server answers as soon
    as one worker does): without this, the workers of a burst hardly ever race each other.
    """
    per_worker = -(-n // workers)
    kept: dict[int, list[Connection]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    try:
        while len(kept) < workers or min(len(group) for group in kept.values()) < per_worker:
            if loop.time() > deadline:
                raise AssertionError(f"connections per worker after {within}s: "
                                     f"{ {pid: len(group) for pid, group in kept.items()} }")
            batch = await asyncio.gather(*(Connection.open(port) for _ in range(8)))
            answers = await asyncio.gather(*(c.ask("GET", "/", "-") for c in batch))
            for connection, answer in zip(batch, answers, strict=True):
                connection.pid = answer.doc["pid"]
                kept.setdefault(answer.doc["pid"], []).append(connection)
    except BaseException:
        await asyncio.gather(*(c.close() for group in kept.values() for c in group))
        raise
    chosen = [c for group in kept.values() for c in group[:per_worker]][:n]
    await asyncio.gather(*(c.close() for group in kept.values() for c in group if c not in chosen))
    return chosen


async def burst(port: int, path: str, project: str, n: int, *, hold: bool = False) -> list[Answer]:
    """n POSTs in flight together, one per connection, the connections shared evenly by the workers."""
    connections = await spread(port, n)
    try:
        return list(await asyncio.gather(*(c.ask("POST", path, project, hold=hold) for c in connections)))
    finally:
        await asyncio.gather(*(c.close() for c in connections))


def statuses(answers: Sequence[Answer]) -> dict[int, int]:
    return dict(sorted(Counter(answer.status for answer in answers).items()))


def live_key(project: str) -> str:
    """Where tests/deploy_app.py records the things of a project that exist (not imported: importing
    the app module builds the app)."""
    return f"deploy:live:{project}"


class Snapshot(NamedTuple):
    usage: int  # what the store counts for the project (commits + live reservations)
    live: int  # what really exists: the app's own record of its successful creates, minus deletes
    leases: int  # reservations not settled yet


async def snapshot(url: str, project: str) -> Snapshot:
    # A client of its own each time: one kept across a restart or an idle gap would be the
    # thing that fails.
    client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    store = RedisStore(client)
    try:
        usage = await store.usage(Bucket(project, "things"))
        live = await client.scard(live_key(project))
        leases = await client.zcard(f"quota:{{{project}}}:things:leases")
    finally:
        await store.aclose()
        await client.aclose()
    return Snapshot(usage, live, leases)


async def until(url: str, project: str, done: Callable[[Snapshot], bool], *, within: float,
                quiet: float | None = None) -> Snapshot:
    """Poll the project's snapshot until ``done`` holds; give up after ``within`` seconds, or, with
    ``quiet``, once nothing changed for that long with no lease left (where ``done`` will never
    hold, the test need not wait the whole bound to say so). Returns the last snapshot."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, since = await snapshot(url, project), loop.time()
    while not done(last) and loop.time() < deadline:
        if quiet is not None and last.leases == 0 and loop.time() - since >= quiet:
            break
        await asyncio.sleep(0.05)
        now = await snapshot(url, project)
        if now != last:
            last, since = now, loop.time()
    return last


def balanced(s: Snapshot) -> bool:
    return s.leases == 0 and s.usage == s.live


async def settled(url: str, project: str, *, within: float = 3.0, quiet: float | None = 0.3) -> Snapshot:
    """The snapshot once settlements have landed (commits travel after the answers, releases right
    after them): no lease left, and usage equal to what exists."""
    return await until(url, project, balanced, within=within, quiet=quiet)


def project_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def own_redis(*args: str) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it may be killed, filled, or idle-timed), always stopped."""
    try:
        server = RedisServer(args=args)
    except FileNotFoundError as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


# -- 1-3: process models and prefixes ------------------------------------------------------------------

class Deployment(NamedTuple):
    server: str  # "uvicorn" (--workers 2) or "gunicorn" (--preload, two uvicorn workers)
    shape: str  # SHAPE of tests/deploy_app.py
    prefix: str  # where the client finds the guarded routes
    extra: tuple[str, ...]  # more server options
    limit: int
    creates: int


DEPLOYMENTS = [
    pytest.param(Deployment("uvicorn", "root", "", (), 10, 60), id="uvicorn-workers-2"),
    pytest.param(Deployment("gunicorn", "root", "", (), 10, 60), id="gunicorn-preload-uvicorn-workers-2"),
    pytest.param(Deployment("uvicorn", "mount", "/api", (), 2, 5), id="starlette-mount-api"),
    pytest.param(Deployment("uvicorn", "root", "", ("--root-path", "/api"), 2, 5), id="uvicorn-root-path-api"),
    pytest.param(Deployment("uvicorn", "fastapi", "/sub", (), 2, 5), id="fastapi-sub-application"),
]


@contextmanager
def serve(deployment: Deployment, env: dict[str, str]) -> Iterator[int]:
    if deployment.server == "gunicorn":
        with gunicorn_server(APP, env=env, workers=2, preload=True, extra=deployment.extra) as base:
            yield port_of(base)
    else:
        with uvicorn_server(APP, env=env, workers=2, extra=deployment.extra) as base:
            yield port_of(base)


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_concurrent_creates_admit_exactly_the_limit_and_deletes_give_quota_back(
        redis_server: RedisServer, deployment: Deployment) -> None:
    limit, creates, prefix = deployment.limit, deployment.creates, deployment.prefix
    project = project_id("deploy")
    env = {"REDIS_URL": redis_server.url, "SHAPE": deployment.shape, "LIMIT": str(limit)}
    with serve(deployment, env) as port:
        answers = await burst(port, f"{prefix}/things", project, creates)
        ids = [answer.doc["id"] for answer in answers if answer.status == 201]
        after_burst = await settled(redis_server.url, project)
        deleted = (await call(port, "DELETE", f"{prefix}/things/{ids[0]}", project)).status if ids else None
        after_delete = await settled(redis_server.url, project)
        again = [(await call(port, "POST", f"{prefix}/things", project)).status for _ in range(2)]
        end = await settled(redis_server.url, project)

    observed = {
        "statuses of the burst": statuses(answers),
        "distinct ids admitted": len(set(ids)),
        "usage, live after the burst": after_burst[:2],
        "delete": deleted,
        "usage, live after one delete": after_delete[:2],
        "two more creates": again,
        "usage, live at the end": end[:2],
        "unsettled leases": end.leases,
    }
    print(f"figures: {observed}")  # shown with -rP: the matrix in a closing note
    assert observed == {
        "statuses of the burst": {201: limit, 403: creates - limit},
        "distinct ids admitted": limit,
        "usage, live after the burst": (limit, limit),
        "delete": 204,
        "usage, live after one delete": (limit - 1, limit - 1),
        "two more creates": [201, 403],
        "usage, live at the end": (limit, limit),
        "unsettled leases": 0,
    }, f"{deployment}: limit {limit}, {len(ids)} admitted of {creates}; observed {observed}"


# -- 4: a Redis that closes idle connections ---------------------------------------------------------------

async def redis_clients(url: str) -> dict[int, str]:
    """The connections Redis has open, other than the one asking: id -> last command."""
    client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        me = await client.client_id()
        return {int(c["id"]): f"{c['cmd']} idle {c['idle']}s" for c in await client.client_list() if int(c["id"]) != me}
    finally:
        await client.aclose()


async def test_redis_closing_idle_connections_fails_no_request() -> None:
    """redis-server's ``timeout 1`` closes connections idle for over a second, as managed Redis
    services do (with longer timeouts): the request that finds its connection closed must not fail."""
    project = project_id("idle")
    no_gap: list[Answer] = []
    after_gaps: list[Answer] = []
    gaps = []
    with own_redis("--timeout", "1") as server, \
            uvicorn_server(APP, env={"REDIS_URL": server.url, "LIMIT": "1000"}, workers=2) as base:
        port = port_of(base)
        no_gap += await burst(port, "/things", project, 10)
        for _ in range(2):
            open_before = await redis_clients(server.url)
            await asyncio.sleep(IDLE_GAP)
            open_after = await redis_clients(server.url)
            survivors = {i: open_after[i] for i in open_before.keys() & open_after.keys()}
            gaps.append(f"{len(open_before)} open, survivors {survivors}")
            after_gaps += await burst(port, "/things", project, 10)
            # Right away again: whatever the last burst failed on is reopened, so that the next
            # gap starts with every worker connected.
            no_gap += await burst(port, "/things", project, 10)
        end = await settled(server.url, project)

    failed = sum(answer.status != 201 for answer in after_gaps)
    observed = {
        "each gap closed every connection open before it": [g.endswith("survivors {}") and not g.startswith("0 ")
                                                             for g in gaps],
        "statuses with no gap before": statuses(no_gap),
        "statuses right after idle gaps": statuses(after_gaps),
        "usage, live at the end": end[:2],
        "unsettled leases": end.leases,
    }
    print(f"figures: {observed}")  # shown with -rP: the matrix in a closing note
    assert observed == {
        "each gap closed every connection open before it": [True, True],
        "statuses with no gap before": {201: 30},
        "statuses right after idle gaps": {201: 20},
        "usage, live at the end": (end.live, end.live),
        "unsettled leases": 0,
    }, (f"timeout 1: {failed} of {len(after_gaps)} requests right after idle gaps failed; gaps {gaps}; "
        f"observed {observed}")


# -- 5: maxmemory reached while settlements are in flight ----------------------------------------------------

async def fill_until_oom(client: aioredis.Redis) -> int:
    """Write junk until Redis refuses writes (noeviction); returns how many junk keys it took.

    The write that meets OOM is over the limit by little more than its own query buffer, which
    Redis frees moments later: maxmemory is then lowered to 1 MiB below what is used, so that Redis
    stays full (whatever small amounts the settlements free) until the junk is deleted.
    """
    junk = b"x" * 65536
    for i in range(2000):  # 2000 x 64 KiB: far past the 4 MiB maxmemory of the test
        try:
            await client.set(f"junk:{i}", junk)
        except redis_errors.OutOfMemoryError:
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory", used - 1024 * 1024)
            return i
    raise AssertionError("Redis never reached its maxmemory")


async def test_usage_equals_live_resources_after_redis_runs_out_of_memory_during_settlements(
        tmp_path: Path) -> None:
    """Creates commit, failed creates refund and deletes release while Redis refuses writes (maxmemory,
    noeviction); once memory is freed, usage must equal what exists, and the limit admit exactly."""
    limit = 10
    project = project_id("oom")
    gate = tmp_path / "gate"
    with own_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as server, \
            uvicorn_server(APP, env={"REDIS_URL": server.url, "LIMIT": str(limit), "GATE_FILE": str(gate)},
                           workers=2) as base:
        port = port_of(base)
        before = [await call(port, "POST", "/things", project) for _ in range(3)]
        # Three creates and three failing requests, admitted, then held by the app.
        held = [asyncio.ensure_future(call(port, "POST", path, project, hold=True))
                for path in ("/things", "/fail") for _ in range(3)]
        client = aioredis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            reserved = await until(server.url, project, lambda s: (s.live, s.leases) == (6, 6), within=5.0)
            junk = await fill_until_oom(client)
            gate.touch()  # the held requests answer: 3 commits and 3 refunds meet a full Redis
            held_answers = await asyncio.gather(*held)
            await asyncio.sleep(0.3)
            # Deletes while Redis is still full: the app removes the things; the releases meet OOM.
            deleted = [(await call(port, "DELETE", f"/things/{answer.doc['id']}", project)).status
                       for answer in before[:2]]
            await asyncio.sleep(0.3)
            try:
                await client.set("probe", "x")
                full = False
            except redis_errors.OutOfMemoryError:
                full = True
            await client.delete(*(f"junk:{i}" for i in range(junk)))
        finally:
            gate.touch()
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await client.aclose()
        recovered = await settled(server.url, project, within=6.0, quiet=None)
        after = await burst(port, "/things", project, 2 * limit)
        end = await settled(server.url, project)

    observed = {
        "creates before": [answer.status for answer in before],
        "held creates, failed requests": sorted(answer.status for answer in held_answers),
        "live, leases before Redis was filled": (reserved.live, reserved.leases),
        "deletes while full": deleted,
        "Redis still full before it was freed": full,
        "usage, live after recovery": recovered[:2],
        "unsettled leases after recovery": recovered.leases,
        "statuses of a burst after recovery": statuses(after),
        "usage, live at the end": end[:2],
    }
    print(f"figures: {observed}")  # shown with -rP: the matrix in a closing note
    assert observed == {
        "creates before": [201, 201, 201],
        "held creates, failed requests": [201, 201, 201, 500, 500, 500],
        "live, leases before Redis was filled": (6, 6),
        "deletes while full": [204, 204],
        "Redis still full before it was freed": True,
        "usage, live after recovery": (4, 4),
        "unsettled leases after recovery": 0,
        "statuses of a burst after recovery": {201: limit - 4, 403: limit + 4},
        "usage, live at the end": (limit, limit),
    }, f"maxmemory: usage {recovered.usage} for {recovered.live} live after recovery; observed {observed}"


# -- 6: Redis restarted between bursts -----------------------------------------------------------------------

async def test_redis_restarted_between_bursts_fails_no_request_and_counts_exactly() -> None:
    limit, creates = 5, 20
    rounds: list[dict[str, Any]] = []
    with own_redis() as server, \
            uvicorn_server(APP, env={"REDIS_URL": server.url, "LIMIT": str(limit)}, workers=2) as base:
        port = port_of(base)
        for round_ in range(3):
            if round_:
                server.kill()  # SIGKILL, restarted empty on the same port: counters start over
                server.start()
            project = project_id(f"restart-{round_}")
            answers = await burst(port, "/things", project, creates)
            end = await settled(server.url, project)
            rounds.append({"statuses": statuses(answers), "usage, live": end[:2], "unsettled leases": end.leases})

    failed = [sum(n for status, n in r["statuses"].items() if status not in (201, 403)) for r in rounds]
    print(f"figures: {rounds}")  # shown with -rP
    assert rounds == [{"statuses": {201: limit, 403: creates - limit}, "usage, live": (limit, limit),
                       "unsettled leases": 0}] * 3, f"restarts: failed requests per burst {failed}; observed {rounds}"
