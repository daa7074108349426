"""The backend contract (backends/base.py), run against every backend: filesystem, LTFS
cartridges (directories), S3 (a real SeaweedFS on 127.0.0.1). Then what is particular to
tape and S3, and the retry and rate-limit wrappers with an injected clock."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from appliance.backends import unwrap
from appliance.backends.filesystem import FilesystemBackend
from appliance.backends.ltfs import Cartridge, LtfsBackend
from appliance.backends.wrappers import RateLimitedBackend, RetryingBackend, TokenBucket
from appliance.config import S3Config
from appliance.errors import BlobMissing, CartridgeOffline, OutOfSpace, TierUnavailable
from conftest import load_cartridge, new_bucket, small_volume


def _s3(endpoint, bucket, **settings):
    from appliance.backends.s3 import S3Backend

    credentials = Path(tempfile.mkdtemp()) / "s3-credentials"
    credentials.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test-secret\n")
    settings = {"timeout_s": 5, "part_size_mb": 5, **settings}
    return S3Backend("s3", S3Config(bucket=bucket, endpoint_url=endpoint, credentials_file=str(credentials),
                                    **settings))


@pytest.fixture(params=["filesystem", "ltfs", "s3"])
def backend(request, tmp_path):
    if request.param == "filesystem":
        return FilesystemBackend("disk", tmp_path / "disk")
    if request.param == "ltfs":
        for label in ("PV0001L9", "PV0002L9"):
            load_cartridge(tmp_path / label, label)
        return LtfsBackend("tape", [Cartridge(label, tmp_path / label, 10**9) for label in ("PV0001L9", "PV0002L9")])
    server = request.getfixturevalue("s3_server")
    return _s3(server.endpoint, new_bucket(server))


def test_put_get_size_list_delete(backend):
    backend.check()  # reachable: says nothing
    data = os.urandom(300_000)
    backend.put("aa11aa11", io.BytesIO(data))
    backend.put("bb22bb22", io.BytesIO(b"x"))
    with backend.open("aa11aa11") as fp:
        assert fp.read() == data
    with backend.open("aa11aa11") as fp:  # idempotent get, seekable
        fp.seek(1000)
        assert fp.read(10) == data[1000:1010]
        fp.seek(-5, io.SEEK_END)
        assert fp.read() == data[-5:]
    assert backend.size("aa11aa11") == len(data)
    assert sorted(backend.list()) == ["aa11aa11", "bb22bb22"]
    backend.put("aa11aa11", io.BytesIO(b"replaced"))
    with backend.open("aa11aa11") as fp:
        assert fp.read() == b"replaced"
    backend.delete("aa11aa11")
    backend.delete("aa11aa11")  # idempotent
    assert sorted(backend.list()) == ["bb22bb22"]
    with pytest.raises(BlobMissing):
        backend.open("aa11aa11")
    with pytest.raises(BlobMissing):
        backend.size("aa11aa11")
    assert backend.read_order(["bb22bb22"]) == ["bb22bb22"]


def test_a_failed_put_leaves_nothing(backend):
    class Failing(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 100_000:
                raise OSError("source disk failed")
            return super().read(n)

    with pytest.raises(OSError):
        backend.put("cc33cc33", Failing(os.urandom(400_000)))
    assert "cc33cc33" not in set(backend.list())
    with pytest.raises(BlobMissing):
        backend.size("cc33cc33")


def test_names_are_checked(backend):
    for bad in ("../etc", "A1", "", "1.2.840.10008"):
        with pytest.raises(ValueError):
            backend.put(bad, io.BytesIO(b"x"))


# -- tape -------------------------------------------------------------------------------------

def _tape(tmp_path, capacity=1_000_000, labels=("PV0001L9", "PV0002L9")):
    return LtfsBackend("tape", [Cartridge(label, tmp_path / label, capacity) for label in labels])


def test_a_full_cartridge_moves_on_to_the_next(tmp_path):
    tape = _tape(tmp_path)
    for label in ("PV0001L9", "PV0002L9"):
        load_cartridge(tmp_path / label, label)
    for number in range(3):
        tape.put(f"{number:04x}", io.BytesIO(os.urandom(400_000)))
    assert [tape.locate(f"{n:04x}") for n in range(3)] == ["PV0001L9", "PV0001L9", "PV0002L9"]
    tape.put("0003", io.BytesIO(os.urandom(400_000)))
    with pytest.raises(OutOfSpace, match="every cartridge of tier tape is full"):
        tape.put("0004", io.BytesIO(os.urandom(400_000)))
    assert "0004" not in set(tape.list())


def test_an_unloaded_cartridge_is_named(tmp_path):
    tape = _tape(tmp_path)
    load_cartridge(tmp_path / "PV0001L9", "PV0001L9")
    load_cartridge(tmp_path / "PV0002L9", "PV0002L9")
    tape.put("00aa", io.BytesIO(b"on the second" * 1000))
    tape.put("00f0", io.BytesIO(os.urandom(900_000)))  # the first cartridge is nearly full
    tape.put("00bb", io.BytesIO(os.urandom(200_000)))
    assert tape.locate("00bb") == "PV0002L9"
    os.rename(tmp_path / "PV0002L9", tmp_path / "unmounted")
    with pytest.raises(CartridgeOffline) as raised:
        tape.open("00bb")
    assert raised.value.label == "PV0002L9" and "load one of: PV0002L9" in str(raised.value)
    with pytest.raises(CartridgeOffline):
        tape.delete("00bb")  # cannot delete what is not loaded: the caller lists it for later
    # A different cartridge in the drive is not the one asked for.
    load_cartridge(tmp_path / "PV0002L9", "PV0099L9")
    with pytest.raises(CartridgeOffline):
        tape.open("00bb")
    with pytest.raises(CartridgeOffline, match="load PV0002L9"):
        tape.put("00cc", io.BytesIO(os.urandom(200_000)))
    tape.check()  # one cartridge loaded: the tier can be reached
    os.rename(tmp_path / "PV0001L9", tmp_path / "unmounted-too")
    with pytest.raises(CartridgeOffline, match="no cartridge of tier tape is loaded; load one of: PV0001L9, PV0002L9"):
        tape.check()


def test_reads_go_in_on_tape_order(tmp_path):
    tape = _tape(tmp_path, capacity=10**9)
    for label in ("PV0001L9", "PV0002L9"):
        load_cartridge(tmp_path / label, label)
    names = [f"{n:04x}" for n in range(6)]
    for name in names:
        tape.put(name, io.BytesIO(name.encode()))
    # Without the LTFS attribute: write order (and `os.utime` shows the order is not by name).
    for number, name in enumerate(names):
        os.utime(tmp_path / "PV0001L9" / "packs" / name, ns=(10**18 - number, 10**18 - number))
    assert tape.read_order(names) == list(reversed(names))
    # With LTFS's startblock attribute, the tape position decides.
    blocks = {name: (number * 7919) % 13 for number, name in enumerate(names)}
    try:
        for name, block in blocks.items():
            os.setxattr(tmp_path / "PV0001L9" / "packs" / name, "user.ltfs.startblock", str(block).encode())
    except OSError:
        pytest.skip("this file system has no user extended attributes")
    assert tape.read_order(names) == sorted(names, key=blocks.get)


def test_an_empty_ltfs_mount_is_labelled_on_first_use(tmp_path):
    mount = tmp_path / "drive0"
    with small_volume(mount, "4m"):
        tape = LtfsBackend("tape", [Cartridge("PV0007L9", mount, 10**9)])
        tape.put("0001", io.BytesIO(b"first pack"))
        assert tape.locate("0001") == "PV0007L9"
        assert "PV0007L9" in (mount / "PACS-VAULT-CARTRIDGE").read_text()
    # An unmounted (empty, not mounted) mount point is never written to.
    tape = LtfsBackend("tape", [Cartridge("PV0007L9", mount, 10**9)])
    with pytest.raises(CartridgeOffline):
        tape.put("0002", io.BytesIO(b"x"))
    assert os.listdir(mount) == []


# -- S3 ---------------------------------------------------------------------------------------

def test_s3_multipart_upload_round_trips(s3_server):
    s3 = _s3(s3_server.endpoint, new_bucket(s3_server))
    data = os.urandom(12 << 20)  # above the 5 MB part size: three checked parts
    s3.put("00ff", io.BytesIO(data))
    with s3.open("00ff") as fp:
        assert fp.read() == data
    head = s3_server.client().head_object(Bucket=s3.settings.bucket, Key="pacs-vault/00ff")
    assert head["ContentLength"] == len(data)


def test_s3_storage_class_is_applied(s3_server):

    bucket = new_bucket(s3_server)
    s3 = _s3(s3_server.endpoint, bucket, storage_class="STANDARD_IA")
    s3.put("0a", io.BytesIO(b"cold"))
    head = s3_server.client().head_object(Bucket=bucket, Key="pacs-vault/0a")
    assert head["StorageClass"] == "STANDARD_IA"


def test_an_s3_server_that_is_down_means_retry_later():
    from s3server import free_ports

    port = free_ports(1)[0]  # nothing listens there
    s3 = _s3(f"http://127.0.0.1:{port}", "nowhere", timeout_s=2)
    for call in (lambda: s3.put("01", io.BytesIO(b"x")), lambda: s3.open("01"), lambda: s3.size("01"),
                 lambda: list(s3.list()), lambda: s3.delete("01"), s3.check):
        with pytest.raises(TierUnavailable, match="unreachable"):
            call()


def test_a_missing_bucket_is_a_tier_that_cannot_be_reached(s3_server):
    with pytest.raises(TierUnavailable, match="bucket never-created does not exist"):
        _s3(s3_server.endpoint, "never-created").check()


def test_s3_credentials_never_appear_in_errors(s3_server, tmp_path):
    from appliance.backends.s3 import S3Backend

    creds = tmp_path / "creds"
    creds.write_text("[default]\naws_access_key_id = AKIDCANARY\naws_secret_access_key = SECRETCANARY\n")
    s3 = S3Backend("s3", S3Config(bucket="no-such-bucket-here", endpoint_url=s3_server.endpoint,
                                  credentials_file=str(creds)))
    with pytest.raises((TierUnavailable, BlobMissing)) as raised:
        s3.size("0b")
    assert "CANARY" not in str(raised.value)


def test_a_credentials_file_that_is_missing_or_malformed_makes_the_tier_unreachable(tmp_path):
    from appliance.backends.s3 import S3Backend

    creds = tmp_path / "creds"
    for text, problem in ((None, "credentials file not found"), ("aws_access_key_id = AKIDCANARY\n", "not an INI file"),
                          ("[other]\n", "no [default] section"),
                          ("[default]\naws_access_key_id = AKIDCANARY\n", "has no aws_secret_access_key")):
        creds.unlink(missing_ok=True)
        if text is not None:
            creds.write_text(text)
        with pytest.raises(TierUnavailable, match=re.escape(problem)) as raised:
            S3Backend("s3", S3Config(bucket="b", endpoint_url="http://127.0.0.1:9", credentials_file=str(creds)))
        assert "CANARY" not in str(raised.value)


# -- wrappers ---------------------------------------------------------------------------------

class _Flaky:
    name = "flaky"

    def __init__(self, failures: int, error=TierUnavailable):
        self.failures, self.error, self.calls, self.stored = failures, error, 0, {}

    def put(self, name, src):
        self.calls += 1
        data = src.read()
        if self.calls <= self.failures:
            raise self.error("timeout") if self.error is TierUnavailable else self.error("x", "PV1")
        self.stored[name] = data

    def open(self, name):
        return io.BytesIO(self.stored[name])


def test_retries_back_off_and_resend_the_whole_object():
    sleeps = []
    inner = _Flaky(2)
    RetryingBackend(inner, 3, base_delay=0.5, sleep=sleeps.append).put("01", io.BytesIO(b"all of it"))
    assert inner.stored["01"] == b"all of it" and sleeps == [0.5, 1.0]
    with pytest.raises(TierUnavailable):
        RetryingBackend(_Flaky(5), 3, sleep=sleeps.append).put("02", io.BytesIO(b"x"))


def test_an_unloaded_cartridge_is_not_retried():
    sleeps = []
    inner = _Flaky(1, CartridgeOffline)
    with pytest.raises(CartridgeOffline):
        RetryingBackend(inner, 3, sleep=sleeps.append).put("01", io.BytesIO(b"x"))
    assert inner.calls == 1 and sleeps == []


def test_a_rate_limited_put_that_is_retried_sends_the_whole_object_again():
    """The throttle reads the caller's file; a failed attempt must leave it open for the next."""
    inner = _Flaky(1)
    src = io.BytesIO(b"all of it")
    RetryingBackend(RateLimitedBackend(inner, 1e6), 3, sleep=lambda s: None).put("01", src)
    assert inner.stored["01"] == b"all of it" and not src.closed


