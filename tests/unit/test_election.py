"""Single writers without a broker: slot mapping, fencing decisions, hand-over of monitor and controller."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client import REGISTRY

from services.monitor import app as monitor_app
from streamml import election
from streamml.codec import codec_for
from streamml.election import Fenced, WriterSlots, slot_of
from streamml.errors import StreamMLError
from streamml.pipelines import load_file, to_definition
from streamml.runtime import MIN_BATCH, Output
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.controller import LoopState, open_work, resume_work
from tests.unit.fakes import FakeMessage

REPO = Path(__file__).resolve().parents[2]
KEY = b"unit-test-key"


class TxnProducer:
    """Records the transactional calls a WriterSlots makes; `fail_commit` makes the next commit fail."""

    def __init__(self, tid: str) -> None:
        self.tid = tid
        self.calls: list[str] = []
        self.produced: list[tuple[str, bytes | None, int | None]] = []
        self.fail_commit: KafkaError | None = None
        self.fail_abort: KafkaError | None = None
        self.fail_begin: KafkaError | None = None

    def init_transactions(self, _timeout: float) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        if self.fail_begin is not None:
            raise KafkaException(self.fail_begin)
        self.calls.append("begin")

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, **kw: Any) -> None:
        self.produced.append((topic, value, kw.get("partition")))

    def commit_transaction(self, _timeout: float) -> None:
        if self.fail_commit is not None:
            err, self.fail_commit = self.fail_commit, None
            raise KafkaException(err)
        self.calls.append("commit")

    def abort_transaction(self, _timeout: float) -> None:
        if self.fail_abort is not None:
            raise KafkaException(self.fail_abort)
        self.calls.append("abort")

    def flush(self, _timeout: float = 0) -> int:
        return 0

    def poll(self, _timeout: float = 0) -> int:
        return 0


@pytest.fixture
def settings() -> Settings:
    return Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="u", writer_slots=6, _env_file=None)


@pytest.fixture
def producers(monkeypatch: pytest.MonkeyPatch) -> dict[str, TxnProducer]:
    made: dict[str, TxnProducer] = {}

    def make(_settings: Settings, **conf: Any) -> TxnProducer:
        made[conf["transactional.id"]] = TxnProducer(conf["transactional.id"])
        return made[conf["transactional.id"]]

    monkeypatch.setattr(election, "make_producer", make)
    return made


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, list[int]]] = []

    def gain(self, slots: list[int]) -> None:
        self.events.append(("gain", list(slots)))

    def lose(self, slots: list[int]) -> None:
        self.events.append(("lose", list(slots)))


def writer(settings: Settings) -> tuple[WriterSlots, Recorder]:
    rec = Recorder()
    return WriterSlots(settings, "learner", on_gain=rec.gain, on_lose=rec.lose), rec


def test_each_instance_exports_the_configured_slot_count_and_what_it_owns(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    """The alert rules compare the owned slots summed over instances with the configured count."""

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"service": "learner"})

    slots, _rec = writer(settings.model_copy(update={"writer_slots": 8}))
    assert (gauge("streamml_writer_slots_configured"), gauge("streamml_writer_slots")) == (8, 0)
    slots._assigned(None, [TopicPartition("u.writers", 1), TopicPartition("u.writers", 4)])  # type: ignore[arg-type]
    assert gauge("streamml_writer_slots") == 2


def test_slot_of_is_stable_and_spreads_pipelines() -> None:
    assert slot_of("agrawal", 6) == zlib.crc32(b"agrawal") % 6  # the same in every process and version
    slots = {slot_of(f"pipeline-{i}", 6) for i in range(100)}
    assert slots == set(range(6))


def test_gaining_slots_fences_first_then_restores_once_then_claims(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    slots, rec = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", 1), TopicPartition("u.writers", 4)])  # type: ignore[arg-type]
    assert set(producers) == {"u-learner-writer-1", "u-learner-writer-4"}
    assert rec.events == [("gain", [1, 4])]  # one restore for the whole assignment
    for slot in (1, 4):
        producer = producers[f"u-learner-writer-{slot}"]
        assert producer.calls[0] == "init"  # the previous writer is fenced before anything is restored
        (claim,) = producer.produced
        assert claim[0] == "u.writers" and claim[2] == slot
        record = codec_for("WriterClaim").decode(claim[1] or b"")
        assert (record["service"], record["slot"], record["instance_id"]) == ("learner", slot, "0")
    owned = [p for p in (f"p{i}" for i in range(60)) if slot_of(p, 6) in (1, 4)]
    assert owned and all(slots.owns(p) for p in owned)
    assert not any(slots.owns(p) for p in (f"p{i}" for i in range(60)) if p not in owned)


def test_outputs_of_a_slot_not_owned_are_dropped(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    slots, _ = writer(settings)
    assert slots.send(2, Output("t", b"k", b"v")) is False
    assert producers == {}


def test_revoked_slot_commits_its_open_transaction_before_letting_go(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    slots, rec = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", 3)])  # type: ignore[arg-type]
    producer = producers["u-learner-writer-3"]
    assert slots.send(3, Output("t", b"k", b"v"))
    slots._revoked(None, [TopicPartition("u.writers", 3)])  # type: ignore[arg-type]
    assert producer.calls[-1] == "commit"  # what the next writer restores includes these outputs
    assert rec.events[-1] == ("lose", [3]) and slots.producers == {}


def test_a_fenced_writer_drops_the_slot_and_says_so(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    slots, rec = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", 0)])  # type: ignore[arg-type]
    slots.commit_all()
    assert slots.send(0, Output("t", b"k", b"v"))
    producers["u-learner-writer-0"].fail_commit = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    with pytest.raises(Fenced):
        slots.commit(0)
    assert 0 not in slots.producers and rec.events[-1] == ("lose", [0])
    assert slots.send(0, Output("t", b"k", b"v")) is False  # a zombie publishes nothing more


def test_an_abortable_failure_aborts_and_restores_from_durable_state(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    slots, rec = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", 5)])  # type: ignore[arg-type]
    slots.commit_all()
    slots.send(5, Output("t", b"k", b"v"))
    producer = producers["u-learner-writer-5"]
    producer.fail_commit = KafkaError(KafkaError._INCONSISTENT, "abortable", txn_requires_abort=True)
    with pytest.raises(StreamMLError, match="aborted"):
        slots.commit(5)
    assert producer.calls[-1] == "abort"
    assert rec.events[-2:] == [("lose", [5]), ("gain", [5])]  # in-memory state ran ahead: restored
    assert 5 in slots.producers


def test_a_producer_that_cannot_abort_or_begin_lets_go_of_the_slot_for_a_new_one(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    """An ACL refusal in a transaction leaves the producer unable to abort (INVALID_TXN_STATE): the slot is
    dropped, so it is claimed again later by a new producer, instead of failing every step forever."""
    slots, rec = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", 2), TopicPartition("u.writers", 3)])  # type: ignore[arg-type]
    slots.commit_all()
    slots.send(2, Output("t", b"k", b"v"))
    producer = producers["u-learner-writer-2"]
    producer.fail_commit = KafkaError(
        KafkaError.TOPIC_AUTHORIZATION_FAILED, "refused", txn_requires_abort=True
    )
    producer.fail_abort = KafkaError(KafkaError.INVALID_TXN_STATE, "invalid state", fatal=True)
    with pytest.raises(Fenced, match="abort failed"):
        slots.commit(2)
    assert 2 not in slots.producers and rec.events[-1] == ("lose", [2])
    assert slots.send(2, Output("t", b"k", b"v")) is False
    producers["u-learner-writer-3"].fail_begin = KafkaError(KafkaError.INVALID_TXN_STATE, "fatal", fatal=True)
    with pytest.raises(Fenced):
        slots.send(3, Output("t", b"k", b"v"))
    assert 3 not in slots.producers and set(slots._dropped_at) == {2, 3}  # both claimed again later


def test_a_retriable_commit_failure_keeps_the_transaction_open(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    slots, _ = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", 2)])  # type: ignore[arg-type]
    slots.commit_all()
    slots.send(2, Output("t", b"k", b"v"))
    producers["u-learner-writer-2"].fail_commit = KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)
    assert slots.commit(2) is False and 2 in slots._open
    assert slots.commit(2) is True and 2 not in slots._open


def test_commit_all_bounds_the_time_of_all_commits_together(
    settings: Settings, producers: dict[str, TxnProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data loop commits on the event loop: six commits of 1 s each held it (and SIGTERM) 6 s."""
    slots, _ = writer(settings)
    slots._assigned(None, [TopicPartition("u.writers", s) for s in range(6)])  # type: ignore[arg-type]
    slots.commit_all()
    clock = [100.0]
    monkeypatch.setattr(election.time, "monotonic", lambda: clock[0])
    timeouts: list[float] = []

    def slow_commit(timeout: float) -> None:
        timeouts.append(timeout)
        clock[0] += 0.4  # each commit takes 0.4 s
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True))

    for slot in range(6):
        slots.send(slot, Output("t", b"k", b"v"))
        producers[f"u-learner-writer-{slot}"].commit_transaction = slow_commit  # type: ignore[method-assign]
    assert slots.commit_all(1.0) is False
    assert timeouts == pytest.approx(
        [1.0, 0.6, 0.2]
    )  # then the second is up: the rest wait for the next call
    assert slots._open == set(range(6))


