"""An operator API for quotas, modelled on Barbican's quotas and project-quotas API.

    GET    /v1/quotas                   effective quotas of the caller's project
    GET    /v1/project-quotas           projects with overrides (paged: offset, limit)
    GET    /v1/project-quotas/{id}      one project's overrides (404: none)
    PUT    /v1/project-quotas/{id}      replace one project's overrides (204)
    DELETE /v1/project-quotas/{id}      drop them; the source's limits apply again (204, 404: none)
    GET    /v1/usage                    the caller's usage: limit, used, reserved, remaining, reset
    GET    /v1/project-usage/{id}       any project's usage, the same way

Overrides live in the store, next to the counters, and the store reads them in the same atomic
step as each decision: a change applies to the next guarded request of every worker.

The app has no authentication or authorization of its own: mount it behind yours (only operators
may reach ``/v1/project-quotas``). ``/v1/quotas`` answers for the project the request's identity
names, exactly as the middleware would read it.

    admin = QuotaAdmin(store, source=source, resources=("secrets", "orders", "containers"))
    app = Starlette(routes=[Mount("/admin", app=admin)])
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import SOURCE_FAILED, QuotaEngine
from .errors import ConfigurationError, IdentityError, SourceError, SourceRejected, StoreError
from .identity import Identity, IdentityFn, resource_problem
from .quotas import MAX_LIMIT, UNLIMITED, Limit, Quotas
from .rendering import iso_time
from .sources.base import QuotaSource
from .sources.static import StaticSource
from .stores.base import Store

logger = logging.getLogger("quota_middleware.admin")

#: Barbican's paging defaults (``default_limit_paging``, ``max_limit_paging``).
DEFAULT_PAGE = 10
MAX_PAGE = 100
#: A PUT body is a small JSON object; anything larger is refused (413).
MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER = 5

STORE_FAILED = "Quota store unavailable: quota overrides could not be read or written. Try again later."


class AdminError(Exception):
    """An error answer: ``{"code", "title", "description"}`` with the status as code."""

    def __init__(self, status: int, description: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = headers or {}


def error_response(status: int, description: str, headers: dict[str, str] | None = None) -> JSONResponse:
    title = HTTPStatus(status).phrase
    return JSONResponse({"code": status, "title": title, "description": description}, status_code=status,
                        headers=headers)


class QuotaAdmin:
    """The operator API as an ASGI app (a Starlette app inside).

    ``store``: the store the middleware uses (overrides live there). ``source``: the middleware's
    quota source, read through a quota cache over ``store`` (so the shared copy the middleware's
    workers keep is used); without one, ``/v1/quotas`` shows overrides and defaults only.
    ``resources``: resource names always shown (with ``default_limit`` when neither the source nor
    an override mentions them); when given, a PUT of any other resource is refused (400).
    ``identity``: who the caller of ``/v1/quotas`` is, as for the middleware.

    The admin never closes the store or the source: whoever made them does.
    """

    def __init__(self, store: Store, *, source: QuotaSource | None = None, resources: Iterable[str] = (),
                 default_limit: int = UNLIMITED, identity: IdentityFn | None = None, cache_ttl: float = 60.0,
                 stale_ttl: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(store, Store):
            raise ConfigurationError(f"store must be a Store (MemoryStore, RedisStore, ...), got {store!r}")
        if source is not None and not isinstance(source, QuotaSource):
            raise ConfigurationError(f"source must be a QuotaSource or None, got {source!r}")
        if isinstance(resources, str):
            raise ConfigurationError("resources must be a list of resource names, not one string")
        self.resources = tuple(resources)
        for name in self.resources:
            problem = _resource_problem(name)
            if problem is not None:
                raise ConfigurationError(f"resources: {problem}")
        if cache_ttl <= 0 or stale_ttl < 0:
            raise ConfigurationError("cache_ttl must be positive, stale_ttl not negative")
        self.store = store
        self.source = source
        self.default_limit = UNLIMITED if default_limit < 0 else int(default_limit)
        self.identity = Identity(identity)
        self._project_id = Identity(_path_project)
        self.clock = clock
        #: Usage reads and the source's quotas go through an engine of the admin's own, over the same
        #: store (so the shared quota copy the middleware's workers keep is used).
        self.engine = QuotaEngine(source=source if source is not None else StaticSource({}), store=store,
                                  default_limit=self.default_limit, cache_ttl=cache_ttl, stale_ttl=stale_ttl,
                                  clock=clock)
        self.cache = None if source is None else self.engine.cache
        routes = [
            Route("/v1/quotas", self._effective, methods=["GET"]),
            Route("/v1/quotas/", self._effective, methods=["GET"]),
            Route("/v1/project-quotas", self._list, methods=["GET"]),
            Route("/v1/project-quotas/", self._list, methods=["GET"]),
            Route("/v1/project-quotas/{project_id}", self._one, methods=["GET", "PUT", "DELETE"]),
            Route("/v1/usage", self._caller_usage, methods=["GET"]),
            Route("/v1/project-usage/{project_id}", self._project_usage, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={
            AdminError: _admin_error,
            HTTPException: _http_error,
            StoreError: self._store_error,
            Exception: _server_error,
        })
        self.app.router.redirect_slashes = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # -- GET /v1/quotas -------------------------------------------------------------------------

    async def _effective(self, request: Request) -> Response:
        try:
            project = self.identity(request.scope)
        except IdentityError as exc:
            raise AdminError(exc.status_code, str(exc)) from None
        limits: dict[str, int] = {name: self.default_limit for name in self.resources}
        if self.cache is not None:
            quotas = await self._quotas(project, request)
            limits.update({name: quota_units(limit) for name, limit in quotas.limits.items()})
        overrides = await self.store.overrides(project)
        limits.update({name: UNLIMITED if value < 0 else value for name, value in overrides.items()})
        return JSONResponse({"quotas": self._ordered(limits)})

    async def _quotas(self, project: str, request: Request) -> Quotas:
        assert self.cache is not None
        try:
            return await self.cache.get(project, request.scope["headers"])
        except SourceError as exc:
            raise _source_failure(project, exc) from None

    # -- usage: /v1/usage (the caller's), /v1/project-usage/{id} (any project's) ----------------

    async def _caller_usage(self, request: Request) -> Response:
        try:
            project = self.identity(request.scope)
        except IdentityError as exc:
            raise AdminError(exc.status_code, str(exc)) from None
        return await self._usage(project, request)

    async def _project_usage(self, request: Request) -> Response:
        return await self._usage(self._project(request), request)

    async def _usage(self, project: str, request: Request) -> Response:
        """Per resource: limit, used, reserved, remaining (quota units) and the window it resets at."""
        try:
            report = await self.engine.usage(project, headers=request.scope["headers"], resources=self.resources)
        except SourceError as exc:
            raise _source_failure(project, exc) from None
        for entry in report.values():
            window = entry["window"]
            entry["reset"] = None if window is None else iso_time(window["end"])
        return JSONResponse({"project_id": project, "usage": self._ordered(report)})

    # -- /v1/project-quotas ---------------------------------------------------------------------

    async def _list(self, request: Request) -> Response:
        offset = _paging_param(request, "offset", 0, minimum=0)
        limit = min(_paging_param(request, "limit", DEFAULT_PAGE, minimum=1), MAX_PAGE)
        projects = await self.store.overridden_projects()
        page = projects[offset:offset + limit]
        configured = await asyncio.gather(*(self.store.overrides(project) for project in page))
        body: dict[str, Any] = {
            "project_quotas": [{"project_id": project, "project_quotas": self._configured(values)}
                               for project, values in zip(page, configured, strict=True)],
            "total": len(projects),
        }
        if offset > 0:
            body["previous"] = _page_href(request, max(0, offset - limit), limit)
        if len(projects) > offset + limit:
            body["next"] = _page_href(request, offset + limit, limit)
        return JSONResponse(body)

    async def _one(self, request: Request) -> Response:
        if request.method == "PUT":
            return await self._put(request)
        if request.method == "DELETE":
            return await self._delete(request)
        return await self._get(request)

    async def _get(self, request: Request) -> Response:
        project = self._project(request)
        overrides = await self.store.overrides(project)
        if not overrides:
            raise AdminError(404, f"Project {project} has no configured project quotas.")
        return JSONResponse({"project_quotas": self._configured(overrides)})

    async def _put(self, request: Request) -> Response:
        project = self._project(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise AdminError(415, f"Unsupported media type {media_type or 'none'!r}: send application/json.")
        values = _parse_overrides(await _read_body(request))
        unknown = sorted(set(values) - set(self.resources)) if self.resources else []
        if unknown:
            # An override nothing counts against (a typo) would be accepted and enforce nothing.
            raise AdminError(400, f"Invalid project quotas: unknown resource(s) {', '.join(map(repr, unknown))}; "
                                  f"known: {', '.join(self.resources)}.")
        # PUT replaces the whole set, in one atomic step in the store (null: the source's limit).
        await self.store.set_overrides(project, values, replace=True)
        return Response(status_code=204)

    async def _delete(self, request: Request) -> Response:
        project = self._project(request)
        if not await self.store.overrides(project):
            raise AdminError(404, f"Project {project} has no configured project quotas.")
        await self.store.set_overrides(project, {}, replace=True)
        return Response(status_code=204)

    # -- helpers --------------------------------------------------------------------------------

    def _project(self, request: Request) -> str:
        try:
            return self._project_id(request.scope)
        except IdentityError as exc:
            raise AdminError(400, f"Invalid project id: {exc}") from None

    def _ordered(self, values: dict[str, Any]) -> dict[str, Any]:
        """Configured resources first, in their order; then the others, sorted."""
        ordered = {name: values[name] for name in self.resources if name in values}
        ordered.update({name: values[name] for name in sorted(values) if name not in ordered})
        return ordered

    def _configured(self, overrides: dict[str, int]) -> dict[str, int | None]:
        """A project's configured quotas as Barbican shows them: null where the default applies."""
        values: dict[str, int | None] = {name: None for name in self.resources}
        values.update({name: UNLIMITED if value < 0 else value for name, value in overrides.items()})
        return self._ordered(values)

    async def _store_error(self, request: Request, exc: Exception) -> Response:
        logger.warning("quota store failed in the admin API: %s", exc)
        return error_response(503, STORE_FAILED, {"Retry-After": str(RETRY_AFTER)})


