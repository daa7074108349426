"""Shared fixtures: a fresh appliance home, the CLI as a real subprocess, DICOM test files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # corpus.py: generated studies

from appliance import config as cfg  # noqa: E402
from appliance import home as home_mod  # noqa: E402


def dicom_test_files() -> list[Path]:
    """Every file shipped by pydicom's and pydicom-data's test data (DICOM or not)."""
    import data_store
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    home_mod.init(path)
    return path


@pytest.fixture
def config(home) -> cfg.Config:
    return cfg.load(home)


def run_cli(*args: str, home: Path | None = None, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `appliance` command as a user would."""
    command = [sys.executable, "-m", "appliance"]
    if home is not None:
        command += ["--home", str(home)]
    result = subprocess.run(command + list(args), capture_output=True, text=True, cwd=REPO, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def ct_files(tmp_path_factory) -> list[Path]:
    """A generated CT study (512x512, 16-bit), shared read-only by the session."""
    import corpus

    return corpus.ct_study(tmp_path_factory.mktemp("ct"), 12)


def tree_bytes(root: Path, skip: tuple[str, ...] = ()) -> bytes:
    """All bytes of all files under root, except paths containing a `skip` part."""
    out = bytearray()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part in skip for part in path.parts):
            out += path.read_bytes()
    return bytes(out)


os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
