"""A real `appliance serve` with its DICOMweb front for the tests, tokens, and clients of it."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from conftest import run_cli
from support.dicom_server import Server, free_port, wait_for_port


class WebServer(Server):
    """`appliance serve --dicomweb-port N`: the DICOM front on `port`, DICOMweb on `web_port`."""

    def __init__(self, home: Path, extra: tuple[str, ...] = ()):
        self.web_port = free_port()
        super().__init__(home, extra=("--dicomweb-port", str(self.web_port), *extra))

    def start(self) -> "WebServer":
        super().start()
        wait_for_port(self.web_port, self.process)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/dicom-web"

    def client(self, token: str | None) -> DICOMwebClient:
        return DICOMwebClient(self.url, headers={"Authorization": f"Bearer {token}"} if token else None)

    def get(self, path: str, token: str | None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.get(f"http://127.0.0.1:{self.web_port}{path}", headers=headers, timeout=120, **kwargs)

    def post(self, path: str, token: str | None, body, content_type: str, **kwargs) -> requests.Response:
        headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
        headers.update(kwargs.pop("headers", {}))
        return requests.post(f"http://127.0.0.1:{self.web_port}{path}", data=body, headers=headers, timeout=120,
                             **kwargs)


def add_token(home: Path, name: str, roles: str) -> str:
    """`appliance token add`: the token is the last line it prints."""
    return run_cli("token", "add", name, "--roles", roles, home=home).stdout.strip().splitlines()[-1]


BOUNDARY = "pacs-vault-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(parts: list[bytes], boundary: str = BOUNDARY, part_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode()


def as_sent(path: Path) -> bytes:
    """The bytes dicomweb-client sends for a file (pydicom.dcmwrite of the data set read)."""
    out = io.BytesIO()
    pydicom.dcmwrite(out, pydicom.dcmread(path))
    return out.getvalue()
