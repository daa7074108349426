"""Interop: Orthanc's DICOMweb client (Debian orthanc-dicomweb) sends a study to pacs-vault by
STOW-RS, forgets it, and gets it back by WADO-RS, byte-exact."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from conftest import run_cli
from support.dicom_server import dataset_bytes
from support.orthanc import OrthancPeer, needs_orthanc

from support.dicomweb import WebServer, add_token

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@needs_orthanc
@pytest.mark.skipif(not PLUGIN.exists(), reason="Orthanc's DICOMweb plugin (Debian orthanc-dicomweb) is not installed")
def test_orthanc_stores_by_stow_rs_and_retrieves_by_wado_rs_byte_exact(home, tmp_path, ct_files):
    token = add_token(home, "orthanc", "store,query,retrieve")
    vault = WebServer(home).start()
    server = {"Url": vault.url + "/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}
    orthanc = OrthancPeer(tmp_path, vault.port, Plugins=[str(PLUGIN)],
                          DicomWeb={"Enable": True, "Root": "/dicom-web/", "Servers": {"vault": server}})
    try:
        for path in ct_files[:5]:
            orthanc.call("POST", "/instances", path.read_bytes())
        [study_id] = orthanc.call("GET", "/studies")
        orthanc.call("POST", "/dicom-web/servers/vault/stow", {"Resources": [study_id], "Synchronous": True})
        assert json.loads(run_cli("status", "--json", home=home).stdout)["instances"] == 5
        orthanc.call("DELETE", f"/studies/{study_id}")
        assert orthanc.call("GET", "/instances") == []

        study_uid = pydicom.dcmread(ct_files[0]).StudyInstanceUID
        found = orthanc.call("POST", "/dicom-web/servers/vault/qido", {"Uri": "/studies", "Arguments": {"PatientName": "doe*"}})
        assert [answer["0020000D"]["Value"] for answer in found] == [study_uid]  # as Orthanc simplifies them
        orthanc.call("POST", "/dicom-web/servers/vault/retrieve", {"Resources": [{"Study": study_uid}],
                                                                    "Synchronous": True})
        retrieved = {}
        for instance_id in orthanc.call("GET", "/instances"):
            downloaded = tmp_path / f"{instance_id}.dcm"
            downloaded.write_bytes(orthanc.call("GET", f"/instances/{instance_id}/file"))
            retrieved[pydicom.dcmread(downloaded).SOPInstanceUID] = dataset_bytes(downloaded)
        assert retrieved == {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in ct_files[:5]}
    finally:
        orthanc.stop()
        assert vault.stop() == 0
