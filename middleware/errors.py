"""Exceptions raised by quota-middleware.

Runtime failures share one root; configuration mistakes stand apart::

    QuotaError                  a failure while serving a request
    ├── RequestError            the request itself is unusable (client's fault, 4xx)
    │   ├── IdentityError       it names no usable project
    │   └── CostError           its cost cannot be computed
    ├── SourceError             the quota API could not give an answer
    │   ├── SourceUnavailable   network error, timeout, 5xx, 429 (retry later)
    │   ├── SourceRejected      401/403/404: the upstream refused this caller (never cached)
    │   └── SourceInvalid       the upstream answered something that is not a quota document
    ├── StoreError              Redis (or another store) failed or timed out
    └── QuotaExceeded           raised by QuotaEngine.reserve() alone: the quota refused

    ConfigurationError          the middleware was set up wrong (raised at start-up)

"Over quota" is not an exception: it is a Decision whose ``admitted`` is False.
"""

from __future__ import annotations

from typing import Any


class QuotaError(Exception):
    """Root of every runtime failure of the middleware."""


class RequestError(QuotaError):
    """The request itself cannot be counted: the client's fault, answered with ``status_code``."""

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class IdentityError(RequestError):
    """The request carries no project identity, or one we refuse to key anything by."""


class CostError(RequestError):
    """The request's cost could not be computed (a cost function failed or returned no number)."""


class SourceError(QuotaError):
    """The upstream quota API gave no usable answer."""

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: The upstream's HTTP status, when there was one.
        self.status_code = status_code
        #: Seconds the upstream asked us to wait (its ``Retry-After``), when it said.
        self.retry_after = retry_after


class SourceUnavailable(SourceError):
    """Network error, timeout, 5xx or 429: the answer may come later."""


class SourceRejected(SourceError):
    """The upstream refused the credential or does not know the project (401/403/404)."""

    @property
    def caller_status(self) -> int:
        """What the caller is answered: the upstream's 401 or 403 as it is; anything else, 403."""
        return self.status_code if self.status_code in (401, 403) else 403


class SourceInvalid(SourceError):
    """The upstream answered, but not with a quota document of the expected shape."""


class QuotaExceeded(QuotaError):
    """A refusal, as an exception: for ``async with engine.reserve(...)``, which has no answer to
    return. ``rejection`` says which limit refused (the middleware never raises it)."""

    def __init__(self, rejection: Any) -> None:
        super().__init__(rejection.description)
        #: The middleware.rendering.Rejection the middleware would have answered with.
        self.rejection = rejection


class StoreError(QuotaError):
    """The usage store failed (connection refused, timeout, script error)."""


class ConfigurationError(ValueError):
    """The middleware, a rule, a source or a store was configured wrong."""
