"""Bad days on the network: while other loopback addresses throw junk at the server (random
bytes, malformed PDUs from hypothesis, slow senders, idle connections, an association
flood), a registered AE goes on echoing and storing. Every echo is answered within a
second, every store is acknowledged and retrievable, and once the attack stops no
descriptor or thread is left behind and the server's memory stayed bounded."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import make_study, run_cli, set_config
from support.dicom_server import CLIENT_AE, Server, free_port, register
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from appliance.admin import home as home_mod
from appliance.dicom.negotiation import Proposed
from appliance.dicom.pynetdicom_glue import encode_associate_rq

FLOODER = "FLOODER"
VERIFICATION = "1.2.840.10008.1.1"


def _connect(port: int, source: str, timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _request(calling: str = CLIENT_AE) -> bytes:
    return encode_associate_rq(calling_ae=calling, called_ae="ARCHIVE", contexts=[Proposed(1, VERIFICATION,
                               ("1.2.840.10008.1.2",))], max_pdu=16384, implementation_uid="1.2.3.4",
                               implementation_version="HOSTILE")


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _answer(sock: socket.socket) -> bytes:
    """The server's first PDU header (b"" when it just hangs up). An association it accepted
    (something that decodes from a registered AE) is aborted again."""
    data = b""
    try:
        while len(data) < 6 and (chunk := sock.recv(6 - len(data))):
            data += chunk
        if data[:1] == b"\x02":
            sock.sendall(struct.pack(">BBI", 7, 0, 4) + bytes(4))
    except (ConnectionResetError, BrokenPipeError, socket.timeout, TimeoutError):
        pass
    return data


class Attack:
    """Background attackers, each from its own loopback address, until stopped."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.open_floods = 0
        self.most_floods = 0  # flooder associations open at once, at the most

    def run(self, target, *args) -> None:
        thread = threading.Thread(target=self._forever, args=(target, *args), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _forever(self, target, *args) -> None:
        while not self.stop.is_set():
            try:
                target(*args)
            except OSError:
                time.sleep(0.05)  # refused at once: what a full lobby does

    def random_bytes(self, source: str) -> None:
        with _connect(self.port, source) as sock:
            sock.sendall(os.urandom(random.randint(1, 200)))
        time.sleep(0.02)

    def idle(self, source: str) -> None:
        sock = _connect(self.port, source)  # says nothing, until the server drops it
        _answer(sock)
        sock.close()

    def slow(self, source: str) -> None:
        with _connect(self.port, source) as sock:
            for byte in _request():
                sock.send(bytes([byte]))
                if self.stop.wait(0.5):
                    return

    def flood(self, source: str) -> None:
        """Associations of a registered AE from one address, held open as long as the server lets it."""
        with _connect(self.port, source) as sock:
            sock.sendall(_request(FLOODER))
            if _exactly(sock, 6)[:1] == b"\x02":
                with self._lock:
                    self.open_floods += 1
                    self.most_floods = max(self.most_floods, self.open_floods)
                self.stop.wait(30)
                with self._lock:
                    self.open_floods -= 1
        time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


class Client:
    """The registered AE, echoing and storing from 127.0.0.1 all along."""

    def __init__(self, port: int, files: list[Path]):
        self.port, self.files = port, files
        self.echo_seconds: list[float] = []
        self.failures: list[str] = []
        self.stored: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import pydicom
        ae = AE(ae_title=CLIENT_AE)
        ae.add_requested_context(Verification)
        ae.add_requested_context(SecondaryCaptureImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        files = iter(self.files)
        while not self.stop.is_set():
            started = time.monotonic()
            assoc = ae.associate("127.0.0.1", self.port, ae_title="ARCHIVE")
            if not assoc.is_established:
                self.failures.append("association refused")
                continue
            status = assoc.send_c_echo()
            self.echo_seconds.append(time.monotonic() - started)
            if getattr(status, "Status", None) != 0:
                self.failures.append("echo failed")
            path = next(files, None)
            if path is not None:
                ds = pydicom.dcmread(path)
                if getattr(assoc.send_c_store(ds), "Status", None) == 0:
                    self.stored.append(ds.SOPInstanceUID)
                else:
                    self.failures.append(f"store of {path.name} failed")
            assoc.release()
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture(scope="module")
def under_attack(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    home_mod.init(home)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    register(home, FLOODER, free_port(), "store")
    # A short deadline before the A-ASSOCIATE-RQ, so that each junk example is over quickly.
    set_config(home, "association_request_timeout_s: 5", "association_request_timeout_s: 1")
    study, files = make_study(root / "study", 41, patient_id="PID-HOSTILE")
    srv = Server(home).start()
    pid = srv.process.pid
    # What an undisturbed server holds once it has stored (its journal's thread and files).
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    warm = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE")
    import pydicom
    assert warm.send_c_store(pydicom.dcmread(files[0])).Status == 0
    warm.release()
    files = files[1:]
    time.sleep(1)
    baseline = (_fds(pid), _threads(pid))
    attack = Attack(srv.port)
    attack.run(attack.random_bytes, "127.0.0.2")
    for _ in range(20):
        attack.run(attack.idle, "127.0.0.5")  # more than the lobby takes from one address
    for _ in range(4):
        attack.run(attack.slow, "127.0.0.4")
    for _ in range(12):
        attack.run(attack.flood, "127.0.0.6")  # more than one AE's slots
    client = Client(srv.port, files)
    yield srv, attack, client, study, baseline
    attack.close()
    client.close()
    srv.stop()


_HEADER = struct.Struct(">BBI")
_pdu_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda rq, cut, flip: rq[:cut] + bytes([rq[cut % len(rq)] ^ flip]) + rq[cut + 1:],
              st.just(_request()[6:]), st.integers(0, 400), st.integers(1, 255)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pdu_type=st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7, 9, 0xFF]), body=_pdu_bodies,
       length_lie=st.sampled_from([0, 0, 1, -1, 1000, 0xFFFFFFF0]))
