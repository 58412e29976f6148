"""Composition root of the trainer: control-topic state, training requests by partition, publishing.

Requests are few and each is seconds of CPU. The requests topic is partitioned and keyed by pipeline; the
trainer instances share its partitions in a consumer group, and each takes the requests of its partitions
one at a time (`services.trainer.requests.RequestLoop`): the slice read and the fit run in a worker thread,
so the event loop keeps following pipelines, versions, promotions and results, and the consumer keeps its
place in the group while a model trains.

Each request is answered once across instances: the owner of a partition fences its previous owner and
reads the control topics to their end before it takes requests there, skips requests already answered on
the training-results topic, and publishes the version and the result in one transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from threadpoolctl import threadpool_limits

from services.trainer.requests import RequestLoop
from streamml import artifacts, metrics
from streamml.codec import codec_for, encoder_for
from streamml.errors import StreamMLError
from streamml.kafka import make_consumer
from streamml.runtime import MODEL_VERSION_MAX_BYTES, Output, faust_app
from streamml.runtime import watermarks as runtime_watermarks
from streamml.service import ControlFollower, now_ms, prepare, run_service
from streamml.settings import Settings
from streamml.signing import Keys, keys_from
from streamml.topics import Catalogue
from streams.trainer import (
    Dataset,
    Outcome,
    Plan,
    RequestRejectedError,
    TrainerState,
    TrainingFailedError,
    Watermarks,
    assemble,
    check_dataset,
    check_ranges,
    label_map,
    plan_request,
    result_record,
    train,
    version_record,
)

log = logging.getLogger(__name__)
SERVICE = "trainer"
READ_TIMEOUT_S = 120.0  # reading one request's slice; a stuck read answers FAILED instead of hanging
KAFKA_TIMEOUT_S = 10.0
# OpenMP threads of a fit (HistGradientBoosting). The trainer shares its cores with the rest of the stack,
# and OpenMP threads spinning beside busy processes made a 3k-record fit 15x slower (measured 5 s vs
# 0.33 s on one thread, 2 cores under load); on an idle machine one thread costs little.
TRAINING_THREADS = 1


def _record_key(msg: Any) -> str | None:
    """The key of a control record (a confluent-kafka message; a Faust message's key is an attribute)."""
    key = getattr(msg, "key", None)
    if callable(key):
        key = key()
    return key.decode(errors="replace") if isinstance(key, bytes) else key


def watermarks(consumer: Consumer, topics: Sequence[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """(low, high) of every partition of the topics: what is still stored and where each ends."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for topic in topics:
        marks = runtime_watermarks(consumer, topic, KAFKA_TIMEOUT_S)
        if marks is None:
            raise TrainingFailedError(f"topic {topic} does not exist (is the features service up?)")
        out.update({(topic, p): mark for p, mark in marks.items()})
    return out


def _iso(ms: int | None) -> str:
    if ms is None:
        return "now"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds")


def time_ranges(
    consumer: Consumer, topic: str, marks: Watermarks, time_from: int, time_to: int | None
) -> list[dict[str, Any]]:
    """Offset ranges of the records of `topic` whose timestamps are in [time_from, time_to).

    Kafka record timestamps are when the features service wrote each vector. Without time_to the range
    ends at the current end of each partition.
    """
    parts = sorted(p for t, p in marks if t == topic)

    def lookup(ms: int) -> dict[int, int]:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, ms) for p in parts], timeout=KAFKA_TIMEOUT_S
        )
        out = {}
        for tp in found:
            if tp.error is not None:
                raise TrainingFailedError(
                    f"cannot look up offsets by time in {topic}[{tp.partition}]: {tp.error}"
                )
            # -1: no record at or after that time, i.e. the end of the partition
            out[tp.partition] = tp.offset if tp.offset >= 0 else marks[(topic, tp.partition)][1]
        return out

    starts = lookup(time_from)
    ends = lookup(time_to) if time_to is not None else {p: marks[(topic, p)][1] for p in parts}
    ranges = [
        {"topic": topic, "partition": p, "start_offset": starts[p], "end_offset": ends[p]}
        for p in parts
        if ends[p] > starts[p]
    ]
    if not ranges:
        raise RequestRejectedError(
            f"no feature vectors were written to {topic} between {_iso(time_from)} and {_iso(time_to)}"
        )
    return ranges


def read_slice(
    consumer: Consumer, ranges: Sequence[Mapping[str, Any]], deadline: float
) -> list[bytes | None]:
    """The values of exactly the records in `ranges`, range by range, in offset order."""
    values: list[bytes | None] = []
    for r in ranges:
        topic, partition = r["topic"], r["partition"]
        start, end = r["start_offset"], r["end_offset"]
        consumer.assign([TopicPartition(topic, partition, start)])
        while True:
            if time.monotonic() > deadline:
                raise TrainingFailedError(f"timed out reading {topic}[{partition}] offsets [{start}, {end})")
            for msg in consumer.consume(1000, 0.1):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise TrainingFailedError(
                        f"reading {topic}[{partition}] offsets [{start}, {end}) failed: {err.str()} "
                        "(were records deleted while the trainer read them?)"
                    )
                offset = msg.offset() or 0
                if start <= offset < end and (msg.topic(), msg.partition()) == (topic, partition):
                    values.append(msg.value())
            # The position says when the range is done: transaction markers take offsets, never arrive.
            position = consumer.position([TopicPartition(topic, partition)])[0].offset
            if position >= end:
                break
    consumer.unassign()
    return values


@dataclass
class Answer:
    """What a request is answered with: its outputs (the version, then the result), in one transaction."""

    status: str
    version: int | None
    reason: str
    outputs: list[Output]


InThread = Callable[..., Awaitable[Any]]


class Trainer:
    """The trainer's state and handlers, wired by `build`."""

    def __init__(self, settings: Settings, catalogue: Catalogue, key: bytes | Keys) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.key = key
        self.state = TrainerState()
        self.control = ControlFollower(settings, SERVICE)
        self.answered: set[str] = set()
        self.requests_codec = codec_for("TrainingRequest")

    # -- control topics -------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, msg: Any) -> None:
        self.state.on_pipeline(record, _record_key(msg))

    def on_version(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            artifacts.verify(record, self.key)  # a forged version never sets numbering (CONTROL alert)
            self.state.on_version(record)

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            self.state.on_promotion(record)

    def on_result(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:  # answered, by this instance or another: never answered again
            self.answered.add(record["request_id"])

    def bootstrap(self) -> None:
        """Pipelines, versions, live versions and already-answered requests, before taking any request."""
        c = self.catalogue
        self.control.bootstrap(c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.bootstrap(c.model_versions().name, "ModelVersion", self.on_version)
        self.control.bootstrap(c.promotions().name, "Promotion", self.on_promotion)
        self.control.bootstrap(c.training_results().name, "TrainingResult", self.on_result)
        log.info(
            "bootstrap done: %d pipelines, %d models, %d requests already answered",
            len(self.state.pipelines),
            len(self.state.versions),
            len(self.answered),
        )

    def follow(self, app: faust.App) -> None:
        c = self.catalogue
        self.control.follow(app, c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.follow(app, c.model_versions().name, "ModelVersion", self.on_version)
        self.control.follow(app, c.promotions().name, "Promotion", self.on_promotion)
        self.control.follow(app, c.training_results().name, "TrainingResult", self.on_result)

    # -- requests -------------------------------------------------------------------------------------
    async def answer(
        self, request: dict[str, Any], in_thread: InThread, still_ours: Callable[[], bool]
    ) -> Answer | None:
        """The answer to one request: a TrainingResult, after its ModelVersion on success. None if the
        request's partition moved to another instance while it trained (that owner answers it).

        The version number is taken after the fit, by the owner of the pipeline's requests partition,
        from every version published before (it read them all when it took the partition).
        """
        started = time.monotonic()
        status, reason, version, outcome, version_output = "FAILED", "", None, None, None
        try:
            plan = plan_request(request, self.state, self.catalogue)
            ranges, outcome = await in_thread(self.read_and_train, plan)
            if not still_ours():
                return None
            version = self.state.next_version(request["pipeline"], request["model_name"])
            version_output = await in_thread(self.version_output, plan, outcome, version, ranges)
            status = "SUCCEEDED"
        except RequestRejectedError as exc:
            status, reason = "REJECTED", str(exc)
        except (StreamMLError, KafkaException) as exc:
            reason = str(exc)
        except Exception as exc:  # a bug or an estimator failing oddly: answer FAILED, keep serving
            log.exception("request %s failed unexpectedly", request["request_id"])
            reason = f"unexpected error: {type(exc).__name__}: {exc}"
        if status != "SUCCEEDED":
            version, outcome, version_output = None, None, None
        result = result_record(
            request,
            status,
            now_ms=now_ms(),
            duration_ms=int((time.monotonic() - started) * 1000),
            reason=reason,
            version=version,
            outcome=outcome,
        )
        result_output = Output(
            self.catalogue.training_results().name,
            result["request_id"].encode(),
            encoder_for(self.catalogue.training_results().name, "TrainingResult").encode(result),
        )
        outputs = ([version_output] if version_output is not None else []) + [result_output]
        return Answer(status, version, reason, outputs)

    def answered_one(self, request: dict[str, Any], answer: Answer, duration: float) -> None:
        """Record an answer whose transaction committed: its request and its version number are taken."""
        self.answered.add(request["request_id"])
        pipeline, model_name = request["pipeline"], request["model_name"]
        if answer.version is not None:
            self.state.on_version({"pipeline": pipeline, "model_name": model_name, "version": answer.version})
            metrics.VERSIONS_PUBLISHED.labels(pipeline, model_name).inc()
        label = pipeline if pipeline in self.state.pipelines else ""
        metrics.TRAINING_RUNS.labels(label, answer.status).inc()
        metrics.TRAINING_SECONDS.labels(label).observe(duration)
        log.info(
            "request %s (%s/%s): %s in %.2f s%s",
            request["request_id"],
            pipeline,
            model_name,
            answer.status if answer.version is None else f"{answer.status} v{answer.version}",
            duration,
            f": {answer.reason}" if answer.reason else "",
        )

    def read_and_train(self, plan: Plan) -> tuple[list[dict[str, Any]], Outcome]:
        """Resolve and check the ranges, read exactly them, train (runs in a worker thread)."""
        request = plan.request
        consumer = make_consumer(
            self.settings,
            f"{self.settings.topic_prefix}-{SERVICE}-reader",
            **{"isolation.level": "read_committed", "auto.offset.reset": "error"},
        )
        try:
            deadline = time.monotonic() + READ_TIMEOUT_S
            topics = [plan.features_topic] + ([plan.labels_topic] if plan.labels_topic else [])
            marks = watermarks(consumer, topics)
            requested = request["data_ranges"] or time_ranges(
                consumer, plan.features_topic, marks, request["time_from"], request["time_to"]
            )
            ranges = check_ranges(requested, plan.features_topic, plan.labels_topic, marks)
            feature_ranges = [r for r in ranges if r["topic"] == plan.features_topic]
            labels: dict[str, Any] | None = None
            if plan.labels_topic is not None:
                label_ranges = [r for r in ranges if r["topic"] == plan.labels_topic] or [
                    {"topic": t, "partition": p, "start_offset": low, "end_offset": high}
                    for (t, p), (low, high) in sorted(marks.items())
                    if t == plan.labels_topic and high > low
                ]  # no labels ranges given: every label stored now, recorded in the lineage
                labels = label_map(read_slice(consumer, label_ranges, deadline))
                ranges = feature_ranges + label_ranges
            values = read_slice(consumer, feature_ranges, deadline)
        finally:
            consumer.close()
        data = assemble(
            values, labels, pipeline=request["pipeline"], event_time_from=request.get("event_time_from")
        )
        self._log_dataset(request["request_id"], data)
        where = f"labels topic {plan.labels_topic}" if plan.labels_topic else "inline label"
        check_dataset(data, plan.regression, float(request["validation_split"]), where)
        with threadpool_limits(TRAINING_THREADS, user_api="openmp"):
            return ranges, train(plan, data)

    @staticmethod
    def _log_dataset(request_id: str, data: Dataset) -> None:
        log.info(
            "request %s: %d records read, %d labelled, %d unlabelled, %d duplicates, %d undecodable, "
            "%d before event_time_from",
            request_id,
            data.read,
            len(data.labels),
            data.unlabelled,
            data.duplicates,
            data.undecodable,
            data.earlier,
        )

    def version_output(
        self, plan: Plan, outcome: Outcome, version: int, ranges: list[dict[str, Any]]
    ) -> Output:
        """The signed ModelVersion record (runs in a worker thread: serializing a model takes a while)."""
        record = version_record(
            plan, outcome, version=version, training_data=ranges, signing_key=self.key, now_ms=now_ms()
        )
        key = f"{record['pipeline']}/{record['model_name']}/{version}"
        value = encoder_for(self.catalogue.model_versions().name, "ModelVersion").encode(record)
        if len(key) + len(value) > MODEL_VERSION_MAX_BYTES:  # the broker or the services would refuse it
            raise TrainingFailedError(
                f"the model version is {(len(key) + len(value)) / 2**20:.1f} MiB, above the "
                f"{MODEL_VERSION_MAX_BYTES / 2**20:.0f} MiB a model version may take: choose a smaller model "
                "(fewer trees, lower depth)"
            )
        return Output(self.catalogue.model_versions().name, key.encode(), value)


def build(settings: Settings) -> tuple[faust.App, Trainer, RequestLoop]:
    keys = keys_from(settings, signs=True)  # a ConfigError names what is missing
    catalogue = prepare(settings, SERVICE)
    trainer = Trainer(settings, catalogue, keys)
    trainer.bootstrap()
    app = faust_app(SERVICE, settings)
    trainer.follow(app)
    return app, trainer, RequestLoop(trainer)


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _trainer, requests = build(settings)
        return app, [requests]

    run_service(SERVICE, compose)
