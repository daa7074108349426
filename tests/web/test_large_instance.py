"""A large instance goes in by STOW-RS and out by WADO-RS in bounded server memory, byte-exact:
the body streams part piece by piece into the sealer, the response streams from the sealed store.
Bodies of many instances, several at once, stay in bounded memory too: a part committed keeps
only what the response needs, and one compressor seals a whole body."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import corpus
from appliance.web.multipart import MultipartReader

from support.dicomweb import BOUNDARY, MULTIPART, WebServer, add_token, multipart

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


def test_many_instances_by_several_clients_at_once_in_bounded_memory(home, tmp_path):
    bodies = [multipart([path.read_bytes() for path in corpus.ct_study(tmp_path / f"ct{n}", 30, patient_id=f"MANY{n}",
                                                                       seed=40 + n)]) for n in range(4)]
    token = add_token(home, "modality", "store")
    server = WebServer(home).start()
    answers: list[int] = []
    try:
        threads = [threading.Thread(target=lambda body=body: answers.append(
            server.post("/dicom-web/studies", token, body, MULTIPART).status_code)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak_mb = server.peak_rss_kb() / 1024
    finally:
        assert server.stop() == 0
    assert answers == [200] * 4
    assert peak_mb < 250, peak_mb  # was ~310 MB while every part kept its sealed bytes and a compressor
