"""The local Kafka runner against real Java brokers: lifecycle, idempotent start, and a broker failure."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streamml.localkafka import LocalKafka, port_is_free
from streamml.settings import Settings

LocalKafkaFactory = Callable[..., LocalKafka]  # the local_kafka_factory fixture of tests/conftest.py
UniqueName = Callable[..., str]


def create_topic(bootstrap: str, topic: str, partitions: int, replication: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, replication)])[topic].result(timeout=30)


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce with acks=all and fail on any delivery error."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "messages still unsent after 30 s"
    assert errors == []


def consume(bootstrap: str, topic: str, group: str, expected: int, timeout_s: float = 30) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            value = msg.value()
            assert isinstance(value, bytes)
            values.append(value)
    finally:
        consumer.close()
    return values


def process_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_single_node_serves_restarts_with_its_data_and_stops_cleanly(
    local_kafka_factory: LocalKafkaFactory, unique: UniqueName
) -> None:
    kafka = local_kafka_factory(brokers=1)
    topic = unique("localkafka")

    bootstrap = kafka.start()

    assert bootstrap == f"127.0.0.1:{kafka.base_port}"
    pids = kafka.node_pids()
    assert list(pids) == [1]
    create_topic(bootstrap, topic, partitions=1, replication=1)
    produce(bootstrap, topic, [b"hello"])
    assert consume(bootstrap, topic, unique("group"), expected=1) == [b"hello"]

    # A second runner on the same home (a second `make kafka-up`) finds the running broker.
    again = LocalKafka(kafka.home, brokers=1, base_port=kafka.base_port, libs_dir=kafka.libs_dir)
    assert again.start() == bootstrap
    assert again.node_pids() == pids

    kafka.stop()

    assert kafka.node_pids() == {}
    assert not kafka.is_running()
    assert all(process_gone(pid) for pid in pids.values())
    assert not list(kafka.home.glob("node-*/kafka.pid"))
    assert port_is_free(kafka.base_port)

    # Restarting reuses the formatted storage: the message written before is still there.
    kafka.start()
    assert kafka.node_pids() != pids
    assert consume(bootstrap, topic, unique("group"), expected=1) == [b"hello"]
    new_pids = kafka.node_pids()
    kafka.stop()
    assert all(process_gone(pid) for pid in new_pids.values())


@pytest.mark.slow
def test_three_nodes_accept_acks_all_writes_with_one_broker_down(
    local_kafka_factory: LocalKafkaFactory, unique: UniqueName
) -> None:
    kafka = local_kafka_factory(brokers=3)
    topic = unique("replicated")
    bootstrap = kafka.start(timeout_s=90)
    create_topic(bootstrap, topic, partitions=3, replication=3)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    assert all(len(p.replicas) == 3 for p in partitions.values())
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    topic_config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert topic_config["min.insync.replicas"].value == "2"

    kafka.stop_node(2)

    assert sorted(kafka.node_pids()) == [1, 3]
    values = [f"event-{i}".encode() for i in range(200)]
    produce(bootstrap, topic, values)
    received = consume(bootstrap, topic, unique("group"), expected=len(values))
    assert sorted(received) == sorted(values)

    all_pids = kafka.node_pids()
    kafka.stop()
    assert kafka.node_pids() == {}
    assert all(process_gone(pid) for pid in all_pids.values())


def test_session_broker_fixture_serves_settings(
    settings: Settings, kafka_bootstrap: str, unique: UniqueName
) -> None:
    assert settings.bootstrap_servers == kafka_bootstrap
    topic, other = unique("session"), unique("session")
    assert topic != other and topic.startswith("session-test-session-broker")
    create_topic(kafka_bootstrap, topic, partitions=1, replication=1)
    produce(settings.bootstrap_servers, topic, [b"via-settings"])
    assert consume(settings.bootstrap_servers, topic, unique("group"), expected=1) == [b"via-settings"]
