"""Writer election and fencing on the real broker: slots split between instances, move on, fence zombies."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import KafkaException

from streamml.election import WriterSlots, slot_of
from streamml.kafka import ensure_topics
from streamml.runtime import Output, read_to_end
from streamml.settings import Settings
from streamml.topics import Catalogue


def _settings(bootstrap: str, prefix: str, instance: str) -> Settings:
    return Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, instance_id=instance, writer_slots=4)


def _poll_until(slots: list[WriterSlots], done: object, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for s in slots:
            s.poll()
        if done():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout_s} s: {[sorted(s.producers) for s in slots]}")


def test_two_instances_split_the_slots_and_the_survivor_takes_all_fencing_the_zombie(
    kafka_bootstrap: str,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    a_settings, b_settings = _settings(kafka_bootstrap, prefix, "a"), _settings(kafka_bootstrap, prefix, "b")
    catalogue = Catalogue(a_settings)
    ensure_topics(a_settings, [catalogue.writers()])
    gains: dict[str, list[int]] = {"a": [], "b": []}
    a = WriterSlots(a_settings, "learner", on_gain=gains["a"].extend, on_lose=lambda _s: None)
    b = WriterSlots(b_settings, "learner", on_gain=gains["b"].extend, on_lose=lambda _s: None)
    a.start()
    _poll_until([a], lambda: len(a.producers) == 4)
    b.start()
    # Cooperative-sticky: the newcomer gets its share, the first keeps the rest; never one slot on both.
    _poll_until([a, b], lambda: len(a.producers) == 2 and len(b.producers) == 2)
    assert not set(a.producers) & set(b.producers)
    pipeline = next(f"p{i}" for i in range(100) if slot_of(f"p{i}", 4) in a.producers)
    slot = slot_of(pipeline, 4)
    assert a.owns(pipeline) and not b.owns(pipeline)
    assert a.send(slot, Output(catalogue.writers().name, b"k", b"from a", partition=slot))
    assert a.commit(slot)

    # `a` leaves the group but its producer lives on (a process that lost its membership and does not
    # know yet): `b` takes the slots and fences it; the zombie's next transaction fails, never visible.
    zombie = a.producers[slot]
    started = time.monotonic()
    assert a._consumer is not None
    a._consumer.close()
    _poll_until([b], lambda: len(b.producers) == 4)
    took = time.monotonic() - started
    assert took < 30, took
    zombie.begin_transaction()
    zombie.produce(catalogue.writers().name, b"from the zombie", b"k", partition=slot)
    try:
        zombie.commit_transaction(10)
        raise AssertionError("the zombie's commit succeeded")
    except KafkaException as exc:
        assert exc.args[0].fatal() or exc.args[0].txn_requires_abort(), exc
    values = [m.value() for m in read_to_end(a_settings, catalogue.writers().name) if m.partition() == slot]
    assert b"from a" in values and b"from the zombie" not in values
    claims = [v for v in values if v not in (b"from a",)]
    assert len(claims) >= 2  # a's claim, then b's (WriterClaim audit records)
    b.close()
