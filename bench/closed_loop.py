"""The closed loop measured (issue 4): drift → alert → retraining → promotion → recovery on the services,
the monitor's false alarms on a stationary stream, and the monitor service's throughput.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from bench import stats
from bench.measures import Measured
from bench.workload import DeliveryFailed, Deployment, now_ms
from services.monitor.app import MonitorService
from streamml import pipelines
from streamml.codec import codec_for, decode_raw
from streamml.kafka import make_producer
from streamml.runtime import read_to_end
from streamml.sources import open_source
from streamml.stack import SERVICES
from streams.features import FeatureEngine
from streams.learner import OnlineLearner, auto_promotion
from streams.monitor import Monitor
from streams.predictor import ModelRegistry, prediction_record

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PIPELINE = "agrawal"
DRIFT_AT = 10_000
DRIFT_WIDTH = 100  # 4·position/width = 400 stays under the limit of River's drift sigmoid (709)
DRIFT_SOURCE = f"drift:agrawal?position={DRIFT_AT}&width={DRIFT_WIDTH}&before=0&after=4&seed=11"
LOOP_EVENTS = 32_000
LOOP_RATE = 1000.0  # raw events per second
WINDOW = 5000  # events before the drift, and promoted-model predictions after it, compared for accuracy
STATIONARY_SOURCE = "river:synth.Agrawal?classification_function=0&seed=7"
# As tests/e2e/test_closed_loop.py applies pipelines/agrawal.yaml: versions by event count only, and a
# retraining window and challenger test that fit in 32k events.
OVERRIDES: dict[str, Any] = {
    "snapshot_every_events": 2000,
    "snapshot_every_seconds": 3600.0,
    "policy": {"retrain_window_events": 3000, "challenger_min_labels": 500, "challenger_margin": 0.01},
}


def merged(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with `overrides` applied; a nested section is merged, so an override names only what changes."""
    out = dict(data)
    for key, value in overrides.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = {**current, **value}
        else:
            out[key] = value
    return out


def agrawal_definition(raw_topic: str) -> dict[str, Any]:
    """The PipelineDefinition of pipelines/agrawal.yaml with OVERRIDES, validated like `pipeline apply`."""
    spec = pipelines.load_file(REPO / "pipelines" / f"{PIPELINE}.yaml")
    spec = pipelines.PipelineFile.model_validate(merged(spec.model_dump(), OVERRIDES))
    return pipelines.to_definition(spec, raw_topic).to_avro()


def _records(dep: Deployment, topic: str, schema: str) -> list[dict[str, Any]]:
    codec = codec_for(schema)
    return [codec.decode(m.value() or b"") for m in read_to_end(dep.settings, topic, 120)]


