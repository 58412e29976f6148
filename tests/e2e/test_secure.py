"""StreamML on a secured cluster (TLS everywhere, SCRAM-SHA-512 logins, deny-by-default ACLs): every service
on its own principal with the ACLs `streamml acl apply` derives from the catalogue, the closed loop end to
end, and the broker's own refusals of whatever a principal was not granted."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from river import datasets

from streamml.acl import password_file, user_name
from streamml.localkafka import LocalKafka, free_port_block, ports_per_node
from streamml.settings import Settings
from streamml.signing import Keys, Signer, Verifier, generate
from streamml.stack import Stack
from tests.conftest import _SESSION_KAFKA
from tests.e2e.conftest import REPO, System, model_signing, promote, publish_version, trained_version
from tests.e2e.test_closed_loop import run_closed_loop

AGRAWAL = REPO / "pipelines" / "agrawal.yaml"
PHISHING = REPO / "pipelines" / "phishing.yaml"
_QUIET = logging.getLogger("tests.secure.librdkafka")  # refusals are expected: keep them off stderr


@dataclass
class Secured:
    kafka: LocalKafka
    prefix: str
    users: Path
    admin_env: dict[str, str]

    def env_of(self, who: str) -> dict[str, str]:
        """STREAMML_* settings of a principal: a service, or "cli" (the user)."""
        user = user_name(self.prefix, who)
        return {
            **self.kafka.client_env(user, password_file(self.users, user)),
            "STREAMML_TOPIC_PREFIX": self.prefix,
            "STREAMML_DEFAULT_PARTITIONS": "1",  # as the closed loop expects
        }

    def settings_of(self, who: str) -> Settings:
        env = self.env_of(who)
        return Settings(**{k.removeprefix("STREAMML_").lower(): v for k, v in env.items()}, _env_file=None)

    def conf_of(self, who: str) -> dict[str, str]:
        return dict(self.settings_of(who).kafka_config())


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    """The stack's services are stopped at the end; their logs are shown if the test failed."""
    try:
        yield stack
    except BaseException:
        for label in stack.services:
            print(f"\n===== {label} log (last 60 lines) =====\n{stack.tail(label, 60)}")
        raise
    finally:
        stack.stop_all()


