"""Running `appliance serve` as a real process for the DICOM tests, and dcmtk beside it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, dicom_test_files, run_cli
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset

from appliance.errors import InvalidInstance
from appliance.format import p10

DCMTK = Path("/usr/bin")  # dcmtk's tools: the venv's pynetdicom apps use the same names
CLIENT_AE = "TESTSCU"
DEST_AE = "TESTDEST"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"server exited with {process.returncode}: {output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"server did not listen on {port}")


class Server:
    """`appliance serve` in a subprocess; stderr goes to a log file the test can read (in the
    home, or in `log_dir`: a home on the power-cut mount must not hold the test's own files)."""

    def __init__(self, home: Path, port: int | None = None, extra: tuple[str, ...] = (),
                 log_dir: Path | None = None):
        self.home = home
        self.extra = extra
        self.port = port or free_port()
        self.log = (log_dir or home) / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--home",
                str(self.home), "serve", "--port", str(self.port), *self.extra],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), cwd=REPO)
        with open(self.log) as log:
            self.process.stderr = log  # for wait_for_port's message
            wait_for_port(self.port, self.process)
        self.process.stderr = None
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    def peak_rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")


def dcmtk(tool: str, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run([str(DCMTK / tool), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def register(home: Path, ae_title: str, port: int, roles: str) -> None:
    run_cli("ae", "add", ae_title, "127.0.0.1", str(port), "--roles", roles, home=home)


def retrieving_home(root: Path, move_destination_port: int | None = None) -> Path:
    """A new home, root/home, where CLIENT_AE may store, query and retrieve; DEST_AE listening on
    `move_destination_port` is registered as a C-MOVE destination when given."""
    from appliance.admin import home as home_mod

    home = root / "home"
    home_mod.init(home)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    if move_destination_port is not None:
        register(home, DEST_AE, move_destination_port, "move-destination")
    return home


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file without its file meta: what travels in a C-STORE."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def storable(files):
    """(path, InstanceInfo) of every file the archive accepts that is a whole Part 10 file."""
    out = []
    for path in files:
        try:
            info = p10.inspect(path)
        except InvalidInstance:
            continue
        if info.has_file_meta and path.read_bytes()[128:132] == b"DICM":
            out.append((path, info))
    return out


def send_as_is(srv, files) -> None:
    """pynetdicom SCU sending the files' own bytes in their own syntax (what storescu cannot propose)."""
    from pynetdicom import _config
    ae = AE(ae_title=CLIENT_AE)
    for sop_class, syntax in sorted({(i.instance["SOPClassUID"], i.transfer_syntax) for _, i in files}):
        ae.add_requested_context(sop_class, [syntax])
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE")
        for path, _ in files:
            assert assoc.send_c_store(path).Status == 0x0000, path
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


# Corpus files in compressed syntaxes the archive can transcode (JPEG 2000 lossless and not, JPEG-LS,
# RLE, JPEG lossless and baseline; single and multi-frame, grey and colour, 8 to 32 bits), and one
# uncompressed; all of SOP classes pynetdicom's apps propose.
COMPRESSED_STUDY = ("MR_small_jp2klossless.dcm", "emri_small_jpeg_2k_lossless.dcm", "US1_J2KR.dcm", "MR2_J2KI.dcm",
                    "emri_small_jpeg_ls_lossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm",
                    "SC_rgb_rle_16bit_2frame.dcm", "rtdose_rle.dcm", "JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                    "CT_small.dcm")


def corpus_study(directory: Path, names=COMPRESSED_STUDY) -> list[Path]:
    """The corpus files `names` rewritten as one study of one patient (new Study, Series and SOP
    Instance UIDs: the corpus reuses some), each in its own transfer syntax, pixel data untouched."""
    import pydicom
    from pydicom.uid import generate_uid

    by_name = {}
    for path in dicom_test_files():
        by_name.setdefault(path.name, path)
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, paths = generate_uid(), []
    for number, name in enumerate(names, 1):
        ds = pydicom.dcmread(by_name[name])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "CORPUS1", "CORPUS^STUDY"
        paths.append(directory / f"{number:02d}-{name}")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths
