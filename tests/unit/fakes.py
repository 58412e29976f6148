"""Stand-ins for confluent-kafka objects, for unit tests that run without a broker.

- `FakeMessage`: one record as a consumer hands it out (`confluent_kafka.Message`). Every accessor the
  services call is there, and each returns what the constructor was given; what a test does not give
  has the value a plain record on partition 0 would have (no key, no headers, no error, created at
  `KAFKA_TS`).
- `FakeProducer`: a producer that records what it is asked to produce and delivers nothing.

Fakes that script behaviour (delivery outcomes, transactions that fail, consumers that hand out batches)
stay with the tests that script it; they build on these where they can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME

KAFKA_TS = 1_700_000_000_000
"""The broker timestamp (ms) of a FakeMessage unless a test gives another."""


class FakeMessage:
    """The part of a confluent-kafka Message the services read: topic, partition, offset, key, value,
    headers, timestamp and error, each a method as on the real class.

    `FakeMessage(topic, value, offset)` is a plain record on partition 0; the rest are keywords:
    `partition`, `key`, `headers` (a list of (name, bytes) or None), `timestamp` ((type, ms), by default
    created at KAFKA_TS) and `error` (a KafkaError for an error event the consumer hands out, else None).
    """

    def __init__(
        self,
        topic: str,
        value: bytes | None = None,
        offset: int = 0,
        *,
        partition: int = 0,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp: tuple[int, int] = (TIMESTAMP_CREATE_TIME, KAFKA_TS),
        error: Any = None,
    ) -> None:
        self._topic, self._value, self._offset = topic, value, offset
        self._partition, self._key, self._headers = partition, key, headers
        self._timestamp, self._error = timestamp, error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def error(self) -> Any:
        return self._error

    def __repr__(self) -> str:
        return f"FakeMessage({self._topic}[{self._partition}]@{self._offset}: {self._value!r:.120})"


@dataclass
class FakeProducer:
    """A producer that records each produce call as (topic, value, key) in `produced` and never delivers:
    poll and flush report nothing waiting. Other arguments (partition, headers, on_delivery) are ignored."""

    produced: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **_: Any) -> None:
        self.produced.append((topic, value, key))

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        return 0
