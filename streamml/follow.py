"""Broadcast reading of control topics: every instance reads every partition itself, by assignment.

A consumer group shared by the instances of a service would give each control record to one instance
only; control records (definitions, versions, decisions) must reach all of them. So a `ControlTail`
assigns itself every partition of the topics it follows, with a throwaway group id it never joins or
commits to, and starts where the bootstrap stopped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from streamml.kafka import kafka_error, make_consumer
from streamml.metrics import ERRORS
from streamml.runtime import is_retriable
from streamml.runtime import watermarks as topic_watermarks
from streamml.settings import Settings

log = logging.getLogger(__name__)

# An idle tail looks again this often: the follow latency is about half of it plus the broker's answer.
IDLE_SLEEP_S = 0.02
MAX_RECORDS = 100  # per step; control records are few, and each is applied on the event loop
ERROR_BACKOFF_S = 1.0
LOG_EVERY_S = 5.0  # one line per this many seconds while the broker keeps failing
METADATA_TIMEOUT_S = 10.0


class ConsumerLike(Protocol):
    """What a tail uses of a confluent-kafka Consumer (tests pass a fake)."""

    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Message]: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def close(self) -> None: ...


# -- pure decisions ----------------------------------------------------------------------------------
def start_offsets(
    applied: Mapping[tuple[str, int], int], topic: str, partitions: Iterable[int]
) -> list[TopicPartition]:
    """Where to start each partition: after what the bootstrap applied, else at the beginning."""
    return [TopicPartition(topic, p, applied.get((topic, p), OFFSET_BEGINNING)) for p in sorted(partitions)]


def is_caught_up(positions: Mapping[int, int], ends: Mapping[int, int]) -> bool:
    """Every partition read up to `ends` (an empty partition, end 0, needs no reading)."""
    return all(positions.get(p, 0) >= end for p, end in ends.items())


def advance(positions: dict[tuple[str, int], int], reported: Iterable[TopicPartition]) -> None:
    """Raise known positions to what the consumer reports; an unknown (negative) offset changes nothing.
    The consumer's position, not the last record, says how far a partition is read: transaction markers
    take offsets but are never delivered."""
    for tp in reported:
        if tp.offset >= 0 and tp.error is None:
            key = (tp.topic, tp.partition)
            positions[key] = max(positions.get(key, 0), tp.offset)


class ControlTail:
    """One assign-only, read_committed consumer over the followed topics, stepped on the event loop.

    `deliver` gets each record in partition order; `start_offset` says where each partition starts.
    Positions say how far each partition has been read (and delivered), for `caught_up`.
    """

    def __init__(
        self,
        settings: Settings,
        name: str,
        deliver: Callable[[Message], None],
        start: Callable[[str, Iterable[int]], list[TopicPartition]],
        consumer_factory: Callable[[], ConsumerLike] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.deliver = deliver
        self.start = start
        self._factory = consumer_factory or self._make_consumer
        self.topics: list[str] = []
        self.partitions: dict[str, list[int]] = {}  # assigned, per topic
        self.positions: dict[tuple[str, int], int] = {}
        self.delivered = 0
        self._consumer: ConsumerLike | None = None
        self._marks: Any = None  # a second consumer for watermark queries, used from worker threads
        self._marks_lock = threading.Lock()
        self._last_log = 0.0
        self._closed = False

    def _make_consumer(self) -> ConsumerLike:
        # A group id of its own, never joined or committed: the consumer only needs one to exist.
        group = f"{self.settings.topic_prefix}-{self.name}-control-{uuid.uuid4().hex[:12]}"
        consumer: ConsumerLike = make_consumer(
            self.settings,
            group,
            **{
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 100,
            },
        )
        return consumer

    # -- topics ---------------------------------------------------------------------------------------
    def add(self, topic: str) -> None:
        """Follow `topic` too (assigned by the next `assign_pending`)."""
        if topic not in self.topics:
            self.topics.append(topic)

    def pending(self) -> list[str]:
        return [t for t in self.topics if t not in self.partitions]

    def assign(self, topic: str, partitions: Iterable[int]) -> None:
        """Assign every partition of `topic`, each from where `start` says."""
        parts = self.start(topic, partitions)
        consumer = self._ensure_consumer()
        consumer.incremental_assign(parts)
        self.partitions[topic] = sorted(tp.partition for tp in parts)
        for tp in parts:
            if tp.offset >= 0:
                self.positions[(topic, tp.partition)] = max(
                    self.positions.get((topic, tp.partition), 0), tp.offset
                )
        log.info("%s: following %s from %s", self.name, topic, [(tp.partition, tp.offset) for tp in parts])

    def _ensure_consumer(self) -> ConsumerLike:
        if self._consumer is None:
            self._consumer = self._factory()
        return self._consumer

    def topic_partitions(self, topic: str) -> list[int] | None:
        """The partitions of `topic` (blocking: call from a worker thread); None if it does not exist."""
        marks = self.watermarks(topic)
        return None if marks is None else sorted(marks)

    def watermarks(self, topic: str) -> dict[int, tuple[int, int]] | None:
        """(low, high) per partition (blocking: call from a worker thread)."""
        with self._marks_lock:
            if self._marks is None:
                self._marks = make_consumer(
                    self.settings, f"{self.settings.topic_prefix}-{self.name}-control-marks"
                )
            return topic_watermarks(self._marks, topic, METADATA_TIMEOUT_S)

    # -- reading --------------------------------------------------------------------------------------
    def step(self) -> int:
        """Consume what is there (never waits), deliver it in order, update positions; returns how many
        records were delivered. Broker errors are logged and counted, never raised."""
        consumer = self._consumer
        if consumer is None:
            return 0
        try:
            msgs = consumer.consume(MAX_RECORDS, 0)
        except KafkaException as exc:
            self._error(kafka_error(exc), exc)
            return 0
        n = 0
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._error(err, None)
                continue
            topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
            self.deliver(msg)  # the caller's record boundary: it never raises
            key = (topic, partition)
            self.positions[key] = max(self.positions.get(key, 0), offset + 1)
            n += 1
        self.delivered += n
        assigned = [TopicPartition(t, p) for t, parts in self.partitions.items() for p in parts]
        if assigned:
            try:
                advance(self.positions, consumer.position(assigned))
            except KafkaException as exc:
                self._error(kafka_error(exc), exc)
        return n

    def _error(self, err: KafkaError | None, exc: BaseException | None) -> None:
        retriable = err is not None and is_retriable(err)
        ERRORS.labels(self.name, "control_consume").inc()
        if err is not None and err.fatal():
            self.reset()  # this consumer cannot go on: a new one starts where the records were applied
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.log(
                logging.WARNING if retriable else logging.ERROR,
                "%s: reading control topics: %s%s",
                self.name,
                err or exc,
                " (retrying)" if retriable else "",
            )

    def reset(self) -> None:
        """Drop the consumer; the next `run` step makes a new one and assigns every topic again."""
        consumer, self._consumer = self._consumer, None
        self.partitions.clear()
        if consumer is not None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: closing the failed control consumer: %s", self.name, exc)

    def position(self, topic: str) -> dict[int, int]:
        """Next offset to read per partition of `topic`: everything before it has been applied."""
        return {p: self.positions.get((topic, p), 0) for p in self.partitions.get(topic, [])}

    async def run(self) -> None:
        """Follow until cancelled (the app stopping); the consumer is closed on the way out."""
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                for topic in self.pending():
                    try:
                        parts = await loop.run_in_executor(None, self.topic_partitions, topic)
                    except KafkaException as exc:
                        self._error(kafka_error(exc), exc)
                        parts = None
                    if not parts:
                        await asyncio.sleep(ERROR_BACKOFF_S)  # not there yet: try again
                        continue
                    self.assign(topic, parts)
                n = self.step()
                await asyncio.sleep(0 if n else IDLE_SLEEP_S)
        finally:
            self.close()

    async def caught_up(self, topic: str, timeout_s: float) -> bool:
        """Wait until everything written to `topic` before this call has been applied; False on timeout.

        A single writer asks this after taking over a role: "have I applied every record up to now?"
        The end is the high watermark, so a transaction still open there is waited for.
        """
        if topic not in self.topics:
            raise ValueError(f"{self.name} does not follow {topic}")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        marks = None
        while marks is None:
            try:
                marks = await loop.run_in_executor(None, self.watermarks, topic)
            except KafkaException as exc:
                self._error(kafka_error(exc), exc)
            if marks is None:
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(min(ERROR_BACKOFF_S, max(0.0, deadline - time.monotonic())))
        ends = {p: high for p, (_low, high) in marks.items()}
        while not (topic in self.partitions and is_caught_up(self.position(topic), ends)):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def close(self) -> None:
        self._closed = True
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()  # assign-only: nothing to commit, no group to leave
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: closing the control consumer: %s", self.name, exc)
        with self._marks_lock:
            marks, self._marks = self._marks, None
        if marks is not None:
            marks.close()
