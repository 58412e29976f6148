"""Composition root of the controller: follows alerts, results, decisions and evaluations; acts by records.

Every instance follows every control topic; for each pipeline only the instance elected for its writer
slot (`streamml.election`) acts, publishing requests and decisions through a producer that fenced any
previous writer. Its open work (a retrain waiting for data, requests waiting for results) and how far it
had read is snapshotted to `<prefix>.controller-state` in the same transaction as each request or decision
(or change of that work): a new writer restores it and replays the inputs that came after, so each alert
gets one request and each result one decision, across fail-overs.

History is not replayed into actions at start: alerts, training results and evaluations that were on the
topics before the controller started are skipped, beyond what a snapshot says is still open.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import faust
from confluent_kafka import KafkaException, Message, TopicPartition

from streamml import metrics
from streamml.codec import codec_for, encoder_for
from streamml.election import WriterSlots, slot_of
from streamml.errors import StreamMLError
from streamml.kafka import kafka_error, make_consumer
from streamml.runtime import Output, faust_app, is_retriable, read_to_end, watermarks
from streamml.service import (
    ControlFollower,
    check_declared_model,
    check_record_pipeline,
    now_ms,
    prepare,
    run_service,
)
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.controller import Controller, open_work, resume_work, retraining_ranges

log = logging.getLogger(__name__)
SERVICE = "controller"
STOP_WAIT_S = 2.0  # how long a stop waits for the last decisions and requests


class ControllerService:
    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.logic = Controller(now_ms)
        self.control = ControlFollower(settings, SERVICE)
        self.slots = WriterSlots(settings, SERVICE, on_gain=self.on_gain, on_lose=self.on_lose)
        self.slots.pipelines_of = self.in_slot
        self.watermarks = make_consumer(settings, f"{settings.topic_prefix}-{SERVICE}-watermarks")
        self._snapshots = codec_for("ControllerSnapshot")
        self._open: dict[str, dict[str, Any]] = {}  # pipeline -> open work as last snapshotted
        self._progress: dict[str, int] = {}  # pipeline -> last features-topic progress read

    def owns(self, pipeline: str) -> bool:
        return self.slots.owns(pipeline)

    # -- inputs ---------------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            self.logic.on_pipeline(record)
            name = record["name"]
            if not record["deleted"] and name not in self._open and self.owns(name):
                self._publish(name, [], force=True)  # a new pipeline of ours: where its inputs start

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:  # every instance tracks champions and challengers of every pipeline
            check_declared_model(self.logic.pipelines, record)
            self.logic.on_promotion(record)

    def on_alert(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if (
            record is not None
            and record["pipeline"] in self.logic.pipelines
            and self.owns(record["pipeline"])
        ):
            self.logic.on_alert(record, self.progress(record["pipeline"])[0])
            self._publish(record["pipeline"], [])

    def on_result(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None and self.owns(record["pipeline"]):
            self._publish_decisions(record["pipeline"], self.logic.on_training_result(record), force=True)

    def on_evaluation(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None and self.owns(record["pipeline"]):
            self._publish_decisions(record["pipeline"], self.logic.on_evaluation(record), force=True)

    # -- writer hand-over ------------------------------------------------------------------------------
    def in_slot(self, slot: int) -> list[str]:
        return sorted(p for p in self.logic.pipelines if slot_of(p, self.slots.count) == slot)

    def on_gain(self, slots: list[int]) -> None:
        """Resume the open work of the slots' pipelines from their last snapshots (the previous writers
        are fenced: nothing they publish can follow), then act on the inputs that came after them."""
        names = [p for slot in slots for p in self.in_slot(slot)]
        if not names:
            return
        self._catch_up(self.catalogue.promotions().name, "Promotion", self.on_promotion)
        latest: dict[str, dict[str, Any]] = {}
        for msg in read_to_end(self.settings, self.catalogue.controller_state().name):
            name = (msg.key() or b"").decode(errors="replace")
            if name in names and msg.value() is not None:
                try:
                    latest[name] = self._snapshots.decode(msg.value() or b"")
                except Exception as exc:  # a bad snapshot: resume from nothing (nothing open)
                    log.error("%s: ignoring a controller snapshot: %s", name, exc)
        for name in names:
            snapshot = latest.get(name)
            st = self.logic._state(name)
            if snapshot is None:  # first writer of the pipeline: record where its inputs start, so a
                self._publish(name, [], force=True)  # successor replays whatever comes after
                continue
            resume_work(st, snapshot)
            self._open[name] = open_work(st)
            log.info("%s: resuming the open work of %s's snapshot", name, snapshot["writer"] or "?")
            self._replay(name, snapshot)

    def _catch_up(self, topic: str, schema: str, apply: Callable[[dict[str, Any] | None, Any], None]) -> None:
        """Apply what the follower of `topic` has not applied yet (it skips those records later)."""
        for msg in _read_from(self.settings, topic, self.control.applied):
            self.control._apply(
                topic, schema, msg.partition() or 0, msg.offset() or 0, msg.value(), apply, msg
            )

    def _replay(self, name: str, snapshot: dict[str, Any]) -> None:
        """The inputs between the snapshot and what the followers have applied: the previous writer did not
        handle them (every input it handled moved the snapshot on, in the transaction of what it did), so
        this writer does, in the order they were written."""
        c = self.catalogue
        sources = (
            (c.drift_alerts().name, "DriftAlert", snapshot["alerts_offset"], self.on_alert),
            (c.training_results().name, "TrainingResult", snapshot["results_offset"], self.on_result),
            (c.evaluations().name, "Evaluation", snapshot["evaluations_offset"], self.on_evaluation),
        )
        pending: list[tuple[int, int, Any, dict[str, Any]]] = []
        for i, (topic, schema, start, apply) in enumerate(sources):
            stop = self.control.applied.get((topic, 0), 0)
            # Only up to what the follower applied (committed records): what comes after is the follower's
            # to apply, and reading on to the end would wait on any writer's open transaction there.
            for msg in _read_from(self.settings, topic, {(topic, 0): start}, {(topic, 0): stop}):
                if (msg.offset() or 0) >= stop or msg.value() is None:
                    continue
                try:
                    record = codec_for(schema).decode(msg.value() or b"")
                    check_record_pipeline(record)
                except Exception:  # skipped (and alerted) when the follower first met it
                    continue
                if record["pipeline"] == name:
                    pending.append((msg.timestamp()[1], i, apply, record))
        for _ts, _i, apply, record in sorted(pending, key=lambda p: (p[0], p[1])):
            apply(record, None)
        if pending:
            log.info("%s: replayed %d inputs after the snapshot", name, len(pending))

    def on_lose(self, slots: list[int]) -> None:
        for name in (p for slot in slots for p in self.in_slot(slot)):
            st = self.logic.state.get(name)
            if st is not None:  # the next writer resumes it; only the decisions' view stays
                st.retrain_due_at, st.alert, st.in_flight = None, None, {}
            self._open.pop(name, None)

    def snapshot(self, name: str) -> Output:
        c = self.catalogue
        applied = self.control.applied
        record = {
            "pipeline": name,
            **open_work(self.logic._state(name)),
            "alerts_offset": applied.get((c.drift_alerts().name, 0), 0),
            "results_offset": applied.get((c.training_results().name, 0), 0),
            "evaluations_offset": applied.get((c.evaluations().name, 0), 0),
            "writer": self.settings.instance_id,
            "taken_at": now_ms(),
        }
        return Output(c.controller_state().name, name.encode(), self._snapshots.encode(record), pipeline=name)

    def _publish(self, pipeline: str, outputs: list[Output], force: bool = False) -> None:
        """Publish outputs with the pipeline's open work, in one transaction of its writer slot; nothing
        (not even a snapshot) when neither changed, unless `force`."""
        work = open_work(self.logic._state(pipeline))
        if not outputs and not force and work == self._open.get(pipeline):
            return
        slot = slot_of(pipeline, self.slots.count)
        for out in [*outputs, self.snapshot(pipeline)]:
            if not self.slots.send(slot, out):
                log.error(
                    "%s: not this instance's pipeline any more; %d outputs dropped", pipeline, len(outputs)
                )
                return
        self._open[pipeline] = work
        self._commit(slot)

    def _commit(self, slot: int) -> None:
        try:
            if not self.slots.commit(slot, 2.0):
                log.warning("slot %d: commit not done yet; retried at the next tick", slot)
        except Exception as exc:  # fenced or aborted: the slot's state was dropped or restored
            log.error("%s", exc)

    # -- features-topic progress ----------------------------------------------------------------------
    def progress(self, pipeline: str) -> tuple[int, dict[int, tuple[int, int]]]:
        """Total records in the pipeline's features topic, and (low, high) per partition."""
        marks = watermarks(self.watermarks, self.catalogue.features(pipeline).name) or {}
        return sum(high for _low, high in marks.values()), marks

    def current_progress(self, pipeline: str) -> int:
        """The features-topic progress now; while the broker cannot say (a leader moving), the last known
        one (the retrain then comes a little early), never a skipped alert."""
        for attempt in range(3):
            try:
                total = self.progress(pipeline)[0]
                self._progress[pipeline] = total
                return total
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or not is_retriable(err):
                    raise
                log.warning("%s: cannot read the progress (%s); attempt %d of 3", pipeline, err, attempt + 1)
                time.sleep(0.5)
        return self._progress.get(pipeline, 0)

    def tick(self) -> None:
        """Issue the training requests that are due (for the pipelines this instance writes for)."""
        self.slots.commit_all(0.5)  # commits that met a retriable error go again
        for pipeline in list(self.logic.pipelines):
            st = self.logic.state.get(pipeline)
            if st is None or st.retrain_due_at is None or not self.owns(pipeline):
                continue
            try:
                total, marks = self.progress(pipeline)
                self._progress[pipeline] = total
            except KafkaException as exc:  # e.g. NOT_LEADER_FOR_PARTITION while a broker comes back
                err = kafka_error(exc)
                metrics.ERRORS.labels(SERVICE, "progress").inc()
                log.warning(
                    "%s: cannot read the progress now (%s); trying again next tick", pipeline, err or exc
                )
                continue
            recent = functools.partial(retraining_ranges, self.catalogue.features(pipeline).name, marks)
            outputs = []
            for request in self.logic.on_progress(pipeline, total, recent):
                log.info("%s: requesting training %s: %s", pipeline, request["request_id"], request["reason"])
                outputs.append(
                    Output(
                        self.catalogue.training_requests().name,
                        pipeline.encode(),
                        encoder_for(self.catalogue.training_requests().name, "TrainingRequest").encode(
                            request
                        ),
                        pipeline=pipeline,
                    )
                )
                metrics.TRAINING_REQUESTS.labels(pipeline, "controller").inc()
            self._publish(pipeline, outputs)

    def _publish_decisions(self, pipeline: str, decisions: list[dict[str, Any]], force: bool = False) -> None:
        outputs = []
        for decision in decisions:
            log.info("%s: %s %s v%s: %s", decision["pipeline"], decision["action"], decision["model_name"],
                     decision["version"], decision["reason"])  # fmt: skip
            outputs.append(
                Output(
                    self.catalogue.promotions().name,
                    f"{decision['pipeline']}/{decision['model_name']}/{decision['decided_at']}".encode(),
                    encoder_for(self.catalogue.promotions().name, "Promotion").encode(decision),
                    pipeline=pipeline,
                )
            )
            metrics.CONTROLLER_DECISIONS.labels(decision["pipeline"], decision["action"]).inc()
            self.logic.on_promotion(decision)
        self._publish(pipeline, outputs, force=force)


