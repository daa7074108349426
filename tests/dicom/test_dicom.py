"""The DICOM front against real clients: dcmtk's tools and pynetdicom as SCU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import corpus
import pydicom
import pytest
from conftest import dicom_test_files, run_cli, small_volume
from support.dicom_server import CLIENT_AE, DEST_AE, Server, dataset_bytes, dcmtk, free_port, register, send_as_is, storable
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.audit.trail import AuditTrail


@pytest.fixture
def server(home):
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    srv = Server(home).start()
    yield srv
    srv.stop()


def _addr(srv) -> list[str]:
    return ["-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(srv.port)]


def _storescu(srv, files, *extra) -> subprocess.CompletedProcess:
    return dcmtk("storescu", "-nh", *extra, *_addr(srv), *map(str, files), check=False)


def _scu(ae_title: str = CLIENT_AE) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae


def _sop(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


# -- association control ---------------------------------------------------------------------

def test_echo_and_association_control(home, server):
    dcmtk("echoscu", *_addr(server))
    unknown = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "ARCHIVE", "127.0.0.1", str(server.port), check=False)
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
    wrong = dcmtk("echoscu", "-aet", CLIENT_AE, "-aec", "NOTME", "127.0.0.1", str(server.port), check=False)
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
    # A truncated PDU stream and a peer that vanishes mid-association leave the server serving.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"\x01\x00\x00\x00\x10\x00")
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00")  # an A-ABORT out of the blue
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        # a PDU that claims 4 GB: the server hangs up at once instead of waiting for (or making
        # room for) it; pynetdicom alone would wait for the bytes (a timeout here)
        raw.sendall(b"\x01\x00\xff\xff\xff\xf0" + b"\x00" * 64)
        try:
            assert raw.recv(1) == b""
        except ConnectionResetError:  # closed with our 64 bytes unread
            pass
    dcmtk("echoscu", *_addr(server))
    log = server.log.read_text()
    assert '"event": "association.rejected", "calling_ae": "STRANGER"' in log


def test_roles_are_enforced_per_service(home, server, ct_files):
    register(home, "QUERYONLY", free_port(), "query")
    store = dcmtk("storescu", "-v", "-aet", "QUERYONLY", "-aec", "ARCHIVE", "127.0.0.1", str(server.port),
                  str(ct_files[0]), check=False)
    assert "Received Store Response (Unknown Status: 0x124)" in store.stderr  # Refused: Not authorized
    assert json.loads(run_cli("status", "--json", home=home).stdout)["instances"] == 0
    dcmtk("storescu", *_addr(server), str(ct_files[0]))
    # the query-only AE finds it; the store-only client may not query
    found = dcmtk("findscu", "-v", "-S", "-aet", "QUERYONLY", "-aec", "ARCHIVE", "127.0.0.1", str(server.port),
                  "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert "Find Response: 1 (Pending)" in found.stderr
    register(home, "STOREONLY", free_port(), "store")
    refused = dcmtk("findscu", "-v", "-S", "-aet", "STOREONLY", "-aec", "ARCHIVE", "127.0.0.1", str(server.port),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", check=False)
    assert "Pending" not in refused.stderr and "0x0124" in refused.stderr.replace("0x124", "0x0124")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_associations_cost_no_cpu_and_leave_nothing_open(home, server):
    """The reactors wait for the socket instead of polling: four open, idle associations
    (pynetdicom's own loops burnt ~35% of a core with them) leave the server asleep, each
    still answers, is released and is aborted as before, and associations that come and go
    leave no descriptor behind (each reactor owns an eventfd while it runs)."""
    ae = _scu()
    fds = lambda: len(os.listdir(f"/proc/{server.process.pid}/fd"))  # noqa: E731
    dcmtk("echoscu", *_addr(server))
    before = fds()
    for _ in range(20):
        assoc = ae.associate("127.0.0.1", server.port, ae_title="ARCHIVE")
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    deadline = time.monotonic() + 10
    while fds() > before and time.monotonic() < deadline:  # the last threads finish their exit
        time.sleep(0.1)
    assert fds() <= before
    assocs = [ae.associate("127.0.0.1", server.port, ae_title="ARCHIVE") for _ in range(4)]
    assert all(a.is_established for a in assocs)
    before = _cpu_seconds(server.process.pid)
    time.sleep(3)
    assert _cpu_seconds(server.process.pid) - before < 0.5
    for assoc in assocs[:3]:
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert assoc.is_released
    assocs[3].abort()
    dcmtk("echoscu", *_addr(server))


# -- storage ---------------------------------------------------------------------------------

# storescu can propose one compressed syntax family at a time: the option for each.
STORESCU_OPTION = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
}


DEFLATED = "1.2.840.10008.1.2.1.99"


def _get_raw(srv, info) -> dict[str, bytes]:
    """C-GET one instance with pynetdicom; the data set bytes exactly as they arrived."""
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    sop_class = info.instance["SOPClassUID"]
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class, [info.transfer_syntax])
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE",
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID = info.study_uid, info.series_uid
    query.SOPInstanceUID = info.sop_uid
    statuses = [s.Status for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000, statuses
    return received


def _by_syntax(files) -> dict[str, list]:
    groups: dict[str, list] = {}
    for path, info in files:
        groups.setdefault(info.transfer_syntax, []).append((path, info))
    return dict(sorted(groups.items()))


def _indexed_instances(home) -> set[str]:
    from appliance import config as cfg
    with open_archive(cfg.load(home)) as archive:
        with archive.catalog.read() as view:
            return {instance.sop_uid for instance in view.instances()}


def test_storescu_stores_every_test_file_in_its_own_syntax(home, server):
    files = storable(dicom_test_files())
    groups = _by_syntax(files)
    assert len(groups) >= 10  # uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, RLE, big endian ...
    for syntax, group in groups.items():
        option = STORESCU_OPTION.get(syntax)
        if option is None:  # a syntax storescu cannot propose (HTJ2K, JPEG process 14 ...)
            send_as_is(server, group)
            continue
        for path, info in group:
            result = _storescu(server, [path], "-R", option)
            if "missing SOP class" in result.stderr:  # dcmtk cannot read this file's UN-encoded UIDs
                send_as_is(server, [(path, info)])
                continue
            assert result.returncode == 0 and "Store Failed" not in result.stderr, (path, result.stderr[-2000:])
    assert _indexed_instances(home) == {info.sop_uid for _, info in files}


def test_every_test_file_moved_back_byte_exact(home, server, tmp_path):
    """What a peer sent is what it gets back, in the syntax it was sent in (storescp +B writes
    the data set bit for bit). pynetdicom sends each file's own bytes; storescu may re-encode."""
    files = storable(dicom_test_files())
    groups = _by_syntax(files)
    for group in groups.values():
        send_as_is(server, group)
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    dest_port = free_port()
    register(home, DEST_AE, dest_port, "move-destination")
    storescp = subprocess.Popen(["/usr/bin/storescp", "+B", "+xa", "-aet", DEST_AE, "-od", str(dest_dir),
                                 str(dest_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for study in sorted({info.study_uid for _, info in files}):
            dcmtk("movescu", "-S", "-aem", DEST_AE, *_addr(server), "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", check=False)
    finally:
        storescp.terminate()
        storescp.wait()
    received = {_sop(path): dataset_bytes(path) for path in dest_dir.iterdir()}
    # storescp does not accept deflate (+xa leaves it out): those come back through a pynetdicom C-GET.
    for path, info in groups.get(DEFLATED, []):
        received.update(_get_raw(server, info))
    # The current version of an instance is the last new one sent (the same bytes again are a
    # duplicate and change nothing).
    current, seen = {}, set()
    for syntax, group in groups.items():
        for path, info in group:
            data = dataset_bytes(path)
            if (info.sop_uid, syntax, data) not in seen:
                seen.add((info.sop_uid, syntax, data))
                current[info.sop_uid] = data
    assert set(received) == {info.sop_uid for _, info in files}
    for sop_uid, data in received.items():
        assert data == current[sop_uid], sop_uid


def test_malformed_dataset_is_refused_and_nothing_is_stored(home, server, ct_files):
    ds = pydicom.dcmread(ct_files[0])
    del ds.StudyInstanceUID
    assoc = _scu().associate("127.0.0.1", server.port, ae_title="ARCHIVE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assert status.Status == 0xC000 and "StudyInstanceUID" in status.ErrorComment
    good = assoc.send_c_store(pydicom.dcmread(ct_files[1]))
    assert good.Status == 0x0000
    assoc.release()
    assert json.loads(run_cli("status", "--json", home=home).stdout)["instances"] == 1


def test_duplicates_and_new_versions(home, server, ct_files, tmp_path):
    assoc = _scu().associate("127.0.0.1", server.port, ae_title="ARCHIVE")
    first = pydicom.dcmread(ct_files[0])
    assert assoc.send_c_store(first).Status == 0x0000
    assert assoc.send_c_store(pydicom.dcmread(ct_files[0])).Status == 0x0000
    first.SeriesDescription = "corrected"
    assert assoc.send_c_store(first).Status == 0x0000
    assoc.release()
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["instances"] == 1 and status["versions"] == 2


def test_concurrent_associations_lose_nothing(home, server, tmp_path):
    studies = [corpus.ct_study(tmp_path / f"s{n}", 6, patient_id=f"P{n}", seed=n) for n in range(4)]
    errors = []

    def send(files):
        assoc = _scu().associate("127.0.0.1", server.port, ae_title="ARCHIVE", max_pdu=0)
        for path in files:
            status = assoc.send_c_store(path)
            if status.Status != 0:
                errors.append(status.Status)
        assoc.release()

    threads = [threading.Thread(target=send, args=(files,)) for files in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["instances"] == 24 and status["studies"] == 4
    assert run_cli("fsck", home=home).returncode == 0


def test_retired_sop_class_is_stored(home, server, ct_files):
    ds = pydicom.dcmread(ct_files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6"  # US (retired)
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.6")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="ARCHIVE")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


# -- query -----------------------------------------------------------------------------------

def _find(srv, *keys, root="-S") -> list[dict]:
    result = dcmtk("findscu", root, *_addr(srv), *[x for k in keys for x in ("-k", k)], check=False)
    responses, current = [], None
    for line in result.stderr.splitlines():
        if "Find Response" in line and "Pending" in line:
            current = {}
            responses.append(current)
        match = re.match(r"I: \(([0-9a-f]{4}),([0-9a-f]{4})\) \w\w (?:\[(.*)\]|\(no value available\))", line)
        if current is not None and match:
            current[f"{match.group(1)},{match.group(2)}"] = (match.group(3) or "").strip(" \x00")
    return responses


@pytest.fixture
def stocked(home, server, tmp_path):
    ct = corpus.ct_study(tmp_path / "ct", 3, patient_name="Doe^Jane", patient_id="PID1")
    mr = corpus.mr_series(tmp_path / "mr", 2, patient_name="Roe^Richard", patient_id="PID2")
    _storescu(server, ct + mr)
    return server, ct, mr


def test_find_at_every_level_with_matching_rules(stocked):
    srv, ct, mr = stocked
    ct_study, mr_study = (pydicom.dcmread(ct[0]).StudyInstanceUID, pydicom.dcmread(mr[0]).StudyInstanceUID)
    assert len(_find(srv, "QueryRetrieveLevel=STUDY", "StudyInstanceUID")) == 2
    by_name = _find(srv, "QueryRetrieveLevel=STUDY", "PatientName=doe*", "StudyInstanceUID")
    assert [r["0020,000d"] for r in by_name] == [ct_study]
    assert len(_find(srv, "QueryRetrieveLevel=STUDY", "PatientName=?OE^*", "StudyInstanceUID")) == 2
    for name in ("DOE^JANE^^", "doe^j*", "Doe^Jane"):  # exact and prefix go through the name index
        assert [r["0020,000d"] for r in _find(srv, "QueryRetrieveLevel=STUDY", f"PatientName={name}",
                                              "StudyInstanceUID")] == [ct_study], name
    by_id_prefix = _find(srv, "QueryRetrieveLevel=STUDY", "PatientID=PID*", "StudyInstanceUID")
    assert sorted(r["0020,000d"] for r in by_id_prefix) == sorted([ct_study, mr_study])
    assert len(_find(srv, "QueryRetrieveLevel=STUDY", "StudyDate=20260101-20261231", "StudyInstanceUID")) == 2
    assert _find(srv, "QueryRetrieveLevel=STUDY", "StudyDate=-20250101", "StudyInstanceUID") == []
    listed = _find(srv, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ct_study}\\{mr_study}\\1.2.3")
    assert sorted(r["0020,000d"] for r in listed) == sorted([ct_study, mr_study])
    mr_only = _find(srv, "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR", "NumberOfStudyRelatedInstances")
    assert len(mr_only) == 1 and mr_only[0]["0020,1208"] == "2"
    # only the requested keys come back (plus character set, level and retrieve AE title)
    assert set(mr_only[0]) == {"0008,0005", "0008,0052", "0008,0054", "0008,0061", "0020,1208"}
    series = _find(srv, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={ct_study}", "SeriesInstanceUID",
                   "Modality", "NumberOfSeriesRelatedInstances")
    assert len(series) == 1 and series[0]["0008,0060"] == "CT" and series[0]["0020,1209"] == "3"
    images = _find(srv, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ct_study}",
                   f"SeriesInstanceUID={series[0]['0020,000e']}", "SOPInstanceUID", "InstanceNumber=2")
    assert [r["0008,0018"] for r in images] == [pydicom.dcmread(ct[1]).SOPInstanceUID]
    patients = _find(srv, "QueryRetrieveLevel=PATIENT", "PatientID=PID*", "PatientName",
                     "NumberOfPatientRelatedStudies", root="-P")
    assert sorted(r["0010,0010"] for r in patients) == ["Doe^Jane", "Roe^Richard"]


def test_find_refuses_bad_identifiers(stocked):
    srv, _, _ = stocked
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE")
    bad_level = Dataset()
    bad_level.QueryRetrieveLevel = "FOLDER"
    statuses = [s.Status for s, _ in assoc.send_c_find(bad_level, PatientRootQueryRetrieveInformationModelFind)]
    assert statuses[-1] == 0xA900
    bad_range = Dataset()
    bad_range.QueryRetrieveLevel = "PATIENT"
    bad_range.PatientBirthDate = "2020-2021-2022"
    statuses = [s.Status for s, _ in assoc.send_c_find(bad_range, PatientRootQueryRetrieveInformationModelFind)]
    assert statuses[-1] == 0xC000
    assoc.release()


# -- retrieve --------------------------------------------------------------------------------

def test_get_at_study_series_and_image_level_is_byte_exact(stocked, tmp_path):
    srv, ct, _ = stocked
    ct_study = pydicom.dcmread(ct[0])
    for level, keys, expected in (
            ("STUDY", [f"StudyInstanceUID={ct_study.StudyInstanceUID}"], ct),
            ("SERIES", [f"StudyInstanceUID={ct_study.StudyInstanceUID}",
                        f"SeriesInstanceUID={ct_study.SeriesInstanceUID}"], ct),
            ("IMAGE", [f"StudyInstanceUID={ct_study.StudyInstanceUID}",
                       f"SeriesInstanceUID={ct_study.SeriesInstanceUID}",
                       f"SOPInstanceUID={ct_study.SOPInstanceUID}"], ct[:1])):
        out = tmp_path / f"get-{level}"
        out.mkdir()
        dcmtk("getscu", "-S", *_addr(srv), "-od", str(out), "-k", f"QueryRetrieveLevel={level}",
              *[x for k in keys for x in ("-k", k)])
        got = {_sop(p): dataset_bytes(p) for p in out.iterdir()}
        assert got == {_sop(p): dataset_bytes(p) for p in expected}, level


def test_move_to_registered_destination_and_refusals(home, stocked, tmp_path):
    srv, ct, _ = stocked
    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    unknown = dcmtk("movescu", "-S", "-aem", "NOWHERE", *_addr(srv), "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study}", check=False)
    assert "Refused: MoveDestinationUnknown" in unknown.stderr
    dest_port = free_port()
    register(home, DEST_AE, dest_port, "move-destination")
    out = tmp_path / "moved"
    out.mkdir()
    storescp = subprocess.Popen(["/usr/bin/storescp", "+B", "-aet", DEST_AE, "-od", str(out), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        moved = dcmtk("movescu", "-v", "-S", "-aem", DEST_AE, *_addr(srv), "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"StudyInstanceUID={study}")
    finally:
        storescp.terminate()
        storescp.wait()
    assert moved.stderr.count("(Pending)") == 3 and "Received Final Move Response (Success)" in moved.stderr
    # the per-association log line says what the association did
    deadline, summary = time.monotonic() + 10, None
    while summary is None and time.monotonic() < deadline:
        lines = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith("{")]
        summary = next((e for e in lines if e["event"] == "association.ended" and "C-MOVE" in e["services"]), None)
        time.sleep(0.05)
    assert summary and summary["retrieved"] == 3 and summary["calling_ae"] == CLIENT_AE
    assert {_sop(p): dataset_bytes(p) for p in out.iterdir()} == {_sop(p): dataset_bytes(p) for p in ct}


def _blob_path(home, sop_uid) -> Path:
    from appliance import config as cfg
    with open_archive(cfg.load(home)) as archive:
        record = archive.instance(sop_uid)
        with archive.catalog.read() as view:
            name = view.blob(record.current).copies["hot"].name
        return archive.hot.path(name)


def test_get_answers_a_failure_for_an_instance_that_does_not_verify(home, stocked, tmp_path):
    srv, ct, _ = stocked
    victim = _blob_path(home, _sop(ct[0]))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    out = tmp_path / "get"
    out.mkdir()
    result = dcmtk("getscu", "-v", "-S", *_addr(srv), "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={pydicom.dcmread(ct[0]).StudyInstanceUID}", check=False)
    assert "Number of Failed Suboperations    : 1" in result.stderr
    assert "Number of Completed Suboperations : 2" in result.stderr
    originals = {_sop(p): dataset_bytes(p) for p in ct[1:]}
    assert {_sop(p): dataset_bytes(p) for p in out.iterdir()} == originals  # the damaged one never arrives


def test_storage_commitment_reports_on_the_same_association(stocked):
    srv, ct, _ = stocked
    reports = []

    def on_report(event):
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    request = Dataset()
    request.TransactionUID = "1.2.3.4.5"
    known, missing = Dataset(), Dataset()
    known.ReferencedSOPClassUID, known.ReferencedSOPInstanceUID = CTImageStorage, _sop(ct[0])
    missing.ReferencedSOPClassUID, missing.ReferencedSOPInstanceUID = CTImageStorage, "1.2.3.999"
    request.ReferencedSOPSequence = [known, missing]
    status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0000
    deadline = time.monotonic() + 20
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
    assoc.release()
    assert reports, "no N-EVENT-REPORT arrived"
    event_type, info = reports[0]
    assert event_type == 2 and info.TransactionUID == "1.2.3.4.5"
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [_sop(ct[0])]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [("1.2.3.999", 0x0112)]


# -- faults ----------------------------------------------------------------------------------

def _successes(storescu_output: str, files) -> set[str]:
    """SOP Instance UIDs whose C-STORE response reached the client as Success (storescu -v)."""
    done, current = set(), None
    for line in storescu_output.splitlines():
        match = re.search(r"Sending file: (\S+)", line)
        if match:
            current = match.group(1)
        if "Received Store Response (Success)" in line and current:
            done.add(_sop(current))
    return done


def _export_all(home, tmp_path) -> dict[str, bytes]:
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    out = tmp_path / "export"
    exported = {}
    from appliance import config as cfg
    with open_archive(cfg.load(home)) as archive:
        studies = archive.study_uids()
    for study in studies:
        run_cli("export", study, str(out), home=home)
    for path in out.glob("*.dcm"):
        exported[path.stem] = dataset_bytes(path)
    assert len(exported) == status["instances"]
    return exported


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_server_stopped_mid_store_keeps_every_acknowledged_instance(home, tmp_path, signum):
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    files = corpus.ct_study(tmp_path / "ct", 120, seed=7)
    srv = Server(home).start()
    try:
        client = subprocess.Popen(["/usr/bin/storescu", "-v", "-nh", *_addr(srv), *map(str, files)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
        output = []
        for line in client.stdout:
            output.append(line)
            if sum("Received Store Response (Success)" in x for x in output) >= 30:
                break
        if signum == signal.SIGKILL:
            srv.kill9()
        else:
            assert srv.stop(signum) == 0
        output.extend(client.stdout.readlines())
        client.wait()
    finally:
        srv.stop()
    acknowledged = _successes("".join(output), files)
    assert len(acknowledged) >= 30
    assert run_cli("fsck", home=home).returncode == 0
    exported = _export_all(home, tmp_path)
    originals = {_sop(p): dataset_bytes(p) for p in files}
    assert acknowledged <= set(exported)
    for sop_uid, data in exported.items():  # nothing half-stored is visible
        assert data == originals[sop_uid]
    # every acknowledged store has its audit record, and the trail is intact
    config = cfg.load(home)
    audited = {r["detail"]["sop"] for r in AuditTrail(config.audit_dir, config.audit_key_file).records()
               if r["op"] == "c-store"}
    assert acknowledged <= audited
    assert run_cli("audit", "verify", home=home).returncode == 0
    # and it goes on serving
    srv = Server(home, srv.port).start()
    try:
        dcmtk("echoscu", *_addr(srv))
    finally:
        srv.stop()


def test_full_disk_answers_a700_and_stores_again_when_space_returns(tmp_path, ct_files):
    with small_volume(tmp_path / "small", "2m") as mount:
        home = mount / "home"
        run_cli("init", home=home)
        register(home, CLIENT_AE, free_port(), "store")
        srv = Server(home).start()
        try:
            result = dcmtk("storescu", "-v", "-nh", *_addr(srv), *map(str, ct_files), check=False)
            assert "Received Store Response (Refused: OutOfResources)" in result.stderr  # 0xA700
            dcmtk("echoscu", *_addr(srv))  # still serving
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
            dcmtk("storescu", "-nh", *_addr(srv), *map(str, ct_files))
        finally:
            srv.stop()
        assert json.loads(run_cli("status", "--json", home=home).stdout)["instances"] == len(ct_files)
        assert run_cli("fsck", home=home).returncode == 0
        # every stored instance has its record; the disk filling up broke nothing in the trail
        config = cfg.load(home)
        audited = {r["detail"]["sop"] for r in AuditTrail(config.audit_dir, config.audit_key_file).records()
                   if r["op"] == "c-store" and r["outcome"] == 0}
        assert audited == {_sop(p) for p in ct_files}
        assert run_cli("audit", "verify", home=home).returncode == 0


def test_large_multiframe_stored_and_retrieved_in_bounded_memory(home, server, tmp_path):
    big = corpus.multiframe(tmp_path / "big.dcm", 500)
    before = server.peak_rss_kb()
    dcmtk("storescu", *_addr(server), str(big))
    out = tmp_path / "out"
    out.mkdir()
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    dcmtk("getscu", "-S", *_addr(server), "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
          "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
          "-k", f"SOPInstanceUID={ds.SOPInstanceUID}")
    [got] = list(out.iterdir())
    assert dataset_bytes(got) == dataset_bytes(big)
    peak = server.peak_rss_kb()
    print(f"server peak RSS {peak / 1024:.0f} MB")
    assert peak < 300 * 1024, f"server peak RSS {peak / 1024:.0f} MB (before: {before / 1024:.0f} MB)"


def test_commitment_report_goes_to_the_registered_address_when_the_association_is_gone(home, tmp_path, ct_files):
    reports = []
    listener_port = free_port()
    listener = AE(ae_title=CLIENT_AE)
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)

    def on_report(event):
        reports.append(event.event_information)
        return 0x0000, None

    server_handle = listener.start_server(("127.0.0.1", listener_port), block=False,
                                          evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    register(home, CLIENT_AE, listener_port, "store")
    srv = Server(home).start()
    try:
        dcmtk("storescu", *_addr(srv), str(ct_files[0]))
        ae = AE(ae_title=CLIENT_AE)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE")
        request = Dataset()
        request.TransactionUID = "1.2.3.4.6"
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, _sop(ct_files[0])
        request.ReferencedSOPSequence = [item]
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assoc.abort()  # gone before the report could come back on it
        assert status.Status == 0x0000
        deadline = time.monotonic() + 30
        while not reports and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.stop()
        server_handle.shutdown()
    assert reports and reports[0].TransactionUID == "1.2.3.4.6"
    assert [i.ReferencedSOPInstanceUID for i in reports[0].ReferencedSOPSequence] == [_sop(ct_files[0])]


def test_cancel_stops_a_get_between_sub_operations(stocked):
    srv, ct, _ = stocked
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        if len(received) == 1:
            event.assoc.send_c_cancel(1, context_id=get_context[0])
        return 0x0000

    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    get_context = [cx.context_id for cx in assoc.accepted_contexts
                   if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = pydicom.dcmread(ct[0]).StudyInstanceUID
    responses = [(s.Status, s.get("NumberOfRemainingSuboperations"), s.get("NumberOfCompletedSuboperations"))
                 for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet, msg_id=1)]
    assoc.release()
    assert len(received) == 1, responses
    assert responses[-1] == (0xFE00, 2, 1)  # cancelled: two remaining, one completed


def test_unknown_sop_classes_only_when_the_config_allows(home, ct_files):
    register(home, CLIENT_AE, free_port(), "store")
    private_class = "1.2.826.0.1.3680043.9.9999.1"
    ds = pydicom.dcmread(ct_files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = private_class

    def store() -> int | None:
        ae = AE(ae_title=CLIENT_AE)
        ae.add_requested_context(private_class)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE")
        try:
            if not assoc.accepted_contexts:
                return None
            return assoc.send_c_store(ds).Status
        finally:
            assoc.release()

    srv = Server(home).start()
    try:
        assert store() is None  # the presentation context is refused
    finally:
        srv.stop()
    config = home / "appliance.yaml"
    config.write_text(config.read_text().replace("allow_unknown_sop_classes: false",
                                                 "allow_unknown_sop_classes: true"))
    srv = Server(home).start()
    try:
        assert store() == 0x0000
    finally:
        srv.stop()
    assert json.loads(run_cli("status", "--json", home=home).stdout)["instances"] == 1
