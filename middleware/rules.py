"""Rules: which requests are guarded, which resource they count against and how.

A rule is an HTTP method plus a path template (``/v1/secrets/{id}``). All templates of one method
are compiled into a single regular expression at start-up, so a request that no rule guards costs
a few dict lookups and one failed regex match (a path without parameters is found by a dict lookup).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from starlette.routing import compile_path

from .engine import Demand
from .errors import ConfigurationError, CostError, RequestError
from .quotas import Number, to_store_units
from .types import Scope
from .windows import Period

Action = Literal["consume", "release", "meter"]
_ACTIONS = ("consume", "release", "meter")
#: ``{name}`` in a resource template.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: ``{name}`` or ``{name:convertor}`` in a path template, as Starlette's router reads them.
_PATH_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_][A-Za-z0-9_]*)?\}")
#: An opening parenthesis of a capturing group (not an escaped one, not ``(?...``).
_CAPTURING = re.compile(r"(?<!\\)\((?!\?)")
#: A named group's opening.
_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")
#: A cost computed from the request: takes the ASGI scope, returns a number of quota units.
CostFn = Callable[[Scope], Number]
#: A resource name computed from the request (e.g. from a region header).
ResourceFn = Callable[[Scope], str]


def _compiled(path: str) -> tuple[str, set[str]]:
    """A path template as Starlette's router compiles it (``compile_path``): the regex without its
    anchors, and the parameter names. So ``{id:int}`` matches what the application's route matches.
    Unlike a Route, a rule's trailing slash is optional: the fragment is of the path without it."""
    base = path.rstrip("/") or "/"
    try:
        regex, _, convertors = compile_path(base)
    except (AssertionError, ValueError, KeyError) as exc:
        raise ConfigurationError(f"rule path {path!r}: {exc}") from None
    fragment = regex.pattern.removeprefix("^").removesuffix("$")
    return ("" if base == "/" else fragment), set(convertors)


def _check_cost(cost: Number | CostFn, what: str) -> None:
    if not callable(cost):
        try:
            to_store_units(cost, 1)
        except ValueError as exc:
            raise ConfigurationError(f"{what}: {exc}") from None


def _whole(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not
                                                                          value.lstrip("-").isdigit()):
        raise ConfigurationError(f"{what} must be a whole number of quota units (-1: unlimited), got {value!r}")
    return int(value)


def cost_of(cost: Number | CostFn, scope: Scope) -> Number:
    """A request's cost in quota units: the constant, or what the cost function makes of the
    request, checked (a bad computed cost is the client's 400)."""
    if not callable(cost):
        return cost
    try:
        value = cost(scope)
        to_store_units(value, 1)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise CostError(f"Could not compute the cost of this request: {exc}") from None
    return value


