"""Identity: which project a request belongs to, and what is refused as no identity at all."""

from __future__ import annotations

import pytest

from middleware import HeaderIdentity, IdentityError
from middleware.identity import Identity
from tests.test_middleware import client_for, guarded, usage

pytestmark = pytest.mark.anyio


def scope_with(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "headers": list(headers)}


def test_one_header_names_the_project() -> None:
    identity = Identity(HeaderIdentity())
    assert identity(scope_with((b"x-project-id", b"p1"), (b"accept", b"*/*"))) == "p1"


def test_two_project_headers_are_ambiguous_even_when_equal() -> None:
    identity = Identity(HeaderIdentity())
    for second in (b"p2", b"p1"):
        with pytest.raises(IdentityError, match="more than once") as raised:
            identity(scope_with((b"x-project-id", b"p1"), (b"x-project-id", second)))
        assert raised.value.status_code == 400


def test_a_header_identity_of_its_own_reads_its_header_and_refuses_two() -> None:
    # Identity scans the default identity's header itself: the class is still right on its own.
    tenant = HeaderIdentity("X-Tenant")
    assert tenant(scope_with((b"x-project-id", b"p"), (b"x-tenant", b"t"))) == b"t"
    assert Identity(tenant)(scope_with((b"x-project-id", b"p"), (b"x-tenant", b"t"))) == "t"
    with pytest.raises(IdentityError, match="more than once"):
        tenant(scope_with((b"x-tenant", b"a"), (b"x-tenant", b"b")))


def test_a_subclass_of_the_header_identity_is_called() -> None:
    class Lowered(HeaderIdentity):
        def __call__(self, scope: dict[str, object]) -> bytes | None:  # type: ignore[override]
            raw = super().__call__(scope)
            return None if raw is None else raw.lower()

    assert Identity(Lowered())(scope_with((b"x-project-id", b"P1"))) == "p1"


async def test_a_request_with_two_project_headers_is_refused_and_counts_nothing() -> None:
    mw = guarded(limit=5)
    async with client_for(mw) as client:
        response = await client.post("/things", headers=[("X-Project-Id", "p"), ("X-Project-Id", "victim")])
        assert response.status_code == 400
        assert "more than once" in response.json()["description"]
        assert (await client.post("/things", headers={"X-Project-Id": "p"})).status_code == 201
    assert await usage(mw, "p") == 1 and await usage(mw, "victim") == 0


async def test_an_identity_set_on_the_middleware_later_is_the_one_it_asks() -> None:
    mw = guarded(limit=5)
    mw.identity = Identity(HeaderIdentity("X-Tenant"))
    async with client_for(mw) as client:
        assert (await client.post("/things", headers={"X-Tenant": "t"})).status_code == 201
        assert (await client.post("/things", headers={"X-Project-Id": "p"})).status_code == 401
    assert await usage(mw, "t") == 1 and await usage(mw, "p") == 0
