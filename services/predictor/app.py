"""Composition root of the predictor: clients from settings, control-topic followers, data loop, HTTP.

Before any version of a pipeline is live, the predictor does not subscribe to that pipeline's features
topic: its events wait in Kafka (nothing is dropped) and are predicted as soon as a version goes live.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import faust
from aiohttp import web
from confluent_kafka import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamml import metrics
from streamml.codec import codec_for
from streamml.errors import StreamMLError
from streamml.kafka import make_producer
from streamml.runtime import BatchLoop, Output, faust_app
from streamml.service import (
    ControlFollower,
    dead_letter,
    now_ms,
    prepare,
    run_service,
)
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.features import FeatureEngine
from streams.predictor import (
    LiveModel,
    ModelRegistry,
    RegistryEvent,
    is_batch_model,
    prediction_record,
    prediction_records,
)

log = logging.getLogger(__name__)
SERVICE = "predictor"


class PredictRequest(BaseModel):
    """POST /predict body: model inputs as computed features, or a raw event the pipeline validates."""

    model_config = ConfigDict(extra="forbid")
    pipeline: str
    features: dict[str, float | str] | None = None
    event: dict[str, bool | int | float | str | None] | None = None
    event_id: str = Field("http", description="Echoed back; not used for prediction.")


class Predictor:
    """The predictor's state and handlers, wired by `build`."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
        self.registry = ModelRegistry(signing_key=key)
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.engines: dict[str, FeatureEngine] = {}
        self.control = ControlFollower(settings, SERVICE)
        self.alerts = make_producer(settings, **{"linger.ms": 0})
        self._features = codec_for("FeatureVector")
        self._predictions = codec_for("Prediction")

    # -- control topics -------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        if record["deleted"]:
            self.pipelines.pop(name, None)
            self.engines.pop(name, None)
            return
        self.pipelines[name] = record
        self.engines[name] = FeatureEngine(record)
        self.registry.regression[name] = record["task"] == "REGRESSION"

    def on_version(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            self._report(self.registry.on_version(record))

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            actor = record["actor"] if record["actor"] in ("auto", "controller") else "user"
            metrics.PROMOTIONS.labels(record["pipeline"], record["action"], actor).inc()
            self._report(self.registry.on_promotion(record))

    def _report(self, events: list[RegistryEvent]) -> None:
        for ev in events:
            if ev.kind in ("shadow", "unshadow"):
                log.info("%s: %s %s v%s", ev.pipeline, ev.kind, ev.model_name, ev.version)
            elif ev.kind == "swap":
                metrics.SWAPS.labels(ev.pipeline, ev.model_name).inc()
                metrics.LIVE_VERSION.labels(ev.pipeline, ev.model_name).set(ev.version)
                metrics.LAST_SWAP.labels(ev.pipeline).set(time.time())
                log.info(
                    "%s: %s v%s is live (was v%s)",
                    ev.pipeline,
                    ev.model_name,
                    ev.version,
                    ev.previous_version,
                )
            else:
                reason = ev.reason.split(": ", 1)[-1].split(" (")[0]
                metrics.REJECTED_ARTIFACTS.labels(ev.pipeline, reason).inc()
                self.alerts.produce(
                    self.catalogue.drift_alerts().name,
                    codec_for("DriftAlert").encode(
                        {
                            "alert_id": f"artifact-{ev.pipeline}-{ev.model_name}-{ev.version}-{now_ms()}",
                            "pipeline": ev.pipeline,
                            "model_name": ev.model_name,
                            "model_version": ev.version,
                            "kind": "ARTIFACT",
                            "detector": "artifact-verification",
                            "feature": None,
                            "statistic": None,
                            "threshold": None,
                            "window": [],
                            "severity": "CRITICAL",
                            "message": ev.reason,
                            "detected_at": now_ms(),
                        }
                    ),
                    ev.pipeline.encode(),
                )
                self.alerts.flush(5)

    def bootstrap(self) -> None:
        """Load pipelines, versions and the live version per pipeline before consuming any features."""
        c = self.catalogue
        self.control.bootstrap(c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.bootstrap(c.model_versions().name, "ModelVersion", self.on_version)
        self.control.bootstrap(c.promotions().name, "Promotion", self.on_promotion)
        live = {p: (m.model_name, m.version) for p, m in self.registry.live.items()}
        log.info("bootstrap done: %d pipelines, live versions %s", len(self.pipelines), live)

    def follow(self, app: faust.App) -> None:
        c = self.catalogue
        self.control.follow(app, c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.follow(app, c.model_versions().name, "ModelVersion", self.on_version)
        self.control.follow(app, c.promotions().name, "Promotion", self.on_promotion)

    # -- data path ------------------------------------------------------------------------------------
    def topics(self) -> set[str]:
        """Features topics of pipelines that have a live model (the others wait in Kafka)."""
        return {self.catalogue.features(p).name for p in self.pipelines if p in self.registry.live}

    def handle(self, msgs: list[Message]) -> list[Output]:
        """Predictions for a batch: grouped per pipeline so batch-capable models score it in one call."""
        now = now_ms()
        decode = self._features.decode
        outputs: list[Output] = []
        groups: dict[str, list[tuple[Message, dict[str, Any]]]] = {}
        for msg in msgs:
            try:
                fv = decode(msg.value() or b"")
            except Exception as exc:  # not a feature vector: dead-letter it, keep going
                outputs.append(dead_letter(self.catalogue, SERVICE, None, msg, exc))
                continue
            groups.setdefault(fv["pipeline"], []).append((msg, fv))
        for pipeline, items in groups.items():
            outputs += self._predict_pipeline(pipeline, items, now)
        return outputs

    def _predict_pipeline(
        self, pipeline: str, items: list[tuple[Message, dict[str, Any]]], now: int
    ) -> list[Output]:
        encode = self._predictions.encode
        outputs: list[Output] = []
        live = self.registry.live.get(pipeline)
        if live is None:
            exc = StreamMLError(f"pipeline {pipeline!r} has no live model")
            return [dead_letter(self.catalogue, SERVICE, pipeline, msg, exc) for msg, _ in items]
        topic = self.catalogue.predictions(pipeline).name
        latency = metrics.E2E_SECONDS.labels(pipeline)
        served: list[dict[str, Any]] = []
        append, observe = outputs.append, latency.observe
        if not is_batch_model(live):  # River, one event at a time: the hot path, kept flat
            for msg, fv in items:
                try:
                    value = encode(prediction_record(live, fv, now))
                except Exception as exc:  # a model that cannot score it, or an unencodable answer
                    append(dead_letter(self.catalogue, SERVICE, pipeline, msg, exc))
                    continue
                append(Output(topic, fv["event_id"].encode(), value))
                observe(max(0, now - fv["event_time"]) / 1000)
                served.append(fv)
        else:  # scikit-learn: one vectorized call for the batch
            try:
                records: list[dict[str, Any] | Exception] = list(
                    prediction_records(live, [fv for _, fv in items], now)
                )
            except Exception:  # one bad event fails a batch call: score one by one to isolate it
                records = [_attempt(live, fv, now) for _, fv in items]
            for (msg, fv), record in zip(items, records, strict=True):
                try:
                    if isinstance(record, Exception):
                        raise record
                    value = encode(record)
                except Exception as exc:
                    append(dead_letter(self.catalogue, SERVICE, pipeline, msg, exc))
                    continue
                append(Output(topic, fv["event_id"].encode(), value))
                observe(max(0, now - fv["event_time"]) / 1000)
                served.append(fv)
        metrics.EVENTS_OUT.labels(SERVICE, topic, pipeline).inc(len(served))
        challenger = self.registry.shadow.get(pipeline)
        if challenger is not None and served:
            try:
                shadow_records = prediction_records(challenger, served, now, shadow=True)
            except Exception:  # a challenger failing must never affect serving
                log.exception("%s: shadow model v%s failed", pipeline, challenger.version)
                return outputs
            shadow_topic = self.catalogue.shadow_predictions(pipeline).name
            outputs.extend(Output(shadow_topic, r["event_id"].encode(), encode(r)) for r in shadow_records)
        return outputs

    # -- HTTP -----------------------------------------------------------------------------------------
    def predict_http(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of one POST /predict."""
        try:
            req = PredictRequest.model_validate_json(body)
        except ValidationError as exc:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()]
            return 400, {"error": "invalid request", "details": problems}
        if (req.features is None) == (req.event is None):
            return 400, {"error": "give exactly one of 'features' (model inputs) or 'event' (raw fields)"}
        engine = self.engines.get(req.pipeline)
        if engine is None:
            return 404, {"error": f"unknown pipeline {req.pipeline!r}", "pipelines": sorted(self.pipelines)}
        live = self.registry.live.get(req.pipeline)
        if live is None:
            return 503, {"error": f"pipeline {req.pipeline!r} has no live model version yet"}
        features: dict[str, float | str]
        if req.event is not None:
            try:
                fv = engine.transform({"fields": req.event, "event_time": None}, timestamp_ms=0, now_ms=0)
            except StreamMLError as exc:
                return 422, {"error": f"invalid event: {exc}"}
            features = fv["features"]
        else:
            features = req.features or {}
        now = now_ms()
        fake = {"event_id": req.event_id, "key": None, "pipeline": req.pipeline, "features": features,
                "event_time": now, "feature_time": now}  # fmt: skip
        record = prediction_record(live, fake, now)
        return 200, {k: record[k] for k in ("event_id", "pipeline", "model_name", "model_version",
                                            "prediction", "score", "probabilities")}  # fmt: skip


def _attempt(live: LiveModel, fv: dict[str, Any], now: int) -> dict[str, Any] | Exception:
    """The prediction record, or the exception that prevented it (the event is then dead-lettered)."""
    try:
        return prediction_record(live, fv, now)
    except Exception as exc:
        return exc


def build(settings: Settings) -> tuple[faust.App, Predictor, BatchLoop]:
    catalogue = prepare(settings)
    predictor = Predictor(settings, catalogue)
    predictor.bootstrap()
    app = faust_app(
        SERVICE, settings, app_id=f"{settings.topic_prefix}-{SERVICE}-{settings.instance_id}", web=True
    )
    predictor.follow(app)

    @app.page("/predict")
    class PredictView(faust.web.View):  # type: ignore[misc]
        async def post(self, request: web.Request) -> web.Response:
            status, body = predictor.predict_http(await request.read())
            return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))

    @app.page("/healthz")
    class Health(faust.web.View):  # type: ignore[misc]
        async def get(self, request: web.Request) -> web.Response:
            live = {
                p: {"model": m.model_name, "version": m.version} for p, m in predictor.registry.live.items()
            }
            return web.json_response({"status": "ok", "live": live})

    loop = BatchLoop(
        settings,
        name=SERVICE,
        handler=predictor.handle,
        topics=predictor.topics,
    )
    return app, predictor, loop


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _predictor, loop = build(settings)
        return app, [loop]

    run_service(compose)
