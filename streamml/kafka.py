"""Kafka clients built from settings, the broker check every entry point runs, and topic administration."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

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


def data_fetch(settings: Settings) -> dict[str, Any]:
    """The fetch options of a data loop's consumer. By default (1 byte, 500 ms) the broker answers as soon
    as there is a record, so the long wait adds no latency and an idle consumer asks each broker twice a
    second. A larger `fetch_min_bytes` gathers that much per answer (fewer requests for the broker and the
    client under load) and holds a fetch up to `fetch_max_wait_ms` while less is there (latency per hop)."""
    return {"fetch.min.bytes": settings.fetch_min_bytes, "fetch.wait.max.ms": settings.fetch_max_wait_ms}


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
        list_topics(make_admin(settings), deadline)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"{hint} ({exc})") from exc


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The KafkaError a confluent-kafka call raised (KafkaException carries it as its first argument)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return err if isinstance(err, KafkaError) else None


# Metadata errors that say "not now" (a broker of the bootstrap list is down, or just went away)
_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT}


# One metadata request waits at most this long: a request sent to a broker that is going away can wait
# for it much longer (make chaos: a monitor restarted during a broker restart got no metadata in 30 s while
# two brokers served, and exited), and the next request goes to a broker that answers.
METADATA_ATTEMPT_S = 5.0


def list_topics(admin: AdminClient, deadline: float) -> Any:
    """Cluster metadata, asked again until `deadline` while the answer is a transient failure (a broker of
    the bootstrap list being down fails the request sent to it; another broker answers the next one)."""
    while True:
        try:
            return admin.list_topics(timeout=max(1.0, min(METADATA_ATTEMPT_S, deadline - time.monotonic())))
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or not _transient(err) or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _transient(err: KafkaError) -> bool:
    return bool(err.retriable()) or err.code() in _TRANSIENT


@dataclass(frozen=True)
class TopicStatus:
    spec: TopicSpec
    created: bool


def ensure_topics(settings: Settings, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[TopicStatus]:
    """Create missing topics and verify existing ones against their declaration (idempotent).

    Every topic this call did not create itself is verified, including one the broker reports as already
    existing although our metadata did not list it yet (another client created it a moment ago).
    """
    deadline = time.monotonic() + timeout_s
    admin = make_admin(settings)
    try:
        existing = list_topics(admin, deadline).topics
    except KafkaException as exc:
        if (err := kafka_error(exc)) is not None and _transient(err):  # not now, not wrong
            raise BrokerUnavailableError(f"no cluster metadata within {timeout_s:.0f} s: {exc}") from exc
        raise
    missing = [s for s in specs if s.name not in existing]
    created: set[str] = set()
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
                code = exc.args[0].code()
                if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                    raise TopicMismatchError(
                        f"cannot create topic {name}: it does not exist or this principal "
                        f"({settings.sasl_username or 'anonymous'}) may not see it. On a secured cluster the "
                        "user creates the topics (`streamml topics create`, `streamml pipeline apply`) after "
                        "the operator granted them (`streamml acl apply --pipeline FILE`)."
                    ) from exc
                if code != KafkaError.TOPIC_ALREADY_EXISTS:
                    if _transient(exc.args[0]):  # not now, not wrong: a caller may try again later
                        raise BrokerUnavailableError(f"cannot create topic {name}: {exc}") from exc
                    raise TopicMismatchError(f"cannot create topic {name}: {exc}") from exc
            else:
                created.add(name)
    problems = _verify(admin, [s for s in specs if s.name not in created], deadline)
    if problems:
        raise TopicMismatchError(
            "existing topics differ from the catalogue:\n  "
            + "\n  ".join(problems)
            + "\nDelete and recreate them (data is lost), or change the settings to match."
        )
    return [TopicStatus(s, s.name in created) for s in specs]


# "The topic exists but this broker's metadata does not show it yet": retried until the deadline.
_NOT_YET_PROPAGATED = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.LEADER_NOT_AVAILABLE}
_PROPAGATION_POLL_S = 0.1


def _verify(admin: AdminClient, specs: list[TopicSpec], deadline: float) -> list[str]:
    if not specs:
        return []
    partitions = _partition_counts(admin, [s.name for s in specs], deadline)
    policies = _cleanup_policies(admin, [s.name for s in specs], deadline)
    problems = []
    grow = [s for s in specs if s.may_grow and partitions[s.name] < s.partitions]
    if grow:
        _grow(admin, grow, deadline)
        partitions.update(
            _partition_counts(admin, [s.name for s in grow], deadline, {s.name: s.partitions for s in grow})
        )
    for spec in specs:
        if partitions[spec.name] != spec.partitions:
            problems.append(f"{spec.name}: {partitions[spec.name]} partitions, declared {spec.partitions}")
        if policies[spec.name] != spec.cleanup_policy:
            problems.append(
                f"{spec.name}: cleanup.policy={policies[spec.name]}, declared {spec.cleanup_policy}"
            )
    return problems


def _remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def _grow(admin: AdminClient, specs: list[TopicSpec], deadline: float) -> None:
    """Add partitions up to the declared count (topics declared `may_grow`)."""
    wanted = [NewPartitions(s.name, s.partitions) for s in specs]
    for name, future in admin.create_partitions(wanted, request_timeout=_remaining(deadline)).items():
        try:
            future.result()
            log.info("%s: partitions raised to the declared count", name)
        except KafkaException as exc:  # another instance raised it a moment ago: verified below
            if exc.args[0].code() != KafkaError.INVALID_PARTITIONS:
                raise TopicMismatchError(f"cannot add partitions to {name}: {exc}") from exc


def _partition_counts(
    admin: AdminClient, names: list[str], deadline: float, at_least: dict[str, int] | None = None
) -> dict[str, int]:
    """Partition count per topic, from cluster metadata, waiting for topics it does not show yet (and, with
    `at_least`, for added partitions to show)."""
    counts: dict[str, int] = {}
    while True:
        topics = list_topics(admin, deadline).topics
        for name in names:
            meta = topics.get(name)
            if (
                meta is not None
                and meta.error is None
                and len(meta.partitions) >= (at_least or {}).get(name, 1)
            ):
                counts[name] = len(meta.partitions)
        pending = [n for n in names if n not in counts]
        if not pending:
            return counts
        if time.monotonic() >= deadline:
            raise TopicMismatchError(
                f"topics {', '.join(pending)} exist (the broker refused to create them again) but did not "
                "appear in its metadata in time; run the command again"
            )
        time.sleep(_PROPAGATION_POLL_S)


def _cleanup_policies(admin: AdminClient, names: list[str], deadline: float) -> dict[str, str]:
    """cleanup.policy per topic via describe_configs, retried while a new topic is still propagating."""
    policies: dict[str, str] = {}
    pending = list(names)
    while pending:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in pending]
        futures = admin.describe_configs(resources, request_timeout=_remaining(deadline))
        for resource, future in futures.items():
            try:
                policies[resource.name] = future.result()["cleanup.policy"].value
            except KafkaException as exc:
                err = exc.args[0]
                # a topic still propagating, or a broker that went away (the next attempt goes to another)
                waits = err.code() in _NOT_YET_PROPAGATED or _transient(err)
                if not waits or time.monotonic() >= deadline:
                    why = f"cannot read the configs of topic {resource.name}: {exc}"
                    if _transient(err):  # a broker away past the deadline: not now, not wrong
                        raise BrokerUnavailableError(why) from exc
                    raise TopicMismatchError(why) from exc
        pending = [n for n in pending if n not in policies]
        if pending:
            time.sleep(_PROPAGATION_POLL_S)
    return policies
