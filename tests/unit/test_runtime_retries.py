"""Broker errors without a broker: which are retried, how the data loop holds its commit for them, bounded
stops, and the learner's size check before it publishes a model version."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from services.controller import app as controller_app
from services.learner import app as learner_app
from streamml import codec, kafka, runtime
from streamml.codec import codec_for
from streamml.errors import BrokerUnavailableError, DependencyUnavailableError, StreamMLError
from streamml.pipelines import load_file, to_definition
from streamml.registry import Registry, RegistryUnavailableError
from streamml.runtime import BatchLoop, Outbox, Output, commit_can_wait, is_permanent, is_retriable
from streamml.settings import Settings
from streamml.topics import Catalogue
from tests.unit.fakes import FakeMessage

REPO = Path(__file__).resolve().parents[2]
KEY = b"retries-test-key"

# -- classification ------------------------------------------------------------------------------------

RETRIABLE_CODES = [
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError._ALL_BROKERS_DOWN,
]


@pytest.mark.parametrize("code", RETRIABLE_CODES)
def test_broker_errors_that_pass_are_retriable_even_without_librdkafkas_flag(code: int) -> None:
    err = KafkaError(code)  # retriable() is False: librdkafka does not flag every such error
    assert is_retriable(err) and not is_permanent(err) and commit_can_wait(err)


def test_librdkafkas_retriable_flag_is_honoured() -> None:
    assert is_retriable(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, retriable=True))


@pytest.mark.parametrize(
    "code",
    [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.RECORD_LIST_TOO_LARGE],
)
def test_refusals_for_good_are_permanent_never_retried(code: int) -> None:
    err = KafkaError(code, retriable=True)
    assert is_permanent(err) and not is_retriable(err)


def test_fatal_and_unknown_errors_are_not_retried() -> None:
    assert not is_retriable(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, fatal=True))
    unknown = KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED)
    assert not is_retriable(unknown) and not is_permanent(unknown) and not commit_can_wait(unknown)


@pytest.mark.parametrize(
    "code", [KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS]
)
def test_commits_the_group_moved_past_can_wait(code: int) -> None:
    assert commit_can_wait(KafkaError(code)) and not is_retriable(KafkaError(code))


# -- fakes (messages: tests/unit/fakes.py) ---------------------------------------------------------------

Outcome = Callable[[str, bytes | None, int], KafkaError | str | None]


class FakeProducer:
    """Delivers on flush/poll with the outcome a test scripts per (topic, value, attempt): None (acked), a
    KafkaError (failed), or "stuck" (stays queued, as while the broker is away)."""

    def __init__(self, outcome: Outcome | None = None, full: int = 0) -> None:
        self.outcome: Outcome = outcome or (lambda _t, _v, _n: None)
        self.queue: list[tuple[str, bytes | None, bytes | None, Any]] = []
        self.attempts: dict[tuple[str, bytes | None], int] = {}
        self.acked: list[tuple[str, bytes | None]] = []
        self.full = full  # the next `full` produce calls raise BufferError

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        on_delivery: Any = None,
        partition: int | None = None,
    ) -> None:
        if self.full > 0:
            self.full -= 1
            raise BufferError("queue full")
        self.queue.append((topic, value, key, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        return 0  # deliveries happen on flush only, so a test knows when each attempt is made

    def flush(self, timeout: float = 0) -> int:
        waiting = []
        for topic, value, key, callback in self.queue:
            n = self.attempts[(topic, value)] = self.attempts.get((topic, value), 0) + 1
            result = self.outcome(topic, value, n)
            if isinstance(result, str):  # "stuck" (KafkaError == str leaves a pending exception)
                self.attempts[(topic, value)] -= 1
                waiting.append((topic, value, key, callback))
                continue
            if result is None:
                self.acked.append((topic, value))
            callback(result, FakeMessage(topic, value, key=key))
        self.queue = waiting
        return len(waiting)

    def __len__(self) -> int:
        return len(self.queue)


class FakeConsumer:
    def __init__(self, commit_error: KafkaError | None = None, close_error: KafkaError | None = None) -> None:
        self.commits: list[list[tuple[str, int, int]]] = []
        self.commit_error = commit_error
        self.close_error = close_error
        self.closed = False

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def assignment(self) -> list[TopicPartition]:
        return []

    def close(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise KafkaException(self.close_error)


@pytest.fixture
def settings() -> Settings:
    return Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="p", signing_key="k", _env_file=None)  # type: ignore[arg-type,call-arg]


def data_loop(settings: Settings, producer: FakeProducer, consumer: FakeConsumer | None = None) -> BatchLoop:
    loop = BatchLoop(
        settings, name="t", handler=lambda msgs: [Output("out", None, m.value()) for m in msgs], topics=set
    )
    loop._producer = producer  # type: ignore[assignment]
    loop._consumer = consumer or FakeConsumer()  # type: ignore[assignment]
    return loop


def fails_first(code: int, times: int = 1) -> Outcome:
    return lambda _t, _v, n: KafkaError(code) if n <= times else None


# -- the data loop ---------------------------------------------------------------------------------------


def test_a_retriable_delivery_failure_is_produced_again_and_holds_the_commit_until_delivered(
    settings: Settings,
) -> None:
    producer = FakeProducer(fails_first(KafkaError.NOT_LEADER_FOR_PARTITION))
    consumer = FakeConsumer()
    loop = data_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", 0), FakeMessage("in", b"b", 1)])  # type: ignore[list-item]
    assert loop._commit(force=True) is False  # both failed once: kept, nothing committed
    assert loop._holding and consumer.commits == [] and len(loop._retry) == 2
    assert loop._commit(force=True) is True  # produced again, delivered, then committed
    assert producer.acked == [("out", b"a"), ("out", b"b")]
    assert consumer.commits == [[("in", 0, 2)]] and not loop._holding


def test_outputs_stuck_while_the_broker_is_away_are_never_committed_past(settings: Settings) -> None:
    away = True
    producer = FakeProducer(lambda _t, _v, _n: "stuck" if away else None)
    consumer = FakeConsumer()
    loop = data_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", 4)])  # type: ignore[list-item]
    for _ in range(3):
        assert loop._commit(force=True, timeout_s=0) is False
    assert consumer.commits == [] and loop._holding
    away = False
    assert loop._commit(force=True, timeout_s=0) is True
    assert consumer.commits == [[("in", 0, 5)]]


def test_a_timed_out_delivery_is_produced_again(settings: Settings) -> None:
    producer = FakeProducer(fails_first(KafkaError._MSG_TIMED_OUT, times=3))
    loop = data_loop(settings, producer)
    loop.process([FakeMessage("in", b"a", 0)])  # type: ignore[list-item]
    results = [loop._commit(force=True) for _ in range(4)]
    assert results == [False, False, False, True] and producer.acked == [("out", b"a")]


def test_a_refused_output_is_dropped_and_the_commit_goes_on(settings: Settings) -> None:
    producer = FakeProducer(
        lambda _t, v, _n: KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if v == b"big" else None
    )
    consumer = FakeConsumer()
    loop = data_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"big", 0), FakeMessage("in", b"ok", 1)])  # type: ignore[list-item]
    assert loop._commit(force=True) is True and consumer.commits == [[("in", 0, 2)]]


def test_an_error_neither_retriable_nor_permanent_still_fails_the_commit(settings: Settings) -> None:
    producer = FakeProducer(lambda _t, _v, _n: KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED))
    consumer = FakeConsumer()
    loop = data_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", 0)])  # type: ignore[list-item]
    with pytest.raises(StreamMLError, match="outputs failed"):
        loop._commit(force=True)
    assert consumer.commits == []


def test_a_full_local_queue_keeps_the_output_for_later_instead_of_raising(settings: Settings) -> None:
    producer = FakeProducer(full=2)
    consumer = FakeConsumer()
    loop = data_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", 0)])  # type: ignore[list-item]
    assert loop._retry and producer.acked == []
    assert loop._commit(force=True) is True
    assert producer.acked == [("out", b"a")] and consumer.commits == [[("in", 0, 1)]]


def test_a_commit_the_group_moved_past_is_retried_later_not_fatal(settings: Settings) -> None:
    consumer = FakeConsumer(commit_error=KafkaError(KafkaError.UNKNOWN_MEMBER_ID))
    loop = data_loop(settings, FakeProducer(), consumer)
    loop.process([FakeMessage("in", b"a", 0)])  # type: ignore[list-item]
    assert loop._commit(force=True) is False
    consumer.commit_error = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    assert loop._commit(force=True) is False
    consumer.commit_error = None
    assert loop._commit(force=True) is True and consumer.commits == [[("in", 0, 1)]]
    assert loop._commit(force=True) is True and len(consumer.commits) == 1  # unchanged: not sent again
    consumer.commit_error = KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)
    loop.process([FakeMessage("in", b"b", 1)])  # type: ignore[list-item]
    with pytest.raises(StreamMLError, match="committing offsets failed"):
        loop._commit(force=True)


class StateOfEvents:
    """A handler's state: one changelog record per processed event's key since the last take."""

    def __init__(self) -> None:
        self.dirty: list[bytes] = []

    def handle(self, msgs: list[Any]) -> list[Output]:
        self.dirty += [m.value() for m in msgs]
        return [Output("out", None, m.value()) for m in msgs]

    def take(self) -> list[Output]:
        taken, self.dirty = self.dirty, []
        return [Output("changelog", None, b"state-" + v) for v in taken]


def test_at_least_once_state_is_produced_only_after_its_events_outputs_are_acknowledged(
    settings: Settings,
) -> None:
    """Output "a" stuck (broker away): its state is not produced, nothing is committed. Once "a" is
    acknowledged the state goes out, and the offsets only after the state is acknowledged too."""
    away = {"out"}
    producer = FakeProducer(lambda t, _v, _n: "stuck" if t in away else None)
    consumer = FakeConsumer()
    state = StateOfEvents()
    loop = data_loop(settings, producer, consumer)
    loop.handler, loop._state = state.handle, state.take
    loop.process([FakeMessage("in", b"a", 0)])  # type: ignore[list-item]
    assert loop._commit(force=True, timeout_s=0) is False
    assert producer.queue[0][:2] == ("out", b"a") and len(producer.queue) == 1  # no state produced
    away = {"changelog"}
    assert loop._commit(force=True, timeout_s=0) is False  # "a" acked, its state produced but stuck
    assert producer.acked == [("out", b"a")] and producer.queue[0][:2] == ("changelog", b"state-a")
    assert consumer.commits == []
    away = set()
    assert loop._commit(force=True, timeout_s=0) is True
    assert producer.acked == [("out", b"a"), ("changelog", b"state-a")]
    assert consumer.commits == [[("in", 0, 1)]]
    assert loop._commit(force=True) is True and len(producer.acked) == 2  # nothing changed since


def test_exactly_once_state_is_produced_in_the_transaction_before_its_offsets(settings: Settings) -> None:
    producer = TxnFakeProducer()
    consumer = RewindConsumer()
    state = StateOfEvents()
    loop = eos_loop(settings, producer, consumer)
    loop.handler, loop._state = state.handle, state.take
    loop.process([FakeMessage("in", b"a", 0), FakeMessage("in", b"b", 1)])  # type: ignore[list-item]
    produced = [(t, v) for t, v, _k, _cb in producer.queue]
    assert produced == [("out", b"a"), ("out", b"b")]  # state is taken at the commit, not per batch
    assert loop._commit(force=True) is True
    produced = [(t, v) for t, v, _k, _cb in producer.queue]
    assert produced[2:] == [("changelog", b"state-a"), ("changelog", b"state-b")]
    assert producer.calls == ["begin", "offsets", "commit"]


def test_stop_commits_in_flight_work_and_survives_a_consumer_already_out_of_the_group(
    settings: Settings,
) -> None:
    consumer = FakeConsumer(close_error=KafkaError(KafkaError.UNKNOWN_MEMBER_ID))
    loop = data_loop(settings, FakeProducer(), consumer)
    loop.process([FakeMessage("in", b"a", 7)])  # type: ignore[list-item]
    asyncio.run(loop.on_stop())
    assert consumer.commits == [[("in", 0, 8)]] and consumer.closed
    loop._on_revoke(consumer, [TopicPartition("in", 0)])  # type: ignore[arg-type]  # as close() does
    assert consumer.commits == [[("in", 0, 8)]]


def test_stop_is_bounded_when_the_broker_never_acknowledges(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "STOP_TIMEOUT_S", 0.4)
    consumer = FakeConsumer()
    loop = data_loop(settings, FakeProducer(lambda _t, _v, _n: "stuck"), consumer)
    loop.process([FakeMessage("in", b"a", 0)])  # type: ignore[list-item]
    started = time.monotonic()
    asyncio.run(loop.on_stop())
    assert time.monotonic() - started < 2.0
    assert consumer.commits == [] and consumer.closed  # not delivered: the input stays uncommitted


# -- the outbox (controller, trainer) --------------------------------------------------------------------


def test_outbox_delivers_through_retriable_errors_and_raises_on_a_refusal() -> None:
    producer = FakeProducer(fails_first(KafkaError.LEADER_NOT_AVAILABLE, times=2))
    outbox = Outbox(producer, "t")  # type: ignore[arg-type]
    outbox.deliver(Output("versions", b"k", b"v"), timeout_s=5)
    assert producer.acked == [("versions", b"v")]
    refused = Outbox(FakeProducer(lambda *_: KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)), "t")  # type: ignore[arg-type]
    with pytest.raises(StreamMLError, match="refused"):
        refused.deliver(Output("versions", b"k", b"v"), timeout_s=5)
    stuck = Outbox(FakeProducer(lambda *_: "stuck"), "t")  # type: ignore[arg-type]
    with pytest.raises(StreamMLError, match="not acknowledged"):
        stuck.deliver(Output("versions", b"k", b"v"), timeout_s=0.3)


def test_outbox_pump_keeps_retriable_failures_for_the_next_pump() -> None:
    producer = FakeProducer(fails_first(KafkaError._TRANSPORT))
    outbox = Outbox(producer, "t")  # type: ignore[arg-type]
    outbox.send(Output("promotions", b"k", b"decision"))
    assert outbox.pump(0) == 1 and producer.acked == []
    assert outbox.pump(0) == 0 and producer.acked == [("promotions", b"decision")]


class FakeTxnProducer:
    """A transactional producer whose commits fail as scripted (then succeed)."""

    def __init__(self, commit_errors: list[KafkaError]) -> None:
        self.commit_errors = commit_errors
        self.calls: list[str] = []
        self.committed: list[bytes] = []
        self._open: list[bytes] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self._open = []

    def produce(self, topic: str, value: Any = None, key: Any = None, **_kwargs: Any) -> None:
        self._open.append(value)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def send_offsets_to_transaction(self, positions: Any, metadata: Any, timeout: float) -> None:
        self.calls.append("offsets")

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        if self.commit_errors:
            raise KafkaException(self.commit_errors.pop(0))
        self.committed.extend(self._open)

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        self._open = []


def test_trainer_answer_commits_through_a_leader_change_and_gives_up_when_fenced() -> None:
    from services.trainer.requests import OwnershipLostError, transact

    offsets = [TopicPartition("p.training-requests", 0, 8)]
    outputs = [Output("p.model-versions", b"k", b"version"), Output("p.training-results", b"r", b"result")]
    retriable = KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, retriable=True)
    producer = FakeTxnProducer([retriable])
    transact(producer, outputs, offsets, None, timeout_s=5)  # type: ignore[arg-type]
    assert producer.committed == [b"version", b"result"]
    assert producer.calls == ["begin", "offsets", "commit", "commit"]  # the commit alone is retried

    abortable = KafkaError(KafkaError._TIMED_OUT, txn_requires_abort=True)
    producer = FakeTxnProducer([abortable])
    transact(producer, outputs, offsets, None, timeout_s=5)  # type: ignore[arg-type]
    assert producer.committed == [b"version", b"result"]  # both again, in a new transaction
    assert producer.calls == ["begin", "offsets", "commit", "abort", "begin", "offsets", "commit"]

    moved = KafkaError(KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True)  # a rebalance took it
    producer = FakeTxnProducer([moved])
    with pytest.raises(OwnershipLostError, match="aborted"):
        transact(producer, outputs, offsets, None, timeout_s=5)  # type: ignore[arg-type]
    assert producer.committed == [] and producer.calls[-1] == "abort"  # not tried again with stale metadata

    always = FakeTxnProducer([abortable] * 10)
    with pytest.raises(OwnershipLostError, match="aborted"):
        transact(always, outputs, offsets, None, timeout_s=5)  # type: ignore[arg-type]
    assert always.calls.count("begin") == 3

    fenced = KafkaError(KafkaError._FENCED, fatal=True)
    producer = FakeTxnProducer([fenced])
    with pytest.raises(OwnershipLostError, match="transaction failed"):
        transact(producer, outputs, offsets, None, timeout_s=5)  # type: ignore[arg-type]
    assert producer.committed == []  # neither the version nor the result


def test_controller_tick_survives_not_leader_for_partition(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_app, "make_consumer", lambda *_a, **_k: FakeConsumer())
    service = controller_app.ControllerService(settings, Catalogue(settings))
    monkeypatch.setattr(service, "owns", lambda _pipeline: True)
    service.logic.on_pipeline(agrawal())
    service.logic._state("agrawal").retrain_due_at = 10

    def leader_moved(_pipeline: str) -> Any:
        raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))

    monkeypatch.setattr(service, "progress", leader_moved)
    service.tick()  # logged, tried again at the next tick


# -- the learner: size before producing -------------------------------------------------------------------


def agrawal() -> dict[str, Any]:
    spec = load_file(REPO / "pipelines" / "agrawal.yaml")
    return to_definition(spec, raw_topic="p.agrawal.raw").to_avro()


def learner_with_events(settings: Settings, monkeypatch: pytest.MonkeyPatch, n: int = 50) -> Any:
    monkeypatch.setattr(learner_app, "ensure_topics", lambda *_a, **_k: None)
    service = learner_app.Learner(settings, Catalogue(settings), KEY)
    service.on_pipeline(agrawal(), None)
    learner = service.learners["agrawal"]
    for i in range(n):
        x = {"salary": 50_000.0 + i, "commission": 0.0, "age": 40, "elevel": 1, "car": 3, "zipcode": 2,
             "hvalue": 100_000.0, "hyears": 10, "loan": 20_000.0 * (i % 3)}  # fmt: skip
        learner.learn(x, i % 2 == 0)
    return service, learner


def test_a_version_too_large_to_publish_becomes_an_artifact_alert_and_learning_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, learner = learner_with_events(settings, monkeypatch)
    monkeypatch.setattr(learner_app, "MODEL_VERSION_MAX_BYTES", 1000)
    outputs = service._snapshot("agrawal", learner)
    assert [o.topic for o in outputs] == ["p.drift-alerts"]  # no version, no AUTO promotion
    alert = codec_for("DriftAlert").decode(outputs[0].value)
    assert alert["kind"] == "ARTIFACT" and alert["severity"] == "CRITICAL"
    assert alert["model_version"] == 1 and alert["threshold"] == 1000.0 and alert["statistic"] > 1000
    assert "not published" in alert["message"] and "MiB" in alert["message"]
    assert learner.version == 0 and ("agrawal", "online") not in service.latest
    assert service._snapshot("agrawal", learner) == []  # still too large: logged and counted, one alert
    learner.learn({"salary": 1.0}, True)  # learning goes on
    monkeypatch.setattr(learner_app, "MODEL_VERSION_MAX_BYTES", runtime.MODEL_VERSION_MAX_BYTES)
    outputs = service._snapshot("agrawal", learner)
    assert [o.topic for o in outputs] == ["p.model-versions", "p.promotions"]
    version = codec_for("ModelVersion").decode(outputs[0].value)
    assert version["version"] == 1 and version["parent_version"] is None  # numbering without a gap


def test_the_size_limit_fits_the_topic_and_every_reader() -> None:
    from streamml import limits
    from streamml.topics import MODEL_MAX_BYTES

    assert runtime.MODEL_VERSION_MAX_BYTES <= MODEL_MAX_BYTES - 64 * 1024
    assert runtime.MODEL_VERSION_MAX_BYTES <= limits.MAX_CONTROL_BYTES
    topic = Catalogue(Settings(_env_file=None)).model_versions()  # type: ignore[call-arg]
    assert int(topic.config["max.message.bytes"]) == MODEL_MAX_BYTES


def test_the_data_loop_clients_take_the_services_producer_config_and_batching(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: dict[str, Any] = {}
    consumer: dict[str, Any] = {}
    monkeypatch.setattr(runtime, "make_consumer", lambda *_a, **k: consumer.update(k) or FakeConsumer())
    monkeypatch.setattr(runtime, "make_producer", lambda _s, **conf: made.update(conf) or FakeProducer())
    tuned = settings.model_copy(update={"linger_ms": 12.0, "fetch_min_bytes": 4096, "fetch_max_wait_ms": 7})
    loop = BatchLoop(
        tuned,
        name="learner",
        handler=lambda _m: [],
        topics=set,
        producer_config={"message.max.bytes": 64 << 20},
    )
    asyncio.run(loop.on_start())
    assert made["message.max.bytes"] == 64 << 20 and made["linger.ms"] == 12.0
    assert consumer["fetch.min.bytes"] == 4096 and consumer["fetch.wait.max.ms"] == 7


def test_slow_steps_shrink_the_batch_and_quick_full_ones_grow_it_back(settings: Settings) -> None:
    loop = data_loop(settings, FakeProducer())
    assert loop._batch_limit == settings.max_batch == 2000
    loop._check_step(time.monotonic() - 1.0, 2000)  # a full batch held the event loop 1 s (and a bit)
    assert 990 <= loop._batch_limit <= 1000
    loop._sizer.step("t", loop._batch_limit, 2 * runtime.STEP_TARGET_S)
    assert 495 <= loop._batch_limit <= 500
    limit = loop._batch_limit
    loop._check_step(time.monotonic() - 1.0, 3)  # slow for another reason (the broker): not the batch size
    assert loop._batch_limit == limit
    for _ in range(10):
        loop._check_step(time.monotonic(), loop._batch_limit)
    assert loop._batch_limit == 2000  # never above max_batch
    for _ in range(10):
        loop._check_step(time.monotonic() - 1.0, loop._batch_limit)
    assert loop._batch_limit == runtime.MIN_BATCH


def test_a_much_too_slow_step_sets_the_next_batch_in_proportion() -> None:
    sizer = runtime.BatchSizer(2000)
    sizer.step("learner", 2000, 9.0)  # 4.5 ms per record (a deep tree on a starved core)
    assert sizer.limit == int(2000 * runtime.STEP_TARGET_S / 9.0) == 111  # not 1000 (4.5 s again)
    sizer.step("learner", 111, 0.6)  # a little slow: at most halved
    assert sizer.limit == 55
    start = runtime.BatchSizer(2000, start=runtime.MIN_BATCH)  # a writer loop starts small
    assert start.limit == runtime.MIN_BATCH
    start.step("learner", runtime.MIN_BATCH, 0.01)
    assert start.limit == 2 * runtime.MIN_BATCH


def test_the_worker_lets_faust_send_its_producer_buffer_before_the_app_stops() -> None:
    """Faust closes its producer before its buffer; records left there (table writes) fail the stop."""
    from types import SimpleNamespace

    from streamml import service

    class Buffer:
        def __init__(self) -> None:
            self.left = 3

        @property
        def size(self) -> int:
            self.left = max(0, self.left - 1)  # Faust's sender drains it meanwhile
            return self.left

    buffer = Buffer()
    worker = SimpleNamespace(app=SimpleNamespace(_producer=SimpleNamespace(buffer=buffer)))
    asyncio.run(service._Worker._drain_producer_buffer(worker))  # type: ignore[arg-type]
    assert buffer.left == 0
    no_producer = SimpleNamespace(app=SimpleNamespace(_producer=None))
    asyncio.run(service._Worker._drain_producer_buffer(no_producer))  # type: ignore[arg-type]


# -- exactly once: a transaction that cannot commit is aborted and the loop goes back ----------------------


class TxnFakeProducer(FakeProducer):
    """As librdkafka: a commit call that timed out goes on in the background, and until it is called again
    to its end (committed, or failed with an abortable error) any other transactional call is refused with
    _CONFLICT."""

    def __init__(self, commit_error: KafkaError | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.commit_error = commit_error
        self.abort_errors: list[KafkaError] = []
        self.committing = False  # a commit call timed out and has not been resumed to its end

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def send_offsets_to_transaction(self, *_a: Any) -> None:
        self.calls.append("offsets")

    def commit_transaction(self, _timeout: float = 0) -> None:
        if self.commit_error is not None:
            self.committing = self.commit_error.retriable() and not self.commit_error.txn_requires_abort()
            raise KafkaException(self.commit_error)
        self.committing = False
        self.calls.append("commit")

    def abort_transaction(self, _timeout: float = 0) -> None:
        if self.committing:
            raise KafkaException(KafkaError(KafkaError._CONFLICT, "commit_transaction call in progress"))
        if self.abort_errors:  # the broker does not acknowledge this attempt
            raise KafkaException(self.abort_errors.pop(0))
        self.calls.append("abort")


class RewindConsumer(FakeConsumer):
    """Holds partition in[0], whose committed offset is 7 (the first input of the transaction the tests
    give up), and records where a rewind seeks."""

    def __init__(self) -> None:
        super().__init__()
        self.held = [TopicPartition("in", 0)]
        self.seeks: list[tuple[str, int, int]] = []
        self.seek_errors: list[KafkaError] = []
        self.fetch_errors = 0
        self.left_group = False

    def consumer_group_metadata(self) -> object:
        return object()

    def assignment(self) -> list[TopicPartition]:
        return list(self.held)

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        if self.fetch_errors > 0:
            self.fetch_errors -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "coordinator away", retriable=True))
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]

    def seek(self, tp: TopicPartition) -> None:
        if self.seek_errors:
            raise KafkaException(self.seek_errors.pop(0))
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def unsubscribe(self) -> None:
        self.left_group = True

    def get_watermark_offsets(self, _tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, 9

    @property
    def rewound(self) -> bool:
        """Sought back to the committed offset, without leaving the group."""
        return self.seeks == [("in", 0, 7)] and not self.left_group


def eos_loop(settings: Settings, producer: TxnFakeProducer, consumer: RewindConsumer) -> BatchLoop:
    loop = data_loop(settings.model_copy(update={"processing_guarantee": "exactly_once"}), producer, consumer)
    assert loop.exactly_once
    return loop


@pytest.mark.parametrize("where", ["commit", "delivery"])
def test_exactly_once_aborts_a_failed_transaction_and_rewinds_to_the_committed_input(
    settings: Settings, where: str
) -> None:
    abortable = KafkaError(KafkaError._TIMED_OUT, "transaction timed out", txn_requires_abort=True)
    producer = TxnFakeProducer(commit_error=abortable if where == "commit" else None)
    if where == "delivery":
        producer.outcome = lambda *_: KafkaError(KafkaError._MSG_TIMED_OUT)
    consumer = RewindConsumer()
    loop = eos_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    if where == "delivery":
        producer.flush()
    assert loop._commit(force=True) is True  # not holding: nothing committed, the input is read again
    assert "abort" in producer.calls and "commit" not in producer.calls
    assert consumer.rewound and not loop._rewind_pending and not loop._in_txn
    loop._on_revoke(consumer, [TopicPartition("in", 0)])  # nothing read since: nothing to commit
    assert consumer.commits == []


def test_exactly_once_gives_up_a_transaction_held_too_long(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = TxnFakeProducer(commit_error=KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True))
    consumer = RewindConsumer()
    loop = eos_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    assert loop._commit(force=True) is False and loop._holding
    assert loop._held_for() < 1.0  # the clock starts at the first hold
    monkeypatch.setattr(runtime, "HOLD_LIMIT_S", -1.0)
    assert loop._held_for() > runtime.HOLD_LIMIT_S
    producer.commit_error = KafkaError(KafkaError._TIMED_OUT, "txn timed out", txn_requires_abort=True)
    loop._abort_and_rewind("held")  # the commit call in progress ends failed (the broker aborted it)
    assert loop._abort_pending and not loop._holding and not consumer.seeks
    assert loop._finish_abort() is True and producer.calls[-1] == "abort"  # `_run`'s next turn
    loop._rewind()
    assert consumer.rewound and "commit" not in producer.calls


SLOW_COMMIT = KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)


def test_exactly_once_gives_up_a_transaction_still_open_when_its_partitions_are_revoked(
    settings: Settings,
) -> None:
    """A commit that times out in the revocation goes on in the background and librdkafka refuses an abort
    (_CONFLICT) until it has ended: the loop reads nothing and begins nothing until then, and the
    partitions' next owner waits for that end before it restores their state (`_on_assign`)."""
    producer = TxnFakeProducer(commit_error=SLOW_COMMIT)
    consumer = RewindConsumer()
    loop = eos_loop(settings, producer, consumer)
    dropped: list[list[tuple[str, int]]] = []
    loop._on_revoke_hook = lambda parts: dropped.append([(tp.topic, tp.partition) for tp in parts])
    loop.process([FakeMessage("in", b"a", offset=7)])
    assert loop._commit(force=True) is False and loop._holding  # the broker is slow: holding
    loop._on_revoke(consumer, [TopicPartition("in", 0)])  # type: ignore[arg-type]
    assert producer.calls == ["begin", "offsets"] and not loop._in_txn and not loop._holding
    assert dropped == [[("in", 0)]] and loop._positions == {}
    assert loop._abort_pending and not loop._rewind_pending  # all was revoked: nothing else to rewind
    assert loop._finish_abort() is False  # still committing in the background: resumed, not refused
    producer.commit_error = None  # the broker is back: the commit in progress ends
    assert loop._finish_abort() is True and producer.calls == ["begin", "offsets", "commit"]
    assert not loop._abort_pending and loop._commit(force=True) is True


