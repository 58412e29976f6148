"""Composition root of the learner: pipelines follower, one writer per pipeline, resume from its last version.

One truth per pipeline: of all learner instances, only the one elected for a pipeline's writer slot
(`streamml.election`) learns it and publishes its versions, through a producer that fenced any previous
writer. Exactly-once learning: the writer reads the pipeline's features (and labels) by assignment from
the offsets recorded in the last published version (or the beginning), never from group offsets, so
across restarts and fail-overs each event is learned once in the one version lineage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import faust
from confluent_kafka import Message

from streamml import artifacts, metrics
from streamml.artifacts import ArtifactRejectedError
from streamml.codec import codec_for, encoder_for
from streamml.election import WriterLoop, WriterSlots, slot_of
from streamml.errors import ValidationError
from streamml.kafka import ensure_topics
from streamml.pipelines import online_model
from streamml.runtime import MODEL_VERSION_MAX_BYTES, Output, faust_app, read_to_end
from streamml.service import ControlFollower, dead_letter, frame_dead_letters, now_ms, prepare, run_service
from streamml.settings import Settings
from streamml.signing import Keys, keys_from
from streamml.topics import MODEL_MAX_BYTES, Catalogue
from streams.features import FeatureEngine, coerce_label
from streams.learner import LabelJoin, OnlineLearner, auto_promotion

log = logging.getLogger(__name__)
SERVICE = "learner"
OVERSIZED_ALERT_EVERY_S = 600.0  # a model too large to publish stays so: one alert per model per 10 min


class Learner:
    def __init__(self, settings: Settings, catalogue: Catalogue, key: bytes | Keys) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.key = key
        self.control = ControlFollower(settings, SERVICE)
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.learners: dict[str, OnlineLearner] = {}
        self.joins: dict[str, LabelJoin] = {}
        self.engines: dict[str, FeatureEngine] = {}  # what each pipeline's feature vectors must look like
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}  # last published version per model
        self.topic_roles: dict[str, tuple[str, str]] = {}  # topic -> (pipeline, "features" | "labels")
        self.live_model: dict[str, str] = {}  # pipeline -> name of the model serving it
        self.known_versions: set[tuple[str, str, int]] = set()  # (pipeline, model, version) published
        self.pending: dict[str, dict[str, Any]] = {}  # pipeline -> decision whose version is not seen yet
        self._features = codec_for("FeatureVector")
        self._labels = codec_for("Label")
        self._versions = codec_for("ModelVersion")
        self.oversized: dict[tuple[str, str], float] = {}  # (pipeline, model) -> when a too-large alert went
        # Whether this instance writes for a pipeline (its writer slot); set by `build` (all, in tests).
        self.owns: Callable[[str], bool] = lambda _pipeline: True
        self.slot_count = settings.writer_slots

    # -- control --------------------------------------------------------------------------------------
    def load_versions(self) -> None:
        """Read every version published so far (a new writer does so after fencing the previous one, so
        the last version of its lineage is among them)."""
        topic = self.catalogue.model_versions().name
        for msg in read_to_end(self.settings, topic):
            # the follower of model-versions starts after what was read here
            self.control.applied[(topic, msg.partition() or 0)] = (msg.offset() or 0) + 1
            if msg.value() is None:
                continue
            try:
                rec = self._versions.decode(msg.value() or b"")
                artifacts.verify(rec, self.key)  # a forged version must not set numbering or resume
            except Exception as exc:  # one bad record never keeps the learner from starting
                log.warning("ignoring %s[%d]@%d: %s", topic, msg.partition() or 0, msg.offset() or 0, exc)
                continue
            key = (rec["pipeline"], rec["model_name"])
            self.known_versions.add((rec["pipeline"], rec["model_name"], int(rec["version"])))
            if rec["kind"] == "ONLINE" and rec["version"] >= self.latest.get(key, {}).get("version", 0):
                self.latest[key] = rec

    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        if record["deleted"]:
            self.pipelines.pop(name, None)
            self.learners.pop(name, None)
            self.engines.pop(name, None)
            self.topic_roles = {t: r for t, r in self.topic_roles.items() if r[0] != name}
            return
        # Everything that can fail comes first, so a revision that cannot be applied changes nothing.
        engine = FeatureEngine(record)
        learner = self._learner_for(record) if self.owns(name) else None
        ensure_topics(self.settings, self.catalogue.used_by(self.catalogue.pipeline_topics(name), SERVICE))
        frame_dead_letters(self.catalogue, name)
        self.engines[name] = engine
        self.pipelines[name] = record
        if learner is not None:
            self.learners[name] = learner
            self.joins[name] = LabelJoin(ttl_s=record["label"]["ttl_seconds"])
        self.topic_roles[self.catalogue.features(name).name] = (name, "features")
        if record["label"]["source"] == "TOPIC":
            self.topic_roles[self.catalogue.labels(name).name] = (name, "labels")

    def _learner_for(self, record: dict[str, Any]) -> OnlineLearner:
        """The pipeline's online learner: the current one if its model is unchanged, else one resuming the
        lineage from the last version."""
        name = record["name"]
        model = online_model(record)
        regression = record["task"] == "REGRESSION"
        current = self.learners.get(name)
        same = current is not None and (current.model_name, current.estimator_spec, current.params) == (
            model["name"], model["estimator_spec"], dict(model["params"])
        )  # fmt: skip
        return current if same and current is not None else self._new_learner(name, model, regression)

    def in_slot(self, slot: int) -> list[str]:
        return sorted(p for p in self.pipelines if slot_of(p, self.slot_count) == slot)

    def on_gain(self, slots: list[int]) -> None:
        """This instance now writes for `slots` (their previous writers are fenced): resume each of their
        pipelines from the last version published, wherever it was published from."""
        self.load_versions()
        for name in (p for slot in slots for p in self.in_slot(slot)):
            self.learners.pop(name, None)  # never keep state from an earlier turn as writer
            definition = self.pipelines[name]
            self.learners[name] = self._learner_for(definition)
            self.joins[name] = LabelJoin(ttl_s=definition["label"]["ttl_seconds"])

    def on_lose(self, slots: list[int]) -> None:
        for name in (p for slot in slots for p in self.in_slot(slot)):
            learner = self.learners.pop(name, None)
            self.joins.pop(name, None)
            for metric in learner.metric_values() if learner is not None else {}:  # the next writer reports
                with contextlib.suppress(KeyError):
                    metrics.LEARNER_METRIC.remove(name, metric)

    def inputs(self) -> dict[str, dict[int, int]]:
        """What the writer reads: each learning pipeline's topics, from its last version's positions."""
        wanted: dict[str, dict[int, int]] = {}
        for topic, (pipeline, _kind) in self.topic_roles.items():
            learner = self.learners.get(pipeline)
            if learner is not None:
                wanted[topic] = {p: o for (t, p), o in learner.positions.items() if t == topic}
        return wanted

    def pipeline_of(self, topic: str) -> str | None:
        role = self.topic_roles.get(topic)
        return role[0] if role else None

    def on_version(self, record: dict[str, Any] | None, _msg: Any) -> None:
        """Remember which versions exist; a decision that was waiting for its version now counts."""
        if record is None:
            return
        artifacts.verify(record, self.key)  # a forged version is skipped (CONTROL alert), never counted
        self.known_versions.add((record["pipeline"], record["model_name"], int(record["version"])))
        pending = self.pending.get(record["pipeline"])
        if pending is not None and (pending["model_name"], pending["version"]) == (
            record["model_name"],
            record["version"],
        ):
            del self.pending[record["pipeline"]]
            self.live_model[record["pipeline"]] = pending["model_name"]

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        """Which model serves each pipeline: AUTO promotion stops while another model serves.

        A decision naming a model the pipeline does not declare is refused (skipped with a CONTROL alert);
        one naming a version not yet seen counts only once that version exists, so a PROMOTE of something
        that does not exist can never stop AUTO promotion.
        """
        if record is None or record["action"] not in ("PROMOTE", "ROLLBACK"):
            return
        pipeline, model = record["pipeline"], record["model_name"]
        definition = self.pipelines.get(pipeline)
        if definition is not None and model not in {m["name"] for m in definition["models"]}:
            raise ValidationError(
                f"{record['action']} names model {model!r}, not declared by pipeline {pipeline}"
            )
        if (pipeline, model, int(record["version"])) in self.known_versions:
            self.pending.pop(pipeline, None)
            self.live_model[pipeline] = model
        else:
            log.warning(
                "%s: %s of %s v%s waits for that version",
                pipeline,
                record["action"],
                model,
                record["version"],
            )
            self.pending[pipeline] = record

    def on_alert(self, record: dict[str, Any] | None, _msg: Any) -> None:
        """With `policy.reset_online_on_drift`, concept drift restarts the online model from scratch."""
        if record is None or record["kind"] != "CONCEPT":
            return
        definition = self.pipelines.get(record["pipeline"])
        learner = self.learners.get(record["pipeline"])
        if definition is None or learner is None or not definition["policy"]["reset_online_on_drift"]:
            return
        fresh = OnlineLearner(
            pipeline=learner.pipeline,
            model_name=learner.model_name,
            estimator_spec=learner.estimator_spec,
            params=learner.params,
            regression=learner.regression,
            signing_key=self.key,
            version=learner.version,  # numbering and resume offsets continue; the model starts over
            first_offsets=dict(learner.first_offsets),
            positions=dict(learner.positions),
        )
        self.learners[record["pipeline"]] = fresh
        log.info("%s: online model reset after drift alert %s", record["pipeline"], record["alert_id"])

    def _new_learner(self, pipeline: str, model: dict[str, Any], regression: bool) -> OnlineLearner:
        last = self.latest.get((pipeline, model["name"]))
        if last is not None and last["estimator_spec"] == model["estimator_spec"]:
            try:
                learner = OnlineLearner.resume(last, regression, self.key)
                log.info("%s: resuming from v%d (%d events)", pipeline, learner.version, learner.events_seen)
                return learner
            except ArtifactRejectedError as exc:
                log.error(
                    "%s: cannot resume from v%s (%s); starting a new lineage", pipeline, last["version"], exc
                )
        learner = OnlineLearner(
            pipeline=pipeline,
            model_name=model["name"],
            estimator_spec=model["estimator_spec"],
            params=dict(model["params"]),
            regression=regression,
            signing_key=self.key,
        )
        if last is not None:  # a new estimator: keep version numbers monotonic, learn from here on
            learner.version = int(last["version"])
        return learner

    # -- data path ------------------------------------------------------------------------------------
    def handle(self, msgs: list[Message]) -> list[Output]:
        now = time.monotonic()
        outputs: list[Output] = []
        for msg in msgs:
            topic = msg.topic() or ""
            role = self.topic_roles.get(topic)
            if role is None:
                continue
            pipeline, kind = role
            learner = self.learners.get(pipeline)
            if learner is None:  # another instance writes for this pipeline
                continue
            partition, offset = msg.partition() or 0, msg.offset() or 0
            learner.consumed(topic, partition, offset)
            try:  # the record boundary: a record that cannot be learned is dead-lettered, never fatal
                if kind == "features":
                    fv = self._features.decode(msg.value() or b"")
                    if fv["pipeline"] != pipeline:
                        raise ValidationError(
                            f"a {fv['pipeline'][:80]!r} feature vector on {pipeline}'s topic"
                        )
                    self.engines[pipeline].check_vector(fv)
                    if self.pipelines[pipeline]["label"]["source"] == "INLINE":
                        pair = fv if fv["label"] is not None else None
                    else:
                        pair = self.joins[pipeline].add_features(fv, now)
                else:
                    label = self._labels.decode(msg.value() or b"")
                    value = coerce_label(self.pipelines[pipeline]["task"], label["label"])
                    pair = self.joins[pipeline].add_label(label["event_id"], value, now)
                if pair is None:
                    continue
                learner.learn(pair["features"], pair["label"])
            except Exception as exc:
                outputs.append(dead_letter(self.catalogue, SERVICE, pipeline, msg, exc))
                continue
            if learner.since_snapshot >= self.pipelines[pipeline]["snapshot_every_events"]:
                outputs += self._snapshot(pipeline, learner)  # exactly every N labelled events
        return outputs + self.snapshots()

    def snapshots(self) -> list[Output]:
        """Versions (and AUTO promotions) for every learner that is due."""
        outputs: list[Output] = []
        for name, learner in self.learners.items():
            definition = self.pipelines.get(name)
            if definition is None:
                continue
            self.joins[name].expire(time.monotonic())
            if learner.due(definition["snapshot_every_events"], definition["snapshot_every_seconds"]):
                outputs += self._snapshot(name, learner)
        return outputs

    def _snapshot(self, name: str, learner: OnlineLearner) -> list[Output]:
        """Publish the learner's state as a new version (and, in AUTO mode, promote it).

        A version whose record would exceed what the model-versions topic and its readers take is not
        published (the broker would refuse it): a DriftAlert of kind ARTIFACT says so instead, the current
        version keeps serving, and the learner keeps learning (a later, smaller model is published).
        """
        record = learner.snapshot(now_ms())
        key = f"{name}/{learner.model_name}/{record['version']}".encode()
        encoded = encoder_for(self.catalogue.model_versions().name, "ModelVersion").encode(record)
        if len(key) + len(encoded) > MODEL_VERSION_MAX_BYTES:
            learner.version -= 1  # the number goes to the next version that is published
            return self._too_large(name, learner, record, len(key) + len(encoded))
        self.oversized.pop((name, learner.model_name), None)
        self.latest[(name, learner.model_name)] = record
        self.known_versions.add((name, learner.model_name, int(record["version"])))
        outputs = [Output(self.catalogue.model_versions().name, key, encoded, pipeline=name)]
        metrics.VERSIONS_PUBLISHED.labels(name, learner.model_name).inc()
        for metric, value in record["metrics"].items():
            metrics.LEARNER_METRIC.labels(name, metric).set(value)
        # AUTO promotes each new online version, unless another model (a retrained challenger the
        # controller promoted, or a user's choice) serves the pipeline now.
        live = self.live_model.get(name)
        if self.pipelines[name]["promotion_mode"] == "AUTO" and live in (None, learner.model_name):
            outputs.append(self._auto_promotion(record))
        return outputs

    def _too_large(
        self, name: str, learner: OnlineLearner, record: dict[str, Any], size: int
    ) -> list[Output]:
        """Count and log every refused snapshot; alert at most every OVERSIZED_ALERT_EVERY_S per model."""
        metrics.REJECTED_ARTIFACTS.labels(name, "too large").inc()
        last = learner.version
        message = (
            f"{name}/{learner.model_name}: version {record['version']} not published: its record is "
            f"{size / 2**20:.1f} MiB, above the {MODEL_VERSION_MAX_BYTES / 2**20:.0f} MiB a model version "
            f"may take; {f'v{last} keeps serving' if last else 'no version is published yet'} and the "
            "learner keeps learning. Choose a smaller model (e.g. a tree with a lower max_depth or memory "
            "limit)."
        )
        log.error("%s", message)
        now = time.monotonic()
        alerted = self.oversized.get((name, learner.model_name))
        if alerted is not None and now - alerted < OVERSIZED_ALERT_EVERY_S:
            return []
        self.oversized[(name, learner.model_name)] = now
        alert = {
            "alert_id": f"artifact-too-large-{name}-{learner.model_name}-{record['version']}-{now_ms()}",
            "pipeline": name,
            "model_name": learner.model_name,
            "model_version": int(record["version"]),
            "kind": "ARTIFACT",
            "detector": "learner:artifact-size",
            "feature": None,
            "statistic": float(size),
            "threshold": float(MODEL_VERSION_MAX_BYTES),
            "window": record["training_data"],
            "severity": "CRITICAL",
            "message": message,
            "detected_at": now_ms(),
        }
        value = encoder_for(self.catalogue.drift_alerts().name, "DriftAlert").encode(alert)
        return [Output(self.catalogue.drift_alerts().name, name.encode(), value, pipeline=name)]

    def _auto_promotion(self, version: dict[str, Any]) -> Output:
        record = auto_promotion(version, now_ms())
        key = f"{version['pipeline']}/{version['model_name']}/{record['decided_at']}".encode()
        return Output(
            self.catalogue.promotions().name,
            key,
            encoder_for(self.catalogue.promotions().name, "Promotion").encode(record),
            pipeline=version["pipeline"],
        )


def build(settings: Settings) -> tuple[faust.App, Learner, WriterLoop]:
    keys = keys_from(settings, signs=True)  # a ConfigError names what is missing
    catalogue = prepare(settings, SERVICE)
    service = Learner(settings, catalogue, keys)
    slots = WriterSlots(
        settings,
        SERVICE,
        on_gain=service.on_gain,
        on_lose=service.on_lose,
        # versions carry artifacts up to what the model-versions topic takes (librdkafka's default is 1 MB)
        producer_config={"message.max.bytes": MODEL_MAX_BYTES},
    )
    slots.pipelines_of = service.in_slot
    service.owns = slots.owns  # no slot is owned before the loop joins the writers group
    service.load_versions()
    service.control.bootstrap(catalogue.pipelines().name, "PipelineDefinition", service.on_pipeline)
    service.control.bootstrap(catalogue.promotions().name, "Promotion", service.on_promotion)
    service.control.skip_history(catalogue.drift_alerts().name)
    app = faust_app(SERVICE, settings)
    service.control.follow(app, catalogue.pipelines().name, "PipelineDefinition", service.on_pipeline)
    service.control.follow(app, catalogue.promotions().name, "Promotion", service.on_promotion)
    service.control.follow(app, catalogue.model_versions().name, "ModelVersion", service.on_version)
    service.control.follow(app, catalogue.drift_alerts().name, "DriftAlert", service.on_alert)
    loop = WriterLoop(
        settings,
        name=SERVICE,
        slots=slots,
        handler=lambda _pipeline, msgs: service.handle(msgs),
        inputs=service.inputs,
        pipeline_of=service.pipeline_of,
        on_idle=service.snapshots,
        dead_letter=lambda msg, exc: dead_letter(catalogue, SERVICE, None, msg, exc),
    )
    return app, service, loop


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service, loop = build(settings)
        return app, [loop]

    run_service(SERVICE, compose)
