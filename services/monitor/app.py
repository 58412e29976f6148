"""Composition root of the monitor: pipelines and promotions followers, one writer per pipeline, alerts out.

Of all monitor instances, the one elected for a pipeline's writer slot (`streamml.election`) reads all its
predictions, shadow predictions, feature vectors and (label source TOPIC) labels; `streams.monitor` joins
them by event id and returns DriftAlert and Evaluation records. Its state (join, metrics, detectors,
challenger comparison) and input positions are snapshotted, signed, to `<prefix>.monitor-state` in the
same transaction as every alert or evaluation (and every few seconds): a new writer fences the old one,
restores the latest snapshot and reads on from its positions, so no alert is repeated or missed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import faust
from confluent_kafka import Message

from streamml import artifacts, metrics
from streamml.codec import codec_for, encoder_for
from streamml.election import WriterLoop, WriterSlots, slot_of
from streamml.errors import ConfigError, ValidationError
from streamml.kafka import ensure_topics
from streamml.runtime import Output, faust_app, read_to_end
from streamml.service import (
    ControlFollower,
    check_declared_model,
    dead_letter,
    frame_dead_letters,
    now_ms,
    prepare,
    run_service,
)
from streamml.settings import Settings
from streamml.topics import MODEL_MAX_BYTES, Catalogue
from streams.features import FeatureEngine, coerce_label
from streams.monitor import ModelKey, Monitor, MonitorOutput, PipelineMonitor

log = logging.getLogger(__name__)
SERVICE = "monitor"
SNAPSHOT_EVERY_S = 5.0  # besides every transaction with an alert or evaluation: bounds the replay
PROMOTIONS_KEPT = 200  # per pipeline, to bring a restored state up to date


class MonitorService:
    """The monitor's state and handlers, wired by `build`."""

    def __init__(self, settings: Settings, catalogue: Catalogue, key: bytes | None = None) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.key = key  # signs the state snapshots (none without a key: single-process tests)
        self.monitor = Monitor()
        # Whether this instance writes for a pipeline (its writer slot); set by `build` (all, in tests).
        self.owns: Callable[[str], bool] = lambda _pipeline: True
        self.slot_count = settings.writer_slots
        self.positions: dict[str, dict[tuple[str, int], int]] = {}  # pipeline -> next offset per input
        self.promotion_log: dict[str, deque[tuple[int, dict[str, Any]]]] = {}  # (offset, decision)
        self._snapshot_at: dict[str, float] = {}
        self._snapshot_positions: dict[str, dict[tuple[str, int], int]] = {}
        self._snapshots = codec_for("MonitorSnapshot")
        self.control = ControlFollower(settings, SERVICE)
        self.routes: dict[str, tuple[str, str]] = {}  # topic -> (pipeline, role)
        self.definitions: dict[str, dict[str, Any]] = {}
        self.engines: dict[str, FeatureEngine] = {}  # what each pipeline's feature vectors must look like
        self._features = codec_for("FeatureVector")
        self._labels = codec_for("Label")
        self._predictions = codec_for("Prediction")
        self._series: dict[str, dict[ModelKey, set[tuple[str, str]]]] = {}  # gauge series set per version
        self._counted: dict[tuple[int, tuple[str, ...]], int] = {}  # last total synced per counter

    # -- control --------------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        if not record["deleted"]:
            ensure_topics(
                self.settings, self.catalogue.used_by(self.catalogue.pipeline_topics(name), SERVICE)
            )
        if record["deleted"] or self.owns(name):
            self.monitor.on_pipeline(record)
        self.routes = {t: r for t, r in self.routes.items() if r[0] != name}
        if record["deleted"]:
            self.definitions.pop(name, None)
            self.engines.pop(name, None)
            self._remove_series(name, set(self._series.get(name, {})))
            return
        self.definitions[name] = record
        self.engines[name] = FeatureEngine(record)
        frame_dead_letters(self.catalogue, name)
        c = self.catalogue
        self.routes[c.features(name).name] = (name, "features")
        self.routes[c.predictions(name).name] = (name, "predictions")
        self.routes[c.shadow_predictions(name).name] = (name, "predictions")
        if record["label"]["source"] == "TOPIC":
            self.routes[c.labels(name).name] = (name, "labels")

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            check_declared_model(self.definitions, record)
            offset = self.control.applied.get((self.catalogue.promotions().name, 0), 1) - 1
            log_ = self.promotion_log.setdefault(record["pipeline"], deque(maxlen=PROMOTIONS_KEPT))
            log_.append((offset, record))
            if self.owns(record["pipeline"]):
                self.monitor.on_promotion(record)

    def bootstrap(self) -> None:
        c = self.catalogue
        self.control.bootstrap(c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.bootstrap(c.promotions().name, "Promotion", self.on_promotion)
        log.info("bootstrap done: watching %s", sorted(self.monitor.pipelines))

    def follow(self, app: faust.App) -> None:
        c = self.catalogue
        self.control.follow(app, c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.follow(app, c.promotions().name, "Promotion", self.on_promotion)

    # -- writer hand-over ------------------------------------------------------------------------------
    def in_slot(self, slot: int) -> list[str]:
        return sorted(p for p in self.definitions if slot_of(p, self.slot_count) == slot)

    def on_gain(self, slots: list[int]) -> None:
        """This instance now writes for `slots` (their previous writers are fenced, so their last
        snapshots are on the topic): resume each pipeline from its latest snapshot."""
        names = [p for slot in slots for p in self.in_slot(slot)]
        if not names:
            return
        latest: dict[str, dict[str, Any]] = {}
        topic = self.catalogue.monitor_state().name
        for msg in read_to_end(self.settings, topic):
            name = (msg.key() or b"").decode(errors="replace")
            if msg.value() is None:
                latest.pop(name, None)
                continue
            if name in names:
                try:
                    latest[name] = self._snapshots.decode(msg.value() or b"")
                except Exception as exc:  # a bad snapshot is skipped: an older one or a fresh start
                    log.error("ignoring %s[0]@%s: %s", topic, msg.offset(), exc)
        for name in names:
            self.restore(name, latest.get(name))

    def restore(self, name: str, snapshot: dict[str, Any] | None) -> None:
        definition = self.definitions[name]
        pm, positions, since = None, {}, -1
        if snapshot is not None:
            try:
                pm = self._load(snapshot)
                pm.configure(definition)
                positions = {(p["topic"], p["partition"]): p["offset"] for p in snapshot["positions"]}
                since = int(snapshot["promotions_offset"])
                log.info(
                    "%s: resuming from the snapshot of %s (%d inputs)",
                    name,
                    snapshot["writer"],
                    len(positions),
                )
            except Exception as exc:  # verification or loading failed: start afresh from the beginning
                log.error("%s: cannot resume from its snapshot (%s); starting afresh", name, exc)
                pm, positions, since = None, {}, -1
        if pm is None:
            pm = PipelineMonitor(definition, self.monitor.max_pending)
        for offset, decision in self.promotion_log.get(name, ()):
            if offset >= since:  # decisions made after the snapshot
                pm.on_promotion(decision)
        self.monitor.early.pop(name, None)
        self.monitor.pipelines[name] = pm
        self.positions[name] = positions
        self._snapshot_positions[name] = dict(positions)
        self._snapshot_at[name] = time.monotonic()

    def _load(self, snapshot: dict[str, Any]) -> PipelineMonitor:
        """Unpickle a snapshot's state, only once its checksum and signature verify with our key."""
        if snapshot["state_format"] != "pickle":
            raise ValidationError(f"unsupported state format {snapshot['state_format']!r}")
        record = {
            "pipeline": snapshot["pipeline"], "model_name": "monitor-state", "version": 0,
            "artifact": snapshot["state"], "artifact_format": "pickle",
            "sha256": snapshot["sha256"], "signature": snapshot["signature"],
        }  # fmt: skip
        state = artifacts.load(record, self.key)
        if not isinstance(state, PipelineMonitor):
            raise ValidationError(f"a {type(state).__name__}, not a monitor state")
        return state

    def on_lose(self, slots: list[int]) -> None:
        for name in (p for slot in slots for p in self.in_slot(slot)):
            self.monitor.pipelines.pop(name, None)
            self.positions.pop(name, None)
            self._remove_series(name, set(self._series.get(name, {})))
            with contextlib.suppress(KeyError):  # the next writer reports it
                metrics.MONITOR_SNAPSHOT_BYTES.remove(name)

    def snapshot(self, name: str) -> Output | None:
        """The pipeline's state and positions as a signed record for `<prefix>.monitor-state`."""
        pm = self.monitor.pipelines.get(name)
        if self.key is None or pm is None:
            return None
        started = time.perf_counter()
        state = pickle.dumps(pm, protocol=pickle.HIGHEST_PROTOCOL)
        metrics.MONITOR_SNAPSHOT_BYTES.labels(name).set(len(state))
        metrics.MONITOR_SNAPSHOT_SECONDS.labels(name).observe(time.perf_counter() - started)
        positions = self.positions.get(name, {})
        record = {
            "pipeline": name,
            "positions": [
                {"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(positions.items())
            ],
            "promotions_offset": self.control.applied.get((self.catalogue.promotions().name, 0), 0),
            "state_format": "pickle",
            "state": state,
            "sha256": artifacts.sha256_hex(state),
            "signature": artifacts.sign(state, self.key),
            "writer": self.settings.instance_id,
            "taken_at": now_ms(),
        }
        self._snapshot_at[name] = time.monotonic()
        self._snapshot_positions[name] = dict(positions)
        topic = self.catalogue.monitor_state().name
        return Output(topic, name.encode(), self._snapshots.encode(record), pipeline=name)

    # -- data path ------------------------------------------------------------------------------------
    def inputs(self) -> dict[str, dict[int, int]]:
        """What the writer reads: the monitored pipelines' topics, from where their state resumes."""
        wanted: dict[str, dict[int, int]] = {}
        for topic, (pipeline, _role) in self.routes.items():
            if pipeline in self.monitor.pipelines:
                positions = self.positions.get(pipeline, {})
                wanted[topic] = {p: o for (t, p), o in positions.items() if t == topic}
        return wanted

    def pipeline_of(self, topic: str) -> str | None:
        route = self.routes.get(topic)
        return route[0] if route else None

    def handle(self, msgs: list[Message]) -> list[Output]:
        # Wall-clock seconds (not monotonic): the join's entries move between processes in snapshots.
        now, now_wall = time.time(), now_ms()
        outputs: list[Output] = []
        routes, pipelines = self.routes, self.monitor.pipelines
        emitted: set[str] = set()
        for msg in msgs:
            topic = msg.topic() or ""
            route = routes.get(topic)
            if route is None:
                continue
            pipeline, role = route
            pm = pipelines.get(pipeline)
            if pm is None:
                continue
            src = (topic, msg.partition() or 0, msg.offset() or 0)
            self.positions.setdefault(pipeline, {})[(src[0], src[1])] = src[2] + 1
            before = len(outputs)
            try:
                value = msg.value() or b""
                if role == "predictions":
                    prediction = self._predictions.decode(value)
                    self.check_prediction(pipeline, topic, prediction)
                    results = pm.on_prediction(prediction, src, now, now_wall)
                elif role == "features":
                    fv = self._features.decode(value)
                    if fv["pipeline"] != pipeline:
                        raise ValidationError(
                            f"a {fv['pipeline'][:80]!r} feature vector on {pipeline}'s topic"
                        )
                    self.engines[pipeline].check_vector(fv)
                    results = pm.on_features(fv, src, now, now_wall)
                else:
                    label = self._labels.decode(value)
                    task = self.definitions[pipeline]["task"]
                    results = pm.on_label(
                        label["event_id"], coerce_label(task, label["label"]), now, now_wall
                    )
            except Exception as exc:  # a bad record never stops monitoring: dead-letter it, keep going
                outputs.append(dead_letter(self.catalogue, SERVICE, pipeline, msg, exc))
                emitted.add(pipeline)
                continue
            outputs.extend(self._output(r) for r in results)
            if len(outputs) > before:
                emitted.add(pipeline)
        # Whatever is published goes with the state that produced it (one transaction): a new writer
        # never repeats it.
        for name in sorted(emitted):
            snap = self.snapshot(name)
            if snap is not None:
                outputs.append(snap)
        return outputs + self.housekeeping()

    def check_prediction(self, pipeline: str, topic: str, record: dict[str, Any]) -> None:
        """Raise ValidationError unless a prediction could have come from this pipeline's predictor: anyone
        may write to a predictions topic, and one forged record of another model would restart the drift
        detectors (a new lineage)."""
        if record["pipeline"] != pipeline:
            raise ValidationError(f"a prediction for {record['pipeline'][:80]!r} on {pipeline}'s topic")
        if record["shadow"] != (topic == self.catalogue.shadow_predictions(pipeline).name):
            raise ValidationError("the shadow flag does not match the topic")
        models = {m["name"] for m in self.definitions.get(pipeline, {}).get("models", [])}
        if models and record["model_name"] not in models:
            raise ValidationError(
                f"model {record['model_name'][:80]!r} is not declared by pipeline {pipeline}"
            )
        if not 0 <= record["model_version"] <= 2**53:
            raise ValidationError(f"model version {record['model_version']} out of range")
        prediction = record["prediction"]
        task = self.definitions.get(pipeline, {}).get("task")
        if task == "REGRESSION" and not (
            prediction is None or (isinstance(prediction, int | float) and not isinstance(prediction, bool))
        ):
            raise ValidationError(
                f"a regression prediction must be a number, got {type(prediction).__name__}"
            )
        if task is not None and task != "REGRESSION" and prediction is not None:
            coerce_label(task, prediction, "prediction")  # a class the task can have, or ValidationError
        numbers = [record["score"], *record["probabilities"].values()]
        if isinstance(record["prediction"], float):
            numbers.append(record["prediction"])
        if any(x is not None and not math.isfinite(x) for x in numbers):
            raise ValidationError("a score, probability or prediction is not a finite number")

    def housekeeping(self) -> list[Output]:
        """Expire the join at the label TTL, refresh the metrics and snapshot pipelines that moved on for
        a while (also run when the topics are idle)."""
        self.monitor.expire(time.time())
        outputs: list[Output] = []
        now = time.monotonic()
        for name, pm in self.monitor.pipelines.items():
            self._export(name, pm)
            due = now - self._snapshot_at.get(name, 0.0) >= SNAPSHOT_EVERY_S
            if due and self.positions.get(name) != self._snapshot_positions.get(name):
                snap = self.snapshot(name)
                if snap is not None:
                    outputs.append(snap)
        return outputs

    def _output(self, result: MonitorOutput) -> Output:
        record = result.record
        if result.kind == "alert":
            metrics.DRIFT_ALERTS.labels(result.pipeline, record["kind"], record["detector"]).inc()
            value = encoder_for(self.catalogue.drift_alerts().name, "DriftAlert").encode(record)
            return Output(
                self.catalogue.drift_alerts().name, result.pipeline.encode(), value, pipeline=result.pipeline
            )
        metrics.EVALUATIONS.labels(result.pipeline).inc()
        log.info(
            "%s: %s champion %s v%d %.4f, challenger %s v%d %.4f over %d labels",
            result.pipeline, record["metric"], record["champion_model"], record["champion_version"],
            record["champion_value"], record["challenger_model"], record["challenger_version"],
            record["challenger_value"], record["labels"],
        )  # fmt: skip
        value = encoder_for(self.catalogue.evaluations().name, "Evaluation").encode(record)
        return Output(
            self.catalogue.evaluations().name, result.pipeline.encode(), value, pipeline=result.pipeline
        )

    # -- metrics --------------------------------------------------------------------------------------
    def _count(self, counter: Any, labels: tuple[str, ...], total: int) -> None:
        """Bring a Prometheus counter up to a monotonic count kept by the logic."""
        key = (id(counter), labels)
        delta = total - self._counted.get(key, 0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
            self._counted[key] = total

    def _export(self, name: str, pm: PipelineMonitor) -> None:
        counts = pm.counts
        self._count(metrics.MONITOR_LABELLED, (name,), counts.labelled)
        self._count(metrics.MONITOR_EXPIRED, (name, "unlabelled"), counts.expired_unlabelled)
        self._count(metrics.MONITOR_EXPIRED, (name, "unpredicted"), counts.expired_unpredicted)
        metrics.MONITOR_UNLABELLED.labels(name).set(counts.unlabelled)
        metrics.MONITOR_PENDING.labels(name).set(len(pm.entries))
        for (kind, detector), n in pm.suppressed.items():
            self._count(metrics.DRIFT_SUPPRESSED, (name, kind, detector), n)
        exported = pm.exported()
        series = self._series.setdefault(name, {})
        self._remove_series(name, set(series) - exported)
        for key in exported:
            vm = pm.versions.get(key)
            if vm is None or not vm.dirty:
                continue
            vm.dirty = False
            labels = series.setdefault(key, set())
            for (metric, window), value in vm.values().items():
                metrics.MODEL_METRIC.labels(name, key[0], str(key[1]), metric, window).set(value)
                labels.add((metric, window))

    def _remove_series(self, name: str, keys: set[ModelKey]) -> None:
        """Drop the gauges of versions no longer live or shadowing (bounded version cardinality)."""
        series = self._series.get(name, {})
        for key in keys:
            for metric, window in series.pop(key, set()):
                with contextlib.suppress(KeyError):  # never set: nothing to remove
                    metrics.MODEL_METRIC.remove(name, key[0], str(key[1]), metric, window)


def build(settings: Settings) -> tuple[faust.App, MonitorService, WriterLoop]:
    if settings.signing_key is None:
        raise ConfigError("the monitor signs its state snapshots: set STREAMML_SIGNING_KEY")
    catalogue = prepare(settings, SERVICE)
    service = MonitorService(settings, catalogue, settings.signing_key.get_secret_value().encode())
    slots = WriterSlots(
        settings,
        SERVICE,
        on_gain=service.on_gain,
        on_lose=service.on_lose,
        producer_config={"message.max.bytes": MODEL_MAX_BYTES},  # what the monitor-state topic takes
    )
    slots.pipelines_of = service.in_slot
    service.owns = slots.owns  # no slot is owned before the loop joins the writers group
    service.bootstrap()
    app = faust_app(SERVICE, settings)
    service.follow(app)
    loop = WriterLoop(
        settings,
        name=SERVICE,
        slots=slots,
        handler=lambda _pipeline, msgs: service.handle(msgs),
        inputs=service.inputs,
        pipeline_of=service.pipeline_of,
        on_idle=service.housekeeping,
        dead_letter=lambda msg, exc: dead_letter(catalogue, SERVICE, None, msg, exc),
    )
    return app, service, loop


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service, loop = build(settings)
        return app, [loop]

    run_service(SERVICE, compose)
