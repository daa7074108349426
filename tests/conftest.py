"""Shared fixtures: a fresh appliance home, the CLI as a real subprocess, DICOM test files."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # corpus.py: generated studies

from appliance import config as cfg  # noqa: E402
from appliance.admin import home as home_mod  # noqa: E402


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


@pytest.fixture
def powercut(tmp_path):
    """A file system that loses what was not made durable when the test cuts the power
    (tests/support/powercut.py), mounted at `powercut.path`; skips where FUSE cannot be mounted."""
    from support.powercut import MountUnavailable, PowercutMount

    mount = PowercutMount(tmp_path / "powercut")
    try:
        mount.mount()
    except MountUnavailable as exc:
        pytest.skip(f"FUSE cannot be mounted here: {exc}")
    yield mount
    mount.unmount()


def sudo_env(person: str) -> dict:
    """The environment sudo gives a command it runs on behalf of `person`."""
    return {**os.environ, "SUDO_USER": person}


@contextmanager
def small_volume(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "2m") mounted at `path`: a disk that fills up, or a cartridge
    that can be unloaded. Skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def tree_bytes(root: Path, skip: tuple[str, ...] = ()) -> bytes:
    """All bytes of all files under root, except paths containing a `skip` part."""
    out = bytearray()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part in skip for part in path.parts):
            out += path.read_bytes()
    return bytes(out)


os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server on 127.0.0.1 for the whole session; tests use their own buckets."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


_BUCKETS = iter(range(1, 1 << 30))


def new_bucket(server) -> str:
    name = f"test-bucket-{os.getpid()}-{next(_BUCKETS)}"
    server.client().create_bucket(Bucket=name)
    return name


def add_tier(home: Path, name: str, text: str) -> None:
    """Write HOME/tiers/<name>.yaml."""
    (home / "tiers" / f"{name}.yaml").write_text(f"name: {name}\n" + text)


def s3_tier_yaml(server, bucket: str, **extra) -> str:
    """An S3 tier pointing at the test server, credentials in an INI file as an admin would keep them."""
    lines = ["kind: s3", "s3:", f"  bucket: {bucket}", f"  endpoint_url: {server.endpoint}",
             "  credentials_file: s3-credentials", "  timeout_s: 5"]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\nretries: 1\n"


def write_s3_credentials(home: Path) -> None:
    path = home / "s3-credentials"
    path.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test-secret\n")
    path.chmod(0o600)


def load_cartridge(path: Path, label: str) -> None:
    """What an operator's `ltfs` mount of a pacs-vault cartridge looks like: a directory with its label."""
    from appliance.backends.ltfs import LABEL_FILE, label_text

    path.mkdir(parents=True, exist_ok=True)
    (path / LABEL_FILE).write_text(label_text(label))


TAPE_TIER = "kind: ltfs\ncartridges:\n  - {label: PV0001L9, path: cartridges/PV0001L9, capacity_mb: 1000}\nretries: 0\n"


def everything_to_tape(home: Path, recall_wait_s: int) -> None:
    """A tape tier "tape" with cartridge PV0001L9 loaded (HOME/cartridges/PV0001L9), a policy that
    moves every study to it at once, and recalls that wait `recall_wait_s` for a cartridge."""
    load_cartridge(home / "cartridges" / "PV0001L9", "PV0001L9")
    add_tier(home, "tape", TAPE_TIER)
    set_config(home, "recall_wait_s: 300", f"recall_wait_s: {recall_wait_s}")
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: all\n    retention: {keep_forever: true}\n"
        "    transitions:\n      - {after_days: 0, to: [tape]}\n")


def make_study(directory: Path, count: int = 3, *, study_date: str = "20260101", birth_date: str = "19700101",
               patient_id: str = "PID1", patient_name: str = "TEST^PATIENT", modality: str = "CT",
               pixels: int = 64) -> tuple[str, list[Path]]:
    """A small study with the attributes policies look at; returns (StudyInstanceUID, files)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(abs(hash(study_uid)) % 2**32)
    files = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, birth_date
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.Modality = study_date, "120000", modality
        ds.InstanceNumber, ds.SeriesNumber = number, 1
        ds.Rows = ds.Columns = pixels
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (pixels, pixels), dtype=np.uint16).tobytes()
        path = directory / f"{study_uid}.{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, files


def prometheus_samples(text: str) -> dict[tuple, float]:
    """{(name, frozenset(labels)): value}, parsed as Prometheus parses it."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def set_config(home: Path, old: str, new: str) -> None:
    """Change one setting of HOME/appliance.yaml as an admin would with an editor."""
    path = home / "appliance.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
