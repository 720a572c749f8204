"""The plumbing every benchmark shares (bench/README.md):

- ``procs``: processes in their own groups, all stopped at the end; free ports; a group's CPU time;
- ``redis_server``: a loopback redis-server per run, and its INFO commandstats / CPU;
- ``servers``: uvicorn (uvloop + httptools, or asyncio + h11), one worker or prefork N;
- ``load``: the request bytes, wrk, the built-in load generators (``loadgen.py``, own process);
- ``report``: the environment line and the ratios and percentiles of the tables.

The scripts in bench/ run as files (``.venv/bin/python bench/throughput.py``): Python puts bench/
on the path, so ``import harness`` and ``import apps`` find these; ``middleware`` is what Python
imports, PYTHONPATH's first (``PYTHONPATH=<another tree>`` measures that tree), else this tree's
editable install.
"""

from .load import (
    BODY,
    CREATE,
    HEALTH,
    PROJECTS,
    Route,
    closed_loop_command,
    count_errors,
    fixed_rate_command,
    request_bytes,
    run_load,
    wrk_command,
)
from .procs import HOST, Procs, free_port, group_cpu, group_pids, pinned, wait_http, workspace
from .redis_server import RedisMeter, RedisPhase, RedisServer, commandstats, start_redis, stats_delta
from .report import (
    environment,
    fmt,
    git_state,
    median,
    middleware_origin,
    paired_difference,
    paired_ratio,
    percentile,
    ratio_of_medians,
)
from .servers import SERVER_KINDS, ServerKind, serve_and_wait, server_kind, start_uvicorn

__all__ = [
    "BODY", "CREATE", "HEALTH", "HOST", "PROJECTS", "Procs", "RedisMeter", "RedisPhase", "RedisServer", "Route",
    "SERVER_KINDS", "ServerKind", "closed_loop_command", "commandstats", "count_errors", "environment",
    "fixed_rate_command", "fmt", "free_port", "git_state", "group_cpu", "group_pids", "median", "middleware_origin",
    "paired_difference", "paired_ratio", "percentile", "pinned", "ratio_of_medians", "request_bytes", "run_load",
    "serve_and_wait", "server_kind", "start_redis", "start_uvicorn", "stats_delta", "wait_http", "workspace",
    "wrk_command",
]
