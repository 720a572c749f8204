"""FastAPI: guard a route in its signature, with the same engine as the middleware.

    app = FastAPI()
    quota = QuotaMiddleware(app, rules=[], source=..., store=...)   # serve `quota` (uvicorn main:quota)

    @app.post("/v1/secrets", status_code=201)
    async def create(decision: Decision = Depends(guard(quota, "secrets"))): ...

The dependency decides before the endpoint runs, with the middleware's identity and its engine
(cached quotas, one atomic reservation in the store; its failure policies, shadow mode and
metrics) and settles after it: it keeps the reservation when the endpoint returns and gives it back when
the endpoint raises (an HTTPException included). Unlike the middleware it cannot see the status
of a response the endpoint builds itself, so return errors by raising them. A request let through
uncounted (``fail_open`` while the store fails, or shadow mode without an identity) gets an
unlimited Decision with no reservation. Rules, windows and costs work as in the middleware; both
forms may guard routes of one app.

Answers are the middleware's: a refusal has the same status, body (the middleware's renderer) and
headers (``Retry-After``, ``RateLimit-Policy``, ``RateLimit``), with no exception handler to
register: the first refusal adds :func:`quota_refused_handler` to the app's handlers for
:class:`QuotaRefused` (one you registered yourself is kept). An admitted request's response
carries the same ``RateLimit-Policy`` and ``RateLimit`` headers as the middleware's, set on the
response FastAPI builds from what the endpoint returns (an endpoint that returns a ``Response``
object of its own builds it without them, as with any header a dependency sets).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .asgi import QuotaMiddleware
from .engine import Demand
from .errors import RequestError
from .quotas import UNLIMITED
from .rendering import Rejection
from .rules import CostFn, cost_of
from .stores.base import Decision
from .windows import Period

__all__ = ["QuotaRefused", "guard", "quota_refused_handler"]

#: What the dependency yields for a request let through without a count.
UNCOUNTED = Decision(True, 0, UNLIMITED)


class QuotaRefused(HTTPException):
    """Raised by a guard dependency; ``quota_refused_handler`` renders it like the middleware does.

    An ``HTTPException`` with the rejection's status and headers: where no handler of ours is
    reached (an app without Starlette's exception middleware), FastAPI's own renders it as
    ``{"detail": description}`` with the same status and headers.
    """

    def __init__(self, quota: QuotaMiddleware, rejection: Rejection) -> None:
        rendered = quota.renderer(rejection)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in rendered.headers if k != b"content-length"}
        super().__init__(rendered.status, rejection.description, headers)
        self.quota = quota
        self.rejection = rejection
        self.rendered = rendered


async def quota_refused_handler(request: Request, exc: Exception) -> Response:
    """Renders a :class:`QuotaRefused` as the middleware renders its rejection."""
    assert isinstance(exc, QuotaRefused)
    rendered = exc.rendered
    return Response(rendered.body, status_code=rendered.status, headers=exc.headers)


def _refuse(request: Request, quota: QuotaMiddleware, rejection: Rejection) -> QuotaRefused:
    """The exception to raise, with its handler in place for this app.

    Starlette's exception middleware hands the request its handler tables (the very dicts it looks
    handlers up in when an exception arrives); adding ours there registers it once for the app, as
    ``app.add_exception_handler`` would have before the first request. A handler registered for
    QuotaRefused, or for its status, is kept.
    """
    tables = request.scope.get("starlette.exception_handlers")
    if isinstance(tables, tuple) and tables and isinstance(tables[0], dict):
        tables[0].setdefault(QuotaRefused, quota_refused_handler)
    return QuotaRefused(quota, rejection)


def guard(quota: QuotaMiddleware, resource: str, *, cost: Any | CostFn = 1, window: str | float | None = None,
          shadow: bool = False) -> Callable[[Request, Response], AsyncIterator[Decision]]:
    """A dependency that consumes ``cost`` of ``resource`` for the request's project."""
    period = None if window is None else Period.parse(window)
    if not callable(cost):
        cost_of(cost, {})  # a bad constant is a mistake at start-up, not on each request

    async def dependency(request: Request, response: Response) -> AsyncIterator[Decision]:
        scope = request.scope
        engine = quota.engine  # read per request: a test may point the middleware at another
        try:
            project = quota.identity(scope)
            demand = Demand(resource, cost_of(cost, scope), period)
        except RequestError as exc:
            if not (shadow or engine.shadow):
                raise _refuse(request, quota, Rejection(exc.status_code, str(exc))) from None
            yield UNCOUNTED  # shadow mode: nothing to count without a project
            return
        outcome = await engine.admit(project, demand, headers=scope["headers"], shadow=shadow)
        if isinstance(outcome, Rejection):
            raise _refuse(request, quota, outcome)
        if outcome is None:
            yield UNCOUNTED
            return
        # As the middleware: every policy the request met (a parent's too); none for an unlimited one.
        for name, value in outcome.headers():
            response.headers.append(name.decode("latin-1"), value.decode("latin-1"))
        try:
            yield outcome.decision
        except BaseException:
            await engine.settle_all(outcome, keep=False)  # every reservation: the project's, its parent's
            raise
        await engine.settle_all(outcome, keep=True)

    return dependency
