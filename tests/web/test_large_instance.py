"""A large instance goes in by STOW-RS and out by WADO-RS in bounded server memory, byte-exact:
the body streams part piece by piece into the sealer, the response streams from the sealed store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import corpus
from appliance.web.multipart import MultipartReader

from support.dicomweb import BOUNDARY, MULTIPART, WebServer, add_token

MEGABYTES = 400


def _body(path: Path):
    """The multipart body, read from the file as it is sent (chunked): the client holds no copy either."""
    yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with path.open("rb") as fp:
        while chunk := fp.read(1 << 20):
            yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_large_instance_is_stored_and_retrieved_in_bounded_memory(home, tmp_path):
    big = corpus.multiframe(tmp_path / "big.dcm", MEGABYTES)
    token = add_token(home, "modality", "store,retrieve")
    server = WebServer(home).start()
    try:
        stored = server.post("/dicom-web/studies", token, _body(big), MULTIPART)
        assert stored.status_code == 200, stored.text
        url = stored.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        path = url.split(f":{server.web_port}", 1)[1]
        with server.get(path, token, headers={"Accept": accept}, stream=True) as back:
            assert back.status_code == 200
            boundary = back.headers["Content-Type"].split("boundary=")[1]
            reader, digest = MultipartReader(boundary), hashlib.sha256()
            for chunk in back.iter_content(1 << 20):
                for piece in reader.feed(chunk):
                    if isinstance(piece, bytes):
                        digest.update(piece)
            reader.close()
        peak_mb = server.peak_rss_kb() / 1024
    finally:
        assert server.stop() == 0
    original = hashlib.sha256()
    with big.open("rb") as fp:
        while chunk := fp.read(1 << 20):
            original.update(chunk)
    assert digest.hexdigest() == original.hexdigest()  # byte-exact
    assert peak_mb < 300, peak_mb  # neither the body nor the instance was ever whole in memory
