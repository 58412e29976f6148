"""`python -m bench.chaos` (`make chaos`): scale-out and fail-over under load, judged from the topics alone.

Starts a 3-broker KRaft cluster (replication factor 3, min.insync.replicas 2 for StreamML's topics) and,
once per processing guarantee (at_least_once, then exactly_once, each a fresh deployment with its own topic
prefix), two instances of every service. A plain producer writes the agrawal pipeline's raw events without
keys at a steady rate (a few malformed ones among them), with a concept drift in the middle (Agrawal
function 0 -> 4). Meanwhile random stateful instances (features, learner, monitor, trainer, controller) are
stopped - mostly SIGKILL, some SIGTERM - and restarted after a while, and one broker is stopped and started.
Then every topic is read back (read_committed, as an application reads) and bench/invariants.py judges:

  lost_events            valid raw events without a served prediction
  duplicate_predictions  served predictions beyond one per valid event
  conflicting_versions   (pipeline, model, version) published with two different artifacts (sha256)
  served_regressions     predictions served with a lower version than an earlier one in their partition
  duplicate_alerts       CONCEPT alerts beyond the one the single drift should raise
  feature_mismatches     feature records whose rolling features differ from a per-key reference built in the
                         order the windows read the repartition topic (a raw record forwarded twice counted
                         once; at-least-once replayed copies, which carry the windows as they then stood, are
                         not compared); feature_mismatches_inferred: the same against the reference inferred
                         from source offsets alone (replayed copies mislead its merge: an upper bound)
  loop_completed         1 request, one SHADOW then one PROMOTE/DISCARD of the challenger by the controller
  max_stall_s            longest pause of predictions in any partition after a stop, by signal: a pause
                         belongs to the stop that came last before it began (a pause already running
                         when another stop comes is not counted again for that one); pauses after stops
                         of services off the prediction path (monitor, learner, trainer, controller) are
                         counted as "off_path", not as that stop's signal
  rebalance_p50_s        median time from a stop to the takeover: the next claim of a slot the stopped
                         single-writer instance was writing a pipeline for (none if it held no such slot),
                         or predictions flowing again in every partition for the features service

It prints a table per guarantee and, as the LAST line, one JSON object whose values are per guarantee.
Events and rate: --events/--rate or CHAOS_EVENTS/CHAOS_RATE (e.g. CHAOS_EVENTS=10000 for a smoke run).
Everything it started (brokers, services) is stopped by pid at the end, also on an error or Ctrl-C.
The e2e test tests/e2e/test_scale_out.py runs the same `Run` with a short fixed schedule.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from bench import invariants as inv
from bench import report
from streamml import control, pipelines
from streamml.codec import codec_for
from streamml.kafka import ensure_topics
from streamml.localkafka import LocalKafka, LocalKafkaError, free_port_block
from streamml.settings import Settings
from streamml.sources import open_source
from streamml.stack import SERVICES, STATEFUL, Stack
from streamml.topics import Catalogue
from streams.repartition import Source

log = logging.getLogger("bench.chaos")
REPO = Path(__file__).resolve().parent.parent
PIPELINE = "agrawal"
KEY_FIELD = "zipcode"  # the pipeline's key_field: the features service keys vectors by str(its value)
GUARANTEES = ("at_least_once", "exactly_once")
SINGLE_WRITER = ("learner", "monitor", "controller")
# The services an event passes through on its way to a prediction: only their stops can pause serving.
PREDICTION_PATH = ("features", "predictor")
# Features after a CONCEPT alert beyond the retraining window by which its training request must be out:
# the controller may be down (12 s in the fixed schedule, 3,600 events at 300/s) when the alert comes.
DUE_MARGIN = 4_000
INVALID = b"{not json"  # a malformed raw event: dead-lettered, never predicted
DEAD_LOG_LINES = 40  # of an instance found dead at the end, shown in the report


@dataclass(frozen=True)
class Action:
    """One thing done to the running system, `at` seconds after predictions started to flow."""

    at: float  # seconds after the first prediction (the flow) was seen
    kind: str  # "stop" (an instance, with `sig`), "start" (it again), "broker-stop", "broker-start"
    service: str = ""
    index: int | None = None  # None: the current writer of a single-writer service, else instance 0
    sig: str = "SIGKILL"
    node: int = 2


@dataclass
class Config:
    events: int = 20_000
    rate: float = 400.0
    drift_at: int | None = None  # default: 40 % into the stream
    partitions: int = 4
    instances: int = 2
    invalid_every: int = 997  # every n-th raw record is malformed (0: none)
    seed: int = 7
    schedule: list[Action] = field(default_factory=list)
    drain_timeout_s: float = 120.0
    # After `events`, the stream goes on (post-drift events at the same rate) until the controller has
    # judged the challenger, at most this many more: a real stream does not stop while a loop completes,
    # and kills that delay the loop must not make the scenario end before it can.
    tail_max: int = 8_000
    ready_timeout_s: float = 240.0

    @property
    def drift_position(self) -> int:
        return self.drift_at if self.drift_at is not None else int(self.events * 0.4)


def fixed_schedule(down_s: float = 12.0) -> list[Action]:
    """The e2e test's schedule: each stateful service's writer (or instance 0) SIGKILLed once, restarted
    after `down_s` (longer than the 10 s session timeout, so a sibling takes over), and broker 2 stopped
    for 15 s; within ~20 s of the first prediction, around the drift."""
    out: list[Action] = []
    for at, service in ((3.0, "features"), (6.0, "learner"), (12.0, "monitor"), (16.0, "controller"),
                        (20.0, "trainer")):  # fmt: skip
        out += [Action(at, "stop", service), Action(at + down_s, "start", service)]
    out += [Action(9.0, "broker-stop"), Action(24.0, "broker-start")]
    return sorted(out, key=lambda a: a.at)


def sigterm_schedule(duration_s: float) -> list[Action]:
    """Clean stops on the prediction path only: each instance of features and predictor SIGTERMed in turn
    (restarted 10 s later), evenly over the run; no kills, no broker stop. Measures the "≤ 3 s after a
    SIGTERM" hand-over of the services whose pauses users see."""
    stops = [("features", 0), ("predictor", 0), ("features", 1), ("predictor", 1)]
    step = max(20.0, (duration_s - 10.0) / len(stops))
    out: list[Action] = []
    for i, (service, index) in enumerate(stops):
        at = 5.0 + i * step
        out += [Action(at, "stop", service, index, "SIGTERM"), Action(at + 10.0, "start", service, index)]
    return out


