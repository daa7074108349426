"""Every DICOMweb request needs a bearer token with the role of its route: none, a wrong one or
a removed one is 401, audited without a flood filling the trail; a token without the role, 403."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit.trail import AuditTrail
from appliance import config as cfg
from conftest import run_cli

from support.dicomweb import MULTIPART, WebServer, add_token, multipart

ROUTES = [("GET", "/dicom-web/studies"), ("GET", "/dicom-web/studies/1.2.3/metadata"), ("GET", "/wado?requestType=WADO"),
          ("POST", "/dicom-web/studies")]


def call(server, method: str, path: str, token: str | None):
    if method == "POST":
        return server.post(path, token, multipart([b"x"]), MULTIPART)
    return server.get(path, token)


def refusals(home: Path) -> list[dict]:
    config = cfg.load(home)
    """The trail's security alerts about DICOMweb requests (refused tokens, missing roles)."""
    return [r for r in AuditTrail(config.audit_dir, config.audit_key_file).records()
            if r["event"] == "Security Alert" and (r["op"] == "dicomweb" or r.get("detail", {}).get("source") == "DICOMweb")]


def test_tokens_and_roles(home):
    reader = add_token(home, "reader", "query,retrieve")
    writer = add_token(home, "writer", "store")
    listed = json.loads(run_cli("token", "list", "--json", home=home).stdout)
    assert [(t["name"], t["roles"]) for t in listed] == [("reader", ["query", "retrieve"]), ("writer", ["store"])]
    stored = (home / "dicomweb-tokens.yaml").read_text()
    assert reader not in stored and writer not in stored  # only their hashes
    assert run_cli("token", "add", "x", "--roles", "move-destination", home=home, check=False).returncode != 0
    server = WebServer(home).start()
    try:
        for method, path in ROUTES:
            assert call(server, method, path, None).status_code == 401, path
            assert call(server, method, path, "not-a-token").status_code == 401, path
            assert call(server, method, path, writer if method == "GET" else reader).status_code == 403, path
        assert server.get("/dicom-web/studies", reader).status_code == 200
        assert call(server, "POST", "/dicom-web/studies", writer).status_code == 409  # in, and "x" is no DICOM
        run_cli("token", "remove", "reader", home=home)
        assert server.get("/dicom-web/studies", reader).status_code == 401
        flood = [server.get("/dicom-web/studies", "wrong").status_code for _ in range(30)]
        assert set(flood) == {401}
    finally:
        assert server.stop() == 0
    records = refusals(home)
    wrong = [r for r in records if r.get("detail", {}).get("reason") == "wrong bearer token"]
    # one record at once, one summary of the repeats when the interval closes (here: at the stop)
    assert len(wrong) == 2 and wrong[1]["detail"]["repeated"] == len(ROUTES) + 1 + 30 - 1
    assert len([r for r in records if r.get("detail", {}).get("reason", "").startswith("token has no")]) == len(ROUTES)
    assert all(r["host"] == "127.0.0.1" for r in records)
    assert run_cli("audit", "verify", home=home).returncode == 0
    trail = "".join(p.read_text() for p in (home / "audit" / "trail").glob("*.log"))
    assert reader not in trail and writer not in trail


@pytest.mark.parametrize("roles", ["", "store,bogus"])
def test_token_add_needs_known_roles(home, roles):
    result = run_cli("token", "add", "x", "--roles", roles, home=home, check=False)
    assert result.returncode != 0 and "role" in result.stderr
