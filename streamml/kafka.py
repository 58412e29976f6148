"""Kafka clients built from settings, the broker check every entry point runs, and topic administration."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]

from streamml.errors import BrokerUnavailableError, TopicMismatchError
from streamml.settings import Settings
from streamml.topics import TopicSpec

log = logging.getLogger(__name__)
_quiet = logging.getLogger("streamml.kafka.librdkafka")


def _base(settings: Settings, **overrides: Any) -> dict[str, Any]:
    conf = settings.kafka_config()
    conf["logger"] = _quiet  # librdkafka's connection chatter goes through logging, not stderr
    conf.update(overrides)
    return conf


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(_base(settings))


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """A producer that does not lose acknowledged records: idempotent, acks=all."""
    conf = {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
    conf.update(overrides)
    return Producer(_base(settings, **conf))


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    conf = {
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }
    conf.update(overrides)
    return Consumer(_base(settings, **conf))


def _tcp_reachable(servers: str, timeout_s: float) -> bool:
    for server in servers.split(","):
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def check_broker(settings: Settings, timeout_s: float | None = None) -> None:
    """Fail fast, with what to do, when the broker cannot be reached."""
    timeout = settings.broker_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout
    hint = (
        f"Kafka is not reachable at {settings.bootstrap_servers} (waited {timeout:.0f} s). "
        "Start the local broker with `make kafka-up`, or point STREAMML_BOOTSTRAP_SERVERS at your cluster."
    )
    while not _tcp_reachable(settings.bootstrap_servers, 1.0):
        if time.monotonic() >= deadline:
            raise BrokerUnavailableError(hint)
        time.sleep(0.2)
    try:
        make_admin(settings).list_topics(timeout=max(1.0, deadline - time.monotonic()))
    except KafkaException as exc:
        raise BrokerUnavailableError(f"{hint} ({exc})") from exc


@dataclass(frozen=True)
class TopicStatus:
    spec: TopicSpec
    created: bool


def ensure_topics(settings: Settings, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[TopicStatus]:
    """Create missing topics and verify existing ones against their declaration (idempotent)."""
    admin = make_admin(settings)
    existing = admin.list_topics(timeout=timeout_s).topics
    missing = [s for s in specs if s.name not in existing]
    if missing:
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=s.replication_factor,
                config=s.topic_config(settings.min_insync_replicas),
            )
            for s in missing
        ]
        for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won the race
                    raise TopicMismatchError(f"cannot create topic {name}: {exc}") from exc
    present = [s for s in specs if s.name in existing]
    problems = _verify(admin, present, existing, timeout_s)
    if problems:
        raise TopicMismatchError(
            "existing topics differ from the catalogue:\n  "
            + "\n  ".join(problems)
            + "\nDelete and recreate them (data is lost), or change the settings to match."
        )
    created = {s.name for s in missing}
    return [TopicStatus(s, s.name in created) for s in specs]


def _verify(admin: AdminClient, specs: list[TopicSpec], existing: Any, timeout_s: float) -> list[str]:
    problems = []
    for spec in specs:
        have = len(existing[spec.name].partitions)
        if have != spec.partitions:
            problems.append(f"{spec.name}: {have} partitions, declared {spec.partitions}")
    if not specs:
        return problems
    resources = [ConfigResource(ResourceType.TOPIC, s.name) for s in specs]
    configs = admin.describe_configs(resources, request_timeout=timeout_s)
    by_name = {s.name: s for s in specs}
    for resource, future in configs.items():
        spec = by_name[resource.name]
        policy = future.result()["cleanup.policy"].value
        if policy != spec.cleanup_policy:
            problems.append(f"{spec.name}: cleanup.policy={policy}, declared {spec.cleanup_policy}")
    return problems
