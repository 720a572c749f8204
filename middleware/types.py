"""Types shared across the package: the ASGI interface and what metrics are reported to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: Raw HTTP headers as ASGI carries them.
RawHeaders = list[tuple[bytes, bytes]]


class QuotaMetricsLike(Protocol):
    """What the engine and the cache report to (middleware.metrics.QuotaMetrics implements it).

    An object may also have ``data_lost()``: it is called when the store notices it lost data.
    """

    def decision(self, resource: str, outcome: str, project: str) -> None: ...
    def admitted(self, resource: str, project: str, used: int, limit: int) -> None: ...
    def fetch(self, source: str, status: str, seconds: float) -> None: ...
    def cache(self, result: str) -> None: ...
    def store(self, operation: str, seconds: float, failed: bool = False) -> None: ...


METRICS_METHODS = ("decision", "admitted", "fetch", "cache", "store")