def test_exactly_once_aborts_once_the_commit_in_progress_has_failed(settings: Settings) -> None:
    producer = TxnFakeProducer(commit_error=SLOW_COMMIT)
    loop = eos_loop(settings, producer, RewindConsumer())
    loop.process([FakeMessage("in", b"a", offset=7)])
    loop._commit(force=True)
    loop._abort("held")
    assert loop._abort_pending
    producer.commit_error = KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, "aborted", txn_requires_abort=True)
    assert loop._finish_abort() is False  # the resumed commit fails: abortable now
    assert loop._finish_abort() is True and producer.calls == ["begin", "offsets", "abort"]


def test_exactly_once_retries_an_unacknowledged_abort_before_anything_else(settings: Settings) -> None:
    producer = TxnFakeProducer(commit_error=SLOW_COMMIT)
    producer.abort_errors = [KafkaError(KafkaError._TIMED_OUT, "no coordinator", retriable=True)]
    consumer = RewindConsumer()
    loop = eos_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    loop._commit(force=True)
    producer.commit_error = KafkaError(KafkaError._TIMED_OUT, "timed out", txn_requires_abort=True)
    loop._abort_and_rewind("held too long")
    assert loop._abort_pending and loop._rewind_pending and not consumer.seeks
    assert loop._finish_abort() is False  # the abort itself is not acknowledged this time
    assert loop._finish_abort() is True and producer.calls[-1] == "abort"  # `_run`'s next turn
    loop._rewind()
    assert consumer.rewound and not loop._rewind_pending and "commit" not in producer.calls


