"""Which rules guard a request: every rule that matches, by method and path template, in order."""

from __future__ import annotations

import pytest

from middleware import ConfigurationError, Rule
from middleware.rules import RuleTable


def resources(table: RuleTable, method: str, path: str) -> list[str | None]:
    return [rule.resource for rule in table.match(method, path)]  # type: ignore[misc]


def test_every_matching_rule_applies_in_order_whether_or_not_its_path_has_parameters() -> None:
    template_first = RuleTable([Rule("POST", "/v1/{kind}", "by-kind"), Rule("POST", "/v1/secrets", "secrets")])
    assert resources(template_first, "POST", "/v1/secrets") == ["by-kind", "secrets"]
    assert resources(template_first, "POST", "/v1/secrets/") == ["by-kind", "secrets"]
    assert resources(template_first, "POST", "/v1/orders") == ["by-kind"]
    exact_first = RuleTable([Rule("POST", "/v1/secrets", "secrets"), Rule("POST", "/v1/{kind}", "by-kind")])
    assert resources(exact_first, "POST", "/v1/secrets") == ["secrets", "by-kind"]
    assert resources(exact_first, "POST", "/v1/orders") == ["by-kind"]
    assert resources(exact_first, "POST", "/v2/orders") == []


def test_rules_of_another_action_than_the_first_match_do_not_apply() -> None:
    table = RuleTable([Rule("DELETE", "/v1/secrets/{id}", "secrets", action="release"),
                       Rule("DELETE", "/v1/{kind}/{id}", "anything"), Rule("DELETE", "/v1/secrets/{x}", "also",
                                                                           action="release")])
    assert resources(table, "DELETE", "/v1/secrets/1") == ["secrets", "also"]
    assert resources(table, "DELETE", "/v1/orders/1") == ["anything"]


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
    assert resources(table, method, path) == ([] if resource is None else [resource])


def test_templates_are_compiled_as_starlettes_router_compiles_them() -> None:
    from starlette.routing import compile_path

    table = RuleTable([Rule("DELETE", "/v1/things/{id:int}", "by-id", action="release"),
                       Rule("GET", "/v1/price/{x:float}/{unit}", "priced"), Rule("GET", "/v1/{kind}", "listing"),
                       Rule("GET", "/files/{p:path}", "files")])
    assert resources(table, "DELETE", "/v1/things/12") == ["by-id"]
    assert resources(table, "DELETE", "/v1/things/abc") == []  # what the app's {id:int} route would not match
    assert resources(table, "GET", "/files/a/b/c.txt") == ["files"]
    # A convertor with a group of its own (float) does not shift which rule matched.
    assert resources(table, "GET", "/v1/price/1.5/eur") == ["priced"]
    assert resources(table, "GET", "/v1/price") == ["listing"]
    for path in ("/v1/things/12", "/v1/things/abc", "/files/a/b"):
        rule_says = bool(table.match("DELETE" if "things" in path else "GET", path))
        router_says = any(compile_path(t)[0].match(path) for t in ("/v1/things/{id:int}", "/files/{p:path}"))
        assert rule_says == router_says, path


def test_a_resource_named_by_a_typed_parameter_and_an_unknown_convertor() -> None:
    rule = Rule("POST", "/regions/{region:str}/things", "things:{region}")
    assert rule.resource_for({"path": "/regions/eu/things", "root_path": ""}) == "things:eu"
    with pytest.raises(ConfigurationError, match="rule path"):
        Rule("POST", "/things/{id:nosuch}", "things")
