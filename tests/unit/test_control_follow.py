"""Following control topics by assignment: start offsets, positions, catch-up, errors (fake consumers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from streamml import follow
from streamml.codec import codec_for, use_registry
from streamml.follow import ControlTail, advance, is_caught_up, start_offsets
from streamml.registry import RegistryUnavailableError
from streamml.service import ControlFollower
from streamml.settings import Settings
from tests.unit.fakes import FakeMessage, FakeProducer


class FakeConsumer:
    """Hands out scripted batches; `positions` is what position() reports (e.g. past a txn marker)."""

    def __init__(self, batches: list[Any] | None = None) -> None:
        self.batches = list(batches or [])
        self.assigned: list[TopicPartition] = []
        self.positions: dict[tuple[str, int], int] = {}
        self.closed = False

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned.extend(partitions)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        assert timeout == 0, "a tail never waits on the event loop"
        if not self.batches:
            return []
        batch = self.batches.pop(0)
        if isinstance(batch, BaseException):
            raise batch
        return list(batch)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1001))
                for tp in partitions]  # fmt: skip

    def close(self) -> None:
        self.closed = True


def settings() -> Settings:
    return Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="p", _env_file=None)  # type: ignore[call-arg]


def tail_with(consumer: FakeConsumer, delivered: list[tuple[str, int, int]]) -> ControlTail:
    def deliver(msg: Any) -> None:
        delivered.append((msg.topic(), msg.partition(), msg.offset()))

    return ControlTail(
        settings(),
        "svc",
        deliver,
        lambda t, parts: start_offsets({}, t, parts),
        consumer_factory=lambda: consumer,
    )


# -- pure decisions ----------------------------------------------------------------------------------------
def test_start_offsets_continue_after_the_bootstrap_or_at_the_beginning() -> None:
    applied = {("p.pipelines", 0): 7, ("p.other", 1): 3}
    parts = start_offsets(applied, "p.pipelines", [1, 0])
    assert [(tp.partition, tp.offset) for tp in parts] == [(0, 7), (1, OFFSET_BEGINNING)]


def test_caught_up_needs_every_partition_at_its_end() -> None:
    assert is_caught_up({0: 5}, {0: 5})
    assert is_caught_up({0: 6, 1: 0}, {0: 5, 1: 0})  # an empty partition needs nothing
    assert not is_caught_up({0: 5}, {0: 5, 1: 2})
    assert not is_caught_up({0: 4}, {0: 5})


def test_positions_only_move_forward_and_ignore_unknown_offsets() -> None:
    positions = {("t", 0): 5}
    advance(positions, [TopicPartition("t", 0, -1001), TopicPartition("t", 1, 3), TopicPartition("t", 0, 4)])
    assert positions == {("t", 0): 5, ("t", 1): 3}
    advance(positions, [TopicPartition("t", 0, 9)])
    assert positions[("t", 0)] == 9


# -- the tail ----------------------------------------------------------------------------------------------
def test_tail_delivers_in_order_and_its_position_passes_transaction_markers() -> None:
    consumer = FakeConsumer([[FakeMessage("p.pipelines", b"a", 3), FakeMessage("p.pipelines", b"b", 4)]])
    delivered: list[tuple[str, int, int]] = []
    tail = tail_with(consumer, delivered)
    tail.add("p.pipelines")
    tail.assign("p.pipelines", [0])
    assert tail.step() == 2
    assert delivered == [("p.pipelines", 0, 3), ("p.pipelines", 0, 4)]
    assert tail.position("p.pipelines") == {0: 5}
    consumer.positions[("p.pipelines", 0)] = 6  # a commit marker at offset 5: never delivered
    assert tail.step() == 0
    assert tail.position("p.pipelines") == {0: 6}
    assert is_caught_up(tail.position("p.pipelines"), {0: 6})


def test_tail_starts_where_it_is_told() -> None:
    consumer = FakeConsumer()
    tail = ControlTail(
        settings(), "svc", lambda _m: None, lambda t, parts: start_offsets({(t, 0): 12}, t, parts),
        consumer_factory=lambda: consumer,
    )  # fmt: skip
    tail.add("p.promotions")
    assert tail.pending() == ["p.promotions"]
    tail.assign("p.promotions", [0, 1])
    assert [(tp.partition, tp.offset) for tp in consumer.assigned] == [(0, 12), (1, OFFSET_BEGINNING)]
    assert tail.position("p.promotions") == {0: 12, 1: 0} and tail.pending() == []


def test_tail_survives_broker_errors_and_replaces_a_consumer_that_failed_for_good() -> None:
    retriable = KafkaError(KafkaError._TRANSPORT, retriable=True)
    consumer = FakeConsumer(
        [
            KafkaException(retriable),
            [FakeMessage("p.pipelines", None, -1, error=retriable)],
            [FakeMessage("p.pipelines", b"x", 0)],
        ]
    )
    delivered: list[tuple[str, int, int]] = []
    tail = tail_with(consumer, delivered)
    tail.add("p.pipelines")
    tail.assign("p.pipelines", [0])
    assert tail.step() == 0 and tail.step() == 0  # logged and counted, never raised
    assert tail.step() == 1 and delivered == [("p.pipelines", 0, 0)]
    fatal = KafkaError(KafkaError._FATAL, fatal=True)
    consumer.batches = [[FakeMessage("p.pipelines", None, -1, error=fatal)]]
    tail.step()
    assert consumer.closed and tail.pending() == ["p.pipelines"]  # reassigned by the next run step


def test_caught_up_waits_until_the_tail_has_read_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = FakeConsumer()
    tail = tail_with(consumer, [])
    tail.add("p.model-versions")
    tail.assign("p.model-versions", [0])
    monkeypatch.setattr(tail, "watermarks", lambda _t: {0: (0, 3)})

    async def scenario() -> tuple[bool, bool]:
        early = await tail.caught_up("p.model-versions", timeout_s=0.05)
        waiter = asyncio.create_task(tail.caught_up("p.model-versions", timeout_s=5))
        await asyncio.sleep(0.02)
        consumer.batches = [[FakeMessage("p.model-versions", b"v", i) for i in range(3)]]
        tail.step()
        return early, await waiter

    assert asyncio.run(scenario()) == (False, True)
    with pytest.raises(ValueError, match="does not follow"):
        asyncio.run(tail.caught_up("p.not-followed", timeout_s=0.1))


def test_run_assigns_pending_topics_and_closes_the_consumer_when_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer([[FakeMessage("p.pipelines", b"x", 0)]])
    delivered: list[tuple[str, int, int]] = []
    tail = tail_with(consumer, delivered)
    monkeypatch.setattr(tail, "topic_partitions", lambda _t: [0])
    tail.add("p.pipelines")

    async def scenario() -> None:
        task = asyncio.create_task(tail.run())
        for _ in range(100):
            await asyncio.sleep(follow.IDLE_SLEEP_S)
            if delivered:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert delivered == [("p.pipelines", 0, 0)] and consumer.closed


# -- the follower ------------------------------------------------------------------------------------------
class FakeApp:
    def __init__(self) -> None:
        self.tasks: list[Any] = []

    def task(self, fun: Any) -> Any:
        self.tasks.append(fun)
        return fun


def promotion(version: int) -> bytes:
    record = {
        "pipeline": "agrawal", "model_name": "online", "action": "PROMOTE", "version": version,
        "previous_version": None, "actor": "t", "reason": "t", "metrics": {}, "decided_at": 0,
    }  # fmt: skip
    return codec_for("Promotion").encode(record)


def test_follow_registers_one_task_and_applies_only_records_not_applied_yet() -> None:
    follower = ControlFollower(settings(), "svc")
    follower._alerts = FakeProducer()
    follower.applied[("p.promotions", 0)] = 1  # the bootstrap applied offset 0
    app = FakeApp()
    seen: list[int] = []
    follower.follow(app, "p.promotions", "Promotion", lambda r, _m: seen.append(r["version"]))  # type: ignore[arg-type]
    follower.follow(app, "p.pipelines", "PipelineDefinition", lambda r, _m: None)  # type: ignore[arg-type]
    assert len(app.tasks) == 1  # one consumer per follower, whatever it follows
    with pytest.raises(ValueError, match="followed already"):
        follower.follow(app, "p.promotions", "Promotion", lambda r, _m: None)  # type: ignore[arg-type]
    tail = follower._tail
    assert tail is not None and tail.topics == ["p.promotions", "p.pipelines"]
    parts = tail.start("p.promotions", [0])
    assert [(tp.partition, tp.offset) for tp in parts] == [(0, 1)]
    for offset, version in ((0, 1), (1, 2), (1, 2), (2, 3)):  # a replayed offset changes nothing
        follower._deliver(FakeMessage("p.promotions", promotion(version), offset))  # type: ignore[arg-type]
    assert seen == [2, 3]
    follower._deliver(FakeMessage("p.promotions", b"junk", 3))  # type: ignore[arg-type]
    assert follower.skipped == 1 and seen == [2, 3]  # skipped with a reason, never raised
    assert [topic for topic, _v, _k in follower._alerts.produced] == ["p.drift-alerts"]


class AwayRegistry:
    """A schema registry that cannot answer now, then can (reads framed records as the real one does)."""

    def __init__(self) -> None:
        self.away = True

    def decode_as(self, data: bytes, reader: Any, fast: Any = (None, None)) -> dict[str, Any]:
        if self.away:
            raise RegistryUnavailableError("registry unreachable")
        return codec_for("Promotion").decode(b"\xc3\x01" + codec_for("Promotion").header[2:] + data[5:])

    def decode(self, data: bytes) -> dict[str, Any]:
        return self.decode_as(data, None)

    def decode_features(self, data: bytes) -> dict[str, Any]:
        return self.decode_as(data, None)

    def prefetch(self, values: Any) -> None:
        if self.away:
            raise RegistryUnavailableError("registry unreachable")


def test_a_framed_control_record_waits_while_the_registry_is_away_and_applies_when_it_is_back() -> None:
    """Not the record's fault: never skipped (no CONTROL alert), applied in order once the writer schema
    can be fetched."""
    registry = AwayRegistry()
    use_registry(registry)
    try:
        follower = ControlFollower(settings(), "svc")
        follower._alerts = FakeProducer()
        follower.follow(FakeApp(), "p.promotions", "Promotion", lambda r, _m: seen.append(r["version"]))  # type: ignore[arg-type]
        seen: list[int] = []
        body = promotion(7)[10:]  # the Avro body, framed as a registry-using writer does (id 42)
        follower._deliver(FakeMessage("p.promotions", b"\x00\x00\x00\x00\x2a" + body, 0))  # type: ignore[arg-type]
        follower._deliver(FakeMessage("p.promotions", promotion(8), 1))  # type: ignore[arg-type]
        assert follower.skipped == 0 and seen == [] and follower.waiting() == 2
        registry.away = False
        assert follower.retry_waiting(time.monotonic() + 60) == 2
        assert seen == [7, 8] and follower.skipped == 0 and follower._alerts.produced == []
    finally:
        use_registry(None)