def _source_failure(project: str, exc: SourceError) -> AdminError:
    """The answer when the quota source gave none: its refusal of the caller as it is, else a 503."""
    if isinstance(exc, SourceRejected):
        return AdminError(exc.caller_status, f"Quota service refused the request: {exc}")
    logger.warning("quota API failed for project %r: %s", project, exc)
    retry = exc.retry_after or RETRY_AFTER
    return AdminError(503, SOURCE_FAILED, {"Retry-After": str(max(1, round(retry)))})


def quota_units(limit: Limit) -> int:
    """A limit as the source states it: whole quota units (-1 for unlimited)."""
    return UNLIMITED if limit.value < 0 else limit.value // limit.scale


def _path_project(scope: Any) -> str | None:
    value = scope.get("path_params", {}).get("project_id")
    return value if isinstance(value, str) else None


_path_project.description = "the project id"  # type: ignore[attr-defined]


def _resource_problem(name: Any) -> str | None:
    problem = resource_problem(name)
    return None if problem is None else f"resource name {str(name)[:20]!r} {problem}"


def _parse_overrides(body: bytes) -> dict[str, int | None]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise AdminError(400, "The request body is not valid JSON.") from None
    if not isinstance(doc, dict) or "project_quotas" not in doc:
        raise AdminError(400, 'The request body must be an object {"project_quotas": {...}}.')
    extra = sorted(set(doc) - {"project_quotas"})
    if extra:
        raise AdminError(400, f"Unexpected attribute(s) in the request body: {', '.join(map(repr, extra))}.")
    given = doc["project_quotas"]
    if not isinstance(given, dict):
        raise AdminError(400, '"project_quotas" must be an object of resource name -> integer or null.')
    values: dict[str, int | None] = {}
    for name, value in given.items():
        problem = _resource_problem(name)
        if problem is not None:
            raise AdminError(400, f"Invalid project quotas: {problem}.")
        if value is None:
            values[name] = None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise AdminError(400, f"Invalid project quotas: {name!r} must be an integer or null, "
                                  f"got {json.dumps(value)}.")
        elif value > MAX_LIMIT:
            raise AdminError(400, f"Invalid project quotas: {name!r} is larger than the store can count "
                                  f"({MAX_LIMIT}).")
        else:
            values[name] = UNLIMITED if value < 0 else value
    return values


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise AdminError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise AdminError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    return bytes(body)


def _paging_param(request: Request, name: str, default: int, *, minimum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() would also take '+5', ' 5' and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < minimum:
        raise AdminError(400, f"Invalid {name} {raw!r}: an integer >= {minimum} is required.")
    return int(raw)


def _page_href(request: Request, offset: int, limit: int) -> str:
    return str(request.url.include_query_params(offset=offset, limit=limit))


async def _admin_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdminError)
    return error_response(exc.status, exc.description, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        description = f"No such resource: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        description = f"Method {request.method} is not allowed on {request.url.path}."
    else:
        description = exc.detail
    return error_response(exc.status_code, description, dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "The admin API failed unexpectedly; see the server's log.")
