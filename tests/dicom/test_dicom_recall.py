"""A study that lives only on tape, retrieved over DICOM: recalled once, Pending responses while
the cartridge is fetched, byte-exact at the end; a cartridge that never comes is named."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from conftest import everything_to_tape, make_study, run_cli
from support.dicom_server import CLIENT_AE, DEST_AE, Server, dataset_bytes, dcmtk, free_port, register
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.store import tiering

SC = "1.2.840.10008.5.1.4.1.1.7"


def _addr(srv) -> list[str]:
    return ["-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(srv.port)]


def _on_tape_only(home, study_uid) -> None:
    with open_archive(cfg.load(home), writer=True) as archive:
        tiering.drop_hot(archive, study_uid, ["tape"])
        assert archive.needs_recall(study_uid)


@pytest.fixture
def taped(home, tmp_path):
    everything_to_tape(home, recall_wait_s=5)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    server = Server(home).start()
    study_uid, files = make_study(tmp_path / "in", 4, pixels=256)
    dcmtk("storescu", *_addr(server), *map(str, files))  # stored over DICOM
    run_cli("policy", "apply", home=home)
    assert not [p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts]
    yield server, study_uid, files
    server.stop()


def test_getscu_and_movescu_of_a_study_on_tape_only(home, taped, tmp_path):
    server, study_uid, files = taped
    expected = {p.name.split(".")[-2]: dataset_bytes(p) for p in files}
    out = tmp_path / "got"
    out.mkdir()
    dcmtk("getscu", "-S", *_addr(server), "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
          "-k", f"StudyInstanceUID={study_uid}")
    assert sorted(dataset_bytes(p) for p in out.iterdir()) == sorted(expected.values())

    _on_tape_only(home, study_uid)  # evicted again while the server runs
    dest = tmp_path / "moved"
    dest.mkdir()
    dest_port = free_port()
    register(home, DEST_AE, dest_port, "move-destination")
    storescp = subprocess.Popen(["/usr/bin/storescp", "+B", "-aet", DEST_AE, "-od", str(dest), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        dcmtk("movescu", "-S", "-aem", DEST_AE, *_addr(server), "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study_uid}")
    finally:
        storescp.terminate()
        storescp.wait()
    assert sorted(dataset_bytes(p) for p in dest.iterdir()) == sorted(expected.values())
    study = json.loads(run_cli("status", "--json", home=home).stdout)
    assert study["state"] == "ONLINE"


def _c_get(server, study_uid) -> tuple[list[int], dict[str, bytes], str]:
    """(statuses of every response, received data sets, final Error Comment)."""
    received: dict[str, bytes] = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title=CLIENT_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SC, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="ARCHIVE", ext_neg=[build_role(SC, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    final = responses[-1][0]
    return [s.Status for s, _ in responses], received, str(final.get("ErrorComment", ""))


def test_pending_while_the_cartridge_is_fetched_then_every_instance(home, taped):
    server, study_uid, files = taped
    shelf = home / "cartridges" / "shelf"
    os.rename(home / "cartridges" / "PV0001L9", shelf)
    results = []
    requests = [threading.Thread(target=lambda: results.append(_c_get(server, study_uid))) for _ in range(2)]
    for request in requests:
        request.start()
    deadline = time.monotonic() + 30
    while "load cartridge PV0001L9" not in run_cli("status", home=home).stdout:  # what the operator sees
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(2.5)  # the requestors wait with Pending responses meanwhile
    os.rename(shelf, home / "cartridges" / "PV0001L9")
    for request in requests:
        request.join(120)
    assert len(results) == 2
    for statuses, received, _ in results:
        assert statuses[0] == 0xFF00 and statuses[-1] == 0x0000
        assert statuses.count(0xFF00) > len(files)  # pending while waiting, then one per instance
        assert sorted(received.values()) == sorted(dataset_bytes(p) for p in files)
    hot = [p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts]
    assert len(hot) == len(files)  # one recall for both requests: no second copy of anything


def test_a_cartridge_that_does_not_come_fails_the_retrieve_and_says_which(home, taped):
    server, study_uid, files = taped
    os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "shelf")
    statuses, received, comment = _c_get(server, study_uid)
    assert received == {}
    assert statuses[-1] == 0xA702 and 0xFF00 in statuses[:-1]
    assert comment.startswith("load cartridge PV0001L9")
    assert "load cartridge PV0001L9" in run_cli("status", home=home).stdout
