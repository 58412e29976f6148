"""Composition root of the controller: follows alerts, results, decisions and evaluations; acts by records.

History is not replayed into actions: alerts, training results and evaluations that were on the topics
before the controller started are skipped (the state it needs, pipelines and decisions, is bootstrapped).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import faust
from confluent_kafka import KafkaException

from streamml import metrics
from streamml.codec import codec_for
from streamml.kafka import make_consumer, make_producer
from streamml.runtime import Outbox, Output, faust_app, is_retriable, kafka_error, watermarks
from streamml.service import ControlFollower, check_declared_model, now_ms, prepare, run_service
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.controller import Controller

log = logging.getLogger(__name__)
SERVICE = "controller"
PUMP_WAIT_S = 0.2  # how long a tick waits for acknowledgements (on the event loop)
STOP_WAIT_S = 2.0  # how long a stop waits for the last decisions and requests


class ControllerService:
    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.logic = Controller(now_ms)
        self.control = ControlFollower(settings, SERVICE)
        self.producer = make_producer(settings, **{"linger.ms": 0})
        self.outbox = Outbox(self.producer, SERVICE)
        self.watermarks = make_consumer(settings, f"{settings.topic_prefix}-{SERVICE}-watermarks")

    # -- inputs ---------------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            self.logic.on_pipeline(record)

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            check_declared_model(self.logic.pipelines, record)
            self.logic.on_promotion(record)

    def on_alert(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None and record["pipeline"] in self.logic.pipelines:
            self.logic.on_alert(record, self.progress(record["pipeline"])[0])

    def on_result(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            self._publish_decisions(self.logic.on_training_result(record))

    def on_evaluation(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            self._publish_decisions(self.logic.on_evaluation(record))

    # -- features-topic progress ----------------------------------------------------------------------
    def progress(self, pipeline: str) -> tuple[int, dict[int, tuple[int, int]]]:
        """Total records in the pipeline's features topic, and (low, high) per partition."""
        marks = watermarks(self.watermarks, self.catalogue.features(pipeline).name) or {}
        return sum(high for _low, high in marks.values()), marks

    def tick(self) -> None:
        """Issue the training requests that are due; outputs that met a retriable broker error go again."""
        for pipeline in list(self.logic.pipelines):
            st = self.logic.state.get(pipeline)
            if st is None or st.retrain_due_at is None:
                continue
            try:
                total, marks = self.progress(pipeline)
            except KafkaException as exc:  # e.g. NOT_LEADER_FOR_PARTITION while a broker comes back
                err = kafka_error(exc)
                if err is None or not is_retriable(err):
                    raise
                log.warning("%s: cannot read the progress now (%s); trying again next tick", pipeline, err)
                continue
            topic = self.catalogue.features(pipeline).name

            def recent(
                n: int, marks: dict[int, tuple[int, int]] = marks, topic: str = topic
            ) -> list[dict[str, Any]]:
                share = math.ceil(n / max(1, len(marks)))
                return [
                    {
                        "topic": topic,
                        "partition": p,
                        "start_offset": max(low, high - share),
                        "end_offset": high,
                    }
                    for p, (low, high) in sorted(marks.items())
                    if high > low
                ]

            for request in self.logic.on_progress(pipeline, total, recent):
                log.info("%s: requesting training %s: %s", pipeline, request["request_id"], request["reason"])
                self.outbox.send(
                    Output(
                        self.catalogue.training_requests().name,
                        pipeline.encode(),
                        codec_for("TrainingRequest").encode(request),
                    )
                )
                metrics.TRAINING_REQUESTS.labels(pipeline, "controller").inc()
        self.outbox.pump(PUMP_WAIT_S)  # never holds the event loop for long, whatever the broker does

    def _publish_decisions(self, decisions: list[dict[str, Any]]) -> None:
        for decision in decisions:
            log.info("%s: %s %s v%s: %s", decision["pipeline"], decision["action"], decision["model_name"],
                     decision["version"], decision["reason"])  # fmt: skip
            self.outbox.send(
                Output(
                    self.catalogue.promotions().name,
                    f"{decision['pipeline']}/{decision['model_name']}/{decision['decided_at']}".encode(),
                    codec_for("Promotion").encode(decision),
                )
            )
            metrics.CONTROLLER_DECISIONS.labels(decision["pipeline"], decision["action"]).inc()
            self.logic.on_promotion(decision)
        if decisions:
            self.outbox.pump(PUMP_WAIT_S)  # what is not acknowledged yet goes on with each tick


def build(settings: Settings) -> tuple[faust.App, ControllerService]:
    catalogue = prepare(settings)
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

    @app.timer(1.0)
    async def _tick() -> None:
        service.tick()

    @app.on_before_shutdown.connect
    async def _deliver_on_stop(_app: Any, /, *_args: Any, signal: Any, **_kwargs: Any) -> None:
        if service.outbox.pump(STOP_WAIT_S):
            log.warning("stopping with decisions or requests the broker has not acknowledged")

    return app, service


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service = build(settings)
        return app, []

    run_service(compose)