@dataclass(frozen=True, slots=True)
class Rule:
    """Guard ``method path``: count ``cost`` of ``resource`` per request.

    - ``consume`` reserves quota before the app runs and keeps it only if the app answers 2xx;
    - ``release`` gives ``cost`` back after a 2xx answer (a delete), never below zero;
    - ``meter`` admits while usage is below the limit and charges the bytes of the response body
      after it was sent (traffic).

    ``resource`` may name path parameters (``"traffic:{region}"``). ``cost`` is a number of quota
    units (fractions allowed, e.g. ``0.5`` credits) or a callable of the ASGI scope. ``window``
    makes the quota rate-like: ``"minute"``, ``"hour"``, ``"day"``, ``"month"`` or seconds; a window
    the source reports (a billing period) takes precedence.

    ``charges={"containers": 1, "secrets": count_fn}`` charges several resources instead of one
    (each with its cost). ``limit`` writes the limit on the rule instead of asking the source:
    ``limit=10, window="minute"``, or the short form ``limit="10/minute"``. Every rule that
    matches a request applies (all of its charges decided together, all or nothing): a rate limit
    beside a count quota is two rules on one route.
    """

    method: str
    path: str
    resource: str | ResourceFn | None = None
    cost: Number | CostFn = 1
    action: Action = "consume"
    window: str | float | Period | None = None
    #: Decide and count, but never refuse: for rolling a new quota out.
    shadow: bool = False
    #: ``release`` only: give quota back only when the app confirms that it deleted something
    #: (:func:`confirm_release`), not on every 2xx (idempotent deletes answer 204 for any id).
    confirm: bool = False
    #: A limit of the rule's own, in quota units (or "N/window"); None: the source's.
    limit: int | str | None = None
    #: Several resources at once: name -> cost (a number or a callable of the scope).
    charges: Mapping[str, Number | CostFn] | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    #: The whole template, to tell which of the rules a request matched.
    _full: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    #: The template as Starlette's router compiles it (named groups), without its anchors.
    _fragment: str = field(default="", init=False, repr=False, compare=False)
    #: ``window`` parsed (None: a count quota, unless the source reports a window).
    period: Period | None = field(default=None, init=False, repr=False, compare=False)
    #: What every request of the rule asks for, when neither resources nor costs depend on it.
    demands: tuple[Demand, ...] | None = field(default=None, init=False, repr=False, compare=False)
    #: ``limit`` parsed: quota units (None: the source's).
    static_limit: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.method.upper())
        if not self.path.startswith("/"):
            raise ConfigurationError(f"rule path must start with '/': {self.path!r}")
        if "{" in _PATH_PARAM.sub("", self.path) or "}" in _PATH_PARAM.sub("", self.path):
            raise ConfigurationError(f"rule path has a malformed placeholder: {self.path!r}")
        fragment, params = _compiled(self.path)
        object.__setattr__(self, "_fragment", fragment)
        if self.charges is not None:
            if self.resource is not None:
                raise ConfigurationError(f"rule {self.method} {self.path}: pass resource (and cost) or charges, "
                                         "not both")
            if not self.charges or not all(isinstance(name, str) and name for name in self.charges):
                raise ConfigurationError(f"rule {self.method} {self.path}: charges must name resources")
            for name, cost in self.charges.items():
                _check_cost(cost, f"rule charge {name!r}")
        elif not self.resource:
            raise ConfigurationError("rule resource must not be empty")
        names = set() if callable(self.resource) or self.resource is None else set(_PLACEHOLDER.findall(self.resource))
        if not names <= params:
            raise ConfigurationError(f"rule resource {self.resource!r} names parameters the path does not have")
        object.__setattr__(self, "_full", re.compile(fragment + "/?"))
        if names:
            object.__setattr__(self, "_pattern", self._full)
        _check_cost(self.cost, "rule cost")
        if self.action not in _ACTIONS:
            raise ConfigurationError(f"rule action must be one of {_ACTIONS}, got {self.action!r}")
        if isinstance(self.limit, str):  # "10/minute"
            count, _, per = self.limit.partition("/")
            if not per or self.window is not None:
                raise ConfigurationError(f"rule limit {self.limit!r}: write 'N/window' (e.g. '10/minute'), "
                                         f"or limit=N with window=...")
            object.__setattr__(self, "window", per.strip())
            object.__setattr__(self, "static_limit", _whole(count.strip(), "rule limit"))
        elif self.limit is not None:
            object.__setattr__(self, "static_limit", _whole(self.limit, "rule limit"))
        if self.static_limit is not None and self.action == "meter":
            raise ConfigurationError("a metered rule's limit comes from the source (traffic quotas)")
        if self.window is not None:
            object.__setattr__(self, "period", Period.parse(self.window))
        if self.confirm and self.action != "release":
            raise ConfigurationError(f"confirm=True is for release rules; {self.method} {self.path} is {self.action!r}")
        costs: Mapping[str, Number | CostFn] | None = self.charges
        if costs is None and isinstance(self.resource, str) and self._pattern is None:
            costs = {self.resource: self.cost}
        if costs is not None and not any(callable(cost) for cost in costs.values()):
            object.__setattr__(self, "demands", tuple(Demand(name, cast(Number, cost), self.period, self.static_limit)
                                                      for name, cost in costs.items()))

    def pattern(self, named: bool = False) -> str:
        """The template as a regex fragment (a trailing slash left optional by the caller); unnamed,
        every group is non-capturing, so that fragments can stand side by side in one regex."""
        if named:
            return self._fragment
        return _CAPTURING.sub("(?:", _NAMED_GROUP.sub("(?:", self._fragment))

    def resource_for(self, scope: Scope) -> str:
        """The resource this request counts against (path parameters filled in)."""
        if self.resource is None:
            raise RequestError("This rule charges several resources (charges=...), not one.")
        if callable(self.resource):
            resource = self.resource(scope)
            if not isinstance(resource, str) or not resource:
                raise RequestError("This request names no resource to count it against.")
            return resource
        if self._pattern is None:
            return self.resource
        match = self._pattern.fullmatch(route_path(scope))
        params = match.groupdict() if match else {}
        return _PLACEHOLDER.sub(lambda m: params.get(m.group(1), ""), self.resource)

    def demands_for(self, scope: Scope) -> tuple[Demand, ...]:
        """What this request asks for (raises a RequestError for a request that cannot say)."""
        if self.demands is not None:
            return self.demands
        if self.charges is not None:
            return tuple(Demand(name, cost_of(cost, scope), self.period, self.static_limit)
                         for name, cost in self.charges.items())
        return (Demand(self.resource_for(scope), cost_of(self.cost, scope), self.period, self.static_limit),)


#: Where :func:`confirm_release` leaves its mark: the request's ``scope["state"]``.
RELEASE_CONFIRMED = "quota_middleware.release_confirmed"


def confirm_release(request: Any) -> None:
    """Confirm, from the app, that this delete removed something: its ``confirm=True`` rule releases.

    ``request`` is a Starlette/FastAPI ``Request`` or the ASGI scope itself. The mark lives in the
    request's state, which the app and the middleware share.
    """
    scope = getattr(request, "scope", request)
    scope.setdefault("state", {})[RELEASE_CONFIRMED] = True


