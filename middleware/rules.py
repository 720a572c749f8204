"""Rules: which requests are guarded, which resource they count against and how.

A rule is an HTTP method plus a path template (``/v1/secrets/{id}``). All templates of one method
are compiled into a single regular expression at start-up, so a request that no rule guards costs
one dict lookup and one failed regex match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigurationError

Action = Literal["consume", "release"]
_ACTIONS = ("consume", "release")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Rule:
    """Guard ``method path``: count ``cost`` of ``resource`` per request.

    ``consume`` reserves quota before the app runs and keeps it only if the app answers 2xx;
    ``release`` gives ``cost`` back after a 2xx answer (a delete), never below zero.
    """

    method: str
    path: str
    resource: str
    cost: int = 1
    action: Action = "consume"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.method.upper())
        if not self.path.startswith("/"):
            raise ConfigurationError(f"rule path must start with '/': {self.path!r}")
        if "{" in _PLACEHOLDER.sub("", self.path) or "}" in _PLACEHOLDER.sub("", self.path):
            raise ConfigurationError(f"rule path has a malformed placeholder: {self.path!r}")
        if not self.resource:
            raise ConfigurationError("rule resource must not be empty")
        if isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 1:
            raise ConfigurationError(f"rule cost must be a positive integer, got {self.cost!r}")
        if self.action not in _ACTIONS:
            raise ConfigurationError(f"rule action must be one of {_ACTIONS}, got {self.action!r}")

    def pattern(self) -> str:
        """The template as a regex fragment without groups; a trailing slash is optional."""
        template = self.path.rstrip("/")
        parts = _PLACEHOLDER.split(template)
        # split() alternates literal, placeholder name, literal, ...
        return "".join(re.escape(p) if i % 2 == 0 else "[^/]+" for i, p in enumerate(parts))


class RuleTable:
    """Finds the first rule that matches a request; compiled once."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        by_method: dict[str, list[Rule]] = {}
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ConfigurationError(f"expected a Rule, got {rule!r}")
            by_method.setdefault(rule.method, []).append(rule)
        self._table: dict[str, tuple[re.Pattern[str], tuple[Rule, ...]]] = {}
        for method, method_rules in by_method.items():
            alternatives = "|".join(f"({rule.pattern()})" for rule in method_rules)
            self._table[method] = (re.compile(f"(?:{alternatives})/?"), tuple(method_rules))
        self.rules = tuple(rule for group in by_method.values() for rule in group)

    def match(self, method: str, path: str) -> Rule | None:
        entry = self._table.get(method)
        if entry is None:
            return None
        match = entry[0].fullmatch(path)
        if match is None:
            return None
        return entry[1][match.lastindex - 1]  # type: ignore[operator]