def test_unwrap_finds_the_backend_under_any_stack_of_wrappers(tmp_path):
    tape = _tape(tmp_path)
    for stack in (tape, RetryingBackend(tape, 3), RateLimitedBackend(tape, 1e6),
                  RetryingBackend(RateLimitedBackend(RetryingBackend(tape, 1), 1e6), 3)):
        assert unwrap(stack, LtfsBackend) is tape
    with pytest.raises(TypeError, match="no FilesystemBackend under RetryingBackend"):
        unwrap(RetryingBackend(tape, 3), FilesystemBackend)


def test_wrappers_check_once_without_retrying(tmp_path):
    sleeps = []
    stack = RetryingBackend(RateLimitedBackend(FilesystemBackend("cold", tmp_path / "gone", create=False), 1e6), 3,
                            sleep=sleeps.append)
    with pytest.raises(TierUnavailable, match="not mounted"):
        stack.check()
    assert sleeps == []


def test_token_bucket_holds_the_rate():
    clock, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    bucket = TokenBucket(1_000_000, clock=lambda: clock[0], sleep=sleep)
    for _ in range(50):
        bucket.take(100_000)  # 5 MB at 1 MB/s
    assert clock[0] == pytest.approx(4.0)  # the first second's burst, then 1 MB/s
    clock[0] += 100  # idle time does not bank more than one second
    before = clock[0]
    for _ in range(20):
        bucket.take(100_000)
    assert clock[0] - before == pytest.approx(1.0)