def route_path(scope: Scope) -> str:
    """The path the application routes on: ``path`` without the ``root_path`` before it.

    Under ``uvicorn --root-path /api``, a Starlette ``Mount`` or a FastAPI sub-application,
    ``path`` is the full path (``/api/v1/secrets``) and ``root_path`` the prefix (``/api``), as the
    ASGI spec says. Starlette's router strips the prefix exactly like this (its private
    ``get_route_path``), so a rule matches whatever route the application itself matched.
    """
    path: str = scope["path"]
    root = scope.get("root_path")
    if not root or not path.startswith(root):
        return path  # mounted at the root, or a server that strips the prefix itself
    if len(path) == len(root):
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


class Guard:
    """What the rules one request matched ask of it, worked out once per set of rules: their
    action, whether all of them are in shadow mode, and their demands when no cost or resource
    depends on the request."""

    __slots__ = ("rules", "action", "shadow", "confirm", "demands")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.action: Action = rules[0].action
        #: Several rules decide together: shadow mode only when every one of them is in it.
        self.shadow = all(rule.shadow for rule in rules)
        self.confirm = any(rule.confirm for rule in rules)
        #: None: computed per request (demands_for).
        self.demands: tuple[Demand, ...] | None = None
        if all(rule.demands is not None for rule in rules):
            self.demands = tuple(demand for rule in rules for demand in rule.demands or ())

    def demands_for(self, scope: Scope) -> tuple[Demand, ...]:
        """What the request asks for, all of its rules together (a RequestError if it cannot say)."""
        if self.demands is not None:
            return self.demands
        return tuple(demand for rule in self.rules for demand in rule.demands_for(scope))


class RuleTable:
    """Finds the rules that match a request; compiled once.

    A request no rule guards costs a dict lookup and one failed regex match. Every rule that
    matches applies, if it has the action of the first one (a request is consumed, released or
    metered: not two of these at once).
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        by_method: dict[str, list[Rule]] = {}
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ConfigurationError(f"expected a Rule, got {rule!r}")
            by_method.setdefault(rule.method, []).append(rule)
        self._table: dict[str, tuple[re.Pattern[str], tuple[Rule, ...], tuple[Guard, ...]]] = {}
        for method, method_rules in by_method.items():
            alternatives = "|".join(f"({rule.pattern()})" for rule in method_rules)
            self._table[method] = (re.compile(f"(?:{alternatives})/?"), tuple(method_rules),
                                   tuple(Guard((rule,)) for rule in method_rules))
        self.rules = tuple(rule for group in by_method.values() for rule in group)
        # A path with no parameters is looked up before any regex runs, with the answer the
        # regexes give for it (a template may claim the same path).
        self._exact: dict[str, dict[str, Guard]] = {}
        for rule in self.rules:
            if "{" not in rule.path:
                base = rule.path.rstrip("/")
                for path in (base or "/", base + "/"):
                    found = self._match_pattern(rule.method, path)
                    if found is not None:
                        self._exact.setdefault(rule.method, {})[path] = found

    def guards(self) -> list[Guard]:
        """Every Guard that ``guard`` answers with for good (one made per request, for a templated
        path several rules match, is not among them)."""
        found = [guard for entry in self._table.values() for guard in entry[2]]
        found += [guard for exact in self._exact.values() for guard in exact.values()]
        return list({id(guard): guard for guard in found}.values())

    def match(self, method: str, path: str) -> tuple[Rule, ...]:
        """The rules that apply to ``method path``, in their order (empty: an unguarded request)."""
        guard = self.guard({"method": method, "path": path})
        return () if guard is None else guard.rules

    def guard(self, scope: Scope) -> Guard | None:
        """What guards this request (None: no rule does), on the path the application routes on.
        One call, and for a method no rule names one dict lookup: every unguarded request pays it."""
        method = scope["method"]
        exact = self._exact.get(method)
        if exact is None and method not in self._table:
            return None
        # route_path(scope), its common case written out: mounted at the root.
        path = scope["path"] if not scope.get("root_path") else route_path(scope)
        if exact is not None:
            guard = exact.get(path)
            if guard is not None:
                return guard
        return self._match_pattern(method, path)

    def _match_pattern(self, method: str, path: str) -> Guard | None:
        entry = self._table.get(method)
        if entry is None:
            return None
        match = entry[0].fullmatch(path)
        if match is None:
            return None
        index = match.lastindex - 1  # type: ignore[operator]
        first = entry[1][index]
        if len(entry[1]) == 1:
            return entry[2][index]
        found = tuple(rule for rule in entry[1][index:] if rule.action == first.action
                      and rule._full is not None and rule._full.fullmatch(path))
        return entry[2][index] if len(found) == 1 else Guard(found)
