"""Soak: the example Barbican store under a long mixed load, optionally with Redis killed midway.

One bounded run, everything on 127.0.0.1:

1. starts its own ``redis-server`` on a free port, with ``appendonly yes`` (a restarted Redis keeps
   the counters, as a production Redis with persistence would);
2. serves the example app ``examples.barbican_store:app`` (static quotas: secrets 5, containers 5,
   orders 2 per project) with ``uvicorn --workers 2`` and ``REDIS_URL`` set;
3. drives it from a separate process, for ``--duration`` seconds, over ``--connections`` keep-alive
   connections and ``--projects`` projects, with a mix of
   - creates (``POST /v1/secrets|containers|orders``; 201/202, or 403 at the quota),
   - deletes of what the load generator created (``DELETE /v1/<kind>/<id>``; 204, or 404 when the
     other worker holds it: the example app keeps its data in each worker's memory),
   - failed creates (``POST /v1/secrets`` with a body that is not JSON: the app answers 400 and
     the reservation must be refunded);
4. with ``--chaos``, SIGKILLs Redis halfway through and restarts it on the same port
   ``--chaos-down`` seconds later (the app is not restarted);
5. at the end waits for pending settlements, then checks every (project, resource): the usage
   counter in Redis must equal the creates minus the deletes the load generator saw succeed.

It prints the requests served, the answers by operation and status, connection errors, what the
server logged (lost settlements, store failures, tracebacks) and the consistency check. It exits 1
when a counter disagrees, a request got a 5xx other than a 503 while Redis was down, a request
failed at the connection level, or the server logged a traceback; 0 otherwise.

    .venv/bin/python bench/soak.py                       # 120 s
    .venv/bin/python bench/soak.py --duration 60 --chaos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from harness import HOST, Procs, RedisServer, free_port, wait_http, workspace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = "examples.barbican_store:app"
#: Resource -> (collection path, success status of a create); the example's static quotas apply.
KINDS = {"secrets": 201, "containers": 201, "orders": 202}
RESULT_MARK = "SOAKJSON "
#: What the server may log; counted in the report.
LOG_PATTERNS = {
    "settlement lost (commit/refund not applied)": "quota settlement was not applied",
    "settle/release failed (usage not updated)": "could not settle usage",
    "store failed (503 to the caller)": "quota store failed",
    "traceback": "Traceback (most recent call last)",
}


# -- the load generator (a separate process: `soak.py _load SPEC`) ---------------------------------

async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx

    rng = random.Random(spec["seed"])
    projects = [f"soak-{i:04d}" for i in range(spec["projects"])]
    held: dict[tuple[str, str], list[str]] = defaultdict(list)  # (project, kind) -> ids we created
    created: Counter[str] = Counter()  # "project|kind" -> successful creates
    deleted: Counter[str] = Counter()  # "project|kind" -> successful deletes
    answers: Counter[str] = Counter()  # "op status" -> count
    errors: Counter[str] = Counter()  # connection-level failures, by exception
    ambiguous: Counter[str] = Counter()  # "project|kind" whose create/delete outcome is unknown
    bad_5xx: list[dict[str, Any]] = []  # 5xx answers (with when) for the main process to judge
    started = time.time()
    deadline = time.monotonic() + spec["duration"]
    limits = httpx.Limits(max_connections=spec["connections"], max_keepalive_connections=spec["connections"])

    async with httpx.AsyncClient(base_url=spec["base"], limits=limits, timeout=30) as client:
        async def one(worker: int) -> None:
            while time.monotonic() < deadline:
                project = rng.choice(projects)
                kind = rng.choice(list(KINDS))
                key = f"{project}|{kind}"
                headers = {"X-Project-Id": project}
                roll = rng.random()
                ids = held[(project, kind)]
                if roll < 0.30 and ids:
                    op = "delete"
                    entity = ids.pop(rng.randrange(len(ids)))  # nobody else deletes it meanwhile
                    request = client.build_request("DELETE", f"/v1/{kind}/{entity}", headers=headers)
                elif roll < 0.45:
                    op, kind, key = "failed-create", "secrets", f"{project}|secrets"
                    request = client.build_request("POST", "/v1/secrets", content=b"{not json",
                                                   headers={**headers, "Content-Type": "application/json"})
                else:
                    op = "create"
                    request = client.build_request("POST", f"/v1/{kind}", json={"name": f"soak-{worker}"},
                                                   headers=headers)
                at = time.time()
                try:
                    response = await client.send(request)
                except httpx.HTTPError as exc:
                    errors[f"{op}: {type(exc).__name__}"] += 1
                    if op == "delete":
                        ambiguous[key] += 1
                    elif op == "create":
                        ambiguous[key] += 1
                    continue
                status = response.status_code
                answers[f"{op} {status}"] += 1
                if status >= 500:
                    bad_5xx.append({"at": at, "op": op, "status": status, "body": response.text[:200]})
                if op == "create" and status == KINDS[kind]:
                    created[key] += 1
                    ids.append(response.json()[kind[:-1] + "_ref"].rsplit("/", 1)[1])
                elif op == "delete":
                    if status == 204:
                        deleted[key] += 1
                    else:
                        ids.append(entity)  # the other worker holds it (404), or it failed: try later

        await asyncio.gather(*(one(i) for i in range(spec["connections"])))
    return {"started": started, "elapsed": time.time() - started, "created": created, "deleted": deleted,
            "answers": answers, "errors": errors, "ambiguous": ambiguous, "bad_5xx": bad_5xx,
            "projects": projects}


def load_main(spec_json: str) -> int:
    result = asyncio.run(_load(json.loads(spec_json)))
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# -- the run ---------------------------------------------------------------------------------------

async def counters(redis_url: str, buckets: list[tuple[str, str]],
                   settle: float) -> tuple[dict[str, int], dict[str, int]]:
    """Usage and live leases of every bucket, after waiting up to ``settle`` s for leases to clear."""
    import redis.asyncio as aioredis

    from middleware import Bucket, RedisStore
    from middleware.keys import counter_keys

    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    store = RedisStore(client)
    try:
        deadline = time.monotonic() + settle
        while True:
            leases = {f"{p}|{r}": int(await client.zcard(counter_keys("quota:", p, r)[1])) for p, r in buckets}
            if not any(leases.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        usage = {f"{p}|{r}": await store.usage(Bucket(p, r)) for p, r in buckets}
        return usage, {k: v for k, v in leases.items() if v}
    finally:
        await store.aclose()
        await client.aclose()


def run(args: argparse.Namespace, procs: Procs, tmp: Path) -> int:
    redis = RedisServer(procs, tmp, persistent=True).start()
    port = free_port()
    log_path = tmp / "app.log"
    with open(log_path, "wb") as log:
        app = procs.start([sys.executable, "-m", "uvicorn", APP, "--host", HOST, "--port", str(port),
                           "--workers", str(args.workers), "--log-level", "warning", "--no-access-log"],
                          cwd=ROOT, env={**os.environ, "REDIS_URL": redis.url, "QUOTA_SOURCE_URL": ""},
                          stdout=log, stderr=subprocess.STDOUT)
    wait_http(port, app, "/", 300)
    spec = {"base": f"http://{HOST}:{port}", "duration": args.duration, "connections": args.connections,
            "projects": args.projects, "seed": args.seed}
    print(f"soak: {args.duration:.0f} s, {args.connections} connections, {args.projects} projects, "
          f"uvicorn --workers {args.workers}, redis {redis.url} (appendonly), chaos={'on' if args.chaos else 'off'}",
          flush=True)
    loader = procs.start([sys.executable, str(Path(__file__).resolve()), "_load", json.dumps(spec)],
                         stdout=subprocess.PIPE, cwd=ROOT)
    outage: tuple[float, float] | None = None
    if args.chaos:
        began = time.time()
        time.sleep(args.duration / 2)
        down = time.time()
        redis.kill()
        print(f"chaos: t={down - began:.1f} s: redis-server SIGKILLed; restarting it in {args.chaos_down:.0f} s",
              flush=True)
        time.sleep(args.chaos_down)
        redis.start()
        outage = (down, time.time())
        print(f"chaos: t={outage[1] - began:.1f} s: redis-server back on port {redis.port} (same data directory)",
              flush=True)
    out, _ = loader.communicate(timeout=args.duration + 120)
    procs.forget(loader)
    lines = [line for line in out.decode().splitlines() if line.startswith(RESULT_MARK)]
    if loader.returncode != 0 or not lines:
        print(f"FAIL: the load generator exited with {loader.returncode} and no result", file=sys.stderr)
        return 1
    result = json.loads(lines[-1][len(RESULT_MARK):])

    buckets = [(p, k) for p in result["projects"] for k in KINDS]
    usage, leases = asyncio.run(counters(redis.url, buckets, args.settle))
    procs.stop(app)  # graceful: the workers flush what they still hold
    log_text = log_path.read_text(errors="replace")
    return report(args, result, usage, leases, outage, log_text)


def report(args: argparse.Namespace, result: dict[str, Any], usage: dict[str, int], leases: dict[str, int],
           outage: tuple[float, float] | None, log_text: str) -> int:
    answers, errors = Counter(result["answers"]), Counter(result["errors"])
    created, deleted, ambiguous = Counter(result["created"]), Counter(result["deleted"]), Counter(result["ambiguous"])
    total = sum(answers.values())
    print()
    print(f"requests served: {total} in {result['elapsed']:.1f} s ({total / result['elapsed']:.0f} req/s); "
          f"connection errors: {sum(errors.values())}")
    print("answers by operation and status:")
    for key, count in sorted(answers.items()):
        print(f"  {key:<22} {count:>8}")
    for key, count in sorted(errors.items()):
        print(f"  {key:<22} {count:>8}  (connection error)")

    failures: list[str] = []
    # 5xx: a 503 is the store policy while Redis is down (or moments after); anything else is a failure.
    grace = 2.0
    unexplained = [e for e in result["bad_5xx"]
                   if not (e["status"] == 503 and outage and outage[0] - grace <= e["at"] <= outage[1] + grace)]
    in_outage = len(result["bad_5xx"]) - len(unexplained)
    if outage:
        print(f"503 while Redis was down (+/-{grace:.0f} s): {in_outage}")
    if unexplained:
        failures.append(f"{len(unexplained)} unexpected 5xx answers, e.g. {unexplained[:3]}")
    if errors:
        failures.append(f"{sum(errors.values())} connection errors")

    print("server log:")
    for label, needle in LOG_PATTERNS.items():
        print(f"  {label:<45} {log_text.count(needle):>6}")
    if LOG_PATTERNS["traceback"] in log_text:
        failures.append("the server logged tracebacks")

    drift: dict[str, tuple[int, int]] = {}
    for key, used in usage.items():
        expected = created[key] - deleted[key]
        if used != expected:
            drift[key] = (used, expected)
    exact = [k for k in drift if not ambiguous[k]]
    print(f"consistency: {len(usage)} counters (projects x resources); {len(usage) - len(drift)} equal "
          f"(successful creates - successful deletes), {len(drift)} differ; creates ok {sum(created.values())}, "
          f"deletes ok {sum(deleted.values())}")
    if leases:
        print(f"  reservations still leased after {args.settle:.0f} s: {sum(leases.values())} in {len(leases)} "
              f"buckets (never settled; the store gives them back when their lease ends)")
    if drift:
        over = sum(max(0, u - e) for u, e in drift.values())
        under = sum(max(0, e - u) for u, e in drift.values())
        print(f"  counted too high by {over} in total, too low by {under}")
        lost = log_text.count(LOG_PATTERNS["settle/release failed (usage not updated)"])
        if lost:
            print(f"  the server logged {lost} settlements/releases it could not apply (Redis unreachable): "
                  f"a delete answered 204 whose release never reached Redis leaves its counter 1 too high")
        for key, (used, expected) in sorted(drift.items())[:15]:
            note = f", {leases[key]} leased" if key in leases else ""
            note += f", {ambiguous[key]} outcomes unknown" if ambiguous[key] else ""
            print(f"    {key:<24} counter {used:>3}  observed {expected:>3}{note}")
        if len(drift) > 15:
            print(f"    ... and {len(drift) - 15} more")
        failures.append(f"{len(drift)} counters disagree with what the clients saw"
                        + (f" ({len(drift) - len(exact)} with unknown outcomes)" if len(exact) < len(drift) else ""))

    print()
    if failures:
        print("SOAK FAILED: " + "; ".join(failures))
        return 1
    print("SOAK OK: every counter equals what the clients saw; no unexpected errors")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        return load_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--chaos", action="store_true", help="SIGKILL redis-server halfway, then restart it")
    parser.add_argument("--chaos-down", type=float, default=2.0, help="seconds Redis stays down (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--projects", type=int, default=200, help="projects the load spreads over (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait at the end for reservations to settle (default 10)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.duration <= 0 or (args.chaos and args.duration < 10):
        parser.error("--duration must be positive (at least 10 with --chaos)")

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with workspace("qm-soak-") as (procs, tmp):
        return run(args, procs, tmp)


if __name__ == "__main__":
    sys.exit(main())
