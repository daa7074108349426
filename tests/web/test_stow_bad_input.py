"""STOW-RS refuses bad input with the right status, stores nothing it did not acknowledge, and
goes on serving: a body that is not multipart, parts that are not DICOM, a truncated part, a
wrong boundary, a Content-Length that lies, an instance of another study than the URL's, a full
disk."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest

import corpus
from conftest import run_cli, small_volume

from support.dicomweb import MULTIPART, WebServer, add_token, as_sent, multipart

NOT_DICOM, OTHER_STUDY, OUT_OF_RESOURCES = 0xC000, 0xC409, 0xA700


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    root = tmp_path_factory.mktemp("stow")
    run_cli("init", home=root / "home")
    token = add_token(root / "home", "modality", "store,query")
    server = WebServer(root / "home").start()
    ct = corpus.ct_study(root / "ct", 2, patient_id="STOW1")
    mr = corpus.mr_series(root / "mr", 1, patient_id="STOW2")
    yield server, token, ct, mr
    assert server.stop() == 0


def instances(server) -> int:
    return json.loads(run_cli("status", "--json", home=server.home).stdout)["instances"]


def still_serving(server, token) -> None:
    assert server.get("/dicom-web/studies", token).status_code == 200


def failures(response) -> list[int]:
    return [item["00081197"]["Value"][0] for item in response.json().get("00081198", {}).get("Value", [])]


def test_a_body_that_is_not_multipart_is_415(vault):
    server, token, ct, _ = vault
    before = instances(server)
    assert server.post("/dicom-web/studies", token, as_sent(ct[0]), "application/dicom").status_code == 415
    other_parts = 'multipart/related; type="application/dicom+xml"; boundary=x'
    assert server.post("/dicom-web/studies", token, multipart([b"<xml/>"], "x"), other_parts).status_code == 415
    assert instances(server) == before
    still_serving(server, token)


def test_parts_that_are_not_dicom_fail_and_the_good_ones_are_stored(vault):
    server, token, ct, _ = vault
    before = instances(server)
    junk = server.post("/dicom-web/studies", token, multipart([b"\x00" * 300, b"not dicom at all"]), MULTIPART)
    assert junk.status_code == 409 and failures(junk) == [NOT_DICOM, NOT_DICOM]
    text = multipart([as_sent(ct[0])], part_type="text/plain")
    assert failures(server.post("/dicom-web/studies", token, text, MULTIPART)) == [NOT_DICOM]
    truncated = as_sent(ct[1])[:-1000]
    mixed = server.post("/dicom-web/studies", token, multipart([truncated, as_sent(ct[0])]), MULTIPART)
    assert mixed.status_code == 202 and failures(mixed) == [NOT_DICOM]
    referenced = mixed.json()["00081199"]["Value"]
    assert [r["00081155"]["Value"][0] for r in referenced] == [pydicom.dcmread(ct[0]).SOPInstanceUID]
    assert instances(server) == before + 1
    still_serving(server, token)


def test_a_wrong_boundary_or_a_truncated_body_is_400_and_stores_nothing(vault):
    server, token, ct, _ = vault
    before = instances(server)
    body = multipart([as_sent(ct[1])], boundary="theirs")
    assert server.post("/dicom-web/studies", token, body, MULTIPART).status_code == 400
    whole = multipart([as_sent(ct[1]), as_sent(ct[0])])
    assert server.post("/dicom-web/studies", token, whole[:-100], MULTIPART).status_code == 400
    assert instances(server) == before
    still_serving(server, token)


def _raw_post(server, token: str, body: bytes, declared: int, then_close: bool) -> bytes:
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {MULTIPART}\r\nContent-Length: {declared}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.web_port), timeout=30) as sock:
        sock.sendall(head + body)
        if then_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            answer += data
    return answer


def test_a_content_length_that_lies_stores_nothing(vault):
    server, token, ct, _ = vault
    before = instances(server)
    body = multipart([as_sent(ct[1]), as_sent(ct[0])])
    shorter = _raw_post(server, token, body, len(body) - 5000, then_close=True)
    assert shorter.startswith(b"HTTP/1.1 400")
    _raw_post(server, token, body[:len(body) // 2], len(body), then_close=True)  # the sender gives up half-way
    assert instances(server) == before
    still_serving(server, token)


def test_an_instance_of_another_study_than_the_urls_is_refused(vault):
    server, token, ct, mr = vault
    before = instances(server)
    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    wrong = server.post(f"/dicom-web/studies/{study}", token, multipart([as_sent(mr[0])]), MULTIPART)
    assert wrong.status_code == 409 and failures(wrong) == [OTHER_STUDY]
    mixed = server.post(f"/dicom-web/studies/{study}", token, multipart([as_sent(mr[0]), as_sent(ct[1])]), MULTIPART)
    assert mixed.status_code == 202 and failures(mixed) == [OTHER_STUDY]
    assert mixed.json()["00081190"]["Value"] == [f"{server.url}/studies/{study}"]
    assert instances(server) == before + 1
    still_serving(server, token)


def test_a_body_over_the_limit_is_413(vault):
    server, token, ct, _ = vault
    huge = (16384 << 20) + 1
    answer = _raw_post(server, token, b"", huge, then_close=True)
    assert answer.startswith(b"HTTP/1.1 413")
    still_serving(server, token)


def test_a_full_disk_is_507_stores_nothing_and_stores_again_when_space_returns(tmp_path, ct_files):
    with small_volume(tmp_path / "small", "2m") as mount:
        home = mount / "home"
        run_cli("init", home=home)
        token = add_token(home, "modality", "store,query")
        server = WebServer(home).start()
        try:
            body = multipart([as_sent(p) for p in ct_files[:6]])
            full = server.post("/dicom-web/studies", token, body, MULTIPART)
            assert full.status_code in (507, 202), full.text
            assert OUT_OF_RESOURCES in failures(full)
            stored = len(full.json().get("00081199", {}).get("Value", []))
            assert instances(server) == stored
            still_serving(server, token)
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
            again = server.post("/dicom-web/studies", token, body, MULTIPART)
            assert again.status_code == 200
        finally:
            server.stop()
        assert instances(server) == 6
        assert run_cli("fsck", home=home).returncode == 0
        assert run_cli("audit", "verify", home=home).returncode == 0
