"""The secure local cluster's CA: certificates that verify as Kafka and its clients need, keys that only their
owner can read, and reuse until a certificate nears its end."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from streamml.tlsca import TlsFiles, ensure_tls, write_private_file

KEYS = ("ca.key", "broker.key", "admin.key")
EVERYTHING = ("ca.pem", *KEYS, "broker.pem", "admin.pem")


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return ensure_tls(tmp_path / "tls")


def chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def contents(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in EVERYTHING}


def test_broker_chain_verifies_as_a_server_on_loopback_and_as_a_client(tls: TlsFiles) -> None:
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    leaf, *intermediates = chain(tls.broker_cert)
    assert intermediates == [ca]  # the file is the chain a TLS peer is sent: leaf, then CA
    policy = PolicyBuilder().store(Store([ca]))

    for name in (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")):
        policy.build_server_verifier(name).verify(leaf, intermediates)
    # Every node is also the client of the others on the INTERNAL and CONTROLLER listeners.
    policy.build_client_verifier().verify(leaf, intermediates)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_admin_certificate_is_a_client_certificate_only(tls: TlsFiles) -> None:
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    leaf, *intermediates = chain(tls.admin_cert)

    # (cryptography's verifier follows the web PKI, which wants a SAN on client certificates too; OpenSSL, as
    # Kafka's clients use it, does not: test_openssl_accepts_mutual_tls_... verifies it that way.)
    assert intermediates == [ca]
    leaf.verify_directly_issued_by(ca)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_subjects_are_the_principals_in_super_users(tls: TlsFiles) -> None:
    """Kafka names a TLS peer by its subject DN: anything beyond the CN would change the principal."""
    assert chain(tls.broker_cert)[0].subject.rfc4514_string() == "CN=streamml-broker"
    assert chain(tls.admin_cert)[0].subject.rfc4514_string() == "CN=streamml-admin"


def test_broker_certificate_names_loopback(tls: TlsFiles) -> None:
    leaf = chain(tls.broker_cert)[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]


def test_keys_are_unencrypted_pkcs8_p256_matching_their_certificates(tls: TlsFiles) -> None:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    for cert_path, key_path in (
        (tls.ca_cert, tls.ca_key),
        (tls.broker_cert, tls.broker_key),
        (tls.admin_cert, tls.admin_key),
    ):
        pem = key_path.read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        cert = chain(cert_path)[0]
        assert cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def test_validity_is_two_years_for_the_ca_and_one_for_leaves(tls: TlsFiles) -> None:
    def days(cert: x509.Certificate) -> float:
        return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400

    assert 729 < days(chain(tls.ca_cert)[0]) < 731
    assert 364 < days(chain(tls.broker_cert)[0]) < 366
    assert 364 < days(chain(tls.admin_cert)[0]) < 366
    ca = chain(tls.ca_cert)[0]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_and_their_folder_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not open them up
    try:
        tls = ensure_tls(tmp_path / "tls")
    finally:
        os.umask(old)

    assert stat.S_IMODE(tls.root.stat().st_mode) == 0o700
    for name in KEYS:
        assert stat.S_IMODE((tls.root / name).stat().st_mode) == 0o600, name
    assert not list(tls.root.glob(".*.tmp"))


def test_private_files_are_created_owner_only_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created with mode 0600 by open(2) itself, not chmod-ed afterwards: never world-readable briefly."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), mode))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", recording_open)
    ensure_tls(tmp_path / "tls")

    key_writes = [(path, mode) for path, mode in created if ".key." in Path(path).name]
    assert len(key_writes) == len(KEYS)
    assert all(mode == 0o600 for _, mode in key_writes)


def test_write_private_file_replaces_a_readable_file_with_an_owner_only_one(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)

    write_private_file(path, b"new")

    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_second_call_reuses_everything(tmp_path: Path) -> None:
    first = contents(ensure_tls(tmp_path / "tls").root)
    second = contents(ensure_tls(tmp_path / "tls").root)
    assert second == first


def test_a_missing_leaf_key_remakes_only_that_certificate(tmp_path: Path) -> None:
    folder = ensure_tls(tmp_path / "tls").root
    before = contents(folder)
    (folder / "admin.key").unlink()

    after = contents(ensure_tls(folder).root)

    changed = {name for name in EVERYTHING if after[name] != before[name]}
    assert changed == {"admin.key", "admin.pem"}


def test_leaves_expiring_within_30_days_are_renewed_under_the_same_ca(tmp_path: Path) -> None:
    folder = ensure_tls(tmp_path / "tls").root
    before = contents(folder)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=340)  # leaves end in ~25 days, the CA in ~390

    ensure_tls(folder, now=later)
    after = contents(folder)

    assert after["ca.pem"] == before["ca.pem"]
    assert after["broker.pem"] != before["broker.pem"]
    assert after["admin.pem"] != before["admin.pem"]
    assert chain(folder / "broker.pem")[0].not_valid_after_utc > later + dt.timedelta(days=300)


def test_a_ca_near_its_end_is_remade_with_new_leaves(tmp_path: Path) -> None:
    folder = ensure_tls(tmp_path / "tls").root
    before = contents(folder)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=710)

    ensure_tls(folder, now=later)
    after = contents(folder)

    assert all(after[name] != before[name] for name in EVERYTHING)
    ca = x509.load_pem_x509_certificate(after["ca.pem"])
    chain(folder / "broker.pem")[0].verify_directly_issued_by(ca)


def test_leaves_of_another_ca_are_replaced(tmp_path: Path) -> None:
    folder = ensure_tls(tmp_path / "tls").root
    other = ensure_tls(tmp_path / "other").root
    (folder / "ca.pem").write_bytes((other / "ca.pem").read_bytes())
    write_private_file(folder / "ca.key", (other / "ca.key").read_bytes())

    ensure_tls(folder)

    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    for name in ("broker.pem", "admin.pem"):
        chain(folder / name)[0].verify_directly_issued_by(ca)


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    yield left, right
    left.close()
    right.close()


def test_openssl_accepts_mutual_tls_between_broker_and_admin(
    tls: TlsFiles, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    """The same handshake the INTERNAL listener does, by OpenSSL's strict X.509 rules (as librdkafka and
    Python's ssl use them)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.broker_cert, tls.broker_key)
    server_ctx.load_verify_locations(tls.ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    client_ctx.load_cert_chain(tls.admin_cert, tls.admin_key)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    peer_seen_by_server: list[object] = []
    errors: list[BaseException] = []

    def serve(sock: socket.socket) -> None:
        try:
            with server_ctx.wrap_socket(sock, server_side=True) as conn:
                peer_seen_by_server.append(conn.getpeercert())
                conn.sendall(b"ok")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    server_sock, client_sock = socket_pair
    thread = threading.Thread(target=serve, args=(server_sock,))
    thread.start()
    with client_ctx.wrap_socket(client_sock, server_hostname="127.0.0.1") as conn:
        assert conn.recv(2) == b"ok"
        assert conn.getpeercert()["subject"] == ((("commonName", "streamml-broker"),),)
    thread.join(10)

    assert errors == []
    assert peer_seen_by_server[0]["subject"] == ((("commonName", "streamml-admin"),),)  # type: ignore[index]
