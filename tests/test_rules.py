"""Which rule guards a request: the first that matches, by method and path template."""

from __future__ import annotations

import pytest

from middleware import Rule
from middleware.rules import RuleTable


def test_the_first_matching_rule_wins_whether_or_not_its_path_has_parameters() -> None:
    template_first = RuleTable([Rule("POST", "/v1/{kind}", "by-kind"), Rule("POST", "/v1/secrets", "secrets")])
    assert template_first.match("POST", "/v1/secrets").resource == "by-kind"  # type: ignore[union-attr]
    exact_first = RuleTable([Rule("POST", "/v1/secrets", "secrets"), Rule("POST", "/v1/{kind}", "by-kind")])
    assert exact_first.match("POST", "/v1/secrets").resource == "secrets"  # type: ignore[union-attr]
    assert exact_first.match("POST", "/v1/orders").resource == "by-kind"  # type: ignore[union-attr]


@pytest.mark.parametrize(("method", "path", "resource"), [
    ("POST", "/v1/secrets", "secrets"),
    ("POST", "/v1/secrets/", "secrets"),  # a trailing slash is optional
    ("post", "/v1/secrets", None),  # ASGI methods are upper case; a rule's is upper-cased
    ("GET", "/v1/secrets", "listing"),
    ("DELETE", "/v1/secrets/abc", "secrets"),
    ("DELETE", "/v1/secrets/abc/def", None),
    ("POST", "/v1/secrets/x", None),
    ("POST", "/v1/secretsx", None),
    ("POST", "/", "root"),
    ("PUT", "/v1/secrets", None),
])
def test_method_and_path_select_the_rule(method: str, path: str, resource: str | None) -> None:
    table = RuleTable([Rule("post", "/v1/secrets/", "secrets"), Rule("GET", "/v1/secrets", "listing"),
                       Rule("DELETE", "/v1/secrets/{id}", "secrets", action="release"), Rule("POST", "/", "root")])
    rule = table.match(method, path)
    assert (rule.resource if rule else None) == resource