def _read_from(
    settings: Settings,
    topic: str,
    starts: dict[tuple[str, int], int],
    ends: dict[tuple[str, int], int] | None = None,
) -> list[Message]:
    """The committed records of a topic from its start offset in `starts` to the end now (or to the offset
    in `ends`)."""
    consumer = make_consumer(
        settings, f"{settings.topic_prefix}-{SERVICE}-replay", **{"isolation.level": "read_committed"}
    )
    try:
        marks = watermarks(consumer, topic) or {}
        out: list[Message] = []
        for partition, (low, high) in marks.items():
            if ends is not None and (topic, partition) in ends:
                high = min(high, ends[(topic, partition)])
            start = max(low, starts.get((topic, partition), 0))
            if start >= high:
                continue
            consumer.assign([TopicPartition(topic, partition, start)])
            deadline = time.monotonic() + 30.0
            while True:
                batch = consumer.consume(500, 0.5)
                out.extend(m for m in batch if m.error() is None)
                (position,) = consumer.position([TopicPartition(topic, partition)])
                if position.offset >= high:  # (transaction markers take offsets too)
                    break
                if time.monotonic() > deadline:
                    raise StreamMLError(f"timed out reading {topic} to its end")
        return out
    finally:
        consumer.close()


def build(settings: Settings) -> tuple[faust.App, ControllerService]:
    catalogue = prepare(settings, SERVICE)
    service = ControllerService(settings, catalogue)
    c = catalogue
    service.control.bootstrap(c.pipelines().name, "PipelineDefinition", service.on_pipeline)
    service.control.bootstrap(c.promotions().name, "Promotion", service.on_promotion)
    for topic in (c.drift_alerts().name, c.training_results().name, c.evaluations().name):
        service.control.skip_history(topic)
    app = faust_app(SERVICE, settings, app_id=f"{settings.topic_prefix}-{SERVICE}-{settings.instance_id}")
    service.control.follow(app, c.pipelines().name, "PipelineDefinition", service.on_pipeline)
    service.control.follow(app, c.promotions().name, "Promotion", service.on_promotion)
    service.control.follow(app, c.drift_alerts().name, "DriftAlert", service.on_alert)
    service.control.follow(app, c.training_results().name, "TrainingResult", service.on_result)
    service.control.follow(app, c.evaluations().name, "Evaluation", service.on_evaluation)

    @app.task
    async def _join_writers() -> None:
        service.slots.start()

    @app.timer(0.2)
    async def _serve_group() -> None:
        try:
            service.slots.poll()  # heartbeats and hand-overs happen in here
        except Exception:  # a broker error while taking over: logged, served again next time
            metrics.ERRORS.labels(SERVICE, "writers").inc()
            log.exception("serving the writers group failed; trying again")

    @app.timer(1.0)
    async def _tick() -> None:
        try:
            service.tick()
        except Exception:  # never the end of the service: the next tick tries again
            metrics.ERRORS.labels(SERVICE, "tick").inc()
            log.exception("tick failed; trying again in a second")

    @app.on_before_shutdown.connect
    async def _deliver_on_stop(_app: Any, /, *_args: Any, signal: Any, **_kwargs: Any) -> None:
        service.slots.close(STOP_WAIT_S)

    return app, service


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service = build(settings)
        return app, []

    run_service(SERVICE, compose)
