"""SIGTERM drains the DICOMweb front: a STOW-RS whose body is still arriving when the signal comes
is read to its end, stored and answered; then the server exits cleanly, and what it acknowledged
is there after a restart."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pydicom

import corpus
from conftest import run_cli
from support.dicomweb import BOUNDARY, MULTIPART, WebServer, add_token

MEGABYTES = 24


def _staging(home: Path) -> bool:
    """A sealed blob is being written (the server is reading the body)."""
    incoming = home / "hot" / ".incoming"
    return incoming.exists() and any(incoming.iterdir())


def _response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the answer"
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def test_sigterm_lets_a_stow_in_flight_finish_and_store(home, tmp_path):
    big = corpus.multiframe(tmp_path / "big.dcm", MEGABYTES, patient_id="DRAIN1")
    uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    token = add_token(home, "modality", "store,query,retrieve")
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + big.read_bytes()
            + f"\r\n--{BOUNDARY}--\r\n".encode())
    server = WebServer(home).start()
    try:
        with socket.create_connection(("127.0.0.1", server.web_port), timeout=120) as sock:
            sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: Bearer {token}\r\nContent-Type: {MULTIPART}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode())
            half = len(body) // 2
            sock.sendall(body[:half])
            deadline = time.monotonic() + 60
            while not _staging(home):  # the request is being read: it is in flight
                assert time.monotonic() < deadline, "the server never started on the body"
                time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the signal is handled while the rest of the body is still to come
            sock.sendall(body[half:])
            status, answer = _response(sock)
        assert status == 200, answer[:500]
        stored = json.loads(answer)["00081199"]["Value"]
        assert [item["00081155"]["Value"][0] for item in stored] == [uid]
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    exported = tmp_path / "out"
    study = str(pydicom.dcmread(big, stop_before_pixels=True).StudyInstanceUID)
    run_cli("export", study, str(exported), home=home)
    assert (exported / f"{uid}.dcm").read_bytes() == big.read_bytes()
