"""Which project a request belongs to.

The identity must come from a trusted place: by default the ``X-Project-Id`` header, which an
authentication layer in front of the app (keystonemiddleware, an API gateway) sets after checking
the caller's token. A deployment where clients can reach the app without that layer must strip
the header at its edge, or use another identity (scope state or a callable), or any client could
name any project.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ConfigurationError, IdentityError
from .types import Scope

#: Any callable taking the ASGI scope and returning the raw project id, or None when absent.
IdentityFn = Callable[[Scope], "str | bytes | None"]

AMBIGUOUS = "{what} appears more than once: an ambiguous project identity is refused."
MAX_PROJECT_LENGTH = 255
MAX_RESOURCE_LENGTH = 255
MAX_REMEMBERED = 4096


def project_problem(value: str) -> str | None:
    """Why ``value`` cannot be a project id ("... is empty"), or None when it can.

    One rule for every way a project id arrives: a request, the admin API, the command line.
    """
    if not value:
        return "is empty"
    if len(value) > MAX_PROJECT_LENGTH:
        return f"is longer than {MAX_PROJECT_LENGTH} characters"
    if not value.isprintable() or value != value.strip():
        return "contains control characters or surrounding spaces"
    return None


def resource_problem(value: object) -> str | None:
    """Why ``value`` cannot be a resource name, or None when it can."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_RESOURCE_LENGTH:
        return f"is longer than {MAX_RESOURCE_LENGTH} characters"
    if not value.isprintable():
        return "contains control characters"
    return None


class HeaderIdentity:
    """The project from a request header set by a trusted auth layer (default ``X-Project-Id``)."""

    def __init__(self, name: str = "X-Project-Id") -> None:
        self._name = name.lower().encode("latin-1")
        self.description = f"the {name} header"

    def __call__(self, scope: Scope) -> bytes | None:
        found: bytes | None = None
        name = self._name
        for key, value in scope["headers"]:
            if key == name:
                if found is not None:
                    # Two layers (or a client and a layer) disagree, or may: which one to trust
                    # is not ours to guess.
                    raise IdentityError(AMBIGUOUS.format(what=self.description))
                found = value
        return found


class ScopeStateIdentity:
    """The project from ``scope["state"][key]``, where an auth middleware put it."""

    def __init__(self, key: str = "project_id") -> None:
        self._key = key
        self.description = f"scope state {key!r}"

    def __call__(self, scope: Scope) -> str | None:
        value = (scope.get("state") or {}).get(self._key)
        return value if isinstance(value, str) else None


class Identity:
    """Validates what an identity function returns; one instance per middleware."""

    def __init__(self, fn: IdentityFn | None) -> None:
        fn = HeaderIdentity() if fn is None else fn
        if not callable(fn):
            raise ConfigurationError(f"identity must be a callable taking the ASGI scope, got {fn!r}")
        self._fn = fn
        #: The default identity's header name: scanned in ``__call__`` itself, one call less on every
        #: guarded request (a subclass of HeaderIdentity is called as any other function).
        self._header = fn._name if type(fn) is HeaderIdentity else None
        self.description = getattr(fn, "description", "the project identity")
        #: Raw values already found valid -> the project. A few projects send most requests;
        #: cleared when full, so a flood of distinct ids costs no more than checking each.
        self._valid: dict[str | bytes, str] = {}

    def __call__(self, scope: Scope) -> str:
        header = self._header
        if header is None:
            raw = self._fn(scope)
        else:  # HeaderIdentity.__call__, written out
            raw = None
            for key, value in scope["headers"]:
                if key == header:
                    if raw is not None:
                        raise IdentityError(AMBIGUOUS.format(what=self.description))
                    raw = value
        if type(raw) is not bytes and type(raw) is not str:
            return self._check(raw)
        project = self._valid.get(raw)
        if project is None:
            project = self._check(raw)  # raises for an invalid one, which is not remembered
            if len(self._valid) >= MAX_REMEMBERED:
                self._valid.clear()
            self._valid[raw] = project
        return project

    def _check(self, raw: str | bytes | None) -> str:
        if raw is None or len(raw) == 0:
            raise IdentityError(f"No project identity: {self.description} is missing.", status_code=401)
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise IdentityError(f"{self.description} is not valid UTF-8.") from None
        problem = project_problem(raw)
        if problem is not None:
            raise IdentityError(f"{self.description} {problem}.")
        return raw
