"""A guarded app for the observability tests, served by real uvicorn workers
(tests/test_observability.py). Configured by environment:

- ``LOG_SETUP=basic``: the README's lines for logging from the app module (``logging.basicConfig``);
- ``LIMIT`` (default -1): every project's ``things`` quota; ``SHADOW=1``: shadow mode;
- ``PROMETHEUS_MULTIPROC_DIR``: prometheus_client's multiprocess mode (read by prometheus_client).

Routes: ``POST /things`` (consumes 1 ``things``), ``POST /typo`` (a rule whose resource the source
does not report: a WARNING), ``GET /metrics/`` (QuotaMetrics, mounted), ``GET /`` (``{"pid": ...}``).
"""

from __future__ import annotations

import logging
import os

if os.environ.get("LOG_SETUP") == "basic":
    # What the README tells users to write at the top of their app module.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("quota_middleware").setLevel(logging.INFO)

from starlette.applications import Starlette  # noqa: E402 - logging is set up first, as users would
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402

from middleware import QuotaMiddleware, Rule, StaticSource  # noqa: E402
from middleware.metrics import QuotaMetrics  # noqa: E402

metrics = QuotaMetrics()


async def pid(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()}, status_code=201 if request.method == "POST" else 200)


inner = Starlette(routes=[Route("/", pid), Route("/things", pid, methods=["POST"]),
                          Route("/typo", pid, methods=["POST"]), Mount("/metrics", app=metrics.asgi_app())])
app = QuotaMiddleware(inner, rules=[Rule("POST", "/things", "things"), Rule("POST", "/typo", "thnigs")],
                      source=StaticSource({"things": int(os.environ.get("LIMIT", "-1"))}),
                      shadow=os.environ.get("SHADOW") == "1", metrics=metrics)