def streamml(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The `streamml` CLI as a user runs it: only its STREAMML_* environment tells it where and who."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMML_")}
    return subprocess.run(
        [sys.executable, "-m", "streamml.cli", *args],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A 1-node secured cluster for this module, the ACLs of one deployment applied by the operator (over
    mutual TLS) with the CLI. The session broker is paused meanwhile: one cluster at a time on 2 cores."""
    session = request.config.stash.get(_SESSION_KAFKA, None)
    paused = session is not None and bool(session.node_pids())
    if paused:
        assert session is not None
        session.stop()
    home = tmp_path_factory.mktemp("secure-kafka")
    kafka = LocalKafka(
        home, brokers=1, base_port=free_port_block(ports_per_node(True)), die_with_parent=True, secure=True
    )
    try:
        kafka.start(timeout_s=120)
        prefix = f"z{uuid.uuid4().hex[:8]}"
        users = home / "users"
        admin_env = {**kafka.admin_env(), "STREAMML_TOPIC_PREFIX": prefix}
        apply = [
            "acl",
            "apply",
            "--pipeline",
            str(AGRAWAL),
            "--pipeline",
            str(PHISHING),
            "--secrets-dir",
            str(users),
        ]
        plan = streamml(admin_env, *apply, "--dry-run")
        assert plan.returncode == 0, plan.stderr
        assert f"add    User:{prefix}-predictor" in plan.stdout and not users.exists()  # nothing done
        done = streamml(admin_env, *apply)
        assert done.returncode == 0, done.stderr
        again = streamml(admin_env, *apply)
        assert again.returncode == 0 and "no changes" in again.stdout, again.stdout + again.stderr
        for output in (plan, done, again):  # passwords are in files only, never printed
            for file in users.iterdir():
                assert file.read_text().strip() not in output.stdout + output.stderr
        yield Secured(kafka, prefix, users, admin_env)
    finally:
        kafka.stop()
        if paused:
            assert session is not None
            session.start(timeout_s=120)


class Watched:
    """A confluent-kafka client whose error callbacks (the broker's refusals) are collected."""

    def __init__(self, kind: type[Producer] | type[Consumer], conf: dict[str, str]) -> None:
        self.errors: list[KafkaError] = []
        self.client = kind({**conf, "error_cb": self.errors.append, "logger": _QUIET})

    def first_error(self, seconds: float = 20.0) -> KafkaError:
        deadline = time.monotonic() + seconds
        while not self.errors and time.monotonic() < deadline:
            self.client.poll(0.2)
        assert self.errors, "the broker refused nothing"
        return self.errors[0]


def test_who_is_not_authenticated_is_refused(secured: Secured) -> None:
    plain = Watched(Producer, {"bootstrap.servers": secured.kafka.bootstrap})
    with pytest.raises(KafkaException):  # a PLAINTEXT client never gets past the TLS handshake
        plain.client.list_topics(timeout=5)
    wrong = {**secured.conf_of("cli"), "sasl.password": secrets.token_urlsafe(16)}
    refused = Watched(Producer, wrong).first_error()
    assert refused.code() == KafkaError._AUTHENTICATION, refused
    assert "invalid credentials" in refused.str() or "Authentication failed" in refused.str()
    stranger = {**secured.conf_of("cli"), "sasl.username": "nobody"}
    assert Watched(Producer, stranger).first_error().code() == KafkaError._AUTHENTICATION


def _produce_error(conf: dict[str, str], topic: str) -> KafkaError | None:
    outcome: list[KafkaError | None] = []
    producer = Producer({**conf, "message.timeout.ms": "15000"})
    producer.produce(topic, b"x", on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(20)
    assert outcome, "no delivery report"
    return outcome[0]


def _read_error(conf: dict[str, str], topic: str, group: str) -> KafkaError | None:
    """The broker's refusal of reading `topic` (None: records or the end of the topic came instead)."""
    watched = Watched(Consumer, {**conf, "group.id": group, "enable.partition.eof": "true"})
    consumer = watched.client
    assert isinstance(consumer, Consumer)
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not watched.errors:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None or msg.error().code() == KafkaError._PARTITION_EOF:
                return None
            return msg.error()
        return watched.errors[0] if watched.errors else None
    finally:
        consumer.close()


def test_each_principal_gets_what_the_catalogue_grants_and_nothing_more(secured: Secured) -> None:
    prefix = secured.prefix
    cli = streamml(
        secured.env_of("cli"), "topics", "create", "--pipeline", "agrawal"
    )  # the user creates them
    assert cli.returncode == 0, cli.stderr
    versions = f"{prefix}.model-versions"
    # the predictor may not publish a model version; the trainer may
    assert (
        _produce_error(secured.conf_of("predictor"), versions).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    )
    assert _produce_error(secured.conf_of("trainer"), f"{prefix}.dead-letter") is None
    # the features service may not read model versions; the predictor reads them
    features = _read_error(secured.conf_of("features"), versions, f"{prefix}-features-probe")
    assert features is not None and features.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, features
    assert _read_error(secured.conf_of("predictor"), versions, f"{prefix}-predictor-probe") is None
    # only the controller and users request training
    requests = f"{prefix}.training-requests"
    assert (
        _produce_error(secured.conf_of("monitor"), requests).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    )
    # a consumer in another service's group is refused
    intruder = Watched(Consumer, {**secured.conf_of("predictor"), "group.id": f"{prefix}-learner-data"})
    consumer = intruder.client
    assert isinstance(consumer, Consumer)
    consumer.subscribe([f"{prefix}.agrawal.features"])
    try:
        denied = next((m.error() for _ in range(40) if (m := consumer.poll(0.5)) and m.error()), None)
        denied = denied or (intruder.errors[0] if intruder.errors else None)
        assert denied is not None and denied.code() == KafkaError.GROUP_AUTHORIZATION_FAILED, denied
    finally:
        consumer.close()
    # a transactional producer without its transactional id's ACL is refused; with it, it starts
    stolen = Producer({**secured.conf_of("predictor"), "transactional.id": f"{prefix}-learner-writer-0"})
    with pytest.raises(KafkaException) as refused:
        stolen.init_transactions(20)
    assert refused.value.args[0].code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    own = Producer({**secured.conf_of("learner"), "transactional.id": f"{prefix}-learner-writer-0"})
    own.init_transactions(20)


@pytest.mark.slow
def test_the_closed_loop_runs_with_every_service_on_its_own_principal(
    secured: Secured, tmp_path: Path
) -> None:
    created = streamml(secured.env_of("cli"), "topics", "create")  # the user's principal creates them
    assert created.returncode == 0, created.stderr
    model_env, model_keys = model_signing(tmp_path / "keys")
    env = {
        **secured.env_of("cli"),
        "STREAMML_SIGNING_KEY": secrets.token_hex(16),
        **model_env,
        "STREAMML_DATA_DIR": str(tmp_path / "data"),
    }
    stack = Stack.create(env, tmp_path / "logs", users_dir=secured.users)
    system = System(secured.settings_of("cli"), stack, model_keys)
    with running(stack):
        run_closed_loop(system)
    for label, svc in stack.services.items():  # no service was refused anything on the way
        log = svc.log_path.read_text()
        assert "AUTHORIZATION_FAILED" not in log and "Authorization failed" not in log, label


def _call(url: str, token: str | None, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_signed_versions_rotation_and_the_token_on_the_secured_cluster(
    secured: Secured, tmp_path: Path
) -> None:
    """Versions published by the trainer's principal: a key rotation (old and new key both trusted) serves
    every valid version, a version signed by an unknown key is rejected while the live one keeps serving,
    and the HTTP API wants its token."""
    from tests.e2e.test_hot_swap import _predictions_for, _produce

    created = streamml(secured.env_of("cli"), "topics", "create")
    assert created.returncode == 0, created.stderr
    old_env, old_key = model_signing(tmp_path / "old")
    new_env, new_key = model_signing(tmp_path / "new")
    token = secrets.token_urlsafe(24)
    env = {
        **secured.env_of("cli"),
        "STREAMML_SIGNING_KEY": secrets.token_hex(16),
        **new_env,  # the signer switched to the new key ...
        # ... and verifiers trust both while versions signed with the old one are still around
        "STREAMML_MODEL_VERIFY_KEYS": ",".join(e["STREAMML_MODEL_VERIFY_KEYS"] for e in (old_env, new_env)),
        "STREAMML_DATA_DIR": str(tmp_path / "data"),
        "STREAMML_HTTP_TOKEN": token,
    }
    stack = Stack.create(env, tmp_path / "logs", users_dir=secured.users)
    system = System(secured.settings_of("cli"), stack, old_key, publisher=secured.settings_of("trainer"))
    with running(stack):
        system.apply("phishing", promotion="manual")
        publish_version(system, trained_version(system, "phishing", 1, 100, key=old_key))
        promote(system, "phishing", 1)
        stack.start_all(["features", "predictor"])
        _produce(system, 100, 2000.0, "a")
        assert {p["model_version"] for _, p in _predictions_for(system, "a", 100)} == {1}

        publish_version(system, trained_version(system, "phishing", 2, 200, key=new_key))
        promote(system, "phishing", 2)
        foreign = Keys(Signer(generate()), Verifier())
        publish_version(system, trained_version(system, "phishing", 3, 300, key=foreign))
        promote(system, "phishing", 3)
        alerts_topic = system.catalogue.drift_alerts().name  # shared with the closed loop's pipeline

        def phishing_alerts(msgs: list[Any]) -> list[dict[str, Any]]:
            return [a for a in system.records(msgs, "DriftAlert") if a["pipeline"] == "phishing"]

        alerts = phishing_alerts(system.read(alerts_topic, lambda m: len(phishing_alerts(m)) >= 1))
        assert [(a["kind"], a["model_version"]) for a in alerts] == [("ARTIFACT", 3)]
        assert "signed by unknown key" in alerts[0]["message"]
        _produce(system, 100, 2000.0, "b")
        assert {p["model_version"] for _, p in _predictions_for(system, "b", 100)} == {2}, "v2 keeps serving"
        text = stack.services["predictor"].metrics_text()
        rejected = [
            line  # of this pipeline: the closed loop's versions, signed by another key, are refused too
            for line in text.splitlines()
            if line.startswith("streamml_rejected_artifacts_total{") and 'pipeline="phishing"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in rejected) == 1, "no valid version was rejected"

        url = f"http://127.0.0.1:{stack.services['predictor'].http_port}"
        x, _ = next(iter(datasets.Phishing()))
        body = json.dumps({"pipeline": "phishing", "event": {"event_id": "h1", **x}}).encode()
        assert _call(f"{url}/predict", None, body)[0] == 401
        assert _call(f"{url}/predict", "wrong", body)[0] == 401
        status, answer = _call(f"{url}/predict", token, body)
        assert status == 200 and answer["model_version"] == 2, answer


def test_doctor_checks_the_principals_and_acls_with_the_operator_s_credentials(
    secured: Secured, tmp_path: Path
) -> None:
    from streamml import doctor

    admin_env = {k.removeprefix("STREAMML_").lower(): v for k, v in secured.admin_env.items()}
    admin = Settings(**admin_env, default_partitions=1, _env_file=None)
    found: list[doctor.Check] = []
    doctor.run(admin, tmp_path / "none.json", found.append)
    principals = [c for c in found if c.area == "principals"]
    # ok once every pipeline granted ahead is applied (the other tests apply both); before, a warning
    assert [c.status for c in principals] in (["ok"], ["warn"]), principals
    assert "missing" not in principals[0].detail
    mine: list[doctor.Check] = []
    doctor.run(secured.settings_of("predictor"), tmp_path / "none.json", mine.append)
    assert next(c for c in mine if c.area == "broker").status == "ok"
    assert next(c for c in mine if c.area == "principals").status == "skip"  # a service may not read ACLs
