"""Bounds on what a producer can make a service do: checked before any expensive work on a record.

Every record a service reads comes from someone else; these limits keep one record from costing unbounded
memory or CPU, and keep everything a service writes about it (a feature vector, a dead letter, an alert)
small enough to fit a Kafka message. They are deliberately generous for real data.
"""

from __future__ import annotations

MAX_RAW_BYTES = 512 * 1024  # one raw event (JSON or Avro); the broker's own default limit is 1 MiB
MAX_RAW_FIELDS = 1_000  # fields in one raw event
MAX_STRING_CHARS = 10_000  # one string value in a raw event or feature vector
MAX_FIELD_NAME_CHARS = 256
MAX_EVENT_ID_CHARS = 256
MAX_INT = 2**63 - 1  # integers beyond Avro's long are refused, not rounded
MAX_LABEL_CHARS = 256  # a class label

# Dead letters echo the record that failed: capped so the dead letter always fits in a Kafka message.
DEAD_LETTER_VALUE_BYTES = 64 * 1024
DEAD_LETTER_KEY_BYTES = 1024
MESSAGE_CHARS = 2_000  # error and alert messages

MAX_CONTROL_BYTES = 60 * 1024 * 1024  # a control record (model versions carry artifacts up to 64 MiB)


def clip(text: str, limit: int = MESSAGE_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def clip_bytes(data: bytes | None, limit: int) -> tuple[bytes | None, int]:
    """(`data` cut to `limit` bytes, how many bytes were cut)."""
    if data is None or len(data) <= limit:
        return data, 0
    return data[:limit], len(data) - limit
