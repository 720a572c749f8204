"""``quota-middleware``: look at and correct quota state in Redis, from a shell.

    quota-middleware show PROJECT [--resource R ...]      cached quotas, overrides, usage, reservations
    quota-middleware usage set PROJECT RESOURCE VALUE     overwrite usage (live reservations kept)
    quota-middleware usage reset PROJECT RESOURCE
    quota-middleware overrides set PROJECT RESOURCE VALUE
    quota-middleware overrides show PROJECT
    quota-middleware overrides clear PROJECT [RESOURCE]
    quota-middleware overrides list
    quota-middleware reconcile PROJECT RESOURCE (--count N | --from module:function)

Redis is the one ``REDIS_URL`` or ``--redis-url`` names; keys start with ``--prefix`` (default
``quota:``, the middleware's). Every command takes ``--json`` for machine-readable output.
Exit status: 0 on success, 1 when Redis (or a reconcile callable) fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from .cache import decode_shared
from .errors import SourceInvalid, StoreError
from .identity import project_problem, resource_problem
from .quotas import MAX_LIMIT, UNLIMITED, Limit, in_quota_units
from .rendering import iso_time
from .stores.base import WINDOW_GRACE_MS, Bucket, BucketUsage
from .stores.redis import RedisStore
from .windows import Period, Window, current_window

PROG = "quota-middleware"
T = TypeVar("T")
#: Where the sources shipped with the package keep their shared quota copies.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def usage_error(message: str) -> CliError:
    return CliError(message, EXIT_USAGE)


# -- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the command (SUPPRESS keeps a subcommand's
    # absent option from overwriting one given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=argparse.SUPPRESS,
                        help="Redis to use (default: $REDIS_URL)")
    common.add_argument("--prefix", default=argparse.SUPPRESS, help="key prefix (default: 'quota:')")
    common.add_argument("--cluster", action="store_true", default=argparse.SUPPRESS,
                        help="the URL names a node of a Redis Cluster")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds to wait for Redis (default: 2)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")

    parser = argparse.ArgumentParser(prog=PROG, parents=[common],
                                     description="Look at and correct the quota state the middleware keeps in Redis.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    show = commands.add_parser("show", parents=[common], help="cached quotas, overrides, usage and reservations")
    show.add_argument("project")
    show.add_argument("--resource", action="append", default=[], metavar="R",
                      help="only this resource (repeatable)")

    usage = commands.add_parser("usage", parents=[common], help="overwrite a resource's usage")
    usage_commands = usage.add_subparsers(dest="action", metavar="ACTION", required=True)
    usage_set = usage_commands.add_parser("set", parents=[common], help="set usage (live reservations are kept)")
    usage_set.add_argument("project")
    usage_set.add_argument("resource")
    usage_set.add_argument("value", help="in quota units (fractions allowed for scaled resources)")
    _bucket_options(usage_set)
    usage_reset = usage_commands.add_parser("reset", parents=[common],
                                            help="set usage to 0 (live reservations are kept)")
    usage_reset.add_argument("project")
    usage_reset.add_argument("resource")
    _bucket_options(usage_reset)

    overrides = commands.add_parser("overrides", parents=[common], help="operator overrides of the source's limits")
    override_commands = overrides.add_subparsers(dest="action", metavar="ACTION", required=True)
    override_set = override_commands.add_parser("set", parents=[common], help="override one resource's limit")
    override_set.add_argument("project")
    override_set.add_argument("resource")
    override_set.add_argument("value", help="limit in quota units: N, 0 (disabled) or -1 (unlimited)")
    override_show = override_commands.add_parser("show", parents=[common], help="a project's overrides")
    override_show.add_argument("project")
    override_clear = override_commands.add_parser("clear", parents=[common],
                                                  help="drop a project's overrides (or one of them)")
    override_clear.add_argument("project")
    override_clear.add_argument("resource", nargs="?")
    override_commands.add_parser("list", parents=[common], help="every project with overrides")

    reconcile = commands.add_parser("reconcile", parents=[common],
                                    help="set usage to the true count, keeping live reservations")
    reconcile.add_argument("project")
    reconcile.add_argument("resource")
    truth = reconcile.add_mutually_exclusive_group(required=True)
    truth.add_argument("--count", metavar="N", help="the true count, in quota units")
    truth.add_argument("--from", dest="from_", metavar="MODULE:FUNCTION",
                       help="a callable (project, resource) -> int, sync or async, that counts")
    _bucket_options(reconcile)
    return parser


def _bucket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", nargs=2, type=float, metavar=("START", "END"),
                        help="a windowed bucket: its window in epoch seconds (as 'show --json' reports it)")
    parser.add_argument("--scale", type=int, metavar="N",
                        help="store units per quota unit (default: from the cached quotas, else 1)")


# -- validation ---------------------------------------------------------------------------------

def check_project(value: str) -> str:
    problem = project_problem(value)
    if problem is not None:
        raise usage_error(f"the project id {problem}")
    return value


def check_resource(value: str) -> str:
    problem = resource_problem(value)
    if problem is not None:
        raise usage_error(f"the resource name {problem}")
    return value


def parse_integer(value: str, what: str) -> int:
    text = value.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise usage_error(f"{what} must be an integer, got {value!r}")
    number = int(text)
    if abs(number) > MAX_LIMIT:
        raise usage_error(f"{what} is larger than the store can count ({MAX_LIMIT})")
    return number


def parse_amount(value: str | int, what: str) -> Decimal:
    """A finite amount >= 0 in quota units (fractions allowed: scaled resources count thousandths)."""
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise usage_error(f"{what} must be a number, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise usage_error(f"{what} must be a finite number >= 0, got {value!r}")
    return amount


def to_store_units(value: str | int, scale: int, what: str) -> int:
    """A non-negative amount in quota units -> integer store units (exactly, or refused)."""
    units = parse_amount(value, what) * scale
    if units != units.to_integral_value():
        raise usage_error(f"{what} {value} is not a whole number of store units (scale {scale})")
    if units > MAX_LIMIT:
        raise usage_error(f"{what} is larger than the store can count ({MAX_LIMIT} store units)")
    return int(units)


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no Redis, before connecting: bad input fails the same with Redis down."""
    if getattr(args, "project", None) is not None:
        check_project(args.project)
    resource = getattr(args, "resource", None)
    for name in resource if isinstance(resource, list) else [] if resource is None else [resource]:
        check_resource(name)
    if args.command == "overrides" and args.action == "set":
        parse_integer(args.value, "VALUE")
    if args.command == "usage" and args.action == "set":
        parse_amount(args.value, "VALUE")
    if args.command == "reconcile":
        if args.count is not None:
            parse_amount(args.count, "--count")
        else:
            args.counter = resolve_counter(args.from_)
    window = getattr(args, "window", None)
    if window is not None:
        start, end = window
        if not end > start:
            raise usage_error("--window END must be after START")
        if end * 1000 + WINDOW_GRACE_MS <= time.time() * 1000:
            raise usage_error("that window is over: its counters have expired")
    if getattr(args, "scale", None) is not None and args.scale < 1:
        raise usage_error("--scale must be >= 1")


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


