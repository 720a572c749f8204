"""Configuration mistakes: caught at start-up with the option named, or said clearly once."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from middleware import BarbicanSource, ConfigurationError, QuotaMiddleware, Rule, StaticSource
from tests.test_middleware import HEADERS, client_for, guarded, inner_app, usage

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("option", "value"), [
    ("default_limit", "x"), ("default_limit", 1.5), ("default_limit", True),
    ("cache_ttl", "60"), ("cache_ttl", 0), ("cache_ttl", float("nan")), ("stale_ttl", -1),
    ("lease_seconds", None), ("retry_after", "5"), ("cache_jitter", 2), ("cache_size", 0),
    ("local_leases", "yes"), ("shadow", 1), ("renderer", None), ("renderer", "barbican"),
    ("clock", 0), ("metrics", object()), ("store", "redis://x"),
])
def test_a_bad_option_is_a_configuration_error_naming_it(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        QuotaMiddleware(inner_app(), rules=[], source=StaticSource({}), **{option: value})


def test_an_app_that_is_not_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="app"):
        QuotaMiddleware(None, rules=[], source=StaticSource({}))  # type: ignore[arg-type]


async def test_a_resource_the_source_never_reports_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    # A typo: the source knows "things", the rule counts "thing".
    mw = QuotaMiddleware(inner_app(), rules=[Rule("POST", "/things", "thing")],
                         source=StaticSource({"things": 1}), default_limit=-1)
    with caplog.at_level(logging.WARNING):
        async with client_for(mw) as client:
            statuses = [(await client.post("/things", headers=HEADERS)).status_code for _ in range(3)]
    assert statuses == [201, 201, 201]  # the default (unlimited) applies, as configured
    said = [r for r in caplog.records if "reports no limit" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    message = said[0].getMessage()
    assert "'thing'" in message and "things" in message and "unlimited" in message and "resources=" in message


async def test_barbicans_default_resource_list_is_named_when_a_rule_counts_another() -> None:
    source = BarbicanSource("http://barbican.test")
    assert "transport_keys" not in source.resources
    assert BarbicanSource("http://barbican.test", resources=["secrets", "transport_keys"]).resources == (
        "secrets", "transport_keys")
    await source.aclose()


async def test_a_reported_resource_is_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    mw = guarded(limit=2)
    with caplog.at_level(logging.WARNING):
        async with client_for(mw) as client:
            assert (await client.post("/things", headers=HEADERS)).status_code == 201
    assert not [r for r in caplog.records if "reports no limit" in r.getMessage()]
    assert await usage(mw) == 1