def random_schedule(duration_s: float, rng: random.Random, every_s: float = 10.0) -> list[Action]:
    """Repeated stops of random stateful instances (3 in 4 SIGKILL, else SIGTERM), each restarted 8-15 s
    later, never two of one service down at once; one broker down for 20 s a third of the way in."""
    out: list[Action] = []
    busy_until: dict[str, float] = {}
    at = 5.0
    while at < duration_s - 5.0:
        service = rng.choice(STATEFUL)
        if busy_until.get(service, 0.0) <= at:
            down = rng.uniform(8.0, 15.0)
            sig = "SIGKILL" if rng.random() < 0.75 else "SIGTERM"
            index = rng.randrange(2)
            out += [Action(at, "stop", service, index, sig), Action(at + down, "start", service, index)]
            busy_until[service] = at + down + 1.0
        at += rng.uniform(0.5, 1.5) * every_s
    broker_at = duration_s / 3
    out += [Action(broker_at, "broker-stop", node=2), Action(broker_at + 20.0, "broker-start", node=2)]
    return sorted(out, key=lambda a: a.at)


# -- deployment ------------------------------------------------------------------------------------------
def cluster_env(bootstrap: str, prefix: str, key: str, workdir: Path, partitions: int, guarantee: str,
                replication: int = 3, min_insync: int = 2) -> dict[str, str]:  # fmt: skip
    """The STREAMML_* settings every instance shares (its id, ports and data folder come from the Stack)."""
    return {
        "STREAMML_BOOTSTRAP_SERVERS": bootstrap,
        "STREAMML_TOPIC_PREFIX": prefix,
        "STREAMML_SIGNING_KEY": key,
        "STREAMML_DATA_DIR": str(workdir / "data"),
        "STREAMML_DEFAULT_PARTITIONS": str(partitions),
        "STREAMML_REPLICATION_FACTOR": str(replication),
        "STREAMML_MIN_INSYNC_REPLICAS": str(min_insync),
        "STREAMML_PROCESSING_GUARANTEE": guarantee,
        "STREAMML_LOG_LEVEL": "INFO",
    }


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(
        bootstrap_servers=env["STREAMML_BOOTSTRAP_SERVERS"],
        topic_prefix=env["STREAMML_TOPIC_PREFIX"],
        signing_key=env["STREAMML_SIGNING_KEY"],
        default_partitions=int(env["STREAMML_DEFAULT_PARTITIONS"]),
        replication_factor=int(env["STREAMML_REPLICATION_FACTOR"]),
        min_insync_replicas=int(env["STREAMML_MIN_INSYNC_REPLICAS"]),
        processing_guarantee=env["STREAMML_PROCESSING_GUARANTEE"],
        _env_file=None,
    )


