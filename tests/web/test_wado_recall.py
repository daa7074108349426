"""WADO-RS of a study that lives only on tape: recalled while the client waits, byte-exact; a
cartridge that is not loaded is 503 with Retry-After and the cartridge named, and the study
comes once it is loaded."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import everything_to_tape, make_study, run_cli

from support.dicomweb import MULTIPART, WebServer, add_token, multipart

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def test_a_study_on_tape_is_recalled_and_a_missing_cartridge_is_named(home, tmp_path):
    everything_to_tape(home, recall_wait_s=30)
    token = add_token(home, "reader", "store,query,retrieve")
    study_uid, files = make_study(tmp_path / "in", 3, pixels=128)
    server = WebServer(home).start()
    try:
        sent = [path.read_bytes() for path in files]
        assert server.post("/dicom-web/studies", token, multipart(sent), MULTIPART).status_code == 200
        run_cli("policy", "apply", home=home)  # to tape, the hot copies dropped
        assert not [p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts]

        os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "shelf")
        offline = server.get(f"/dicom-web/studies/{study_uid}", token, headers={"Accept": ACCEPT})
        assert offline.status_code == 503 and "PV0001L9" in offline.text
        assert int(offline.headers["Retry-After"]) > 0

        os.rename(home / "cartridges" / "shelf", home / "cartridges" / "PV0001L9")  # the operator loads it
        back = server.get(f"/dicom-web/studies/{study_uid}", token, headers={"Accept": ACCEPT})
        assert back.status_code == 200
        assert all(original in back.content for original in sent)  # every instance, byte-exact
    finally:
        assert server.stop() == 0