# -- the Redis side -----------------------------------------------------------------------------

@dataclass
class Context:
    client: Any
    store: RedisStore
    prefix: str
    url: str
    cluster: bool

    async def read(self, awaitable: Awaitable[T]) -> T:
        """One read of the store, with its failures turned into a clear CliError."""
        try:
            return await awaitable
        except StoreError as exc:
            raise CliError(f"Redis at {safe_url(self.url)} failed: {exc}") from None


def redis_failure(url: str, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    return f"Redis at {safe_url(url)} failed: {detail}"


async def connect(url: str, prefix: str, cluster: bool, timeout: float) -> Context:
    try:
        if cluster:
            client: Any = RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        else:
            client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except (ValueError, redis_errors.RedisError) as exc:
        raise usage_error(f"invalid Redis URL {safe_url(url)}: {exc}") from None
    context = Context(client, RedisStore(client, prefix=prefix, timeout=timeout), prefix, url, cluster)
    try:
        async with asyncio.timeout(timeout * 2):
            await client.ping()
    except BaseException as exc:
        await close(context)
        if isinstance(exc, TimeoutError):
            raise CliError(f"cannot reach Redis at {safe_url(url)}: no answer within {timeout * 2:g}s") from None
        if isinstance(exc, (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)):
            raise CliError(f"cannot reach Redis at {safe_url(url)}: {exc}") from None
        raise
    return context


async def close(context: Context) -> None:
    try:
        await context.store.aclose()
    finally:
        await context.client.aclose()


# -- reading state ------------------------------------------------------------------------------
# Everything is read through the store's own views (Store.buckets and inspect, SharedState): the
# key layout is the store's business, not the command line's.

async def read_cached(ctx: Context, project: str) -> tuple[dict[str, Any], list[str]]:
    """The shared quota copies found, per source namespace: {"fetched_at", "quotas"}; and notes."""
    found: dict[str, Any] = {}
    notes: list[str] = []
    for namespace in await ctx.read(ctx.store.namespaces(project)):
        blob = await ctx.read(ctx.store.load(project, namespace, "quotas"))
        if blob is None:
            continue  # expired since it was listed
        try:
            fetched_at, quotas = decode_shared(blob)
        except SourceInvalid as exc:
            notes.append(f"the cached copy of namespace {namespace!r} is unreadable: {exc}")
            continue
        found[namespace] = {"fetched_at": fetched_at, "quotas": quotas}
    return found, notes


def _window_doc(window: Window | None) -> dict[str, float] | None:
    return None if window is None else {"start": window.start, "end": window.end}


def scale_for(cached: dict[str, Any], resource: str) -> int:
    for entry in cached.values():
        limit: Limit | None = entry["quotas"].limits.get(resource)
        if limit is not None:
            return limit.scale
    return 1


def _limit_doc(limit: Any) -> dict[str, Any]:
    window: Any = None
    if isinstance(limit.period, Window):
        window = {"start": limit.period.start, "end": limit.period.end}
    elif isinstance(limit.period, Period):
        window = {"period": "month" if limit.period.seconds is None else limit.period.seconds}
    return {
        "limit": UNLIMITED if limit.value < 0 else in_quota_units(limit.value, limit.scale),
        "scale": limit.scale,
        "window": window,
        "upstream_used": None if limit.used is None else in_quota_units(limit.used, limit.scale),
        "unit": limit.unit,
    }


# -- commands -----------------------------------------------------------------------------------

async def cmd_show(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    project = check_project(args.project)
    only = [check_resource(r) for r in args.resource]
    cached, notes = await read_cached(ctx, project)
    overrides = await ctx.store.overrides(project)
    windowed_limits: set[str] = set()
    names: set[str] = set(overrides) | set(only)
    for entry in cached.values():
        for name, limit in entry["quotas"].limits.items():
            names.add(name)
            if limit.period is not None:
                windowed_limits.add(name)
    views = await ctx.read(ctx.store.buckets(project))
    if only:
        names &= set(only)
        views = [v for v in views if v.bucket.resource in only]
    held = {v.bucket.resource for v in views}
    # A count bucket for every known resource (at zero where the store has none), unless its usage
    # lives in windows.
    views += [BucketUsage(Bucket(project, name), 0) for name in names - held if name not in windowed_limits]
    views.sort(key=lambda v: (v.bucket.resource, v.bucket.window is not None,
                              0.0 if v.bucket.window is None else v.bucket.window.start))

    now = time.time()
    effective: dict[str, Any] = {}
    for name in sorted(names | {v.bucket.resource for v in views}):
        if name in overrides:
            effective[name] = {"limit": UNLIMITED if overrides[name] < 0 else overrides[name], "from": "override"}
            continue
        for namespace, entry in cached.items():
            limit = entry["quotas"].limits.get(name)
            if limit is not None:
                effective[name] = {"limit": _limit_doc(limit)["limit"], "from": f"cached:{namespace}"}
                break
        else:
            effective[name] = {"limit": None, "from": "unknown (the source's default applies)"}
    usage = []
    for view in views:
        scale = scale_for(cached, view.bucket.resource)
        usage.append({
            "resource": view.bucket.resource, "window": _window_doc(view.bucket.window), "scale": scale,
            "used": in_quota_units(view.used, scale), "committed": in_quota_units(view.committed, scale),
            "reservations": {"count": view.reservations, "cost": in_quota_units(view.reserved, scale)},
            "store_units": {"used": view.used, "committed": view.committed, "reserved": view.reserved},
        })
    return {
        "project": project,
        "prefix": ctx.prefix,
        "cached_quotas": {
            namespace: {"fetched_at": entry["fetched_at"], "age_seconds": round(now - entry["fetched_at"], 3),
                        "limits": {name: _limit_doc(limit) for name, limit in entry["quotas"].limits.items()
                                   if not only or name in only}}
            for namespace, entry in cached.items()
        },
        "overrides": {k: v for k, v in sorted(overrides.items()) if not only or k in only},
        "effective": effective,
        "usage": usage,
        "notes": notes,
    }


def render_show(doc: dict[str, Any]) -> str:
    out = [f"Project {doc['project']!r} (key prefix {doc['prefix']!r})", ""]
    if doc["cached_quotas"]:
        for namespace, entry in doc["cached_quotas"].items():
            out.append(f"Cached quotas from {namespace} (fetched {entry['age_seconds']:.0f}s ago):")
            rows = [[name, _limit_text(d["limit"]), _window_text(d["window"]),
                     "-" if d["upstream_used"] is None else str(d["upstream_used"]), d["unit"] or "-"]
                    for name, d in sorted(entry["limits"].items())]
            out += _table(["RESOURCE", "LIMIT", "WINDOW", "UPSTREAM USED", "UNIT"], rows)
    else:
        out.append("Cached quotas: none in Redis (expired, or the source is not cached).")
    out.append("")
    if doc["overrides"]:
        out.append("Overrides:")
        out += _table(["RESOURCE", "LIMIT"], [[k, _limit_text(v)] for k, v in doc["overrides"].items()])
    else:
        out.append("Overrides: none.")
    out.append("")
    if doc["usage"]:
        out.append("Usage:")
        rows = []
        for u in doc["usage"]:
            eff = doc["effective"].get(u["resource"], {})
            limit = "not cached" if eff.get("limit") is None else f"{_limit_text(eff['limit'])} ({eff['from']})"
            rows.append([u["resource"], _window_text(u["window"]), str(u["used"]), str(u["committed"]),
                         f"{u['reservations']['count']} (cost {u['reservations']['cost']})", limit])
        out += _table(["RESOURCE", "WINDOW", "USED", "COMMITTED", "LIVE RESERVATIONS", "LIMIT"], rows)
    else:
        out.append("Usage: nothing counted.")
    for note in doc["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)


async def _bucket_for(ctx: Context, args: argparse.Namespace) -> tuple[Bucket, int]:
    """The bucket a usage command changes: the count bucket, or a window (given, or the current one)."""
    project, resource = check_project(args.project), check_resource(args.resource)
    cached, _ = await read_cached(ctx, project)
    now = time.time()
    window = None
    if args.window is not None:
        window = Window(*args.window)
    else:
        limit = next((e["quotas"].limits[resource] for e in cached.values() if resource in e["quotas"].limits), None)
        if limit is not None and limit.period is not None:
            window = current_window(limit.period, now)  # where the middleware counts right now
        else:
            views = await ctx.read(ctx.store.buckets(project))
            found = {v.bucket.window for v in views if v.bucket.resource == resource}
            if found and None not in found:
                raise usage_error(f"{resource!r} is counted in windows; pass --window START END "
                                  f"(see 'show {project} --json')")
    scale = args.scale if args.scale is not None else scale_for(cached, resource)
    return Bucket(project, resource, window), scale


async def _set_usage(ctx: Context, bucket: Bucket, units: int, scale: int, *,
                     commits_since: int | None = None) -> dict[str, Any]:
    before = await ctx.read(ctx.store.inspect(bucket))
    try:
        await ctx.store.set_usage(bucket, units, commits_since=commits_since)
        await ctx.store.flush()
    except StoreError as exc:
        raise CliError(f"Redis at {safe_url(ctx.url)} failed: {exc}") from None
    after = await ctx.read(ctx.store.inspect(bucket))
    window = _window_doc(bucket.window)
    return {
        "project": bucket.project, "resource": bucket.resource, "window": window, "scale": scale,
        "before": {"used": in_quota_units(before.used, scale), "committed": in_quota_units(before.committed, scale)},
        "after": {"used": in_quota_units(after.used, scale), "committed": in_quota_units(after.committed, scale)},
        "reservations": {"count": after.reservations, "cost": in_quota_units(after.reserved, scale)},
    }


def render_usage_change(doc: dict[str, Any]) -> str:
    where = f"{doc['project']}/{doc['resource']}"
    if doc["window"] is not None:
        where += f" in window {_window_text(doc['window'])}"
    res = doc["reservations"]
    return (f"{where}: committed {doc['before']['committed']} -> {doc['after']['committed']}; "
            f"{res['count']} live reservation(s) (cost {res['cost']}) kept; "
            f"usage now {doc['after']['used']}")


async def cmd_usage(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    bucket, scale = await _bucket_for(ctx, args)
    units = 0 if args.action == "reset" else to_store_units(args.value, scale, "VALUE")
    return await _set_usage(ctx, bucket, units, scale)


async def cmd_reconcile(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """Usage becomes the true count, live reservations kept on top (as middleware.reconcile does).

    With ``--from``, commits that land while the callable counts are added on top (they may be in
    its count already): a reconciliation under load may over-count until the next one, never lets
    a project past its limit.
    """
    bucket, scale = await _bucket_for(ctx, args)
    commits = None
    if args.count is not None:
        units = to_store_units(args.count, scale, "--count")
        origin = "--count"
    else:
        commits = await ctx.store.commits(bucket)
        truth = await call_counter(args.counter, args.from_, bucket.project, bucket.resource)
        units = to_store_units(truth, scale, "the true count")
        origin = args.from_
    doc = await _set_usage(ctx, bucket, units, scale, commits_since=commits)
    doc["true_count"] = in_quota_units(units, scale)
    doc["from"] = origin
    return doc


def resolve_counter(spec: str) -> Any:
    """``module:function`` (importable from the current directory, as with ``python -m``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise usage_error(f"--from must be MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the operator's to fix
        raise usage_error(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise usage_error(f"{module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise usage_error(f"{spec} is not callable")
    return fn


async def call_counter(fn: Any, spec: str, project: str, resource: str) -> int:
    try:
        result = fn(project, resource)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:  # noqa: BLE001 - reported, not shown as a traceback
        raise CliError(f"{spec}({project!r}, {resource!r}) failed: {type(exc).__name__}: {exc}") from None
    if isinstance(result, bool) or not isinstance(result, int) or result < 0:
        raise CliError(f"{spec} must return an integer >= 0, got {result!r}")
    return result


async def cmd_overrides(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "list":
        projects = await ctx.store.overridden_projects()
        listed = await asyncio.gather(*(ctx.store.overrides(p) for p in projects))
        return {"projects": [{"project": p, "overrides": dict(sorted(o.items()))}
                             for p, o in zip(projects, listed, strict=True)]}
    project = check_project(args.project)
    if args.action == "set":
        resource = check_resource(args.resource)
        value = parse_integer(args.value, "VALUE")
        await ctx.store.set_overrides(project, {resource: UNLIMITED if value < 0 else value})
    elif args.action == "clear":
        before = await ctx.store.overrides(project)
        if args.resource is not None:
            resource = check_resource(args.resource)
            removed = [resource] if resource in before else []
            await ctx.store.set_overrides(project, {resource: None})
        else:
            removed = sorted(before)
            await ctx.store.set_overrides(project, {}, replace=True)
        overrides = await ctx.store.overrides(project)
        return {"project": project, "removed": removed, "overrides": dict(sorted(overrides.items()))}
    overrides = await ctx.store.overrides(project)
    return {"project": project, "overrides": dict(sorted(overrides.items()))}


def render_overrides(doc: dict[str, Any], args: argparse.Namespace) -> str:
    if args.action == "list":
        if not doc["projects"]:
            return "No project has overrides."
        rows = [[p["project"], ", ".join(f"{k}={_limit_text(v)}" for k, v in p["overrides"].items())]
                for p in doc["projects"]]
        return "\n".join(_table(["PROJECT", "OVERRIDES"], rows))
    lines = []
    if args.action == "clear":
        removed = doc["removed"]
        lines.append(f"Removed override(s) of project {doc['project']!r}: {', '.join(removed)}." if removed
                     else f"Project {doc['project']!r} had no such override(s) to remove.")
    if doc["overrides"]:
        lines.append(f"Overrides of project {doc['project']!r}:")
        lines += _table(["RESOURCE", "LIMIT"], [[k, _limit_text(v)] for k, v in doc["overrides"].items()])
    else:
        lines.append(f"Project {doc['project']!r} has no overrides: the source's limits apply.")
    return "\n".join(lines)


# -- output helpers -----------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [headers, *rows]]


def _limit_text(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, (int, float)) and value < 0:
        return "unlimited"
    if value == 0:
        return "0 (disabled)"
    return str(value)


def _window_text(window: dict[str, Any] | None) -> str:
    if window is None:
        return "-"
    if "period" in window:
        return f"every {window['period']}" + ("" if window["period"] == "month" else "s")
    end = "?" if window.get("end") is None else iso_time(window["end"])
    return f"{iso_time(window['start'])} .. {end}"


# -- entry point --------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> int:
    validate(args)
    url = getattr(args, "redis_url", None) or os.environ.get("REDIS_URL")
    if not url:
        raise usage_error("no Redis given: set REDIS_URL or pass --redis-url")
    timeout = getattr(args, "timeout", 2.0)
    if not timeout > 0:
        raise usage_error("--timeout must be positive")
    ctx = await connect(url, getattr(args, "prefix", "quota:"), getattr(args, "cluster", False), timeout)
    try:
        try:
            if args.command == "show":
                doc = await cmd_show(ctx, args)
                text = render_show(doc)
            elif args.command == "usage":
                doc = await cmd_usage(ctx, args)
                text = render_usage_change(doc)
            elif args.command == "reconcile":
                doc = await cmd_reconcile(ctx, args)
                text = f"reconciled to {doc['true_count']} (from {doc['from']}): " + render_usage_change(doc)
            else:
                doc = await cmd_overrides(ctx, args)
                text = render_overrides(doc, args)
        except StoreError as exc:
            raise CliError(f"Redis at {safe_url(ctx.url)} failed: {exc}") from None
    finally:
        await close(ctx)
    print(json.dumps(doc, indent=2) if getattr(args, "json", False) else text)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
