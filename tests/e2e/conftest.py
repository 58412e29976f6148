"""Fixtures for end-to-end tests: the real services as processes against the session broker."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer

from streamml import control, pipelines
from streamml.codec import codec_for
from streamml.kafka import ensure_topics
from streamml.localkafka import LocalKafka
from streamml.runtime import end_offsets
from streamml.settings import Settings
from streamml.signing import Keys, Signer, Verifier, load_private_key, parse_public_keys, write_key_pair
from streamml.stack import Stack
from streamml.topics import Catalogue
from tests.conftest import _SESSION_KAFKA, LocalKafkaFactory

REPO = Path(__file__).resolve().parents[2]


@dataclass
class System:
    """One isolated StreamML deployment (own topic prefix and signing key) on the test broker."""

    settings: Settings
    stack: Stack
    key: Keys  # signs and verifies model versions as learner and trainer do (Ed25519)
    catalogue: Catalogue = field(init=False)
    control_producer: Producer | None = None
    # Who publishes model versions (on a secured cluster only learner and trainer may): default `settings`.
    publisher: Settings | None = None

    def __post_init__(self) -> None:
        self.catalogue = Catalogue(self.settings)

    def apply(self, name: str, **overrides: Any) -> dict[str, Any]:
        """Publish an example pipeline (pipelines/<name>.yaml) with some fields overridden."""
        spec = pipelines.load_file(REPO / "pipelines" / f"{name}.yaml")
        data = spec.model_dump()
        for key, value in overrides.items():  # nested sections are merged, so overrides stay small
            data[key] = (
                {**data[key], **value}
                if isinstance(value, dict) and isinstance(data.get(key), dict)
                else value
            )
        spec = pipelines.PipelineFile.model_validate(data)
        ensure_topics(self.settings, self.catalogue.pipeline_topics(spec.name))
        definition = pipelines.to_definition(spec, self.catalogue.raw(spec.name).name).to_avro()
        control.publish(
            self.settings, self.catalogue.pipelines().name, "PipelineDefinition", spec.name, definition
        )
        return definition

    def producer(self) -> Producer:
        """A plain confluent-kafka producer, as any data engineer would use."""
        return Producer({**self.settings.kafka_config(), "linger.ms": 5})

    def read(
        self,
        topic: str,
        until: Callable[[list[Message]], bool],
        timeout_s: float = 90.0,
        read_committed: bool = False,
    ) -> list[Message]:
        """All records of a topic from the beginning, polling until `until(records)` holds."""
        consumer = Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"{self.settings.topic_prefix}-cli-e2e-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            }
        )
        consumer.subscribe([topic])
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.5):
                    if msg.error() is None:
                        out.append(msg)
                if until(out):
                    return out
        finally:
            consumer.close()
        raise AssertionError(f"{topic}: condition not met after {timeout_s} s ({len(out)} records)")

    def records(self, msgs: list[Message], schema: str) -> list[dict[str, Any]]:
        codec = codec_for(schema)
        return [codec.decode(m.value() or b"") for m in msgs]

    def end_offsets(self, topic: str) -> dict[int, int]:
        return end_offsets(self.settings, topic)


SystemFactory = Callable[..., System]


def model_signing(folder: Path) -> tuple[dict[str, str], Keys]:
    """A deployment's Ed25519 key pair, as an operator sets it up: the private key file for learner and
    trainer (the stack gives it to no one else), the public key for everyone; and the keys the tests sign
    versions with."""
    path, public = write_key_pair(folder)
    env = {"STREAMML_MODEL_SIGNING_KEY_FILE": str(path), "STREAMML_MODEL_VERIFY_KEYS": public}
    return env, Keys(Signer(load_private_key(path)), Verifier(parse_public_keys(public)))


def show_logs_after(stack: Stack, failed: bool, lines: int) -> None:
    """Stop every instance; if the test failed, print their logs. Instances not running before the
    teardown (died by themselves, or stopped and not restarted) go last and longer, with how each run
    ended: CI keeps the end of the output."""
    down = stack.dead()
    stack.stop_all()
    if not failed:
        return
    exits = stack.exit_codes()
    for label in sorted(stack.services, key=lambda lb: lb in down):
        if label in down:
            print(f"\n===== {label}: NOT RUNNING before the teardown; runs ended {exits.get(label)} =====")
            print(f"===== {label} log (last 150 lines) =====\n{stack.tail(label, 150)}")
        else:
            print(f"\n===== {label} log (last {lines} lines) =====\n{stack.tail(label, lines)}")


@pytest.fixture
def make_system(
    kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[SystemFactory]:
    """Builds isolated deployments; their services are stopped (and logged on failure) at teardown."""
    made: list[System] = []

    def make(partitions: int = 3, **env_overrides: str) -> System:
        prefix = f"e{uuid.uuid4().hex[:8]}"
        key = secrets.token_hex(16)  # the monitor's state key
        model_env, model_keys = model_signing(tmp_path / prefix / "keys")
        env = {
            "STREAMML_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "STREAMML_TOPIC_PREFIX": prefix,
            "STREAMML_SIGNING_KEY": key,
            **model_env,
            "STREAMML_DATA_DIR": str(tmp_path / prefix / "data"),
            "STREAMML_DEFAULT_PARTITIONS": str(partitions),
            "STREAMML_LOG_LEVEL": "INFO",
            **env_overrides,
        }
        settings = Settings(
            bootstrap_servers=kafka_bootstrap,
            topic_prefix=prefix,
            signing_key=key,
            default_partitions=partitions,
            _env_file=None,
        )
        ensure_topics(settings, Catalogue(settings).global_topics())
        system = System(settings, Stack.create(env, tmp_path / prefix / "logs"), model_keys)
        made.append(system)
        return system

    yield make
    report = getattr(request.node, "rep_call", None)
    for system in made:
        show_logs_after(system.stack, report is not None and report.failed, 60)


@pytest.fixture
def system(make_system: SystemFactory) -> System:
    return make_system()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def trained_version(
    system: System, pipeline: str, version: int, n_events: int, *, key: bytes | Keys | None = None
) -> dict[str, Any]:
    """A signed ModelVersion of the pipeline's online model trained in-process on n Phishing events."""
    import itertools

    from river import datasets

    from streams.learner import OnlineLearner

    definitions = control.current_pipelines(system.settings)
    model = pipelines.online_model(definitions[pipeline])
    learner = OnlineLearner(
        pipeline=pipeline,
        model_name=model["name"],
        estimator_spec=model["estimator_spec"],
        params=dict(model["params"]),
        regression=False,
        signing_key=key or system.key,
    )
    for x, y in itertools.islice(datasets.Phishing(), n_events):
        learner.learn(x, y)
    learner.version = version - 1
    return learner.snapshot(int(time.time() * 1000))


