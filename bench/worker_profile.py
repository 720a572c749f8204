"""Where a real uvicorn worker spends its CPU per request: py-spy on the worker under wrk load.

    .venv/bin/python bench/worker_profile.py                               # bare, minimal, memory; ~1 min
    .venv/bin/python bench/worker_profile.py --targets bare,null,minimal,memory,leases-on --rounds 3
    .venv/bin/python bench/worker_profile.py --out /tmp/prof --native       # C frames too; keep the stacks

For each target (the servers of throughput.py, ``bench/apps.py``, one uvicorn worker, uvloop +
httptools by default) and each round, in rotating order:

1. ``wrk -t1 -c32`` for ``--duration`` s without the profiler: the worker's CPU per request
   (user + system, /proc), the figure every share below is multiplied by;
2. the same load with ``py-spy record --nonblocking --rate R`` on the worker (needs ptrace: root,
   or ``kernel.yama.ptrace_scope=0``): collapsed Python stacks; the time of C code (a dict
   operation, a socket write) counts for the Python line that called it. ``--native`` adds the C
   frames (uvloop, httptools, the kernel calls, CPython's garbage collector), but pauses the
   worker for every sample, which over-weights system calls.

The worker runs on CPU 0, wrk and py-spy on CPU 1 (taskset), when there are two CPUs.

Every sample is given to one bucket: the garbage collector when a collection is on the stack;
else the deepest frame of the middleware, of a bench app (``MinimalCounting``, the Starlette
endpoint), of Starlette or of uvicorn; else the event loop's own code (uvloop / libuv, system
calls). A bucket's microseconds per request = its share of the samples x the worker's measured
CPU per request. It prints the buckets side by side for every target with the difference to
``bare``, then the middleware's own buckets by function and line. Sampling perturbs the worker
a little (more with --native); the shares, not the profiled rate, count.
Exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    CREATE,
    SERVER_KINDS,
    Procs,
    environment,
    fmt,
    group_cpu,
    group_pids,
    median,
    pinned,
    run_load,
    serve_and_wait,
    server_kind,
    start_redis,
    workspace,
    wrk_command,
)

HERE = Path(__file__).resolve().parent
#: target -> (app in bench/apps.py, extra environment, needs a redis-server)
TARGETS = {
    "bare": ("bare_app", {}, False),
    "null": ("null_app", {}, False),
    "minimal": ("minimal_app", {}, False),
    "memory": ("memory_app", {}, False),
    "leases-on": ("guarded_app", {"QUOTA_LOCAL_LEASES": "1"}, True),
    "leases-off": ("guarded_app", {"QUOTA_LOCAL_LEASES": "0"}, True),
}
GC_FRAMES = {"gc_collect_main", "gc_collect_with_callback", "gc_collect_generations", "_PyGC_Collect",
             "gc_collect", "collect", "gc_collect_impl"}
SYSCALLS = {"read", "write", "writev", "send", "sendmsg", "sendto", "recv", "recvfrom", "recvmsg", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "accept4", "close", "__libc_write", "__libc_read", "__libc_sendmsg"}
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")


@dataclass
class Frame:
    func: str
    file: str
    line: str

    @property
    def python(self) -> bool:
        return self.file.endswith(".py")

    @property
    def package(self) -> str:
        """``middleware``, ``starlette``, ``uvicorn``, ``apps`` (bench/apps.py), or '' (stdlib, C)."""
        if not self.python:
            return ""
        top = self.file.split("/", 1)[0]
        if top in ("middleware", "starlette", "uvicorn"):
            return top
        if self.file.endswith("apps.py") and "/" not in self.file:
            return "apps"
        return ""


def parse_stack(text: str) -> list[Frame]:
    """The frames of one sample, root first, from where the event loop starts (uvicorn's own start-up
    frames, ``uvicorn/main.py`` down to ``asyncio.Runner.run``, are cut off)."""
    frames = []
    for part in text.split(";"):
        m = FRAME.match(part.strip())
        frames.append(Frame(m["func"], m["file"], m["line"] or "") if m else Frame(part.strip(), "", ""))
    start = next((i + 1 for i, f in enumerate(frames) if f.func == "Runner.run" and f.file == "asyncio/runners.py"), 0)
    return frames[start:]


def bucket_of(frames: list[Frame]) -> tuple[str, str]:
    """(bucket, detail) of one sample; frames are root first."""
    names = {f.func for f in frames if not f.python}
    if names & GC_FRAMES:
        owner = next((f for f in reversed(frames) if f.package), None)
        return "gc: collection", f"triggered in {owner.package + ': ' + owner.func if owner else 'the event loop'}"
    owner = next((f for f in reversed(frames) if f.package), None)
    leaf = frames[-1] if frames else Frame("?", "", "")
    if owner is None:
        if leaf.func in SYSCALLS or leaf.file.startswith("libc"):
            return "event loop: system calls", leaf.func
        if any(f.func == "HttpToolsProtocol.data_received" for f in frames):
            return "uvicorn: HttpToolsProtocol (parser callbacks)", leaf.func
        return "event loop: uvloop/libuv, asyncio C", leaf.func
    if owner.package == "middleware":
        return f"middleware: {owner.func}", f"{owner.file}:{owner.line}"
    if owner.package == "apps":
        if owner.func.startswith(("MinimalCounting", "NullMiddleware")):
            return f"bench wrapper: {owner.func}", f"{owner.file}:{owner.line}"
        return "app endpoint (bench/apps.py)", owner.func
    if owner.package == "uvicorn":
        if "HttpToolsProtocol" in owner.func or "H11Protocol" in owner.func:
            return "uvicorn: protocol (parse, scope, start task)", owner.func
        if owner.func.endswith(".send") or owner.func.endswith(".receive"):
            return f"uvicorn: {owner.func}", f"{owner.file}:{owner.line}"
        return "uvicorn: other (run_asgi, proxy headers, ...)", owner.func
    return "starlette", owner.func


@dataclass
class Profile:
    name: str
    cpu_us: list[float] = field(default_factory=list)  # unprofiled rounds
    rps: list[float] = field(default_factory=list)
    profiled_rps: list[float] = field(default_factory=list)
    buckets: Counter[str] = field(default_factory=Counter)
    details: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    samples: int = 0

    def us(self, bucket: str) -> float:
        return self.buckets[bucket] / self.samples * median(self.cpu_us) if self.samples else float("nan")


def read_raw(path: Path, profile: Profile) -> None:
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        bucket, detail = bucket_of(parse_stack(stack))
        profile.buckets[bucket] += n
        profile.details[bucket][detail] += n
        profile.samples += n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="bare,minimal,memory",
                        help=f"comma-separated, from {', '.join(TARGETS)} (bare,minimal,memory)")
    parser.add_argument("--server", choices=sorted(SERVER_KINDS), default="httptools")
    parser.add_argument("--limit", type=int, default=-1, help="the guarded apps' limit (-1: unlimited)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each measures and profiles every target (3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per load (5)")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second (1000)")
    parser.add_argument("--native", action="store_true",
                        help="py-spy --native (C frames: uvloop, httptools, the collector; pauses the worker for "
                             "every sample, which over-weights system calls) instead of --nonblocking")
    parser.add_argument("--out", type=Path, help="keep py-spy's raw stacks in this directory")
    parser.add_argument("--top", type=int, default=25, help="middleware lines to list (25)")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if "bare" not in targets:
        targets.insert(0, "bare")
    if args.rounds < 1 or args.duration < 2:
        parser.error("--rounds must be at least 1 and --duration at least 2")
    for tool in ("wrk",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {tool})")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed (.venv/bin/pip install -e '.[bench]')")
    kind = server_kind(args.server)
    with workspace("quota-profile-") as (procs, tmp):
        out = args.out or tmp
        out.mkdir(parents=True, exist_ok=True)
        return run(procs, tmp, out, args, targets, kind, pyspy)


def run(procs: Procs, tmp: Path, out: Path, args: argparse.Namespace, targets: list[str], kind: Any,
        pyspy: str) -> int:
    print(environment("uvicorn", "uvloop", "httptools", "starlette", "py-spy"))
    print(f"{kind.describe()}, 1 worker; wrk -t1 -c32, {args.rounds} rounds x {args.duration} s per target unprofiled "
          f"+ the same profiled (py-spy {'--native' if args.native else '--nonblocking'} -r {args.rate}); "
          f"guarded limit {args.limit}")
    env = {**os.environ, "QUOTA_LIMIT": str(args.limit)}
    servers: dict[str, tuple[subprocess.Popen[Any], int]] = {}
    server_cpu, load_cpu = (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)
    for name in targets:
        app, extra, redis = TARGETS[name]
        if redis:
            extra = {**extra, "REDIS_URL": start_redis(procs, tmp, name).url}
        servers[name] = serve_and_wait(procs, app, app_dir=HERE, kind=kind, env={**env, **extra}, cwd=tmp,
                                       cpu=server_cpu)
    profiles = {name: Profile(name) for name in targets}

    def load(name: str, seconds: int) -> tuple[dict[str, Any], float | None]:
        proc, port = servers[name]
        before = group_cpu(proc.pid)
        result = run_load(procs, pinned(wrk_command(CREATE, port, 32, seconds, tmp), load_cpu), seconds)
        after = group_cpu(proc.pid)
        return result, None if before is None or after is None else after - before

    for name in targets:  # warm-up
        load(name, 1)
    for r in range(args.rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for name in order:
            p = profiles[name]
            result, cpu = load(name, args.duration)
            answered = result["statuses"].get("201", 0)
            p.rps.append(answered / result["seconds"])
            if cpu is not None and answered:
                p.cpu_us.append(cpu * 1e6 / answered)
            proc, port = servers[name]
            worker = group_pids(proc.pid)[-1]
            raw = out / f"{name}-{r + 1}.txt"
            spy = [pyspy, "record", "-p", str(worker), "-r", str(args.rate), "-d", str(args.duration - 1),
                   "--format", "raw", "-o", str(raw)] + (["--native"] if args.native else ["--nonblocking"])
            loader = procs.start(pinned(wrk_command(CREATE, port, 32, args.duration, tmp), load_cpu),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(0.5)
            spied = subprocess.run(pinned(spy, load_cpu), capture_output=True, text=True, timeout=args.duration + 30)
            loader.communicate(timeout=args.duration + 20)
            procs.forget(loader)
            if spied.returncode != 0 or not raw.exists():
                raise SystemExit(f"py-spy failed (needs ptrace: run as root): {spied.stderr.strip()[-500:]}")
            read_raw(raw, p)
            print(f"  round {r + 1} {name}: {fmt(p.rps[-1])} req/s, {p.cpu_us[-1] if p.cpu_us else float('nan'):.1f} "
                  f"us/req unprofiled; {p.samples:,} samples so far", flush=True)
    report(profiles, targets, args)
    if args.out:
        print(f"\nraw stacks (py-spy --format raw) kept in {out}")
    return 0


def report(profiles: dict[str, Profile], targets: list[str], args: argparse.Namespace) -> None:
    buckets = sorted({b for p in profiles.values() for b in p.buckets},
                     key=lambda b: -max(p.us(b) for p in profiles.values()))
    print(f"\nWorker CPU per request, us, by bucket (share of {args.rate}/s samples x unprofiled CPU per request); "
          f"+ columns: minus bare")
    head = f"{'bucket':<52}"
    for name in targets:
        head += f" {name:>10}" + (f" {'+':>7}" if name != "bare" else "")
    print(head)

    def line(label: str, values: dict[str, float]) -> None:
        text = f"{label:<52}"
        for name in targets:
            text += f" {values[name]:>10.2f}" + (f" {values[name] - values['bare']:>+7.2f}" if name != "bare" else "")
        print(text)

    for b in buckets:
        line(b[:52], {name: profiles[name].us(b) for name in targets})
    line("TOTAL (median unprofiled worker CPU per request)", {name: median(profiles[name].cpu_us) for name in targets})
    line("req/s (median, unprofiled)", {name: median(profiles[name].rps) for name in targets})
    print("samples: " + ", ".join(f"{name} {profiles[name].samples:,}" for name in targets))
    for name in targets:
        p = profiles[name]
        own = [(b, n) for b, n in p.buckets.items() if b.startswith(("middleware:", "bench wrapper:", "gc:"))]
        if not own or name == "bare":
            continue
        print(f"\n{name}: the middleware's own samples by line (us per request)")
        rows = [(p.details[b][d] / p.samples * median(p.cpu_us), b, d) for b, _ in own for d in p.details[b]]
        for us, b, d in sorted(rows, reverse=True)[:args.top]:
            print(f"  {us:7.2f}  {b:<48} {d}")


if __name__ == "__main__":
    sys.exit(main())
