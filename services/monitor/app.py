"""Composition root of the monitor: pipelines and promotions followers, the data loop, alerts out.

The data loop reads every active pipeline's predictions, shadow predictions, feature vectors and (for
label source TOPIC) labels; `streams.monitor` joins them by event id and returns DriftAlert and
Evaluation records. Monitoring state lives in memory: after a restart the join, metrics and detectors
start again from the committed offsets.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import faust
from confluent_kafka import Message

from streamml import metrics
from streamml.codec import codec_for
from streamml.errors import ValidationError
from streamml.kafka import ensure_topics
from streamml.runtime import BatchLoop, Output, faust_app
from streamml.service import (
    ControlFollower,
    check_declared_model,
    dead_letter,
    now_ms,
    prepare,
    run_service,
)
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.features import FeatureEngine, coerce_label
from streams.monitor import ModelKey, Monitor, MonitorOutput, PipelineMonitor

log = logging.getLogger(__name__)
SERVICE = "monitor"


class MonitorService:
    """The monitor's state and handlers, wired by `build`."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.monitor = Monitor()
        self.control = ControlFollower(settings, SERVICE)
        self.routes: dict[str, tuple[str, str]] = {}  # topic -> (pipeline, role)
        self.definitions: dict[str, dict[str, Any]] = {}
        self.engines: dict[str, FeatureEngine] = {}  # what each pipeline's feature vectors must look like
        self._features = codec_for("FeatureVector")
        self._labels = codec_for("Label")
        self._predictions = codec_for("Prediction")
        self._alerts = codec_for("DriftAlert")
        self._evaluations = codec_for("Evaluation")
        self._series: dict[str, dict[ModelKey, set[tuple[str, str]]]] = {}  # gauge series set per version
        self._counted: dict[tuple[int, tuple[str, ...]], int] = {}  # last total synced per counter

    # -- control --------------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        if not record["deleted"]:
            ensure_topics(self.settings, self.catalogue.pipeline_topics(name))
        self.monitor.on_pipeline(record)
        self.routes = {t: r for t, r in self.routes.items() if r[0] != name}
        if record["deleted"]:
            self.definitions.pop(name, None)
            self.engines.pop(name, None)
            self._remove_series(name, set(self._series.get(name, {})))
            return
        self.definitions[name] = record
        self.engines[name] = FeatureEngine(record)
        c = self.catalogue
        self.routes[c.features(name).name] = (name, "features")
        self.routes[c.predictions(name).name] = (name, "predictions")
        self.routes[c.shadow_predictions(name).name] = (name, "predictions")
        if record["label"]["source"] == "TOPIC":
            self.routes[c.labels(name).name] = (name, "labels")

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            check_declared_model(self.definitions, record)
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

    # -- data path ------------------------------------------------------------------------------------
    def topics(self) -> set[str]:
        return set(self.routes)

    def handle(self, msgs: list[Message]) -> list[Output]:
        now, now_wall = time.monotonic(), now_ms()
        outputs: list[Output] = []
        routes, pipelines = self.routes, self.monitor.pipelines
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
                continue
            outputs.extend(self._output(r) for r in results)
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
        numbers = [record["score"], *record["probabilities"].values()]
        if isinstance(record["prediction"], float):
            numbers.append(record["prediction"])
        if any(x is not None and not math.isfinite(x) for x in numbers):
            raise ValidationError("a score, probability or prediction is not a finite number")

    def housekeeping(self) -> list[Output]:
        """Expire the join at the label TTL and refresh the metrics (also run when the topics are idle)."""
        self.monitor.expire(time.monotonic())
        for name, pm in self.monitor.pipelines.items():
            self._export(name, pm)
        return []

    def _output(self, result: MonitorOutput) -> Output:
        record = result.record
        if result.kind == "alert":
            metrics.DRIFT_ALERTS.labels(result.pipeline, record["kind"], record["detector"]).inc()
            value = self._alerts.encode(record)
            return Output(self.catalogue.drift_alerts().name, result.pipeline.encode(), value)
        metrics.EVALUATIONS.labels(result.pipeline).inc()
        log.info(
            "%s: %s champion %s v%d %.4f, challenger %s v%d %.4f over %d labels",
            result.pipeline, record["metric"], record["champion_model"], record["champion_version"],
            record["champion_value"], record["challenger_model"], record["challenger_version"],
            record["challenger_value"], record["labels"],
        )  # fmt: skip
        value = self._evaluations.encode(record)
        return Output(self.catalogue.evaluations().name, result.pipeline.encode(), value)

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


def build(settings: Settings) -> tuple[faust.App, MonitorService, BatchLoop]:
    catalogue = prepare(settings)
    service = MonitorService(settings, catalogue)
    service.bootstrap()
    app = faust_app(SERVICE, settings)
    service.follow(app)
    loop = BatchLoop(
        settings,
        name=SERVICE,
        handler=service.handle,
        topics=service.topics,
        on_idle=service.housekeeping,
        dead_letter=lambda msg, exc: dead_letter(catalogue, SERVICE, None, msg, exc),
    )
    return app, service, loop


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service, loop = build(settings)
        return app, [loop]

    run_service(compose)