def test_a_malformed_first_pdu_is_answered_or_dropped_at_once(under_attack, pdu_type, body, length_lie):
    """Anything but a well-formed A-ASSOCIATE-RQ first: an A-ABORT or A-ASSOCIATE-RJ, or the
    connection closed, within the lobby's deadline (5 s) and never a hang."""
    srv = under_attack[0]
    length = max(0, min(len(body) + length_lie, 0xFFFFFFFF)) if length_lie != 0xFFFFFFF0 else length_lie
    with _connect(srv.port, "127.0.0.3", timeout=8) as sock:
        started = time.monotonic()
        sock.sendall(_HEADER.pack(pdu_type, 0, length) + body)
        answer = _answer(sock)
        assert time.monotonic() - started < 7
    assert answer[:1] in (b"", b"\x02", b"\x03", b"\x07")
    assert srv.process.poll() is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(st.integers(0, 70000), st.sampled_from([0, 1, 3, 5, 255]),
                                st.integers(0, 255), st.binary(max_size=200)), min_size=1, max_size=4))
def test_malformed_messages_on_an_association_end_it_cleanly(under_attack, items):
    """A registered AE's association carrying PDVs with lying lengths, unknown contexts,
    reserved bits or a garbage command set: aborted or answered, and the server goes on."""
    srv = under_attack[0]
    with _connect(srv.port, "127.0.0.1", timeout=8) as sock:
        sock.sendall(_request())
        head = _exactly(sock, 6)
        assert head[:1] == b"\x02"
        _exactly(sock, struct.unpack(">I", head[2:])[0])  # the rest of the A-ASSOCIATE-AC
        body = b"".join(struct.pack(">IBB", length, context, control) + \
                        data for length, context, control, data in items)
        sock.sendall(_HEADER.pack(4, 0, len(body)) + body)
        answer = _answer(sock)
    assert srv.process.poll() is None
    assert answer == b"" or answer[0] in (2, 4, 7)


def test_the_registered_ae_was_served_throughout_and_nothing_is_left(under_attack, tmp_path):
    srv, attack, client, study, baseline = under_attack
    deadline = time.monotonic() + 60
    while len(client.stored) < 40 and time.monotonic() < deadline and not client.failures:
        time.sleep(0.2)
    held_by_flood = attack.most_floods
    attack.close()
    client.close()
    assert not client.failures, client.failures[:5]
    assert len(client.stored) == 40 and client.echo_seconds
    assert max(client.echo_seconds) < 1.0, sorted(client.echo_seconds)[-5:]
    assert 0 < held_by_flood <= 8  # the flooder got its AE's slots, never all of them
    out = tmp_path / "out"
    run_cli("export", study, str(out), home=srv.home)
    assert {p.stem for p in out.glob("*.dcm")} >= set(client.stored)
    pid = srv.process.pid
    deadline = time.monotonic() + 15  # the lobby drops what is left within its deadline
    while (_fds(pid), _threads(pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _fds(pid) <= baseline[0] and _threads(pid) <= baseline[1], ((_fds(pid), _threads(pid)), baseline)
    assert srv.peak_rss_kb() < 300 * 1024
    trail = run_cli("audit", "export", home=srv.home).stdout
    alerts = [line for line in trail.splitlines() if '"Security Alert"' in line and '"127.0.0.' in line]
    assert alerts and len(alerts) < 200  # counted per source and interval, not one per connection