# -- the loop on the real services ------------------------------------------------------------------------
def produce_paced(producer: Producer, topic: str, values: Sequence[bytes], rate: float) -> float:
    """Every value, in order, at `rate` a second (late ones go out at once: none is skipped).

    Returns the achieved rate.
    """
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    start = time.monotonic()
    for i, value in enumerate(values):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        while True:
            try:
                producer.produce(topic, value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(30) or errors:
        raise DeliveryFailed(f"could not write {topic}: {errors[:3] or 'flush timed out'}")
    return len(values) / (time.monotonic() - start)


def closed_loop(dep: Deployment, definition: dict[str, Any], timeout_s: float = 180.0) -> Measured:
    """The six services on an abrupt drift (Agrawal function 0 → 4 at event 10,000), through topics only.

    Raw JSON events go in at 1000/s; everything measured is read back from the topics afterwards:
    drift alerts, the controller's decisions and every served prediction. Headline: events from the
    drift to the concept-drift alert.
    """
    dep.create_topics()
    dep.publish_pipeline(definition)
    events = [e.value for e in open_source(DRIFT_SOURCE, limit=LOOP_EVENTS)]
    position = {str(e["event_id"]): i for i, e in enumerate(events)}
    labels = {str(e["event_id"]): e["label"] for e in events}
    values = [json.dumps(e).encode() for e in events]
    started = time.monotonic()
    with dep.services(*SERVICES) as stack:
        ready_s = time.monotonic() - started
        produced_at = time.time()
        producer = make_producer(dep.settings, **{"linger.ms": 5})
        achieved = produce_paced(producer, dep.raw_topic, values, LOOP_RATE)
        dep.wait_count(dep.predictions_topic, LOOP_EVENTS, timeout_s, stack)
        caught_up_s = time.time() - produced_at - LOOP_EVENTS / LOOP_RATE
    c = dep.catalogue
    decisions = _records(dep, c.promotions().name, "Promotion")
    alerts = _records(dep, c.drift_alerts().name, "DriftAlert")
    predictions = _records(dep, dep.predictions_topic, "Prediction")
    fv_codec = codec_for("FeatureVector")
    position_of = {
        m.offset() or 0: position[fv_codec.decode(m.value() or b"")["event_id"]]
        for m in read_to_end(dep.settings, dep.features_topic, 120)
    }
    delay = stats.drift_delay(alerts, dep.features_topic, position_of, DRIFT_AT)
    promotion = stats.controller_promotion(decisions)
    promoted = None if promotion is None else (str(promotion["model_name"]), int(promotion["version"]))
    rec = stats.recovery(predictions, position, labels, promoted, DRIFT_AT, WINDOW)
    drift_produced = produced_at + DRIFT_AT / LOOP_RATE  # the drift event's planned produce time
    promoted_after_s = None if promotion is None else promotion["decided_at"] / 1000 - drift_produced
    controlled = Counter(f"{d['action']} by {d['actor']}" for d in decisions if d["actor"] != "auto")
    return Measured(
        None if delay is None else float(delay),
        {
            "alerts": stats.count_kinds(alerts),
            "concept_detector": definition["monitoring"]["concept_detector"],
            "decisions": dict(controlled),
            "promoted": promoted,
            "promotion_s_after_drift": promoted_after_s,
            "recovery_events": rec.events,
            "gap_pts": rec.gap_pts,
            "accuracy_before": rec.before,
            "accuracy_after": rec.after,
            "after_events": rec.after_events,
            "predictions": len(predictions),
            "achieved_rate": achieved,
            "services_ready_s": ready_s,
            "caught_up_s": caught_up_s,
        },
    )


# -- a served stream simulated in-process (no Kafka) ------------------------------------------------------
@dataclass
class ServedLog:
    """A stream as the monitor reads it when the features, learner and predictor services serve it.

    `items` are (role, offset, Avro value) in arrival order, role "features" or "predictions", offset the
    record's position in its topic; `promotions` are (index into items, Promotion record): the learner's
    AUTO promotion of each snapshot, applied before that item.
    """

    definition: dict[str, Any]
    items: list[tuple[str, int, bytes]] = field(default_factory=list)
    promotions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    events: int = 0
    served: int = 0
    served_right: int = 0
    seconds: float = 0.0

    @property
    def pipeline(self) -> str:
        return str(self.definition["name"])

    @property
    def served_accuracy(self) -> float | None:
        return self.served_right / self.served if self.served else None

    def index_of_event(self, event: int) -> int:
        """Index in `items` of the feature vector of the event at that position (len(items) if none)."""
        for k, (role, offset, _value) in enumerate(self.items):
            if role == "features" and offset >= event:
                return k
        return len(self.items)


def serve_stream(definition: dict[str, Any], source: str, n: int, signing_key: bytes) -> ServedLog:
    """The features engine, the online learner and the predictor's registry over `source`, in one loop.

    As the services do it: the learner learns every labelled event and snapshots a signed version every
    `snapshot_every_events`, each AUTO-promoted; the predictor verifies and loads it and serves each
    event with the version live when the event arrives. Events before the first version wait for it
    (they wait in Kafka). Prediction before learning: an event is never served by a model that learned it.
    """
    name = definition["name"]
    online = pipelines.online_model(definition)
    engine = FeatureEngine(definition)
    learner = OnlineLearner(
        pipeline=name, model_name=online["name"], estimator_spec=online["estimator_spec"],
        params=dict(online["params"]), regression=False, signing_key=signing_key,
    )  # fmt: skip
    registry = ModelRegistry(signing_key)
    every = int(definition["snapshot_every_events"])
    fv_codec, pred_codec = codec_for("FeatureVector"), codec_for("Prediction")
    out = ServedLog(definition)
    waiting: list[dict[str, Any]] = []

    def serve(stamp: int) -> None:
        live = registry.live.get(name)
        if live is None:
            return
        for fv in waiting:
            record = prediction_record(live, fv, stamp)
            out.items.append(("predictions", out.served, pred_codec.encode(record)))
            out.served += 1
            out.served_right += record["prediction"] == fv["label"]
        waiting.clear()

    started = time.perf_counter()
    for i, event in enumerate(open_source(source, limit=n)):
        stamp = now_ms()
        raw = decode_raw(json.dumps(event.value).encode())
        src = {"topic": definition["raw_topic"], "partition": 0, "start_offset": i, "end_offset": i + 1}
        fv = engine.transform(raw, timestamp_ms=stamp, now_ms=stamp, source=src)
        out.items.append(("features", i, fv_codec.encode(fv)))
        waiting.append(fv)
        serve(stamp)
        learner.learn(fv["features"], fv["label"])
        if learner.due(every, math.inf):
            version = learner.snapshot(stamp)
            promotion = auto_promotion(version, stamp)
            registry.on_version(version)
            registry.on_promotion(promotion)
            out.promotions.append((len(out.items), promotion))
            serve(stamp)
        out.events = i + 1
    out.seconds = time.perf_counter() - started
    return out


# -- false alarms: the monitor's logic on a stationary stream ---------------------------------------------
def stationary(served: ServedLog, batch: int) -> Measured:
    """streams.monitor fed a stationary served stream: every drift alert it raises is a false alarm.

    Records are decoded from their Avro bytes (what the service hands the logic); the join expires
    every `batch` records, as the service does once per batch. Headline: alerts of all kinds.
    """
    monitor = Monitor()
    monitor.on_pipeline(served.definition)
    pm = monitor.pipelines[served.pipeline]
    decode = {"features": codec_for("FeatureVector").decode, "predictions": codec_for("Prediction").decode}
    topics = {role: f"{served.pipeline}.{role}" for role in decode}  # only names the alerts' windows
    promotions = iter(served.promotions)
    pending = next(promotions, None)
    position: dict[str, int] = {}
    alerts: list[tuple[int, dict[str, Any]]] = []  # (event position, DriftAlert)
    cpu = time.thread_time()
    for k, (role, offset, value) in enumerate(served.items):
        while pending is not None and pending[0] <= k:
            monitor.on_promotion(pending[1])
            pending = next(promotions, None)
        record = decode[role](value)
        now = time.monotonic()
        src = (topics[role], 0, offset)
        if role == "features":
            position[record["event_id"]] = offset
            results = pm.on_features(record, src, now, now_ms())
        else:
            results = pm.on_prediction(record, src, now, now_ms())
        alerts += [(position[record["event_id"]], r.record) for r in results if r.kind == "alert"]
        if k % batch == batch - 1:
            monitor.expire(now)
    cpu_us = (time.thread_time() - cpu) * 1e6 / max(served.events, 1)
    kinds = stats.count_kinds(a for _, a in alerts)
    silenced = {f"{kind}/{detector}": n for (kind, detector), n in pm.suppressed.items()}
    first = [f"{a['kind']}{'/' + a['feature'] if a['feature'] else ''} at event {i}" for i, a in alerts[:5]]
    return Measured(
        float(len(alerts)),
        {
            "events": served.events,
            "by_kind": kinds,
            "silenced": silenced,
            "first": first,
            "served_accuracy": served.served_accuracy,
            "versions": len(served.promotions),
            "detector": served.definition["monitoring"]["concept_detector"],
            "cpu_us_per_event": (cpu_us, cpu_us),
            "simulation_s": served.seconds,
        },
    )


# -- the monitor service's throughput ---------------------------------------------------------------------
def monitor_service(dep: Deployment, served: ServedLog, events: int, warmup: int, batch: int) -> Measured:
    """`MonitorService.handle` in-process on pre-built messages: one FeatureVector and one Prediction per
    event, in batches of `batch` as its BatchLoop hands them over; no broker I/O is timed.

    The first `warmup` events (reference windows, first joins) are handled untimed. The service is the
    real composition root: it creates its pipeline's topics on the bench's broker when it learns it.
    """
    svc = MonitorService(dep.settings, dep.catalogue)
    svc.on_pipeline(served.definition, None)
    topic = {"features": dep.features_topic, "predictions": dep.predictions_topic}
    promotions = dict(served.promotions)
    start, end = served.index_of_event(warmup), served.index_of_event(warmup + events)
    if start >= len(served.items):
        raise ValueError(f"the served stream has no event after the {warmup} warm-up events")
    # Batches never straddle a promotion, so each is applied where the service's follower would see it.
    batches: list[tuple[list[dict[str, Any]], list[Message], bool]] = []
    msgs: list[Message] = []
    before: list[dict[str, Any]] = []
    for k, (role, offset, value) in enumerate(served.items[:end]):
        if (k in promotions or k == start or len(msgs) == batch) and msgs:
            batches.append((before, msgs, k > start))
            msgs, before = [], []
        if k in promotions:
            before.append(promotions[k])
        msgs.append(Message(topic=topic[role], partition=0, offset=offset, value=value))
    if msgs:
        batches.append((before, msgs, True))
    timed = [m for _, m, is_timed in batches if is_timed]
    timed_events = sum(1 for m in timed for msg in m if msg.topic() == topic["features"])
    timed_msgs = sum(len(m) for m in timed)
    elapsed = cpu = 0.0
    outputs = 0
    for decisions, batch_msgs, is_timed in batches:
        for record in decisions:
            svc.on_promotion(record, None)
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs += len(svc.handle(batch_msgs))
        if is_timed:
            elapsed += time.perf_counter() - t0
            cpu += time.thread_time() - c0
    cpu_us = cpu * 1e6 / max(timed_events, 1)
    return Measured(
        timed_events / elapsed,
        {
            "events": timed_events,
            "messages": timed_msgs,
            "batches": len(timed),
            "batch": batch,
            "outputs": outputs,
            "cpu_us_per_event": (cpu_us, cpu_us),
        },
    )
