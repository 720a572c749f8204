"""The examples users copy, run as users run them."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from examples import credits_gate, traffic_gate
from middleware import MemoryStore
from tests.servers import ROOT

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("module", "expected"), [
    ("examples.demo", ["-> 400", "-> 403", "-> 204", "-> 401", "secrets allows 5, 5 already in use",
                       '"secrets";q=5, "secrets:per-minute";q=30;w=60']),
    ("examples.credits_gate", ["-> 429", "allows 100 credits per window"]),
    ("examples.traffic_gate", ["5,000,000 bytes", "-> 429", "allows 20 TB per window"]),
    ("examples.org_cap", ["-> 202", '"servers";r=9, "acme/servers";r=0', "project acme: servers allows 5, 5 already"]),
])
def test_demo_runs_without_a_server(module: str, expected: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, (text, result.stdout)
    assert "Traceback" not in result.stderr


async def test_credits_gate_spends_exactly_the_seed_quota() -> None:
    app = credits_gate.create_app(credits_gate.local_source(), MemoryStore())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gate") as client:
        statuses = [(await client.post("/v1/companies/search", headers={"X-Project-Id": "w"})).status_code
                    for _ in range(401)]
    assert statuses.count(200) == 400 and statuses[-1] == 429  # 100 credits at 0.25 each


async def test_traffic_gate_reads_the_seed_region() -> None:
    app = traffic_gate.create_app(traffic_gate.local_source(), MemoryStore())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cdn") as client:
        response = await client.get("/regions/brazil/files/f?size=10", headers={"X-Project-Id": "proj_lkg1DekRdvZE5"})
        unknown = await client.get("/regions/brazil/files/f?size=10", headers={"X-Project-Id": "someone-else"})
    assert response.status_code == 200 and response.headers["ratelimit-policy"].startswith('"traffic:brazil";q=20;w=')
    assert unknown.status_code == 403 and "no traffic quota" in unknown.json()["description"]


async def test_barbican_store_under_the_quota_fixture() -> None:
    """The example secret store, tested as a user tests their own app: QuotaFixture stands in for
    the quota API, per project, and tells what each project uses."""
    from examples import barbican_store
    from middleware.testing import QuotaFixture

    quota = QuotaFixture(barbican_store.DEMO_QUOTAS)
    quota.set_quota("small", "secrets", 1)
    app = barbican_store.create_app(quota.source, quota.store)
    small, big = {"X-Project-Id": "small"}, {"X-Project-Id": "big"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kms") as client:
        created = await client.post("/v1/secrets", headers=small, json={"name": "a"})
        refused = await client.post("/v1/secrets", headers=small, json={"name": "b"})
        assert [(await client.post("/v1/secrets", headers=big)).status_code for _ in range(6)] == [201] * 5 + [403]
        assert (await client.post("/v1/orders", headers=big)).status_code == 202
        assert (await client.post("/v1/containers", headers=big, content=b"not json")).status_code == 400  # refunded
        assert (quota.usage("small", "secrets"), quota.usage("big", "secrets")) == (1, 5)
        assert (quota.usage("big", "orders"), quota.usage("big", "containers")) == (1, 0)
        secret_id = created.json()["secret_ref"].rsplit("/", 1)[1]
        assert (await client.delete(f"/v1/secrets/{secret_id}", headers=small)).status_code == 204
        assert quota.usage("small", "secrets") == 0
        quota.set_quota("small", "secrets", 0)  # disabled from the next request on
        disabled = await client.post("/v1/secrets", headers=small)
    assert created.status_code == 201 and refused.status_code == 403
    assert refused.json()["description"] == "Quota exceeded for project small: secrets allows 1, 1 already in use."
    assert disabled.status_code == 403 and "disabled" in disabled.json()["description"]