def test_rate_limited_reads_and_writes_are_counted():
    clock = [0.0]
    bucket = TokenBucket(1000, clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    inner = _Flaky(0)
    limited = RateLimitedBackend(inner, 1000, bucket=bucket)
    limited.put("01", io.BytesIO(b"x" * 5000))
    assert inner.stored["01"] == b"x" * 5000 and clock[0] == pytest.approx(4.0)
    with limited.open("01") as fp:
        assert fp.read() == b"x" * 5000
    assert clock[0] == pytest.approx(9.0)


def test_a_partly_laid_out_filesystem_tier_is_completed(tmp_path):
    """A tier directory filled by hand or by a restore (only some fan-out directories)."""
    (tmp_path / "tier" / "ff" / "ee").mkdir(parents=True)
    (tmp_path / "tier" / "ff" / "ee" / "ffee0000aa").write_bytes(b"restored")
    tier = FilesystemBackend("cold", tmp_path / "tier", create=False)
    assert list(tier.list()) == ["ffee0000aa"]
    tier.put("00110000bb", io.BytesIO(b"new"))
    assert sorted(tier.list()) == ["00110000bb", "ffee0000aa"]


def test_an_unmounted_cold_disk_means_retry_later(tmp_path):
    tier = FilesystemBackend("cold", tmp_path / "not-mounted", create=False)
    for call in (lambda: tier.put("00aa00aa", io.BytesIO(b"x")), lambda: list(tier.list()),
                 lambda: tier.open("00aa00aa"), tier.check):
        with pytest.raises(TierUnavailable, match="not mounted"):
            call()
    assert not (tmp_path / "not-mounted").exists()  # nothing written on the root file system


def test_sweeping_incoming_keeps_live_writers_and_removes_the_dead_a_zombie_and_a_reused_pid(tmp_path):
    hot = FilesystemBackend("hot", tmp_path / "hot")
    hot.put("ab" * 16, io.BytesIO(b"x"))  # makes the tier and its .incoming/
    incoming = tmp_path / "hot" / ".incoming"
    own = incoming / f"{'01' * 16}.{os.getpid()}.tmp"
    writer = subprocess.Popen(["sleep", "60"])  # a live writer, started before it wrote its file
    zombie = subprocess.Popen(["true"])  # dead, not reaped yet: kill(pid, 0) still succeeds
    while not Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        time.sleep(0.01)
    live, dead = incoming / f"{'02' * 16}.{writer.pid}.tmp", incoming / f"{'03' * 16}.{zombie.pid}.tmp"
    gone = incoming / f"{'04' * 16}.999999999.tmp"
    reused = incoming / f"{'05' * 16}.{writer.pid}.tmp"  # last written before that process started
    for path in (own, live, dead, gone, reused):
        path.write_bytes(b"partial")
    os.utime(reused, (time.time() - 3600, time.time() - 3600))
    try:
        assert hot.sweep_incoming() == 3
        assert sorted(p.name for p in incoming.iterdir()) == sorted([own.name, live.name])
    finally:
        writer.kill()
        writer.wait()
        zombie.wait()