def pipeline_definition(settings: Settings, config: Config) -> dict[str, Any]:
    """pipelines/agrawal.yaml (key_field zipcode, two rolling windows of 100) tuned for one drift:
    versions every 2000 labels, a retrain on 2000 post-drift events, and a cooldown longer than the run
    so a second CONCEPT alert can only be a duplicate."""
    spec = pipelines.load_file(REPO / "pipelines" / f"{PIPELINE}.yaml").model_dump()
    spec.update(snapshot_every_events=2000, snapshot_every_seconds=3600.0)
    spec["monitoring"] = {**(spec.get("monitoring") or {}), "cooldown_events": 10**9}
    spec["policy"] = {**(spec.get("policy") or {}), "retrain_window_events": 2000,
                      "challenger_min_labels": 500, "challenger_max_labels": 3000}  # fmt: skip
    checked = pipelines.PipelineFile.model_validate(spec)
    return pipelines.to_definition(checked, Catalogue(settings).raw(PIPELINE).name).to_avro()


def apply_pipeline(settings: Settings, definition: dict[str, Any]) -> None:
    c = Catalogue(settings)
    ensure_topics(settings, c.global_topics() + c.pipeline_topics(PIPELINE))
    control.publish(settings, c.pipelines().name, "PipelineDefinition", PIPELINE, definition)


# -- reading back ------------------------------------------------------------------------------------------
def read_all(settings: Settings, topic: str, timeout_s: float = 60.0) -> tuple[list[Message], list[int]]:
    """Every record of a topic as a read_committed application sees it, and the partitions that could not
    be read to their end in time (an open transaction of a dead writer holds the stable offset back)."""
    consumer = Consumer({
        "bootstrap.servers": settings.bootstrap_servers, "group.id": f"chaos-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "isolation.level": "read_committed", "enable.partition.eof": False,
    })  # fmt: skip
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends: dict[int, int] = {}
        parts = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                parts.append(TopicPartition(topic, p, low))
        out: list[Message] = []
        if parts:
            consumer.assign(parts)
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            out += [m for m in consumer.consume(1000, 0.2) if m.error() is None]
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return out, sorted(ends)
    finally:
        consumer.close()


def decode(msgs: Sequence[Message], schema: str) -> list[dict[str, Any]]:
    codec = codec_for(schema)
    out = []
    for m in msgs:
        try:
            out.append(codec.decode(m.value() or b""))
        except Exception:  # a hostile or foreign record: not ours to judge here
            continue
    return out