def test_a_rewind_takes_state_back_and_seeks_to_the_committed_offsets_without_leaving_the_group(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make chaos (exactly_once) lost 133 events: the old rewind left the group and joined again, and when
    librdkafka merged the two (a sibling's rebalance under way) no revocation came, so the loop read on
    past the aborted input. The rewind now seeks every assigned partition itself, after its state hooks."""
    monkeypatch.setattr(runtime, "REWIND_WAIT_S", 0.0)
    consumer = RewindConsumer()
    consumer.held = [TopicPartition("in", 0), TopicPartition("in", 1), TopicPartition("in", 2)]
    loop = eos_loop(settings, TxnFakeProducer(), consumer)
    events: list[tuple[str, list[tuple[str, int, int]]]] = []

    def revoke(parts: list[TopicPartition]) -> None:
        events.append(("revoke", [(tp.topic, tp.partition, tp.offset) for tp in parts]))

    def assign(parts: list[TopicPartition]) -> list[TopicPartition]:
        events.append(("assign", [(tp.topic, tp.partition, tp.offset) for tp in parts]))
        return parts

    loop._on_revoke_hook, loop._on_assign_hook = revoke, assign
    loop.process([FakeMessage("in", b"a", offset=9), FakeMessage("in", b"b", offset=3, partition=1)])
    consumer.fetch_errors = 1  # the coordinator does not answer: nothing is sought or dropped yet
    loop._abort_and_rewind("outputs not acknowledged")
    assert loop._rewind_pending and consumer.seeks == [] and events == []
    consumer.fetch_errors = 0
    # in[1] is not being fetched yet (just assigned): it starts at its committed offset anyway
    consumer.seek_errors = [KafkaError(KafkaError._OUTDATED)]
    consumer.held = [TopicPartition("in", 1), TopicPartition("in", 0)]
    loop._on_revoke(
        consumer, [TopicPartition("in", 2)]
    )  # (a rebalance took in[2]: read the assignment again)
    events.clear()
    loop._rewind()
    assert not loop._rewind_pending and consumer.seeks == [("in", 0, 7)] and not consumer.left_group
    assert events == [
        ("revoke", [("in", 1, -1001), ("in", 0, -1001)]),
        ("assign", [("in", 1, 7), ("in", 0, 7)]),
    ]
    assert loop._positions == {} and loop._buffers == {}

    # a seek refused for another reason: the whole rewind is tried again, nothing is read meanwhile
    consumer.seeks.clear()
    loop._rewind_pending = True
    consumer.seek_errors = [KafkaError(KafkaError._TRANSPORT, "broker down")]
    loop._rewind()
    assert loop._rewind_pending and consumer.seeks == []
    loop._rewind()
    assert not loop._rewind_pending and consumer.seeks == [("in", 1, 7), ("in", 0, 7)]


def test_a_stopping_loop_does_not_rewind(settings: Settings) -> None:
    """An abort while stopping (the producer replaced, say) reads nothing again: no offset fetch that could
    hold the stop while the broker is away; the next owner starts from the committed offsets."""
    consumer = RewindConsumer()
    consumer.fetch_errors = 10**6
    loop = eos_loop(settings, TxnFakeProducer(), consumer)
    loop._closing = loop._rewind_pending = True
    loop._rewind()
    assert not loop._rewind_pending and consumer.seeks == [] and consumer.fetch_errors == 10**6


def test_a_partition_without_a_committed_offset_is_rewound_to_its_beginning(settings: Settings) -> None:
    class Uncommitted(RewindConsumer):
        def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
            return [TopicPartition(tp.topic, tp.partition, OFFSET_INVALID) for tp in partitions]

    consumer = Uncommitted()
    loop = eos_loop(settings, TxnFakeProducer(), consumer)
    loop._rewind_pending = True
    loop._rewind()
    assert consumer.seeks == [("in", 0, OFFSET_BEGINNING)] and not loop._rewind_pending


class AssignConsumer(RewindConsumer):
    """Answers committed() after `unstable` failed attempts (a pending transaction of the previous owner)."""

    def __init__(self, unstable: int) -> None:
        super().__init__()
        self.unstable = unstable
        self.events: list[str] = []
        self.assigned: list[tuple[str, int, int]] = []

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        self.events.append("committed")
        if self.unstable > 0:
            self.unstable -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "unstable offsets", retriable=True))
        return [TopicPartition(tp.topic, tp.partition, 40 + tp.partition) for tp in partitions]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = [(tp.topic, tp.partition, tp.offset) for tp in partitions]


def test_an_assignment_restores_state_only_after_the_stable_committed_offsets(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.time, "sleep", lambda _s: None)
    consumer = AssignConsumer(unstable=2)
    loop = eos_loop(settings, TxnFakeProducer(), consumer)
    seen: list[list[tuple[str, int, int]]] = []

    def restore(parts: list[TopicPartition]) -> list[TopicPartition]:
        consumer.events.append("restore")
        seen.append([(tp.topic, tp.partition, tp.offset) for tp in parts])
        return parts

    loop._on_assign_hook = restore
    loop._on_assign(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])  # type: ignore[arg-type]
    assert consumer.events == ["committed", "committed", "committed", "restore"]
    assert seen == [[("in", 0, 40), ("in", 1, 41)]] and consumer.assigned == [("in", 0, 40), ("in", 1, 41)]

    monkeypatch.setattr(runtime, "COMMITTED_WAIT_S", 0.0)  # the broker never answers: restored anyway
    consumer = AssignConsumer(unstable=100)
    loop._on_assign(consumer, [TopicPartition("in", 0)])  # type: ignore[arg-type]
    assert consumer.events == ["committed", "restore"] and consumer.assigned[0][:2] == ("in", 0)


def test_exactly_once_stop_aborts_a_transaction_it_cannot_commit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left open, the transaction would hold read_committed readers of the partitions' next owner (their
    state restore among them) until the broker's transaction timeout."""
    monkeypatch.setattr(runtime, "STOP_TIMEOUT_S", 0.4)
    producer = TxnFakeProducer()
    producer.full = 10**6  # the local queue takes nothing: the outputs wait, the commit is never called
    consumer = RewindConsumer()
    loop = eos_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    asyncio.run(loop.on_stop())
    assert producer.calls[-1] == "abort" and "commit" not in producer.calls and consumer.closed


def test_exactly_once_stop_resumes_a_commit_in_progress_and_still_stops_in_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka cannot abort once the commit call was made: the stop resumes it until its deadline, and
    the next owner of the partitions waits for its end (`_on_assign`)."""
    monkeypatch.setattr(runtime, "STOP_TIMEOUT_S", 0.4)
    producer = TxnFakeProducer(commit_error=SLOW_COMMIT)
    consumer = RewindConsumer()
    loop = eos_loop(settings, producer, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    started = time.monotonic()
    asyncio.run(loop.on_stop())
    assert time.monotonic() - started < 5 and consumer.closed
    assert producer.calls == ["begin", "offsets"] and producer.committing


def test_a_batch_is_interleaved_over_its_partitions_keeping_each_partitions_order() -> None:
    msgs = [FakeMessage("t", b"a0", 0, partition=0), FakeMessage("t", b"a1", 1, partition=0),
            FakeMessage("t", b"a2", 2, partition=0), FakeMessage("t", b"b0", 0, partition=1),
            FakeMessage("u", b"c0", 0, partition=0)]  # fmt: skip
    assert [m.value() for m in runtime.interleave(msgs)] == [b"a0", b"b0", b"c0", b"a1", b"a2"]
    assert runtime.interleave(msgs[:3]) == msgs[:3]


class HangingOffsetsProducer(TxnFakeProducer):
    """send_offsets_to_transaction never returns (librdkafka issues 5456/5511: group coordinator gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.initialised = False

    def send_offsets_to_transaction(self, *_a: Any) -> None:
        self.calls.append("offsets")
        self.release.wait(30)

    def init_transactions(self, _timeout: float = 0) -> None:
        self.initialised = True


def test_a_wedged_send_offsets_holds_the_loop_briefly_then_the_producer_is_replaced(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "COMMIT_WAIT_S", 0.05)
    wedged, fresh = HangingOffsetsProducer(), HangingOffsetsProducer()
    monkeypatch.setattr(runtime, "make_producer", lambda *_a, **_k: fresh)
    consumer = RewindConsumer()
    loop = eos_loop(settings, wedged, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    started = time.monotonic()
    assert loop._commit(force=True, timeout_s=0.05) is False and loop._holding  # the event loop is free
    assert time.monotonic() - started < 1.5
    assert loop._commit(force=True, timeout_s=0.05) is False  # still waiting: the call is not made twice
    assert wedged.calls == ["begin", "offsets"]
    monkeypatch.setattr(runtime, "TXN_CALL_WEDGED_S", 0.0)
    assert loop._commit(force=True, timeout_s=0.05) is True and not loop._holding
    assert loop._producer is fresh and fresh.initialised and loop._abandoned == [wedged]
    assert consumer.rewound and not loop._in_txn  # back to the committed input
    assert "commit" not in wedged.calls and fresh.calls == []
    wedged.release.set()


def test_a_slow_send_offsets_is_waited_for_between_turns_not_on_the_event_loop(
    settings: Settings,
) -> None:
    """A rebalancing group makes send_offsets_to_transaction take seconds: the periodic commit waits
    LOOP_WAIT_S for it, holds, and commits at the turn after it returned (the same call, not a second)."""
    slow = HangingOffsetsProducer()
    loop = eos_loop(settings, slow, RewindConsumer())
    loop.process([FakeMessage("in", b"a", offset=7)])
    started = time.monotonic()
    assert loop._commit(force=True, timeout_s=runtime.LOOP_WAIT_S) is False and loop._holding
    assert loop._commit(force=True, timeout_s=runtime.LOOP_WAIT_S) is False
    assert time.monotonic() - started < 4 * runtime.LOOP_WAIT_S + 0.5
    slow.release.set()
    deadline = time.monotonic() + 5
    while not loop._commit(force=True, timeout_s=runtime.LOOP_WAIT_S) and time.monotonic() < deadline:
        pass
    assert slow.calls == ["begin", "offsets", "commit"] and not loop._holding and not loop._in_txn
    assert loop._producer is slow  # a slow call is not a wedged one


def test_the_hold_clock_restarts_after_a_hold_that_ended(settings: Settings) -> None:
    """HOLD_LIMIT_S gives up one hold that lasted too long, never the sum of holds that each ended."""
    producer = TxnFakeProducer(commit_error=KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True))
    loop = eos_loop(settings, producer, RewindConsumer())
    loop.process([FakeMessage("in", b"a", offset=7)])
    assert loop._commit(force=True) is False and loop._holding
    first = loop._holding_since
    producer.commit_error = None
    assert loop._commit(force=True) is True and not loop._holding and loop._held_for() == 0.0
    producer.commit_error = KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)
    loop.process([FakeMessage("in", b"b", offset=8)])
    assert loop._commit(force=True) is False and loop._holding
    assert first is not None and loop._holding_since is not None and loop._holding_since > first
    assert loop._held_for() < 1.0


def test_a_stop_never_replaces_a_wedged_producer_it_aborts_what_it_can_and_closes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "COMMIT_WAIT_S", 0.05)
    monkeypatch.setattr(runtime, "STOP_TIMEOUT_S", 0.6)
    monkeypatch.setattr(runtime, "TXN_CALL_WEDGED_S", 0.0)
    wedged = HangingOffsetsProducer()
    monkeypatch.setattr(runtime, "make_producer", lambda *_a, **_k: pytest.fail("no new producer at stop"))
    consumer = RewindConsumer()
    loop = eos_loop(settings, wedged, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    started = time.monotonic()
    asyncio.run(loop.on_stop())
    assert time.monotonic() - started < 5.0 and consumer.closed and "commit" not in wedged.calls
    wedged.release.set()


class FlakyAdmin:
    """list_topics fails with the given errors first (a bootstrap broker that is down), then answers."""

    def __init__(self, *errors: KafkaError) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.timeouts: list[float] = []

    def list_topics(self, timeout: float = 0) -> str:
        self.calls += 1
        self.timeouts.append(timeout)
        if self.errors:
            raise KafkaException(self.errors.pop(0))
        return "metadata"


def test_metadata_is_asked_again_while_a_bootstrap_broker_is_down_but_not_for_other_errors() -> None:
    admin = FlakyAdmin(KafkaError(KafkaError._TRANSPORT), KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert kafka.list_topics(admin, time.monotonic() + 10) == "metadata" and admin.calls == 3  # type: ignore[arg-type]
    denied = FlakyAdmin(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    with pytest.raises(KafkaException):
        kafka.list_topics(denied, time.monotonic() + 10)  # type: ignore[arg-type]
    assert denied.calls == 1
    late = FlakyAdmin(*[KafkaError(KafkaError._TRANSPORT)] * 100)
    with pytest.raises(KafkaException):
        kafka.list_topics(late, time.monotonic() + 0.3)  # type: ignore[arg-type]
    # a request stuck on a broker going away does not hold the whole wait: each waits METADATA_ATTEMPT_S
    stuck = FlakyAdmin(KafkaError(KafkaError._TIMED_OUT))
    assert kafka.list_topics(stuck, time.monotonic() + 60) == "metadata"  # type: ignore[arg-type]
    assert stuck.calls == 2 and max(stuck.timeouts) <= kafka.METADATA_ATTEMPT_S


def test_topics_not_checked_for_want_of_metadata_are_a_broker_problem_not_a_crash(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make chaos: a monitor restarted while a broker restarted got no metadata in time and exited with a
    traceback; it is a BrokerUnavailableError (one clear line, exit status 2) now."""
    monkeypatch.setattr(
        kafka, "make_admin", lambda _s: FlakyAdmin(*[KafkaError(KafkaError._TIMED_OUT)] * 100)
    )
    monkeypatch.setattr(kafka.time, "sleep", lambda _s: None)
    with pytest.raises(BrokerUnavailableError, match="no cluster metadata within 0 s"):
        kafka.ensure_topics(settings, [], timeout_s=0.0)


# -- a schema registry away: framed records wait, never dead-lettered --------------------------------------


class SeekConsumer(FakeConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.seeks: list[tuple[str, int, int]] = []

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


class AwayRegistry:
    """The process's registry as the codec sees it: away for `away` prefetches, then answering."""

    def __init__(self, away: int) -> None:
        self.away = away
        self.asked: list[list[bytes | None]] = []

    def prefetch(self, values: Any) -> None:
        self.asked.append(list(values))
        if self.away > 0:
            self.away -= 1
            raise RegistryUnavailableError("registry http://127.0.0.1:1 unreachable")


def test_records_needing_an_unreachable_registry_are_read_again_later_not_dead_lettered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = AwayRegistry(away=2)
    monkeypatch.setattr(codec, "_registry", registry)
    producer, consumer = FakeProducer(lambda *_: None), SeekConsumer()
    loop = data_loop(settings, producer, consumer)
    framed = b"\x00\x00\x00\x00\x07body"
    batch = [
        FakeMessage("in", framed, 5),
        FakeMessage("in", framed, 6),
        FakeMessage("in", b"x", 3, partition=1),
    ]
    loop.process(batch)  # type: ignore[arg-type]
    assert producer.queue == [] and loop._positions == {}  # nothing handled, nothing to commit past
    assert consumer.seeks == [("in", 0, 5), ("in", 1, 3)] and loop._paused_until > time.monotonic()
    first_wait = loop._dependency_wait
    loop.process(batch)  # type: ignore[arg-type]
    assert loop._dependency_wait == 2 * first_wait  # still away: waits longer
    loop.process(batch)  # type: ignore[arg-type]  # back: handled as usual
    assert [v for _t, v, _k, _cb in producer.queue] == [framed, framed, b"x"]
    assert loop._positions == {("in", 0): 7, ("in", 1): 4}


def test_registry_prefetch_raises_unavailable_only_for_ids_it_has_not_cached(settings: Settings) -> None:
    away = Registry(settings.model_copy(update={"schema_registry_url": "http://127.0.0.1:1"}), timeout_s=0.5)
    away.remember(
        7, {"type": "record", "name": "R", "fields": []}, {"type": "record", "name": "R", "fields": []}
    )
    away.prefetch([b"\x00\x00\x00\x00\x07body", b"{}", None, b"\x00\x00"])  # cached, JSON, null, too short
    with pytest.raises(RegistryUnavailableError, match="unreachable"):
        away.prefetch([b"\x00\x00\x00\x00\x08body"])
    with pytest.raises(DependencyUnavailableError):
        away.writer(8)  # and not cached as unknown: asked again next time


class FreshProducer(TxnFakeProducer):
    def __init__(self) -> None:
        super().__init__()
        self.initialised = False

    def init_transactions(self, _timeout: float = 0) -> None:
        self.initialised = True


def test_a_fatal_abort_replaces_the_producer(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """librdkafka answered an abort (the broker had timed the transaction out) with a fatal INVALID_TXN_STATE
    in a local e2e run, and the features instance exited. A new producer with the same transactional id
    aborts what is open, and the loop goes back to the committed input."""
    fresh = FreshProducer()
    monkeypatch.setattr(runtime, "make_producer", lambda *_a, **_k: fresh)
    failed = TxnFakeProducer()
    failed.abort_errors = [KafkaError(KafkaError.INVALID_TXN_STATE, "invalid state", fatal=True)]
    consumer = RewindConsumer()
    loop = eos_loop(settings, failed, consumer)
    loop.process([FakeMessage("in", b"a", offset=7)])
    loop._abort_and_rewind("outputs not acknowledged")
    assert loop._producer is fresh and fresh.initialised and loop._abandoned == [failed]
    assert not loop._abort_pending and consumer.rewound and "commit" not in failed.calls


def test_a_replaced_producer_is_let_go_after_a_while(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaced producers are purged and dropped on a daemon thread after RETIRE_AFTER_S: a long run that
    replaces some does not keep their librdkafka handles (threads, sockets) for good."""
    monkeypatch.setattr(runtime, "RETIRE_AFTER_S", 0.05)
    monkeypatch.setattr(runtime, "make_producer", lambda *_a, **_k: FreshProducer())
    failed = TxnFakeProducer()
    failed.abort_errors = [KafkaError(KafkaError.INVALID_TXN_STATE, "invalid state", fatal=True)]
    loop = eos_loop(settings, failed, RewindConsumer())
    loop.process([FakeMessage("in", b"a", offset=7)])
    loop._abort_and_rewind("outputs not acknowledged")
    deadline = time.monotonic() + 5
    while loop._abandoned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop._abandoned == [] and isinstance(loop._producer, FreshProducer)


class FencedProducer(TxnFakeProducer):
    """A producer whose transaction the coordinator timed out: every commit and begin is refused as
    fenced (fatal), as librdkafka does once the broker bumped the epoch."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(commit_error=error)
        self.error = error

    def init_transactions(self, _timeout: float = 0) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        if "fail-begin" in self.calls:
            raise KafkaException(self.error)
        super().begin_transaction()


def test_a_fenced_data_loop_replaces_its_producer_unless_fenced_again_and_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI, scale-out e2e: a features instance held a transaction while a broker was down for 15 s; the
    coordinator timed it out (transaction.timeout.ms 10 s) and librdkafka reported the bumped epoch as a
    fatal fence; the instance exited. The data loop's transactional id is its instance's own, so this is
    the broker's doing: a new producer, back to the committed input. Only repeated fences (a second process
    with this instance id) or no right to the id stop it."""
    fenced = KafkaError(KafkaError.PRODUCER_FENCED, "fenced by a newer epoch", fatal=True)
    made: list[FencedProducer] = []

    def make(*_a: Any, **_k: Any) -> FencedProducer:
        made.append(FencedProducer(fenced))
        return made[-1]

    monkeypatch.setattr(runtime, "make_producer", make)
    consumer = RewindConsumer()
    loop = eos_loop(settings, FencedProducer(fenced), consumer)
    for attempt in range(runtime.FENCES_TOLERATED):
        loop.process([FakeMessage("in", b"a", offset=7)])
        assert loop._commit(force=True)  # nothing is held: the producer was replaced, the input rewound
        assert loop._producer is made[attempt] and consumer.rewound and not loop._in_txn
        consumer.seeks.clear()
    loop.process([FakeMessage("in", b"a", offset=7)])
    with pytest.raises(StreamMLError, match="another process uses transactional id"):
        loop._commit(force=True)

    # begin_transaction refused (the fence noticed first by a delivery, say): the batch is not handled
    loop = eos_loop(settings, FencedProducer(fenced), RewindConsumer())
    loop._producer.calls.append("fail-begin")  # type: ignore[union-attr]
    loop.process([FakeMessage("in", b"a", offset=7)])
    assert loop._positions == {} and loop._producer is made[-1]

    denied = TxnFakeProducer(
        KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "denied", fatal=True)
    )
    loop = eos_loop(settings, denied, RewindConsumer())
    loop.process([FakeMessage("in", b"a", offset=7)])
    with pytest.raises(StreamMLError, match="denied"):
        loop._commit(force=True)


class _Future:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def result(self) -> Any:
        if isinstance(self.outcome, KafkaError):
            raise KafkaException(self.outcome)
        return self.outcome


class _Config:
    def __init__(self, value: str) -> None:
        self.value = value


class _ConfigsAdmin:
    """describe_configs answering each call with the next outcome (a KafkaError or a policy)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, _Future]:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, str):
            outcome = {"cleanup.policy": _Config(outcome)}
        return {r: _Future(outcome) for r in resources}


def test_a_broker_going_away_while_topic_configs_are_read_is_retried_not_fatal() -> None:
    # The restarted monitor of a chaos run died on start-up this way while a broker was stopped.
    admin = _ConfigsAdmin(KafkaError(KafkaError._TRANSPORT), KafkaError(KafkaError._TIMED_OUT), "compact")
    policies = kafka._cleanup_policies(admin, ["p.pipelines"], time.monotonic() + 10)  # type: ignore[arg-type]
    assert policies == {"p.pipelines": "compact"} and admin.calls == 3


def test_a_refusal_of_the_topic_configs_still_fails_start_up_with_the_reason() -> None:
    admin = _ConfigsAdmin(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    with pytest.raises(kafka.TopicMismatchError, match=r"cannot read the configs of topic p\.pipelines"):
        kafka._cleanup_policies(admin, ["p.pipelines"], time.monotonic() + 10)  # type: ignore[arg-type]
    transport = _ConfigsAdmin(*[KafkaError(KafkaError._TRANSPORT)] * 50)
    with pytest.raises(kafka.BrokerUnavailableError):  # a broker away past the deadline: "not now"
        kafka._cleanup_policies(transport, ["p.pipelines"], time.monotonic() + 0.3)  # type: ignore[arg-type]


class JoiningConsumer(FakeConsumer):
    """A consumer whose group membership is what the test says (None: the coordinator never saw it)."""

    def __init__(self, member: str | None) -> None:
        super().__init__()
        self.member = member
        self.subscriptions: list[list[str]] = []

    def subscribe(self, topics: list[str], **_callbacks: Any) -> None:
        self.subscriptions.append(topics)

    def memberid(self) -> str | None:
        return self.member


def test_a_consumer_that_never_joins_its_group_is_replaced_and_subscribes_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck, fresh = JoiningConsumer(None), JoiningConsumer(None)
    loop = data_loop(settings, FakeProducer(), stuck)
    monkeypatch.setattr(loop, "_new_consumer", lambda: fresh)
    loop._resubscribe({"b", "a"})
    loop._check_joined()
    assert loop._consumer is stuck  # not before JOIN_WAIT_S
    monkeypatch.setattr(runtime, "JOIN_WAIT_S", 0.0)
    loop._join_deadline = time.monotonic()
    loop._check_joined()
    assert loop._consumer is fresh and fresh.subscriptions == [["a", "b"]]
    deadline = time.monotonic() + 5
    while not stuck.closed and time.monotonic() < deadline:  # closed on a thread of its own
        time.sleep(0.01)
    assert stuck.closed
    fresh.member = "m-1"  # the coordinator has seen it: never replaced again
    loop._check_joined()
    assert loop._join_deadline is None and loop._consumer is fresh


def test_a_consumer_in_its_group_is_kept_however_long_its_first_assignment_takes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    joined = JoiningConsumer("m-1")  # a member id: the coordinator answered (the rebalance may go on)
    loop = data_loop(settings, FakeProducer(), joined)
    monkeypatch.setattr(runtime, "JOIN_WAIT_S", 0.0)
    monkeypatch.setattr(loop, "_new_consumer", lambda: pytest.fail("a member is never replaced"))
    loop._resubscribe({"a"})
    loop._check_joined()
    assert loop._consumer is joined and loop._join_deadline is None


class PausingConsumer(FakeConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []

    def _note(self, what: str, partitions: list[TopicPartition]) -> None:
        self.calls.append((what, sorted((tp.topic, tp.partition) for tp in partitions)))

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._note("assign", partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self._note("add", partitions)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._note("pause", partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._note("resume", partitions)


def test_assigned_partitions_are_read_only_once_the_loop_has_caught_up(settings: Settings) -> None:
    """The predictor's hand-over: partitions stay paused until what their previous owner knew (every
    promotion written so far) is applied; one revoked meanwhile is not resumed by that catch-up."""
    consumer = PausingConsumer()
    loop = data_loop(settings, FakeProducer(), consumer)

    async def scenario() -> None:
        done = asyncio.Event()

        async def catch_up() -> bool:
            await done.wait()
            return True

        loop._catch_up = catch_up
        loop._on_assign(consumer, [TopicPartition("f", 0), TopicPartition("f", 1)])  # type: ignore[arg-type]
        assert consumer.calls == [("assign", [("f", 0), ("f", 1)]), ("pause", [("f", 0), ("f", 1)])]
        await asyncio.sleep(0.05)
        assert len(consumer.calls) == 2  # still waiting for the catch-up: nothing read
        loop._on_revoke(consumer, [TopicPartition("f", 1)])  # type: ignore[arg-type]
        done.set()
        await asyncio.sleep(0.05)
        assert consumer.calls[-1] == ("resume", [("f", 0)]) and not loop._gated

    asyncio.run(scenario())


def test_a_cooperative_loop_adds_the_partitions_of_a_rebalance_to_those_it_keeps(settings: Settings) -> None:
    """Cooperative rebalancing (the predictor): an assignment names only the partitions that moved here,
    so they are added (librdkafka refuses a whole-assignment call then), and the kept ones read on."""
    consumer = PausingConsumer()
    loop = BatchLoop(settings, name="t", handler=lambda msgs: [], topics=lambda: {"f"}, cooperative=True)
    loop._consumer = consumer  # type: ignore[assignment]
    loop._producer = FakeProducer()  # type: ignore[assignment]

    async def scenario() -> None:
        async def catch_up() -> bool:
            return True

        loop._catch_up = catch_up
        loop._on_assign(consumer, [TopicPartition("f", 2)])  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert consumer.calls == [("add", [("f", 2)]), ("pause", [("f", 2)]), ("resume", [("f", 2)])]

    asyncio.run(scenario())


def test_a_catch_up_that_fails_still_lets_the_partitions_be_read(settings: Settings) -> None:
    consumer = PausingConsumer()
    loop = data_loop(settings, FakeProducer(), consumer)

    async def scenario() -> None:
        async def catch_up() -> bool:
            return False  # e.g. the control topics' broker away past the caller's timeout

        loop._catch_up = catch_up
        loop._on_assign(consumer, [TopicPartition("f", 0)])  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert consumer.calls[-1] == ("resume", [("f", 0)])

    asyncio.run(scenario())


class AssigningConsumer(FakeConsumer):
    """Counts assignment reads; its assignment changes as the library changes it after a callback."""

    def __init__(self) -> None:
        super().__init__()
        self.assigned: list[TopicPartition] = [TopicPartition("f", 0)]
        self.reads = 0

    def assignment(self) -> list[TopicPartition]:
        self.reads += 1
        return list(self.assigned)

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, 0

    def subscribe(self, topics: list[str], **_callbacks: Any) -> None:
        pass


def test_the_assignment_is_read_once_per_rebalance_not_once_per_batch(settings: Settings) -> None:
    consumer = AssigningConsumer()
    loop = data_loop(settings, FakeProducer(), consumer)
    for _ in range(100):  # batches, lag reports
        assert [(tp.topic, tp.partition) for tp in loop._assignment()] == [("f", 0)]
    assert consumer.reads == 1
    loop._on_assign(consumer, [TopicPartition("f", 1)])  # type: ignore[arg-type]
    consumer.assigned.append(TopicPartition("f", 1))  # (the library assigns after the callback returns)
    assert [tp.partition for tp in loop._assignment()] == [0, 1] and consumer.reads == 2
    loop._on_revoke(consumer, [TopicPartition("f", 0), TopicPartition("f", 1)])  # type: ignore[arg-type]
    consumer.assigned = []
    reads = consumer.reads  # (the revocation's commit may read it, in the callback)
    assert all(loop._assignment() == [] for _ in range(50)) and consumer.reads == reads + 1
    consumer.assigned = [TopicPartition("g", 0)]
    loop._subscribe(["g"])  # a new subscription: whatever its rebalance brings is read again
    assert [tp.topic for tp in loop._assignment()] == ["g"]


class RebalancingConsumer(AssigningConsumer):
    """One consume call that serves a revocation of f/1 (f/0 stays) and returns records of both partitions
    gathered before it, as librdkafka's batch consume can (confluent-kafka-python issue 1013)."""

    def __init__(self, loop: BatchLoop) -> None:
        super().__init__()
        self.loop = loop
        self.assigned = [TopicPartition("f", 0), TopicPartition("f", 1)]

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.loop._on_revoke(self, [TopicPartition("f", 1)])  # type: ignore[arg-type]
        self.assigned = [TopicPartition("f", 0)]
        self.loop._stopped.set()  # (one turn of the loop)
        return [FakeMessage("f", b"kept", 5, partition=0), FakeMessage("f", b"revoked", 7, partition=1)]


def test_records_of_a_partition_revoked_during_the_consume_call_are_skipped(settings: Settings) -> None:
    """Handled, such a record would meet state this instance never restored for its partition, and its
    offset would be committed for a partition another instance now reads."""
    from streamml.metrics import SKIPPED

    handled: list[bytes | None] = []
    loop = BatchLoop(settings, name="t", handler=lambda msgs: handled.extend(m.value() for m in msgs) or [],
                     topics=lambda: {"f"})  # fmt: skip
    consumer = RebalancingConsumer(loop)
    loop._consumer = consumer  # type: ignore[assignment]
    loop._producer = FakeProducer()  # type: ignore[assignment]
    loop._subscribed = {"f"}
    skipped = SKIPPED.labels("t", "partition_revoked")._value.get()
    asyncio.run(BatchLoop._run.fun(loop))
    assert handled == [b"kept"]
    assert loop._positions == {("f", 0): 6}
    assert SKIPPED.labels("t", "partition_revoked")._value.get() - skipped == 1
