"""Interop with Orthanc: it sends a study to pacs-vault, forgets it, queries and retrieves it back."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from conftest import run_cli
from dicom_server import Server, dataset_bytes, free_port, register, wait_for_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class OrthancPeer:
    def __init__(self, work: Path, vault_port: int):
        self.http, self.dicom = free_port(), free_port()
        config = {
            "Name": "interop", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": True, "Plugins": [],
            "DicomModalities": {"vault": ["ARCHIVE", "127.0.0.1", vault_port]},
        }
        (work / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                                        stderr=open(work / "orthanc.log", "w"))
        wait_for_port(self.http, self.process)

    def call(self, method: str, path: str, body=None):
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return json.loads(payload) if payload[:1] in (b"{", b"[") else payload

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc (Debian package orthanc) is not installed")
def test_orthanc_stores_queries_and_retrieves_byte_exact(home, tmp_path, ct_files):
    vault = Server(home)
    orthanc = OrthancPeer(tmp_path, vault.port)
    try:
        register(home, "ORTHANC", orthanc.dicom, "store,query,retrieve,move-destination")
        vault.start()
        for path in ct_files[:5]:
            orthanc.call("POST", "/instances", path.read_bytes())
        [study_id] = orthanc.call("GET", "/studies")
        assert orthanc.call("POST", "/modalities/vault/echo", {}) is not None
        orthanc.call("POST", "/modalities/vault/store", {"Resources": [study_id], "Synchronous": True})
        orthanc.call("DELETE", f"/studies/{study_id}")
        assert orthanc.call("GET", "/instances") == []

        study_uid = pydicom.dcmread(ct_files[0]).StudyInstanceUID
        query = orthanc.call("POST", "/modalities/vault/query",
                             {"Level": "Study", "Query": {"PatientName": "doe*", "StudyInstanceUID": ""}})
        answers = orthanc.call("GET", f"/queries/{query['ID']}/answers?expand")
        assert [a["0020,000d"]["Value"] for a in answers] == [study_uid]
        orthanc.call("POST", f"/queries/{query['ID']}/retrieve",
                     {"TargetAet": "ORTHANC", "Synchronous": True})
        deadline = time.monotonic() + 60
        while len(orthanc.call("GET", "/instances")) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        retrieved = {}
        for instance_id in orthanc.call("GET", "/instances"):
            downloaded = tmp_path / f"{instance_id}.dcm"
            downloaded.write_bytes(orthanc.call("GET", f"/instances/{instance_id}/file"))
            retrieved[pydicom.dcmread(downloaded).SOPInstanceUID] = dataset_bytes(downloaded)
        originals = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in ct_files[:5]}
        assert retrieved == originals
        status = json.loads(run_cli("status", "--json", home=home).stdout)
        assert status["instances"] == 5
    finally:
        vault.stop()
        orthanc.stop()
