"""Composition root of the trainer: control-topic state, training requests one at a time, publishing.

Requests are few and each is seconds of CPU, so a Faust agent takes them one by one (concurrency 1)
and runs the slice read and the fit in a worker thread: the event loop keeps following pipelines,
versions and promotions and keeps Faust's consumer alive while a model trains. (A BatchLoop would fit
on the event loop itself and stall every agent for the length of a fit.)

Requests already answered on the training-results topic are skipped, so a restart that re-reads
uncommitted requests does not train them twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import faust
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from threadpoolctl import threadpool_limits

from streamml import artifacts, metrics
from streamml.codec import codec_for
from streamml.errors import ConfigError, DecodeError, StreamMLError
from streamml.kafka import make_consumer, make_producer
from streamml.runtime import MODEL_VERSION_MAX_BYTES, Outbox, Output, faust_app, read_to_end
from streamml.runtime import watermarks as runtime_watermarks
from streamml.service import ControlFollower, check_record_pipeline, now_ms, prepare, run_service
from streamml.settings import Settings
from streamml.topics import MODEL_MAX_BYTES, Catalogue
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
PUBLISH_TIMEOUT_S = 120.0  # a version or result waits this long for a broker that is away (in a thread)
# OpenMP threads of a fit (HistGradientBoosting). The trainer shares its cores with the rest of the stack,
# and OpenMP threads spinning beside busy processes made a 3k-record fit 15x slower (measured 5 s vs
# 0.33 s on one thread, 2 cores under load); on an idle machine one thread costs little.
TRAINING_THREADS = 1


def _record_key(msg: Any) -> str | None:
    """The key of a confluent-kafka message (bootstrap) or a Faust message (follower)."""
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


class Trainer:
    """The trainer's state and handlers, wired by `build`."""

    def __init__(self, settings: Settings, catalogue: Catalogue, key: bytes) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.key = key
        self.state = TrainerState()
        self.control = ControlFollower(settings, SERVICE)
        self.answered: set[str] = set()
        self.producer = make_producer(settings, **{"linger.ms": 0, "message.max.bytes": MODEL_MAX_BYTES})
        self.outbox = Outbox(self.producer, SERVICE)
        self._requests = codec_for("TrainingRequest")
        self._results = codec_for("TrainingResult")
        self._versions = codec_for("ModelVersion")

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

    def bootstrap(self) -> None:
        """Pipelines, versions, live versions and already-answered requests, before taking any request."""
        c = self.catalogue
        self.control.bootstrap(c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.bootstrap(c.model_versions().name, "ModelVersion", self.on_version)
        self.control.bootstrap(c.promotions().name, "Promotion", self.on_promotion)
        for msg in read_to_end(self.settings, c.training_results().name):
            try:
                self.answered.add(self._results.decode(msg.value() or b"")["request_id"])
            except DecodeError:
                continue
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
        channel = app.topic(c.training_requests().name, value_serializer="raw", key_serializer="raw")

        async def training_requests(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                message = event.message
                try:
                    await self.on_request(event.value, message.partition, message.offset)
                except Exception:  # the record boundary: the agent must outlive any request
                    metrics.ERRORS.labels(SERVICE, "request").inc()
                    log.exception("request at %s[%d]@%d failed", channel, message.partition, message.offset)

        app.agent(channel, name="training_requests", concurrency=1)(training_requests)

    # -- requests -------------------------------------------------------------------------------------
    async def on_request(self, value: bytes | None, partition: int = 0, offset: int = -1) -> None:
        """Answer one request with a TrainingResult (after its ModelVersion on success).

        A record that is not a request of a valid pipeline name is skipped with a CONTROL alert (an answer
        would carry the bad name on to the controller); everything else gets an answer.
        """
        started = time.monotonic()
        try:
            request = self._requests.decode(value or b"")
            check_record_pipeline(request)
        except Exception as exc:
            self.control.skip(self.catalogue.training_requests().name, partition, offset, exc, None)
            return
        request_id = request["request_id"]
        if request_id in self.answered:
            log.info("request %s was answered before; skipping it", request_id)
            return
        loop = asyncio.get_running_loop()
        status, reason, version, outcome = "FAILED", "", None, None
        try:
            plan = plan_request(request, self.state, self.catalogue)
            ranges, outcome = await loop.run_in_executor(None, self.read_and_train, plan)
            version = self.state.reserve_version(request["pipeline"], request["model_name"])
            await loop.run_in_executor(None, self.publish_version, plan, outcome, version, ranges)
            status = "SUCCEEDED"
        except RequestRejectedError as exc:
            status, reason = "REJECTED", str(exc)
        except (StreamMLError, KafkaException) as exc:
            reason = str(exc)
        except Exception as exc:  # a bug or an estimator failing oddly: answer FAILED, keep serving
            log.exception("request %s failed unexpectedly", request_id)
            reason = f"unexpected error: {type(exc).__name__}: {exc}"
        if status != "SUCCEEDED":
            version, outcome = None, None
        duration = time.monotonic() - started
        result = result_record(
            request,
            status,
            now_ms=now_ms(),
            duration_ms=int(duration * 1000),
            reason=reason,
            version=version,
            outcome=outcome,
        )
        await loop.run_in_executor(None, self.publish_result, result)
        self.answered.add(request_id)
        label = request["pipeline"] if request["pipeline"] in self.state.pipelines else ""
        metrics.TRAINING_RUNS.labels(label, status).inc()
        metrics.TRAINING_SECONDS.labels(label).observe(duration)
        log.info(
            "request %s (%s/%s): %s in %.2f s%s",
            request_id,
            request["pipeline"],
            request["model_name"],
            status if version is None else f"{status} v{version}",
            duration,
            f": {reason}" if reason else "",
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
        data = assemble(values, labels, pipeline=request["pipeline"])
        self._log_dataset(request["request_id"], data)
        where = f"labels topic {plan.labels_topic}" if plan.labels_topic else "inline label"
        check_dataset(data, plan.regression, float(request["validation_split"]), where)
        with threadpool_limits(TRAINING_THREADS, user_api="openmp"):
            return ranges, train(plan, data)

    @staticmethod
    def _log_dataset(request_id: str, data: Dataset) -> None:
        log.info(
            "request %s: %d records read, %d labelled, %d unlabelled, %d duplicates, %d undecodable",
            request_id,
            data.read,
            len(data.labels),
            data.unlabelled,
            data.duplicates,
            data.undecodable,
        )

    def publish_version(
        self, plan: Plan, outcome: Outcome, version: int, ranges: list[dict[str, Any]]
    ) -> dict[str, Any]:
        record = version_record(
            plan, outcome, version=version, training_data=ranges, signing_key=self.key, now_ms=now_ms()
        )
        key = f"{record['pipeline']}/{record['model_name']}/{version}"
        value = self._versions.encode(record)
        if len(key) + len(value) > MODEL_VERSION_MAX_BYTES:  # the broker or the services would refuse it
            raise TrainingFailedError(
                f"the model version is {(len(key) + len(value)) / 2**20:.1f} MiB, above the "
                f"{MODEL_VERSION_MAX_BYTES / 2**20:.0f} MiB a model version may take: choose a smaller model "
                "(fewer trees, lower depth)"
            )
        self._produce(self.catalogue.model_versions().name, key, value)
        metrics.VERSIONS_PUBLISHED.labels(record["pipeline"], record["model_name"]).inc()
        return record

    def publish_result(self, result: dict[str, Any]) -> None:
        """The answer must get out: retried while the broker errors are retriable (up to PUBLISH_TIMEOUT_S),
        then logged (the service keeps running)."""
        value = self._results.encode(result)
        try:
            self._produce(self.catalogue.training_results().name, result["request_id"], value)
        except (StreamMLError, KafkaException) as exc:
            log.error("could not publish the result of %s: %s", result["request_id"], exc)
            metrics.ERRORS.labels(SERVICE, "result_not_published").inc()

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        """Deliver one record (in a worker thread): retriable broker errors, such as a leader moving while
        a broker restarts, are retried for up to PUBLISH_TIMEOUT_S; a refusal raises TrainingFailedError."""
        try:
            self.outbox.deliver(Output(topic, key.encode(), value), PUBLISH_TIMEOUT_S)
        except StreamMLError as exc:
            raise TrainingFailedError(f"could not publish to {topic}: {exc}") from exc


def build(settings: Settings) -> tuple[faust.App, Trainer]:
    if settings.signing_key is None:
        raise ConfigError("the trainer signs model versions: set STREAMML_SIGNING_KEY")
    catalogue = prepare(settings)
    trainer = Trainer(settings, catalogue, settings.signing_key.get_secret_value().encode())
    trainer.bootstrap()
    app = faust_app(SERVICE, settings)
    trainer.follow(app)
    return app, trainer


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _trainer = build(settings)
        return app, []

    run_service(compose)