class Tail:
    """An incremental reader of one topic (all partitions from the start), for waiting on progress."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": settings.bootstrap_servers, "group.id": f"chaos-tail-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "isolation.level": "read_committed",
        })  # fmt: skip
        self.consumer.subscribe([topic])
        self.msgs: list[Message] = []

    def poll(self, seconds: float = 0.5) -> list[Message]:
        new = [m for m in self.consumer.consume(2000, seconds) if m.error() is None]
        self.msgs += new
        return new

    def close(self) -> None:
        self.consumer.close()


# -- one run -------------------------------------------------------------------------------------------------
@dataclass
class Done:
    """An action as it happened (wall-clock seconds since the epoch), with the instance it hit."""

    action: Action
    at: float
    label: str = ""
    exit_code: int | None = None
    error: str = ""
    instance_id: str = ""  # of the instance stopped (its writer claims name it)


class Run:
    """One deployment under load and chaos, then its records judged. `run()` returns `result`."""

    def __init__(self, kafka: LocalKafka, stack: Stack, settings: Settings, config: Config) -> None:
        self.kafka, self.stack, self.settings, self.config = kafka, stack, settings, config
        self.c = Catalogue(settings)
        self.raw_topic = self.c.raw(PIPELINE).name
        self.acked: dict[str, inv.Where] = {}  # valid event id -> where the broker stored it
        self.raw: dict[inv.Where, dict[str, Any]] = {}
        self.sent_at: dict[inv.Where, float] = {}  # when the producer created each acknowledged event (s)
        self.produce_errors: list[str] = []
        self.invalid_sent = 0
        self.started_at = 0.0  # wall clock of the first event
        self.flow_at = 0.0  # wall clock of the first prediction seen: the schedule's time 0
        self.produced_s = 0.0
        self.produced_at = math.inf  # wall clock when the last event was acknowledged
        self.done: list[Done] = []
        self.timings: dict[str, float] = {}
        self.result: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self._stop = threading.Event()

    # -- driving ----------------------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        cfg = self.config
        position = cfg.drift_position
        width = max(100, math.ceil(4 * position / 700))
        spec = f"drift:agrawal?position={position}&width={width}&before=0&after=4&seed={cfg.seed}"
        return [e.value for e in open_source(spec, limit=cfg.events + cfg.tail_max)]

    def produce(self, events: list[dict[str, Any]]) -> None:
        """Raw events WITHOUT keys, at a steady rate, by a plain producer (acks=all, idempotent)."""
        producer = Producer({"bootstrap.servers": self.settings.bootstrap_servers, "linger.ms": 5,
                             "enable.idempotence": True})  # fmt: skip
        cfg = self.config
        start = time.monotonic()
        self.started_at = time.time()
        checked = 0.0
        for i, event in enumerate(events):
            if self._stop.is_set():
                break
            if i >= cfg.events and time.monotonic() - checked >= 1.0:  # the tail: until the verdict
                checked = time.monotonic()
                if self._verdict_made():
                    break
            delay = start + i / cfg.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            on_delivery: Callable[[KafkaError | None, Message], None]
            if cfg.invalid_every and i % cfg.invalid_every == cfg.invalid_every - 1:
                value, on_delivery = INVALID, self._invalid_acked
            else:
                value = json.dumps(event).encode()
                on_delivery = self._acked(event)
            while True:
                try:
                    producer.produce(self.raw_topic, value, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        left = producer.flush(120)
        if left:
            self.produce_errors.append(f"{left} records not acknowledged")
        self.produced_s = time.monotonic() - start
        self.produced_at = time.time()

    def _acked(self, event: dict[str, Any]) -> Callable[[KafkaError | None, Message], None]:
        def done(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.produce_errors.append(str(err))
                return
            spot = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
            self.acked[str(event["event_id"])] = spot
            self.raw[spot] = event
            self.sent_at[spot] = msg.timestamp()[1] / 1000

        return done

    def _invalid_acked(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.invalid_sent += 1

    def current_writer(self, service: str) -> int:
        """Instance index holding the writer slot of the pipeline, from the latest WriterClaim (else 0)."""
        try:
            msgs, _ = read_all(self.settings, self.c.writers().name, timeout_s=5)
        except Exception:  # the writers topic may not be readable during a broker stop
            return 0
        claims = [w for w in decode(msgs, "WriterClaim") if w["service"] == service
                  and (not w["pipelines"] or PIPELINE in w["pipelines"])]  # fmt: skip
        if not claims:
            return 0
        latest = max(claims, key=lambda w: w["claimed_at"])
        for svc in self.stack.instances_of(service):
            if svc.instance_id == latest["instance_id"]:
                return svc.index
        return 0

    def act(self, action: Action, targets: dict[str, int]) -> Done:
        done = Done(action, time.time())
        try:
            if action.kind == "broker-stop":
                self.kafka.stop_node(action.node)
                done.label = f"broker {action.node}"
            elif action.kind == "broker-start":
                self.kafka.start_node(action.node, timeout_s=240)  # a JVM start on 2 busy cores
                done.label = f"broker {action.node}"
            elif action.kind == "stop":
                index = action.index
                if index is None:
                    index = self.current_writer(action.service) if action.service in SINGLE_WRITER else 0
                targets[action.service] = index
                svc = self.stack.instance(action.service, index)
                done.label = svc.label
                done.instance_id = svc.instance_id
                done.at = time.time()
                done.exit_code = self.stack.stop(action.service, signal.Signals[action.sig], index=index)
            elif action.kind == "start":
                index = action.index if action.index is not None else targets.get(action.service, 0)
                done.label = self.stack.instance(action.service, index).label
                self.stack.start(action.service, index=index)
        except Exception as exc:  # recorded: a harness action that failed is a finding, not a crash
            done.error = f"{type(exc).__name__}: {exc}"
            log.warning("%s %s failed: %s", action.kind, done.label or action.service, done.error)
        log.info("t=%5.1f s %s %s %s", done.at - self.flow_at, action.kind, done.label,
                 "" if action.kind != "stop" else f"{action.sig} -> exit {done.exit_code}")  # fmt: skip
        return done

    def wait_for_flow(self, timeout_s: float = 180.0) -> None:
        """The schedule's clock starts when predictions flow: stops before that would interrupt nothing
        (the predictor serves once the first version is live) and their stalls could not be measured."""
        tail = Tail(self.settings, self.c.predictions(PIPELINE).name)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not tail.poll(0.5):
                pass
        finally:
            tail.close()
        while not self.started_at:
            time.sleep(0.01)
        self.flow_at = time.time()
        self.timings["first prediction"] = self.flow_at - self.started_at

    def follow(self, actions: Sequence[Action], targets: dict[str, int]) -> None:
        """Do each action at its time (late if the one before took long), recording what happened."""
        for action in actions:
            delay = self.flow_at + action.at - time.time()
            if self._stop.wait(max(0.0, delay)):
                return
            self.done.append(self.act(action, targets))

    def run(self) -> dict[str, Any]:
        cfg = self.config
        t0 = time.monotonic()
        definition = pipeline_definition(self.settings, cfg)
        apply_pipeline(self.settings, definition)
        self.stack.start_all(SERVICES, timeout_s=cfg.ready_timeout_s)
        self.timings["services ready"] = time.monotonic() - t0
        events = self.events()
        producer = threading.Thread(target=self.produce, args=(events,), name="producer", daemon=True)
        t1 = time.monotonic()
        producer.start()
        self.wait_for_flow()
        # Broker actions on a thread of their own: a controlled shutdown or a restart under load takes tens
        # of seconds, which must not delay the instance stops scheduled meanwhile.
        brokers = [a for a in cfg.schedule if a.kind.startswith("broker")]
        broker_thread = threading.Thread(target=self.follow, args=(brokers, {}), name="brokers", daemon=True)
        broker_thread.start()
        try:
            self.follow([a for a in cfg.schedule if not a.kind.startswith("broker")], {})
            producer.join()
            broker_thread.join()
        finally:
            self._stop.set()
            producer.join()
            broker_thread.join()
        self.timings["produce + chaos"] = time.monotonic() - t1
        t2 = time.monotonic()
        self.drain()
        self.timings["drain"] = time.monotonic() - t2
        t3 = time.monotonic()
        self.judge(definition)
        self.timings["read back + judge"] = time.monotonic() - t3
        self.result["duration_s"] = round(time.monotonic() - t0, 1)
        return self.result

    def drain(self) -> None:
        """Until every acked valid event is predicted and the controller judged the challenger, or timeout."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        tail = Tail(self.settings, self.c.predictions(PIPELINE).name)
        seen: set[str] = set()
        codec = codec_for("Prediction")
        wanted = set(self.acked)
        try:
            while time.monotonic() < deadline:
                for m in tail.poll(1.0):
                    try:
                        seen.add(codec.decode(m.value() or b"")["event_id"])
                    except Exception:
                        continue
                if wanted <= seen and self._verdict_made():
                    return
        finally:
            tail.close()
        log.warning("drain timed out: %d of %d events predicted", len(wanted & seen), len(wanted))

    def _verdict_made(self) -> bool:
        try:
            msgs, _ = read_all(self.settings, self.c.promotions().name, timeout_s=10)
        except Exception:  # e.g. while a broker is away: not known yet
            return False
        return any(p["actor"] == "controller" and p["action"] in ("PROMOTE", "DISCARD")
                   for p in decode(msgs, "Promotion"))  # fmt: skip

    # -- judging ----------------------------------------------------------------------------------------
    def judge(self, definition: dict[str, Any]) -> None:
        c, s = self.c, self.settings
        stuck: dict[str, list[int]] = {}

        def read(topic: str, schema: str) -> tuple[list[Message], list[dict[str, Any]]]:
            msgs, left = read_all(s, topic, timeout_s=90)
            if left:
                stuck[topic] = left
            return msgs, decode(msgs, schema)

        pred_msgs, _ = read(c.predictions(PIPELINE).name, "Prediction")
        pairs = [(m, p) for m, p in zip(pred_msgs, decode_pairs(pred_msgs), strict=True) if p is not None]
        preds = [p for _, p in pairs]
        feature_msgs, features = read(c.features(PIPELINE).name, "FeatureVector")
        _, versions = read(c.model_versions().name, "ModelVersion")
        _, alerts = read(c.drift_alerts().name, "DriftAlert")
        _, requests = read(c.training_requests().name, "TrainingRequest")
        _, results = read(c.training_results().name, "TrainingResult")
        _, promotions = read(c.promotions().name, "Promotion")
        _, claims = read(c.writers().name, "WriterClaim")
        promotions = [p for p in promotions if p["pipeline"] == PIPELINE]

        count = inv.count_predictions(self.acked, preds)
        lineage = inv.check_lineage(v for v in versions if v["pipeline"] == PIPELINE)
        served = inv.served_regressions((m.partition() or 0, m.offset() or 0, p) for m, p in pairs)
        fcheck = inv.check_rolling_features(
            features, inv.rolling_steps(definition["feature_steps"]), self.raw
        )
        # The same against the order the window processor really read (the repartition topic).
        hop_msgs, _ = read_all(s, c.repartition(PIPELINE).name, timeout_s=90)
        read_order = []
        for m in sorted(hop_msgs, key=lambda m: (m.partition() or 0, m.offset() or 0)):
            named = Source.from_headers(m.headers())
            if named is not None:
                spot = (named.topic, named.partition, named.offset)
                read_order.append(((m.key() or b"").decode(errors="replace"), spot))
        ocheck = inv.check_rolling_in_read_order(
            features, inv.rolling_steps(definition["feature_steps"]), read_order, self.raw
        )
        concept_alerts = [a for a in alerts if a["pipeline"] == PIPELINE and a["kind"] == "CONCEPT"]
        concept = inv.count_alerts(concept_alerts, "CONCEPT", expected=1)
        # alerts a request must answer: a retraining window of features after them, and DUE_MARGIN more
        window = int(definition["policy"]["retrain_window_events"])
        feature_times = [m.timestamp()[1] for m in feature_msgs]
        due = inv.alerts_due(concept_alerts, feature_times, window + DUE_MARGIN)
        labels = {str(e["event_id"]): e["label"] for e in self.raw.values()}
        alerted = [(a.get("model_name"), a.get("model_version")) for a in concept_alerts]
        errors = [(m, inv.error_profile(preds, labels, m)) for m in alerted]  # per alert, in order
        loop = inv.loop_outcome(
            [r for r in requests if r["pipeline"] == PIPELINE],
            [r for r in results if r["pipeline"] == PIPELINE],
            promotions,
        )
        # stalls and take-overs, per stop
        # Output times per input stream: per raw partition (a dead reader of it stalls them all) and per
        # entity key (a dead owner of its window stalls the key); predictions partitions would hide both,
        # as they are chosen by event id.
        times: dict[tuple[str, Any], list[float]] = collections.defaultdict(list)
        for p in preds:
            if not p["shadow"]:
                spot = inv.where_of(p.get("source"))
                if spot is not None:
                    times[("raw", spot[1])].append(p["prediction_time"] / 1000)
                times[("key", p.get("key"))].append(p["prediction_time"] / 1000)
        # When input for each of those came (a partition or key silent after a stop had nothing to say
        # unless input for it came after the stop).
        inputs: dict[tuple[str, Any], list[float]] = collections.defaultdict(list)
        for spot, sent in self.sent_at.items():
            inputs[("raw", spot[1])].append(sent)
            key = self.raw[spot].get(KEY_FIELD)
            inputs[("key", None if key is None else str(key))].append(sent)
        self.done.sort(key=lambda x: x.at)
        stops = [d for d in self.done if d.action.kind in ("stop", "broker-stop") and not d.error]
        stall: dict[str, float] = {}
        takeovers: list[float] = []
        per_stop = []
        for i, d in enumerate(stops):
            key = d.action.sig if d.action.kind == "stop" else "broker"
            if d.action.kind == "stop" and d.action.service not in PREDICTION_PATH:
                # Stopping a monitor, learner, trainer or controller cannot pause serving: a pause after it
                # has another cause (a drift's swap, a concurrent broker stop) and is reported apart.
                key = "off_path"
            # A pause is the stop's that came last before it began: its last output came at most 1 s
            # before the stop, and before the next stop (stops every ~10 s overlap pauses of 10-20 s, and
            # each was counted for every stop it overlapped).
            until = stops[i + 1].at - d.at if i + 1 < len(stops) else 60.0
            gap = inv.max_stall(times, d.at, horizon_s=min(60.0, max(until, 0.0)), end=self.produced_at,
                                began_after=d.at - 1.0, inputs=inputs)  # fmt: skip
            if gap is not None:
                stall[key] = max(stall.get(key, 0.0), gap)
            took: float | None = None
            if d.action.kind == "stop" and d.action.service in SINGLE_WRITER:
                took = inv.takeover(claims, d.action.service, d.instance_id, d.at)
            elif d.action.kind == "stop" and d.action.service == "features":
                took = gap
            if took is not None:
                takeovers.append(took)
            per_stop.append((d, gap, took))

        exits = self.stack.exit_codes()
        unasked = sorted(label for label in self.stack.dead())
        self.details = {
            "count": count, "lineage": lineage, "served": served, "features": fcheck, "concept": concept,
            "features_read_order": ocheck,
            "loop": loop, "concept_due": due, "per_stop": per_stop, "stuck": stuck, "exits": exits,
            "dead": unasked, "errors": errors,
            "dead_logs": {label: self.stack.tail(label, DEAD_LOG_LINES) for label in unasked},
            "alert_messages": [a.get("message", "") for a in concept_alerts],
            "alerts_by_kind": collections.Counter(a["kind"] for a in alerts),
            "requests": len(requests), "claims": len(claims),
            "decisions": [f"{p['action']} {p['model_name']} v{p['version']}" for p in promotions
                          if p["actor"] == "controller"],
        }  # fmt: skip
        self.result = {
            "events": len(self.acked),
            "invalid_events": self.invalid_sent,
            "lost_events": count.lost,
            "duplicate_predictions": count.duplicates,
            "conflicting_versions": lineage.conflicting,
            "served_regressions": served.regressions,
            "duplicate_alerts": concept.duplicates,
            "concept_alerts": concept.records,
            "feature_mismatches": ocheck.mismatches if ocheck.records else fcheck.mismatches,
            "feature_mismatches_inferred": fcheck.mismatches,
            "training_requests": loop.requests,
            "loop_completed": loop.completed_once,
            "max_stall_s": {k: round(v, 2) for k, v in sorted(stall.items())},
            "rebalance_p50_s": _round(inv.percentile(takeovers, 50)),
            "writer_claims": len(claims),
            "dead_instances": unasked,
            "stuck_partitions": {t.rsplit(".", 1)[-1]: p for t, p in stuck.items()},
            "produce_errors": len(self.produce_errors),
        }

    def text(self, guarantee: str) -> str:
        d, r = self.details, self.result
        count, lineage, served, fcheck = d["count"], d["lineage"], d["served"], d["features"]
        loop = d["loop"]
        rows = [
            ["valid raw events (acked)", f"{count.expected:,}", f"+ {r['invalid_events']} malformed"],
            ["lost (no served prediction)", f"{count.lost:,}", ", ".join(count.lost_examples)],
            ["duplicate predictions", f"{count.duplicates:,}", str(count.duplicate_examples[:3])],
            ["predictions of unexpected ids", f"{count.unexpected:,}", ""],
            ["model versions (pipeline, model: numbers)", "",
             "; ".join(f"{m}: {len(v)} up to v{max(v)}" for (_, m), v in lineage.models.items())],
            ["conflicting versions (2 artifacts)", f"{lineage.conflicting}", str(lineage.conflict_examples)],
            ["repeated version records (same artifact)", f"{lineage.repeated}", f"gaps {lineage.gaps}"],
            ["served version went back", f"{served.regressions:,}", str(served.examples[:3])],
            ["rolling features, inferred order", f"{fcheck.mismatches:,}",
             f"of {fcheck.records:,} records, {fcheck.keys} keys; e.g. {fcheck.examples[:1]}"],
            ["rolling feature mismatches (read order)", f"{d['features_read_order'].mismatches:,}",
             f"of {d['features_read_order'].records:,} (reference in repartition-topic order; "
             f"{d['features_read_order'].copies:,} replayed copies not compared); "
             f"e.g. {d['features_read_order'].examples[:1]}"],
            ["CONCEPT alerts (1 expected)", f"{d['concept'].records}",
             ", ".join(f"{k} {v}" for k, v in sorted(d["alerts_by_kind"].items()))
             + f"; on lineages {d['concept'].lineages}"],
            ["training requests (1 expected)", f"{loop.requests}",
             f"{loop.results} results, {loop.answered_twice} answered twice; {d['concept_due']} alerts "
             f"followed by the retraining window + {DUE_MARGIN:,} features"],
            ["controller SHADOW / verdicts", f"{loop.shadows} / {loop.verdicts}",
             f"challenger {loop.challenger}, verdict {loop.verdict}, completed once: {loop.completed_once}; "
             + ", ".join(d["decisions"])],
            ["writer claims", f"{d['claims']}", ""],
            ["partitions not readable to the end", str(sum(len(p) for p in d["stuck"].values())),
             str(r["stuck_partitions"])],
            ["dead instances at the end", str(len(d["dead"])),
             ", ".join(f"{lb} (exit {d['exits'][lb][-1].returncode if d['exits'].get(lb) else '?'})"
                       for lb in d["dead"])],
            ["phases (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())],
        ]  # fmt: skip
        title = (f"StreamML chaos, {guarantee}: {count.expected:,} events at {self.config.rate:.0f}/s, "
                 f"{self.config.instances} instances per service, 3 brokers; drift at event "
                 f"{self.config.drift_position:,}")  # fmt: skip
        out = _noted(["measure", "value", "notes"], rows, title)
        stop_rows = [
            [f"{dd.at - self.flow_at:6.1f}", dd.action.kind, dd.label, dd.action.sig
             if dd.action.kind == "stop" else "", "" if dd.exit_code is None else str(dd.exit_code),
             "n/a" if gap is None else f"{gap:.2f}", "n/a" if took is None else f"{took:.2f}",
             dd.error[:60]]
            for dd, gap, took in d["per_stop"]
        ]  # fmt: skip
        out += "\n\n" + report.table(
            ["t (s)", "action", "target", "signal", "exit", "stall s", "takeover s", "error"],
            stop_rows, "Stops: longest pause of predictions in any partition after each, and the takeover",
        )  # fmt: skip
        # Why an instance died by itself: the end of its log (the work folder is gone after the run).
        for label, tail in d["dead_logs"].items():
            out += f"\n\nLast {DEAD_LOG_LINES} log lines of {label}, dead at the end:\n{tail}"
        # Each CONCEPT alert, and how the version it is about erred by event index and in prediction order.
        for message, (model, profile) in zip(d["alert_messages"], d["errors"], strict=True):
            by_index, by_time = profile
            out += f"\n\nCONCEPT alert on {model[0]} v{model[1]}: {message}"
            out += "\n  its errors by event index: " + ", ".join(
                f"{start:,}+ {rate:.3f} ({n})" for start, rate, n in by_index
            )
            out += "\n  by prediction time (quarters): " + ", ".join(
                f"{rate:.3f} ({n})" for rate, n in by_time
            )
        return out


def decode_pairs(msgs: Sequence[Message]) -> list[dict[str, Any] | None]:
    codec = codec_for("Prediction")
    out: list[dict[str, Any] | None] = []
    for m in msgs:
        try:
            out.append(codec.decode(m.value() or b""))
        except Exception:
            out.append(None)
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _noted(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    *head, note = headers
    body = report.table(head, [r[:-1] for r in rows], title).split("\n")
    width = max(len(line) for line in body[1:])
    lines = [body[0], body[1].ljust(width) + "  " + note, body[2] + "  " + "-" * len(note)]
    lines += [line.ljust(width) + "  " + r[-1] for line, r in zip(body[3:], rows, strict=True)]
    return "\n".join(line.rstrip() for line in lines)


# -- command line -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=int(os.environ.get("CHAOS_EVENTS", 100_000)),
                   help="raw events per guarantee (default 100000, env CHAOS_EVENTS)")  # fmt: skip
    p.add_argument("--rate", type=float, default=float(os.environ.get("CHAOS_RATE", 500)),
                   help="events per second (default 500, env CHAOS_RATE)")  # fmt: skip
    p.add_argument("--guarantees", default=os.environ.get("CHAOS_GUARANTEES", ",".join(GUARANTEES)),
                   help="comma-separated, run one after another (default both)")  # fmt: skip
    p.add_argument("--kill-every", type=float, default=10.0, help="mean seconds between stops (default 10)")
    p.add_argument("--instances", type=int, default=2, help="instances per service (default 2)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of data topics (default 4)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--schedule", choices=["random", "sigterm"], default="random",
                   help="random: kills, clean stops, a broker stop (default); sigterm: clean stops of each "
                   "features and predictor instance only")  # fmt: skip
    p.add_argument("--keep", type=Path, help="work folder to keep (broker data, service logs)")
    return p.parse_args(argv)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `finally`: services, then brokers


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("streamml.kafka.librdkafka").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _terminate)
    guarantees = [g.strip() for g in args.guarantees.split(",") if g.strip()]
    if not guarantees or any(g not in GUARANTEES for g in guarantees):
        raise SystemExit(f"--guarantees: choose from {GUARANTEES}")
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="streamml-chaos-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kafka = LocalKafka(workdir / "kafka", brokers=3, base_port=free_port_block(6), die_with_parent=True)
        try:
            bootstrap = kafka.start(timeout_s=180)
            log.info("Kafka (3 brokers) at %s, work folder %s", bootstrap, workdir)
            for guarantee in guarantees:
                prefix = f"chaos{uuid.uuid4().hex[:8]}"
                env = cluster_env(bootstrap, prefix, secrets.token_hex(16), workdir / prefix,
                                  args.partitions, guarantee)  # fmt: skip
                stack = Stack.create(env, workdir / prefix / "logs", args.instances)
                duration = args.events / args.rate
                config = Config(
                    events=args.events, rate=args.rate, partitions=args.partitions,
                    instances=args.instances, seed=args.seed,
                    schedule=(
                        sigterm_schedule(duration)
                        if args.schedule == "sigterm"
                        else random_schedule(duration, random.Random(args.seed), args.kill_every)
                    ),
                    drain_timeout_s=max(120.0, duration / 2),
                )  # fmt: skip
                run = Run(kafka, stack, settings_of(env), config)
                runs[guarantee] = run
                try:
                    run.run()
                finally:
                    stack.stop_all()
                print(run.text(guarantee) + "\n", flush=True)
                try:  # every broker up again for the next run, whatever happened in this one
                    kafka.start(timeout_s=240)
                except LocalKafkaError as exc:
                    log.error("could not bring every broker back (%s); going on with the others", exc)
        finally:
            kafka.stop()
    keys = ("lost_events", "duplicate_predictions", "conflicting_versions", "served_regressions",
            "duplicate_alerts", "feature_mismatches", "feature_mismatches_inferred", "loop_completed",
            "max_stall_s", "rebalance_p50_s",
            "training_requests", "concept_alerts", "events", "dead_instances", "duration_s")  # fmt: skip
    summary = {k: {g: r.result.get(k) for g, r in runs.items()} for k in keys}
    print(json.dumps(summary))
    bad = any(
        r.result["lost_events"] or r.result["conflicting_versions"] or r.result["duplicate_alerts"]
        or r.result["feature_mismatches"] or not r.result["loop_completed"]
        for r in runs.values()
    )  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
