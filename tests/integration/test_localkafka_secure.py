"""A secure local cluster (`make kafka-up SECURE=1`) against a real Java broker: the operator's admin client
over mutual TLS, SCRAM users on the client listener, ACLs denying by default, and strangers refused."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import (
    AdminClient,
    NewTopic,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from streamml import localkafka
from streamml.localkafka import LocalKafka, free_port_block, ports_per_node
from streamml.settings import Settings
from tests.conftest import _TEST_CLUSTERS, UniqueName

Config = dict[str, str | int | float | bool]

# librdkafka logs every refused connection; the tests look at errors, not at those lines.
_SILENT = logging.getLogger(f"{__name__}.librdkafka")
_SILENT.propagate = False
_SILENT.addHandler(logging.NullHandler())


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """One secure 1-broker cluster for the module (a start costs seconds), stopped at its end."""
    kafka = LocalKafka(
        tmp_path_factory.mktemp("kafka-secure"),
        brokers=1,
        base_port=free_port_block(ports_per_node(secure=True)),
        die_with_parent=True,
        secure=True,
    )
    try:
        kafka.start(timeout_s=90)
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, secure_kafka: LocalKafka) -> None:
    """A failing test shows the broker's last log lines (tests/conftest.py's report hook)."""
    request.node.stash[_TEST_CLUSTERS] = [secure_kafka]


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process started with exactly these STREAMML_* variables would have."""
    for key in [k for k in os.environ if k.startswith("STREAMML_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def admin_client(kafka: LocalKafka, monkeypatch: pytest.MonkeyPatch) -> AdminClient:
    return AdminClient(settings_from(kafka.admin_env(), monkeypatch).kafka_config(), logger=_SILENT)


def create_user(admin: AdminClient, user: str, password: str) -> None:
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upsert = UserScramCredentialUpsertion(user, info, password.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=20)


def client_config(
    kafka: LocalKafka, tmp_path: Path, user: str, password: str, monkeypatch: pytest.MonkeyPatch
) -> Config:
    """An application's client settings, from client_env and a password file as `streamml acl` writes it."""
    password_file = tmp_path / f"{user}.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    conf: Config = {**settings_from(kafka.client_env(user, password_file), monkeypatch).kafka_config()}
    return conf


def refused(conf: Config, timeout_s: float = 3.0) -> list[KafkaError]:
    """Asks for metadata, which must fail; returns the errors the client reported meanwhile."""
    errors: list[KafkaError] = []
    admin = AdminClient({**conf, "error_cb": errors.append}, logger=_SILENT)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=timeout_s)
    admin.poll(0.2)
    return errors


def test_cluster_is_ready_for_the_operator_over_mutual_tls(
    secure_kafka: LocalKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = secure_kafka
    assert kafka.is_running()
    assert LocalKafka.from_home(kafka.home).secure
    assert kafka.admin_bootstrap != kafka.bootstrap

    metadata = admin_client(kafka, monkeypatch).list_topics(timeout=10)

    assert set(metadata.brokers) == {1}
    assert metadata.brokers[1].port == kafka.nodes[0].internal_port  # the INTERNAL listener answered
    assert kafka.nodes[0].properties.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in kafka.logs(5000)  # the inline key is [hidden] in the broker's log


def test_scram_user_reads_metadata_but_may_not_write_without_an_acl(
    secure_kafka: LocalKafka, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, unique: UniqueName
) -> None:
    kafka = secure_kafka
    admin = admin_client(kafka, monkeypatch)
    user, topic = unique("user"), unique("secured")
    create_user(admin, user, "correct horse battery")
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=20)
    conf = client_config(kafka, tmp_path, user, "correct horse battery", monkeypatch)

    metadata = AdminClient(conf, logger=_SILENT).list_topics(timeout=10)
    assert set(metadata.brokers) == {1}  # logged in over SASL_SSL
    assert topic not in metadata.topics  # no DESCRIBE ACL: the topic is not even shown

    delivered: list[KafkaError | None] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        delivered.append(err)

    producer = Producer({**conf, "message.timeout.ms": 10000}, logger=_SILENT)
    producer.produce(topic, b"not allowed", on_delivery=on_delivery)
    producer.flush(15)

    assert len(delivered) == 1 and delivered[0] is not None
    assert delivered[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_a_wrong_password_is_an_authentication_error(
    secure_kafka: LocalKafka, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, unique: UniqueName
) -> None:
    user = unique("user")
    create_user(admin_client(secure_kafka, monkeypatch), user, "the right one")
    conf = client_config(secure_kafka, tmp_path, user, "a wrong one", monkeypatch)

    errors = refused(conf)

    assert KafkaError._AUTHENTICATION in {e.code() for e in errors}, errors


def test_clients_without_a_login_are_refused_on_the_client_listener(secure_kafka: LocalKafka) -> None:
    began = time.monotonic()
    refused({"bootstrap.servers": secure_kafka.bootstrap})  # PLAINTEXT
    refused(  # TLS but no SCRAM login, even with the operator's certificate
        {
            "bootstrap.servers": secure_kafka.bootstrap,
            "security.protocol": "SSL",
            "ssl.ca.location": str(secure_kafka.ca_file),
            "ssl.certificate.location": str(secure_kafka.tls_dir / "admin.pem"),
            "ssl.key.location": str(secure_kafka.tls_dir / "admin.key"),
        }
    )
    assert time.monotonic() - began < 15


def test_the_admin_listener_wants_a_client_certificate(secure_kafka: LocalKafka) -> None:
    conf: Config = {
        "bootstrap.servers": secure_kafka.admin_bootstrap,
        "security.protocol": "SSL",
        "ssl.ca.location": str(secure_kafka.ca_file),
    }
    errors = refused(conf)
    assert any("certificate" in e.str() for e in errors), errors


def test_cli_refuses_to_restart_the_secure_home_as_plaintext_and_reports_it_secure(
    secure_kafka: LocalKafka, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(secure_kafka.home)

    assert localkafka.main(["up", "--no-secure", "--home", home]) == 1
    assert "holds a secure cluster" in capsys.readouterr().err

    assert localkafka.main(["up", "--home", home]) == 0  # the home's own mode: already running
    out = capsys.readouterr().out
    assert "already running" in out and str(secure_kafka.home / "admin.env") in out
    assert "BEGIN" not in out

    assert localkafka.main(["status", "--home", home]) == 0
    assert "security: secure" in capsys.readouterr().out
