"""Orthanc as a real peer for the interop tests: started on free loopback ports with the options
a test needs, stopped after."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from support.dicom_server import free_port, wait_for_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class OrthancPeer:
    def __init__(self, work: Path, vault_port: int, **settings):
        """`settings`: Orthanc configuration options beside (or over) the ones every test needs."""
        self.http, self.dicom = free_port(), free_port()
        config = {
            "Name": "interop", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": True, "Plugins": [],
            "DicomModalities": {"vault": ["ARCHIVE", "127.0.0.1", vault_port]}, **settings,
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


needs_orthanc = pytest.mark.skipif(not Path(ORTHANC).exists(
), reason="Orthanc (Debian package orthanc) is not installed")