def test_the_writer_loop_starts_with_small_batches_and_sizes_them_by_step_time(
    settings: Settings, producers: dict[str, TxnProducer]
) -> None:
    """Its first batch after a (re)start is a catch-up that an online learner handles at ~1 ms per record."""
    slots, _ = writer(settings)
    loop = election.WriterLoop(
        settings,
        name="learner",
        slots=slots,
        handler=lambda _p, _m: [],
        inputs=dict,
        pipeline_of=lambda _t: None,
    )
    assert loop._sizer.limit == MIN_BATCH < settings.max_batch
    loop._sizer.step("learner", MIN_BATCH, 0.001)
    assert loop._sizer.limit == 2 * MIN_BATCH


# -- hand-over of the monitor's state ---------------------------------------------------------------------


def agrawal() -> dict[str, Any]:
    return to_definition(load_file(REPO / "pipelines" / "agrawal.yaml"), raw_topic="u.agrawal.raw").to_avro()


def monitor(settings: Settings, monkeypatch: pytest.MonkeyPatch, key: bytes) -> Any:
    monkeypatch.setattr(monitor_app, "ensure_topics", lambda *_a, **_k: None)
    service = monitor_app.MonitorService(settings, Catalogue(settings), key)
    service.on_pipeline(agrawal(), None)
    return service


