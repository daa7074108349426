"""DICOM over TLS with a client-certificate check: pynetdicom and dcmtk as clients."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.dicom_server import CLIENT_AE, Server, dataset_bytes, dcmtk, free_port, register
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet, Verification

from appliance import config as cfg
from appliance.audit.trail import AuditTrail


def _certificate(name: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, key, cert) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def pki(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs-vault test CA")])
    ca_cert = _certificate("pacs-vault test CA", ca_key, ca_name, ca_key, ca=True)
    _write(tmp_path / "ca", ca_key, ca_cert)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(tmp_path / name, key, _certificate(name, key, ca_name, ca_key, ca=False))
    return tmp_path


@pytest.fixture
def tls_server(home, pki):
    config = home / "appliance.yaml"
    text = config.read_text()
    text = text.replace('certificate: ""', f'certificate: {pki / "server.pem"}', 1)
    text = text.replace('private_key: ""', f'private_key: {pki / "server.key"}')
    text = text.replace('ca_certificates: ""', f'ca_certificates: {pki / "ca.pem"}')
    text = text.replace("require_client_certificate: false", "require_client_certificate: true")
    config.write_text(text)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    srv = Server(home).start()
    yield srv
    srv.stop()


def _client_context(pki, with_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if with_certificate:
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
    return context


def test_store_and_get_over_tls_byte_exact(tls_server, pki, ct_files):
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", tls_server.port, ae_title="ARCHIVE",
                         tls_args=(_client_context(pki), "127.0.0.1"),
                         ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(pydicom.dcmread(ct_files[0])).Status == 0x0000
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = pydicom.dcmread(ct_files[0]).StudyInstanceUID
    statuses = [s.Status for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000
    sop = pydicom.dcmread(ct_files[0]).SOPInstanceUID
    assert received == {sop: dataset_bytes(ct_files[0])}


def test_without_client_certificate_or_without_tls_no_association(tls_server, pki):
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(Verification)
    no_cert = ae.associate("127.0.0.1", tls_server.port, ae_title="ARCHIVE",
                           tls_args=(_client_context(pki, with_certificate=False), "127.0.0.1"))
    assert not no_cert.is_established
    plain = ae.associate("127.0.0.1", tls_server.port, ae_title="ARCHIVE")
    assert not plain.is_established
    tls_server.process.poll()
    assert tls_server.process.returncode is None  # still serving
    with_cert = ae.associate("127.0.0.1", tls_server.port, ae_title="ARCHIVE",
                             tls_args=(_client_context(pki), "127.0.0.1"))
    assert with_cert.is_established
    with_cert.release()
    # Both refusals are Security Alerts; the TLS association is recorded with the client's certificate.
    config = cfg.load(tls_server.home)
    records = list(AuditTrail(config.audit_dir, config.audit_key_file).records())
    alerts = [r for r in records if r["event"] == "Security Alert" and r["op"] == "association"]
    assert len(alerts) == 2 and all("TLS handshake failed" in r["detail"]["reason"] for r in alerts)
    assert all(r["host"] == "127.0.0.1" and r["outcome"] == 4 for r in alerts)
    login = next(r for r in records if r["event"] == "User Authentication")
    assert login["user"] == CLIENT_AE and login["detail"]["tls"] is True
    assert "commonName=client" in login["detail"]["certificate"]


def test_dcmtk_echo_over_tls(tls_server, pki):
    result = dcmtk("echoscu", "+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem"),
                   "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(tls_server.port), check=False)
    assert result.returncode == 0, result.stderr
    refused = dcmtk("echoscu", "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(tls_server.port), check=False)
    assert refused.returncode != 0
