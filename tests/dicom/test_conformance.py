"""The conformance statement is the server's: the README's copy is what `appliance conformance`
prints, and a live server negotiates what it says."""

from __future__ import annotations

import re

import pytest
from conftest import REPO
from support.dicom_server import CLIENT_AE, Server, free_port, register

from appliance.dicom import conformance
from appliance.dicom.negotiation import UNCOMPRESSED, Proposed
from appliance.dicom.requestor import RequestedAssociation

CT = "1.2.840.10008.5.1.4.1.1.2"


def _section(text: str, title: str) -> str:
    return text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]


def _uids(text: str) -> list[str]:
    return re.findall(r"`(1\.2\.[0-9.]+)`", text)


def test_the_readme_carries_the_statement_the_code_prints():
    readme = (REPO / "README.md").read_text()
    copy = readme.split("<!-- conformance statement: begin -->\n", 1)[1].split("<!-- conformance statement: end -->")[0]
    assert copy == conformance.statement()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from appliance.admin import home as home_mod
    home = tmp_path_factory.mktemp("conformance") / "home"
    home_mod.init(home)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    srv = Server(home).start()
    yield srv
    srv.stop()


def _negotiate(port: int, proposals: list[tuple[str, tuple[str, ...]]]) -> dict[tuple[str, tuple], str | None]:
    """(abstract syntax, proposed syntaxes) -> the syntax accepted, or None; 128 contexts per association."""
    outcome = {}
    for start in range(0, len(proposals), 128):
        batch = proposals[start:start + 128]
        contexts = [Proposed(2 * n + 1, sop, syntaxes) for n, (sop, syntaxes) in enumerate(batch)]
        link = RequestedAssociation.open("127.0.0.1", port, calling_ae=CLIENT_AE, called_ae="ARCHIVE",
                                         contexts=contexts, max_pdu=65536, timeout=10)
        try:
            for context in contexts:
                accepted = link.contexts.get(context.context_id)
                outcome[(context.abstract_syntax, context.transfer_syntaxes)] = \
                    accepted.transfer_syntax if accepted else None
        finally:
            link.release()
    return outcome


def test_the_server_accepts_what_the_statement_lists_and_nothing_else(live):
    text = conformance.statement()
    classes = _section(text, "SOP classes")
    others = _uids(classes.split("<details>")[0])  # verification, query/retrieve, storage commitment
    stores = _uids(classes.split("<details>")[1])
    storage = others + stores
    syntaxes = _uids(_section(text, "Transfer syntaxes"))
    assert len(stores) > 200 and len(syntaxes) > 30 and len(others) == 8
    proposals = [(uid, (UNCOMPRESSED[0],)) for uid in storage]  # every SOP class it lists
    proposals += [(CT, (ts,)) for ts in syntaxes]  # storage in every syntax it lists
    proposals += [(uid, ("1.2.840.10008.1.2.4.50",)) for uid in others]  # the others: uncompressed only
    proposals += [("1.2.826.0.1.3680043.9.9999.77", (UNCOMPRESSED[0],))]  # a class it does not list
    outcome = _negotiate(live.port, proposals)
    for uid in storage:
        assert outcome[(uid, (UNCOMPRESSED[0],))] == UNCOMPRESSED[0], uid
    for ts in syntaxes:
        assert outcome[(CT, (ts,))] == ts, ts
    for uid in others:
        assert outcome[(uid, ("1.2.840.10008.1.2.4.50",))] is None, uid
    assert outcome[("1.2.826.0.1.3680043.9.9999.77", (UNCOMPRESSED[0],))] is None
