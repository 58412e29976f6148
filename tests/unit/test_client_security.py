"""The Faust side of each service honours the same Kafka security settings as confluent-kafka, and secrets
can come from files."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import faust
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from streamml.runtime import faust_app, faust_credentials
from streamml.settings import Settings

BASE = {"bootstrap_servers": "127.0.0.1:1", "_env_file": None}


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streamml-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_plaintext_needs_no_credentials() -> None:
    assert faust_credentials(Settings(**BASE)) is None  # type: ignore[arg-type]


def test_sasl_ssl_gives_faust_the_mechanism_user_password_and_a_verifying_tls_context(tmp_path: Path) -> None:
    cert, _key = _self_signed(tmp_path)
    settings = Settings(**BASE, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",  # type: ignore[arg-type]
                        sasl_username="features", sasl_password="pw", ssl_ca_location=str(cert))  # fmt: skip
    creds = faust_credentials(settings)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.mechanism.value, creds.username, creds.password) == ("SCRAM-SHA-512", "features", "pw")
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED and creds.ssl_context.check_hostname
    app = faust_app("features", Settings(**{**settings.model_dump(), "data_dir": str(tmp_path)}))  # type: ignore[arg-type]
    assert app.conf.broker_credentials is not None and "pw" not in repr(app.conf.broker_credentials)


def test_sasl_without_tls_and_mutual_tls(tmp_path: Path) -> None:
    creds = faust_credentials(
        Settings(
            **BASE,
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",  # type: ignore[arg-type]
            sasl_username="u",
            sasl_password="p",
        )
    )
    assert isinstance(creds, faust.SASLCredentials) and creds.ssl_context is None
    cert, key = _self_signed(tmp_path)
    mtls = faust_credentials(
        Settings(
            **BASE,
            security_protocol="SSL",
            ssl_ca_location=str(cert),  # type: ignore[arg-type]
            ssl_certificate_location=str(cert),
            ssl_key_location=str(key),
        )
    )
    assert isinstance(mtls, faust.SSLCredentials)


def test_secrets_come_from_files_and_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-a-file\n")
    (tmp_path / "hmac").write_text("k3y")
    settings = Settings(**BASE, sasl_password_file=str(tmp_path / "password"),  # type: ignore[arg-type]
                        signing_key_file=str(tmp_path / "hmac"))  # fmt: skip
    assert settings.sasl_password is not None and settings.sasl_password.get_secret_value() == "from-a-file"
    assert settings.signing_key is not None and settings.signing_key.get_secret_value() == "k3y"
    assert "from-a-file" not in repr(settings)
    direct = Settings(**BASE, sasl_password="direct", sasl_password_file=str(tmp_path / "password"))  # type: ignore[arg-type]
    assert direct.sasl_password is not None and direct.sasl_password.get_secret_value() == "direct"
    with pytest.raises(ValidationError, match="cannot read sasl_password_file"):
        Settings(**BASE, sasl_password_file=str(tmp_path / "nope"))  # type: ignore[arg-type]
