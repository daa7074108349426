"""Interop with Orthanc: it sends a study to pacs-vault, forgets it, queries and retrieves it back;
and, taking little endian only, it gets a study of compressed instances moved to it transcoded."""

from __future__ import annotations

import json
import time

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from conftest import run_cli
from support.dicom_server import (CLIENT_AE, Server, corpus_study, dataset_bytes, free_port, register, send_as_is,
                                  storable)
from support.orthanc import OrthancPeer, needs_orthanc


@needs_orthanc
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


@needs_orthanc
def test_a_study_moved_to_an_orthanc_taking_little_endian_only_arrives_whole_and_transcoded(home, tmp_path):
    little_endian = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    files = corpus_study(tmp_path / "study")
    vault = Server(home)
    orthanc = OrthancPeer(tmp_path, vault.port, AcceptedTransferSyntaxes=little_endian)
    try:
        register(home, CLIENT_AE, free_port(), "store")
        register(home, "ORTHANC", orthanc.dicom, "retrieve,move-destination")
        vault.start()
        send_as_is(vault, storable(files))
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        orthanc.call("POST", "/modalities/vault/move", {"Level": "Study", "TargetAet": "ORTHANC",
                                                        "Resources": [{"StudyInstanceUID": study_uid}]})
        instances = orthanc.call("GET", "/instances")
        assert len(instances) == len(files)
        received = {}
        for instance_id in instances:
            assert orthanc.call("GET", f"/instances/{instance_id}/metadata/TransferSyntax").decode() in little_endian
            received[orthanc.call("GET", f"/instances/{instance_id}/simplified-tags")["SOPInstanceUID"]] = instance_id
        # The multi-frame JPEG 2000 lossless one, as Orthanc hands it out.
        [original] = [p for p in files if p.name.endswith("emri_small_jpeg_2k_lossless.dcm")]
        ds = pydicom.dcmread(original)
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        downloaded = tmp_path / "from-orthanc.dcm"
        downloaded.write_bytes(orthanc.call("GET", f"/instances/{received[ds.SOPInstanceUID]}/file"))
        assert np.array_equal(pydicom.dcmread(downloaded).pixel_array, ds.pixel_array)
    finally:
        vault.stop()
        orthanc.stop()
