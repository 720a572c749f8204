"""FastAPI: guard a route in its signature, with the same engine as the middleware.

    app = FastAPI()
    quota = QuotaMiddleware(app, rules=[], source=..., store=...)   # serve `quota` (uvicorn main:quota)
    app.add_exception_handler(QuotaRefused, quota_refused_handler)

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
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

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


class QuotaRefused(Exception):
    """Raised by a guard dependency; ``quota_refused_handler`` renders it like the middleware does."""

    def __init__(self, quota: QuotaMiddleware, rejection: Rejection) -> None:
        super().__init__(rejection.description)
        self.quota = quota
        self.rejection = rejection


async def quota_refused_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QuotaRefused)
    rendered = exc.quota.renderer(exc.rejection)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in rendered.headers if k != b"content-length"}
    return Response(rendered.body, status_code=rendered.status, headers=headers)


def guard(quota: QuotaMiddleware, resource: str, *, cost: Any | CostFn = 1, window: str | float | None = None,
          shadow: bool = False) -> Callable[[Request], AsyncIterator[Decision]]:
    """A dependency that consumes ``cost`` of ``resource`` for the request's project."""
    period = None if window is None else Period.parse(window)
    if not callable(cost):
        cost_of(cost, {})  # a bad constant is a mistake at start-up, not on each request
    engine = quota.engine

    async def dependency(request: Request) -> AsyncIterator[Decision]:
        scope = request.scope
        try:
            project = quota.identity(scope)
            demand = Demand(resource, cost_of(cost, scope), period)
        except RequestError as exc:
            if not (shadow or engine.shadow):
                raise QuotaRefused(quota, Rejection(exc.status_code, str(exc))) from None
            yield UNCOUNTED  # shadow mode: nothing to count without a project
            return
        outcome = await engine.admit(project, demand, headers=scope["headers"], shadow=shadow)
        if isinstance(outcome, Rejection):
            raise QuotaRefused(quota, outcome)
        if outcome is None:
            yield UNCOUNTED
            return
        reservation = outcome.decision.reservation
        try:
            yield outcome.decision
        except BaseException:
            if reservation is not None:
                await engine.settle(reservation, keep=False)
            raise
        if reservation is not None:
            await engine.settle(reservation, keep=True)

    return dependency
