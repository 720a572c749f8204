"""quota-middleware: enforce upstream quotas at the edge of an ASGI app."""

from importlib import metadata as _metadata

from .asgi import QuotaMiddleware
from .engine import Admitted, Charge, Demand, QuotaEngine
from .errors import (
    ConfigurationError,
    CostError,
    IdentityError,
    QuotaError,
    QuotaExceeded,
    RequestError,
    SourceError,
    SourceInvalid,
    SourceRejected,
    SourceUnavailable,
    StoreError,
)
from .identity import HeaderIdentity, ScopeStateIdentity
from .quotas import UNLIMITED, Limit, Quotas
from .rendering import Rejection, Rendered, barbican_error, problem_json
from .rules import Rule, confirm_release
from .sources import (
    BarbicanSource,
    CaptainDataSource,
    HTTPSource,
    JSONSource,
    KeystoneLimitsSource,
    LatitudeSource,
    QuotaSource,
    StaticSource,
)
from .stores import (
    Bucket,
    BucketUsage,
    Decision,
    LeasingStore,
    MemoryStore,
    RedisStore,
    Reservation,
    SharedState,
    Store,
)
from .windows import Period, Window

try:
    #: The installed distribution's version: pyproject.toml is the one place it is written.
    __version__ = _metadata.version("quota-middleware")
except _metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "UNLIMITED",
    "Admitted",
    "BarbicanSource",
    "Bucket",
    "BucketUsage",
    "CaptainDataSource",
    "Charge",
    "ConfigurationError",
    "CostError",
    "Decision",
    "Demand",
    "HTTPSource",
    "HeaderIdentity",
    "IdentityError",
    "JSONSource",
    "KeystoneLimitsSource",
    "LatitudeSource",
    "LeasingStore",
    "Limit",
    "MemoryStore",
    "Period",
    "QuotaEngine",
    "QuotaError",
    "QuotaExceeded",
    "QuotaMiddleware",
    "QuotaSource",
    "Quotas",
    "RedisStore",
    "Rejection",
    "Rendered",
    "RequestError",
    "Reservation",
    "Rule",
    "ScopeStateIdentity",
    "SharedState",
    "SourceError",
    "SourceInvalid",
    "SourceRejected",
    "SourceUnavailable",
    "StaticSource",
    "Store",
    "StoreError",
    "Window",
    "barbican_error",
    "confirm_release",
    "problem_json",
]