def features(service: Any, n: int) -> list[FakeMessage]:
    topic = service.catalogue.features("agrawal").name
    codec = codec_for("FeatureVector")
    msgs = []
    for i in range(n):
        fv = {"event_id": f"e{i}", "pipeline": "agrawal", "key": None, "event_time": 0, "feature_time": 0,
              "features": {"salary": 1.0 * i, "commission": 0.0, "age": 40.0, "elevel": 1.0, "car": 3.0,
                           "zipcode": 2.0, "hvalue": 1.0, "hyears": 1.0, "loan": 1.0},
              "label": None, "source": None}  # fmt: skip
        msgs.append(FakeMessage(topic, codec.encode(fv), i // 3, partition=i % 3, timestamp=(1, 0)))
    return msgs


def test_monitor_state_moves_to_a_new_writer_only_if_signed_with_our_key(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = monitor(settings, monkeypatch, KEY)
    msgs = features(old, 30)
    assert [o for o in old.handle(msgs) if o.topic.endswith("dead-letter")] == []
    snap = old.snapshot("agrawal")
    assert snap is not None and snap.topic == "u.monitor-state" and snap.pipeline == "agrawal"
    record = codec_for("MonitorSnapshot").decode(snap.value or b"")
    assert {(p["topic"], p["partition"]): p["offset"] for p in record["positions"]} == {
        ("u.agrawal.features", 0): 10, ("u.agrawal.features", 1): 10, ("u.agrawal.features", 2): 10
    }  # fmt: skip

    new = monitor(settings, monkeypatch, KEY)
    new.restore("agrawal", record)
    assert new.inputs()["u.agrawal.features"] == {0: 10, 1: 10, 2: 10}  # reads on from there
    assert (
        len(new.monitor.pipelines["agrawal"].entries) == len(old.monitor.pipelines["agrawal"].entries) == 30
    )

    forged = monitor(settings, monkeypatch, b"another key")  # a snapshot it cannot verify is never loaded
    forged.restore("agrawal", record)
    assert forged.inputs()["u.agrawal.features"] == {} and not forged.monitor.pipelines["agrawal"].entries


def test_controller_open_work_round_trips_through_a_snapshot() -> None:
    st = LoopState(retrain_due_at=1234, alert={"alert_id": "a1", "window": [{"topic": "t"}]})
    st.in_flight["r1"] = {"alert_id": "a0"}
    record = {**open_work(st), "pipeline": "p", "alerts_offset": 5, "results_offset": 6,
              "evaluations_offset": 7, "writer": "1", "taken_at": 0}  # fmt: skip
    decoded = codec_for("ControllerSnapshot").decode(codec_for("ControllerSnapshot").encode(record))
    fresh = LoopState()
    resume_work(fresh, decoded)
    assert (fresh.retrain_due_at, fresh.alert, fresh.in_flight) == (st.retrain_due_at, st.alert, st.in_flight)
    assert open_work(fresh) == open_work(st)
