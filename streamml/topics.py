"""The topic catalogue: every topic StreamML uses is declared here once (name, partitions, policy, schema)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from streamml.settings import Settings

DAY_MS = 24 * 3600 * 1000
PIPELINE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
Encoding = Literal["avro", "json-or-avro"]


@dataclass(frozen=True)
class TopicSpec:
    """A declared topic; `schema` names the record type its values carry (None for raw topics)."""

    name: str
    role: str  # e.g. "features"; the same role exists once per pipeline (or once globally)
    schema: str
    encoding: Encoding
    key: str  # what the record key holds
    description: str
    partitions: int
    replication_factor: int
    cleanup_policy: Literal["delete", "compact"] = "delete"
    retention_ms: int = 7 * DAY_MS
    config: dict[str, str] = field(default_factory=dict)
    # Partitions may be added to an existing topic with fewer (its readers re-route records by key, so
    # an upgrade that raised the count needs no manual step); other topics must match exactly.
    may_grow: bool = False
    # Who reads and who writes it: the principals (services, and "cli" for the user's streamml commands
    # and producers) that `streamml acl apply` grants access to, and nobody else.
    readers: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()

    def topic_config(self, min_insync_replicas: int) -> dict[str, str]:
        """The topic-level configs to create the topic with."""
        conf = {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "min.insync.replicas": str(min(min_insync_replicas, self.replication_factor)),
        }
        conf.update(self.config)
        return conf


def check_pipeline_name(name: str) -> str:
    if not PIPELINE_NAME.match(name):
        raise ValueError(
            f"invalid pipeline name {name!r}: use 1-63 lower-case letters, digits and dashes, "
            "starting with a letter or digit"
        )
    return name


# Compacted topics keep their latest record per key forever (retention -1): model versions and decisions
# have unique keys, so nothing is removed unless a tombstone replaces it.
MODEL_MAX_BYTES = 64 * 1024 * 1024

# The principals of the access declarations below: one per service, and the user's (the `streamml` CLI, the
# data engineers' producers, app teams' consumers).
FEATURES, LEARNER, PREDICTOR, MONITOR, CONTROLLER, TRAINER, CLI = (
    "features", "learner", "predictor", "monitor", "controller", "trainer", "cli",
)  # fmt: skip
SERVICES = (FEATURES, LEARNER, PREDICTOR, MONITOR, CONTROLLER, TRAINER)
EVERY_SERVICE = SERVICES


class Catalogue:
    """Names and declarations of all topics, derived from settings (prefix, partitions, replication)."""

    GLOBAL_ROLES = (
        "pipelines",
        "model-versions",
        "promotions",
        "training-requests",
        "training-results",
        "drift-alerts",
        "evaluations",
        "dead-letter",
        "writers",
        "monitor-state",
        "controller-state",
    )
    PIPELINE_ROLES = (
        "raw",
        "features",
        "labels",
        "predictions",
        "shadow-predictions",
        "dead-letter",
        "repartition",
        "windows",
    )

    # (readers, writers) of each per-pipeline topic; the user (CLI) reads every topic.
    DATA_ACCESS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
        "raw": ((FEATURES, CLI), (CLI,)),
        "features": ((LEARNER, PREDICTOR, MONITOR, CONTROLLER, TRAINER, CLI), (FEATURES,)),
        "labels": ((LEARNER, MONITOR, TRAINER, CLI), (CLI,)),
        "predictions": ((MONITOR, CLI), (PREDICTOR,)),
        "shadow-predictions": ((MONITOR, CLI), (PREDICTOR,)),
        "dead-letter": ((CLI,), EVERY_SERVICE),
        "repartition": ((FEATURES, CLI), (FEATURES,)),
        "windows": ((FEATURES, CLI), (FEATURES,)),
    }

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.topic_prefix
        self.partitions = settings.default_partitions
        self.rf = settings.replication_factor
        self.writer_slots = settings.writer_slots
        self._specs: dict[tuple[str, str, str, int, int], TopicSpec] = {}

    # -- global control topics, keyed by pipeline -------------------------------------------------
    def pipelines(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.pipelines", "pipelines", "PipelineDefinition", "avro", "pipeline name",
            "Pipeline definitions; the latest record per pipeline is its current revision.",
            1, self.rf, cleanup_policy="compact", retention_ms=-1,
            readers=(*EVERY_SERVICE, CLI), writers=(CLI,),
        )  # fmt: skip

    def model_versions(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.model-versions", "model-versions", "ModelVersion", "avro",
            "pipeline/model/version",
            "Every model version with its signed artifact and lineage.",
            1, self.rf, cleanup_policy="compact", retention_ms=-1,
            config={"max.message.bytes": str(MODEL_MAX_BYTES)},
            readers=(LEARNER, PREDICTOR, TRAINER, CLI), writers=(LEARNER, TRAINER),
        )  # fmt: skip

    def promotions(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.promotions", "promotions", "Promotion", "avro", "pipeline/model/decision-time",
            "Deployment decisions (promote, rollback, shadow, discard) with their reasons.",
            1, self.rf, cleanup_policy="compact", retention_ms=-1,
            readers=(LEARNER, PREDICTOR, MONITOR, CONTROLLER, TRAINER, CLI),
            writers=(CONTROLLER, LEARNER, CLI),  # the learner promotes its own versions (promotion: auto)
        )  # fmt: skip

    def training_requests(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.training-requests", "training-requests", "TrainingRequest", "avro", "pipeline",
            "Requests to train a batch model on an exact slice of a topic. Trainer instances share its "
            "partitions; keyed by pipeline, so one instance at a time answers (and numbers) a pipeline's.",
            self.partitions, self.rf, retention_ms=30 * DAY_MS, may_grow=True,
            readers=(TRAINER, CLI), writers=(CONTROLLER, CLI),
        )  # fmt: skip

    def training_results(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.training-results", "training-results", "TrainingResult", "avro", "request id",
            "The outcome of each training request: the candidate version, or why it was rejected.",
            1, self.rf, retention_ms=30 * DAY_MS,
            readers=(TRAINER, CONTROLLER, CLI), writers=(TRAINER,),
        )  # fmt: skip

    def evaluations(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.evaluations", "evaluations", "Evaluation", "avro", "pipeline",
            "Champion/challenger comparisons on the same labelled events.",
            1, self.rf, retention_ms=30 * DAY_MS,
            readers=(CONTROLLER, CLI), writers=(MONITOR,),
        )  # fmt: skip

    def drift_alerts(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.drift-alerts", "drift-alerts", "DriftAlert", "avro", "pipeline",
            "Drift and artifact alerts.",
            1, self.rf, retention_ms=30 * DAY_MS,
            readers=(LEARNER, CONTROLLER, CLI), writers=(MONITOR, LEARNER, PREDICTOR),
        )  # fmt: skip

    def dead_letters(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.dead-letter", "dead-letter", "DeadLetter", "avro",
            "source topic/partition/offset",
            "Records no pipeline could claim (unknown or invalid pipeline), with the original bytes and the "
            "reason.",
            1, self.rf, retention_ms=30 * DAY_MS,
            readers=(CLI,), writers=EVERY_SERVICE,
        )  # fmt: skip

    def writers(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.writers", "writers", "WriterClaim", "avro", "service/slot",
            "Its partitions are the writer slots of single-writer services (learner, monitor, "
            "controller). Each service's instances join one group on it; whoever is assigned slot k writes "
            "for the pipelines hashed to k (and records a WriterClaim there).",
            self.writer_slots, self.rf,
            readers=(LEARNER, MONITOR, CONTROLLER, CLI), writers=(LEARNER, MONITOR, CONTROLLER),
        )  # fmt: skip

    def monitor_state(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.monitor-state", "monitor-state", "MonitorSnapshot", "avro", "pipeline",
            "The monitor's signed state per pipeline and where its inputs resume: how a new writer takes "
            "over without repeating or missing an alert.",
            1, self.rf, cleanup_policy="compact", retention_ms=-1,
            config={"max.message.bytes": str(MODEL_MAX_BYTES)},
            readers=(MONITOR, CLI), writers=(MONITOR,),
        )  # fmt: skip

    def controller_state(self) -> TopicSpec:
        return TopicSpec(
            f"{self.prefix}.controller-state", "controller-state", "ControllerSnapshot", "avro", "pipeline",
            "The controller's open work per pipeline and where its inputs resume: how a new writer takes "
            "over without a second request or decision for one alert.",
            1, self.rf, cleanup_policy="compact", retention_ms=-1,
            readers=(CONTROLLER, CLI), writers=(CONTROLLER,),
        )  # fmt: skip

    # -- per-pipeline data topics -----------------------------------------------------------------
    def _data(
        self, pipeline: str, role: str, schema: str, encoding: Encoding, key: str, doc: str
    ) -> TopicSpec:
        # Services name a pipeline's topics per record: the specs are built once (they are immutable).
        memo = (pipeline, role, self.prefix, self.partitions, self.rf)
        spec = self._specs.get(memo)
        if spec is not None:
            return spec
        check_pipeline_name(pipeline)
        if len(self._specs) >= 4096:  # names taken from records: never an unbounded cache
            self._specs.clear()
        readers, writers = self.DATA_ACCESS[role]
        spec = self._specs[memo] = TopicSpec(
            f"{self.prefix}.{pipeline}.{role}", role, schema, encoding, key, doc, self.partitions, self.rf,
            readers=readers, writers=writers,
        )  # fmt: skip
        return spec

    def raw(self, pipeline: str) -> TopicSpec:
        return self._data(
            pipeline, "raw", "RawEvent", "json-or-avro", "entity key or none",
            "Raw input events: flat JSON objects, or Avro RawEvent records.",
        )  # fmt: skip

    def features(self, pipeline: str) -> TopicSpec:
        return self._data(
            pipeline, "features", "FeatureVector", "avro", "event id", "Feature vectors, one per valid event."
        )

    def labels(self, pipeline: str) -> TopicSpec:
        return self._data(pipeline, "labels", "Label", "avro", "event id", "Ground truth, possibly late.")

    def predictions(self, pipeline: str) -> TopicSpec:
        return self._data(
            pipeline, "predictions", "Prediction", "avro", "event id",
            "One prediction per event (plus tagged shadow predictions of challengers).",
        )  # fmt: skip

    def shadow_predictions(self, pipeline: str) -> TopicSpec:
        return self._data(
            pipeline, "shadow-predictions", "Prediction", "avro", "event id",
            "Challengers' predictions (shadow=true): recorded for evaluation, never served.",
        )  # fmt: skip

    def dead_letter(self, pipeline: str) -> TopicSpec:
        spec = self._data(
            pipeline, "dead-letter", "DeadLetter", "avro", "source topic/partition/offset",
            "Records a service could not process, with the original bytes and the reason.",
        )  # fmt: skip
        return TopicSpec(**{**spec.__dict__, "retention_ms": 30 * DAY_MS})

    def repartition(self, pipeline: str) -> TopicSpec:
        return self._data(
            pipeline, "repartition", "RawEvent", "json-or-avro", "key field value (text); none: partition 0",
            "Internal to the features service: the raw events, bytes unchanged, keyed by the pipeline's key "
            "field so all events of one key meet in one partition; header streamml-source names the raw "
            "record (topic/partition/offset/timestamp).",
        )  # fmt: skip

    def windows(self, pipeline: str) -> TopicSpec:
        spec = self._data(
            pipeline, "windows", "WindowState", "avro", "input partition/entity key",
            "Changelog of the features service's per-key rolling windows: each record goes to the partition "
            "number of the input partition that owns the key; the latest per key is its state.",
        )  # fmt: skip
        return TopicSpec(**{**spec.__dict__, "cleanup_policy": "compact", "retention_ms": -1})

    # -- listings -------------------------------------------------------------------------------------
    def global_topics(self) -> list[TopicSpec]:
        return [
            self.pipelines(),
            self.model_versions(),
            self.promotions(),
            self.training_requests(),
            self.training_results(),
            self.drift_alerts(),
            self.evaluations(),
            self.dead_letters(),
            self.writers(),
            self.monitor_state(),
            self.controller_state(),
        ]

    def pipeline_topics(self, pipeline: str) -> list[TopicSpec]:
        return [
            self.raw(pipeline),
            self.features(pipeline),
            self.labels(pipeline),
            self.predictions(pipeline),
            self.shadow_predictions(pipeline),
            self.dead_letter(pipeline),
            self.repartition(pipeline),
            self.windows(pipeline),
        ]

    def used_by(self, specs: list[TopicSpec], principal: str) -> list[TopicSpec]:
        """The topics of `specs` that `principal` reads or writes: what a service verifies at start."""
        return [s for s in specs if principal in s.readers or principal in s.writers]

    def resolve(self, topic: str) -> TopicSpec | None:
        """The declaration of a topic name, if StreamML declares it (used by `streamml tail`)."""
        for spec in self.global_topics():
            if spec.name == topic:
                return spec
        head = f"{self.prefix}."
        if topic.startswith(head):
            pipeline, _, role = topic[len(head) :].rpartition(".")
            if role in self.PIPELINE_ROLES and PIPELINE_NAME.match(pipeline):
                return next(s for s in self.pipeline_topics(pipeline) if s.role == role)
        return None
