"""A private certificate authority for the secure local Kafka cluster: its CA, the brokers' and the
operator's certificates, made once in <home>/tls/ and reused while they stay valid."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streamml.errors import StreamMLError

logger = logging.getLogger(__name__)

CA_NAME = "StreamML local CA"
# Kafka names a TLS client by the RFC 2253 form of its certificate's subject: with only a CN in the subject
# these are the principals `User:CN=streamml-broker` and `User:CN=streamml-admin`.
BROKER_NAME = "streamml-broker"
ADMIN_NAME = "streamml-admin"
CA_DAYS = 730
LEAF_DAYS = 365
# A certificate that expires sooner than this is made anew at the next start.
RENEW_BEFORE = dt.timedelta(days=30)
# Clocks of the machine's processes may disagree a little; a certificate valid from "now" could be refused.
_BACKDATE = dt.timedelta(minutes=5)


class TlsError(StreamMLError):
    """The local CA or a certificate could not be made or read."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS material in one folder (the contents are never held here: keys stay on disk)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def broker_cert(self) -> Path:
        """Leaf + CA: every node's server certificate and its client certificate towards the other nodes."""
        return self.root / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker.key"

    @property
    def admin_cert(self) -> Path:
        return self.root / "admin.pem"

    @property
    def admin_key(self) -> Path:
        return self.root / "admin.key"

    def read_broker_pem(self) -> tuple[str, str]:
        """(key, chain) of the broker as PEM text, for a Kafka PEM keystore given inline."""
        try:
            return self.broker_key.read_text(), self.broker_cert.read_text()
        except OSError as exc:
            raise TlsError(f"cannot read the broker's key or certificate in {self.root}: {exc}") from exc


def ensure_tls(tls_dir: Path, now: dt.datetime | None = None) -> TlsFiles:
    """The CA and certificates in tls_dir: made if missing, damaged or expiring within 30 days, else reused.

    A new CA brings new leaf certificates (the old ones would no longer verify).
    """
    files = TlsFiles(tls_dir)
    now = now or dt.datetime.now(dt.UTC)
    _private_dir(tls_dir)
    ca = _load_valid(files.ca_cert, files.ca_key, now, issuer=None)
    if ca is None:
        ca = _make_ca(files, now)
        logger.info("Made a local certificate authority in %s", tls_dir)
    ca_cert, ca_key = ca
    broker = _load_valid(files.broker_cert, files.broker_key, now, issuer=ca_cert)
    if broker is None:
        _make_leaf(files.broker_cert, files.broker_key, BROKER_NAME, ca_cert, ca_key, now, server=True)
        logger.info("Made the broker certificate (CN=%s) in %s", BROKER_NAME, tls_dir)
    if _load_valid(files.admin_cert, files.admin_key, now, issuer=ca_cert) is None:
        _make_leaf(files.admin_cert, files.admin_key, ADMIN_NAME, ca_cert, ca_key, now, server=False)
        logger.info("Made the operator's client certificate (CN=%s) in %s", ADMIN_NAME, tls_dir)
    return files


def write_new_private_file(path: Path, data: bytes) -> None:
    """Data in a new file readable by its owner only from the first byte on; an existing file is never
    overwritten (FileExistsError): keys and passwords are made once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as out:
        out.write(data)


def write_private_file(path: Path, data: bytes) -> None:
    """Replace path with data, readable by its owner only from the first byte on.

    Written to a new 0600 file beside it, then renamed over it, so a reader never sees half a file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# -- internals -------------------------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is reduced by the umask and ignored for an existing folder


def _write_public_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_valid(
    cert_path: Path, key_path: Path, now: dt.datetime, issuer: x509.Certificate | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and key if both are readable, belong together, were issued by issuer (self-signed
    when None) and stay valid for RENEW_BEFORE; else None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, public) != key.public_key().public_bytes(der, public):
        return None
    if cert.not_valid_after_utc - RENEW_BEFORE < now or cert.not_valid_before_utc > now:
        return None
    try:
        cert.verify_directly_issued_by(issuer or cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    return cert, key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(files: TlsFiles, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(CA_NAME)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_file(files.ca_key, _pkcs8(key))
    _write_public_file(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _make_leaf(
    cert_path: Path,
    key_path: Path,
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for common_name; a server one also names 127.0.0.1 and localhost.

    Its file holds the chain (leaf, then CA), as TLS peers expect it sent.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    usages = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + dt.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private_file(key_path, _pkcs8(key))
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_public_file(cert_path, chain)
    return cert, key


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
