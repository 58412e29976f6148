"""The repartition hop of the features service: raw events keyed by the pipeline's key field.

Pure logic: which partition an event's key goes to, and how a repartitioned record names the raw record it
was (topic, partition, offset, timestamp, key), so feature vectors and dead letters point at the raw record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

# Header of a repartition record: b"<raw topic>/<partition>/<offset>/<timestamp ms>" (topic names hold no
# "/"), and the raw record's own key if it had one.
SOURCE_HEADER = "streamml-source"
SOURCE_KEY_HEADER = "streamml-source-key"
# Events without a key (no key field value) all go here: one deterministic place, so they share the
# empty key's windows as they did before the hop.
KEYLESS_PARTITION = 0

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (seed 0x9747b28c), as its Java client's default partitioner computes it."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    end = length - length % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length - end
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


_PARTITIONS: dict[tuple[bytes, int], int] = {}  # keys seen recently (entity keys repeat): bounded
_PARTITIONS_MAX = 16_384


def partition_for(key: bytes | None, partitions: int) -> int:
    """The partition of a key: Kafka's default (positive murmur2 modulo the count), so a raw topic a Java
    producer keyed by the same text puts each key on the same partition number."""
    if key is None:
        return KEYLESS_PARTITION
    got = _PARTITIONS.get((key, partitions))
    if got is None:
        if len(_PARTITIONS) >= _PARTITIONS_MAX:
            _PARTITIONS.clear()
        got = _PARTITIONS[(key, partitions)] = (murmur2(key) & 0x7FFFFFFF) % partitions
    return got


def source_time(msg: Any) -> int:
    """The timestamp of the raw record a repartitioned record was (its `streamml-source` header), else the
    record's own: the time the features service orders its repartition partitions by. Kafka Streams keeps
    the input record's timestamp on repartition records; the hop's produce time would make thousands of
    events forwarded in one batch tie, and a tie-break by turns would emit the key groups at equal rates
    instead of as they came."""
    headers = msg.headers()
    if headers:
        for name, value in headers:
            if name == SOURCE_HEADER and isinstance(value, bytes):
                try:
                    return int(value.rsplit(b"/", 1)[1])
                except (IndexError, ValueError):
                    break
    return int(msg.timestamp()[1])


def key_of(raw: Mapping[str, Any], key_field: str) -> bytes | None:
    """The repartition key of a decoded raw event: its key field as the text the windows are keyed by."""
    value = raw["fields"].get(key_field)
    return None if value is None else str(value).encode()


class Source(NamedTuple):
    """The raw record a repartitioned event was (a named tuple: made twice per event on the hot path)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        value = f"{self.topic}/{self.partition}/{self.offset}/{self.timestamp}".encode()
        if self.key is None:
            return [(SOURCE_HEADER, value)]
        return [(SOURCE_HEADER, value), (SOURCE_KEY_HEADER, self.key)]

    @classmethod
    def from_headers(cls, headers: Any) -> Source | None:
        """The source named by a record's headers, a list of (name, value) as confluent-kafka gives them
        (None if absent or malformed: anyone may write to a topic)."""
        found: tuple[str, int, int, int] | None = None
        key: bytes | None = None
        for name, value in headers if isinstance(headers, list) else ():
            if name == SOURCE_KEY_HEADER and isinstance(value, bytes):
                key = value
            elif name == SOURCE_HEADER and isinstance(value, bytes):
                try:
                    topic, partition, offset, timestamp = value.decode().rsplit("/", 3)
                    found = (topic, int(partition), int(offset), int(timestamp))
                except (UnicodeDecodeError, ValueError):
                    return None
                if not topic or min(found[1], found[2]) < 0:
                    return None
        if found is None:
            return None
        return cls(*found, key)

    # The part of a confluent-kafka Message that dead letters read, so a record refused after the hop is
    # dead-lettered with the raw record's coordinates and bytes.
    def as_message(self, value: bytes | None) -> _SourceMessage:
        return _SourceMessage(self, value)


class _SourceMessage:
    def __init__(self, source: Source, value: bytes | None) -> None:
        self._source, self._value = source, value

    def topic(self) -> str:
        return self._source.topic

    def partition(self) -> int:
        return self._source.partition

    def offset(self) -> int:
        return self._source.offset

    def key(self) -> bytes | None:
        return self._source.key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, self._source.timestamp)
