"""The metadata cache: bounded in bytes, least recently used out, never stale (a new version of
an instance has a new content address, so its metadata is computed again)."""

from __future__ import annotations

import io

import pydicom

import corpus
from support.dicomweb import MULTIPART, WebServer, add_token, multipart

from appliance.web.cache import MetadataCache


def test_entries_are_bounded_in_bytes_and_the_least_recently_used_go_first():
    cache = MetadataCache(max_bytes=10)
    cache.put(b"a", "base", b"1234")
    cache.put(b"b", "base", b"1234")
    assert cache.get(b"a", "base") == b"1234"  # now b is the least recently used
    cache.put(b"c", "base", b"1234")
    assert cache.get(b"b", "base") is None and cache.get(b"a", "base") == b"1234"
    assert cache.size == 8
    cache.put(b"a", "base", b"12")  # replaced, not added
    assert cache.size == 6
    cache.put(b"d", "base", b"x" * 11)  # larger than the whole cache: not kept
    assert cache.get(b"d", "base") is None and cache.size == 6
    assert cache.get(b"a", "other base") is None  # BulkDataURIs are written for one base URL


def test_a_new_version_gets_its_own_metadata(home, tmp_path):
    path = corpus.ct_study(tmp_path / "ct", 1, patient_id="CACHE1")[0]
    ds = pydicom.dcmread(path)
    token = add_token(home, "viewer", "store,query,retrieve")
    server = WebServer(home).start()
    try:
        def stored_comment(comment: str) -> str:
            ds.ImageComments = comment
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            assert server.post("/dicom-web/studies", token, multipart([out.getvalue()]), MULTIPART).status_code == 200
            metadata = server.client(token).retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                                        ds.SOPInstanceUID)
            return metadata["00204000"]["Value"][0]

        assert stored_comment("first version") == "first version"
        assert stored_comment("second version") == "second version"
    finally:
        assert server.stop() == 0
