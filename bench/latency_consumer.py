"""The end-to-end latency probe: a plain consumer of the predictions topic in its own process.

It stamps each prediction the moment `poll` hands it over (the moment an application could act on it) and
subtracts the produce time the benchmark wrote into the event id. A separate process keeps the producer's
pacing and this stamping from competing for one GIL; it imports only confluent-kafka so it starts fast.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

MEASURED_PREFIX = b"m-"


def event_id(seq: int, sent_ns: int) -> str:
    """Id of a measured event: the probe reads its produce time back from it (µs precision)."""
    return f"m-{seq}-{sent_ns}"


def sent_ns_of(key: bytes) -> int | None:
    """Produce time (ns since epoch) encoded in a measured event id; None for warm-up events."""
    if not key.startswith(MEASURED_PREFIX):
        return None
    try:
        return int(key.rsplit(b"-", 1)[1])
    except (IndexError, ValueError):
        return None


Sample = tuple[int, int, int, int, int]  # sent ns, latency µs, then ms spent in each of the 3 stages


def run(conf: dict[str, Any], topic: str, expected: int, conn: Connection) -> None:
    """Samples of `expected` measured predictions (or until the parent says "stop"), sent as a list.

    The stages come from the stamps the services write (feature_time, prediction_time: the start of
    the batch that handled the event), decoded only after the measurement so the probe stays light.
    """
    consumer = Consumer(
        {
            **conf,  # the deployment's brokers, security and a group of its own
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 100,
        }
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    consumer.poll(0.5)  # connects and fetches before the parent starts measuring
    conn.send("ready")
    seen: list[tuple[int, int, bytes]] = []
    try:
        while len(seen) < expected:
            if conn.poll():
                conn.recv()
                break
            msg = consumer.poll(0.1)
            if msg is None:
                continue
            received = time.time_ns()
            if msg.error() is not None:
                continue
            key, value = msg.key(), msg.value()
            sent = sent_ns_of(key) if isinstance(key, bytes) else None
            if sent is not None and value is not None:
                seen.append((sent, received, value))
    finally:
        consumer.close()
    conn.send(stages(seen))


def stages(seen: list[tuple[int, int, bytes]]) -> list[Sample]:
    from streamml.codec import codec_for  # after measuring: keeps the probe's start-up light

    decode = codec_for("Prediction").decode
    out: list[Sample] = []
    for sent, received, value in seen:
        p = decode(value)
        sent_ms, received_ms = sent // 1_000_000, received // 1_000_000
        featured, predicted = p["feature_time"], p["prediction_time"]
        out.append(
            (
                sent,
                (received - sent) // 1000,
                featured - sent_ms,
                predicted - featured,
                received_ms - predicted,
            )
        )
    return out
