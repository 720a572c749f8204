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


async def test_a_request_with_two_project_headers_is_refused_and_counts_nothing() -> None:
    mw = guarded(limit=5)
    async with client_for(mw) as client:
        response = await client.post("/things", headers=[("X-Project-Id", "p"), ("X-Project-Id", "victim")])
        assert response.status_code == 400
        assert "more than once" in response.json()["description"]
        assert (await client.post("/things", headers={"X-Project-Id": "p"})).status_code == 201
    assert await usage(mw, "p") == 1 and await usage(mw, "victim") == 0
