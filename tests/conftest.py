"""Shared fixtures: one real Kafka broker per session, unique names per test, broker logs on failure."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from streamml.localkafka import LocalKafka, free_port_block
from streamml.localregistry import LocalRegistry
from streamml.settings import Settings

TESTS_DIR = Path(__file__).resolve().parent
BROKER_LOG_LINES = 40

# The session broker and the clusters a test started itself, so a failing test can show their logs.
_SESSION_KAFKA = pytest.StashKey[LocalKafka]()
_TEST_CLUSTERS = pytest.StashKey[list[LocalKafka]]()

LocalKafkaFactory = Callable[..., LocalKafka]
UniqueName = Callable[..., str]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by folder, so `-m "not integration"` needs no marker boilerplate in the test files."""
    for item in items:
        folders = item.path.resolve().parents
        if TESTS_DIR / "integration" in folders:
            item.add_marker(pytest.mark.integration)
        if TESTS_DIR / "e2e" in folders:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the last broker log lines to the report of a failed test that used a broker."""
    report = yield
    if report.failed:
        own: list[LocalKafka] = item.stash.get(_TEST_CLUSTERS, [])
        clusters = [*own]
        session_kafka = item.config.stash.get(_SESSION_KAFKA, None)
        if session_kafka is not None and "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            clusters.insert(0, session_kafka)
        for kafka in clusters:
            title = f"Kafka log, last {BROKER_LOG_LINES} lines per node ({kafka.home})"
            report.sections.append((title, kafka.logs(BROKER_LOG_LINES)))
    return report


@pytest.fixture(scope="session")
def kafka_bootstrap(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """bootstrap.servers of a real broker: $STREAMML_BOOTSTRAP_SERVERS, else a local one for this session.

    The local broker is started by the same code as `make kafka-up`, on free ports in a temporary folder,
    only when a test asks for it, and stopped when the session ends.
    """
    external = os.environ.get("STREAMML_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external
        return
    kafka = LocalKafka(
        tmp_path_factory.mktemp("kafka"), brokers=1, base_port=free_port_block(2), die_with_parent=True
    )
    request.config.stash[_SESSION_KAFKA] = kafka
    try:
        yield kafka.start(timeout_s=120)
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Schema Registry (Apicurio, in memory) for this session: $STREAMML_SCHEMA_REGISTRY_URL, else one
    started by the same code as `make registry-up` on a free port, stopped when the session ends."""
    external = os.environ.get("STREAMML_SCHEMA_REGISTRY_URL", "").strip()
    if external:
        yield external
        return
    registry = LocalRegistry(tmp_path_factory.mktemp("registry"), die_with_parent=True)
    try:
        yield registry.start(timeout_s=120)
    finally:
        registry.stop()


@pytest.fixture
def settings(kafka_bootstrap: str) -> Settings:
    """Settings pointing at the session broker."""
    return Settings(bootstrap_servers=kafka_bootstrap)


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> UniqueName:
    """unique("orders") -> "orders-test-name-1a2b3c4d5e": a fresh topic or group name on every call.

    Tests share one broker, so names carry the test name (to find them) and a uuid (to never collide).
    """
    test_name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:60]

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{test_name}-{uuid.uuid4().hex[:10]}"

    return make


@pytest.fixture
def local_kafka_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKafkaFactory]:
    """Make private clusters (not started) on free ports, for tests that stop or break brokers.

    Every cluster made is stopped when the test ends, and its logs are shown if the test fails.
    """
    made: list[LocalKafka] = []
    request.node.stash[_TEST_CLUSTERS] = made

    def make(brokers: int = 1, heap_mb: int = 512) -> LocalKafka:
        home = tmp_path_factory.mktemp(f"kafka{brokers}n")
        base_port = free_port_block(2 * brokers)
        kafka = LocalKafka(home, brokers=brokers, base_port=base_port, heap_mb=heap_mb, die_with_parent=True)
        made.append(kafka)
        return kafka

    yield make
    for kafka in made:
        kafka.stop()
