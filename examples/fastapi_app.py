"""FastAPI with quotas: the middleware guards some routes by rule, a dependency guards another in
its signature, and both share one engine (cache and store).

    uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, HTTPException

from middleware import Decision, MemoryStore, QuotaMiddleware, Rule, StaticSource, Store
from middleware.fastapi import guard


def create_app(store: Store | None = None) -> QuotaMiddleware:
    api = FastAPI(title="Quota-guarded API")
    # The middleware wraps the FastAPI app: it is what the server serves.
    quota = QuotaMiddleware(api, rules=[Rule("POST", "/v1/secrets", "secrets")],
                            source=StaticSource({"secrets": 3, "reports": 2}), store=store or MemoryStore())

    @api.post("/v1/secrets", status_code=201)
    async def create_secret() -> dict[str, str]:
        return {"secret_ref": "http://localhost/v1/secrets/1"}

    @api.post("/v1/reports", status_code=201)
    async def create_report(title: str = "report",
                            decision: Decision = Depends(guard(quota, "reports"))) -> dict[str, object]:
        if not title:
            raise HTTPException(400, "title must not be empty")  # raised: the reservation is given back
        return {"title": title, "remaining": decision.remaining}

    return quota


app = create_app()