def publish_version(system: System, record: dict[str, Any]) -> None:
    key = f"{record['pipeline']}/{record['model_name']}/{record['version']}"
    settings = system.publisher or system.settings
    control.publish(settings, system.catalogue.model_versions().name, "ModelVersion", key, record)


def promote(system: System, pipeline: str, version: int, model_name: str = "online") -> float:
    """Publish a PROMOTE decision (as `streamml model promote` does); returns when it was produced."""
    decided = int(time.time() * 1000)
    record = {
        "pipeline": pipeline,
        "model_name": model_name,
        "action": "PROMOTE",
        "version": version,
        "previous_version": None,
        "actor": "test",
        "reason": "test promotion",
        "metrics": {},
        "decided_at": decided,
    }
    if system.control_producer is None:
        system.control_producer = Producer({**system.settings.kafka_config(), "linger.ms": 0})
    system.control_producer.produce(
        system.catalogue.promotions().name,
        codec_for("Promotion").encode(record),
        f"{pipeline}/{model_name}/{decided}".encode(),
    )
    assert system.control_producer.flush(10) == 0
    return decided / 1000


# -- scale-out: a 3-broker cluster of the test's own, and deployments with N instances per service ----------
@pytest.fixture
def kafka3(request: pytest.FixtureRequest, local_kafka_factory: LocalKafkaFactory) -> Iterator[LocalKafka]:
    """A 3-broker KRaft cluster started for this test and stopped (by pid) after it, so the test may stop
    and start brokers. The session broker, if this session started one, is stopped meanwhile and started
    again afterwards (same folder and ports, its topics intact): one cluster at a time on a small machine."""
    session = request.config.stash.get(_SESSION_KAFKA, None)
    paused = session is not None and bool(session.node_pids())
    if paused:
        assert session is not None
        session.stop()
    kafka = local_kafka_factory(brokers=3)
    try:
        kafka.start(timeout_s=180)
        yield kafka
    finally:
        kafka.stop()
        if paused:
            assert session is not None
            session.start(timeout_s=120)


@pytest.fixture
def make_cluster_system(
    kafka3: LocalKafka, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., System]]:
    """Deployments on the 3-broker cluster: StreamML topics with replication factor 3 and
    min.insync.replicas 2 (STREAMML_REPLICATION_FACTOR / STREAMML_MIN_INSYNC_REPLICAS), `instances`
    processes per service. Services are stopped at teardown; every instance's log is shown on failure."""
    from bench.chaos import cluster_env, settings_of

    made: list[System] = []

    def make(
        partitions: int = 4,
        instances: int | dict[str, int] = 2,
        guarantee: str = "exactly_once",
        **env_overrides: str,
    ) -> System:
        prefix = f"s{uuid.uuid4().hex[:8]}"
        key = secrets.token_hex(16)
        model_env, model_keys = model_signing(tmp_path / prefix / "keys")
        env = {**cluster_env(kafka3.bootstrap, prefix, key, tmp_path / prefix, partitions, guarantee),
               **model_env, **env_overrides}  # fmt: skip
        settings = settings_of(env)
        ensure_topics(settings, Catalogue(settings).global_topics())
        system = System(settings, Stack.create(env, tmp_path / prefix / "logs", instances), model_keys)
        made.append(system)
        return system

    yield make
    report = getattr(request.node, "rep_call", None)
    for system in made:
        show_logs_after(system.stack, report is not None and report.failed, 40)
