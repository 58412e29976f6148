"""Composition root of the predictor: clients from settings, control-topic followers, data loop, HTTP.

Before any version of a pipeline is live, the predictor does not subscribe to that pipeline's features
topic: its events wait in Kafka (nothing is dropped) and are predicted as soon as a version goes live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

import faust
from aiohttp import web
from confluent_kafka import Consumer, Message, TopicPartition
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as RequestError

from streamml import limits, metrics
from streamml.codec import check_fields, codec_for, encoder_for
from streamml.contracts import generic_contract
from streamml.errors import StreamMLError, ValidationError
from streamml.httpauth import api_token, authorized
from streamml.kafka import make_consumer, make_producer
from streamml.registry import FramedEncoder, RegistryError
from streamml.registry import Registry as SchemaRegistry
from streamml.runtime import BatchLoop, Output, faust_app
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
from streamml.signing import keys_from
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


MAX_BODY_BYTES = 64 * 1024
# How long a predictor waits to apply the control records written so far before it reads partitions it
# was just assigned (then it reads them anyway: serving an older version beats not serving).
CATCH_UP_TIMEOUT_S = 10.0


class PredictRequest(BaseModel):
    """POST /predict body: model inputs as computed features, or a raw event the pipeline validates."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    pipeline: str = Field(max_length=63)
    features: dict[str, float | str] | None = Field(None, max_length=limits.MAX_RAW_FIELDS)
    event: dict[str, bool | int | float | str | None] | None = Field(None, max_length=limits.MAX_RAW_FIELDS)
    event_id: str = Field(
        "http", min_length=1, max_length=limits.MAX_EVENT_ID_CHARS, description="Echoed back; not used."
    )


class Predictor:
    """The predictor's state and handlers, wired by `build`."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        # public keys only (or the former shared HMAC key): a predictor can verify, never sign
        self.registry = ModelRegistry(signing_key=keys_from(settings, signs=False), fetch=self._fetch_version)
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.engines: dict[str, FeatureEngine] = {}
        self.by_topic: dict[str, str] = {}  # features topic -> its pipeline
        self.version_offsets: dict[tuple[str, str, int], tuple[int, int]] = {}  # where each version is
        self._fetcher: Consumer | None = None
        self.control = ControlFollower(settings, SERVICE)
        self.alerts = make_producer(settings, **{"linger.ms": 0})
        self._features = codec_for("FeatureVector")
        self._predictions = codec_for("Prediction")
        # With a schema registry: predictions (and shadow predictions) in the Confluent wire format under
        # their topic's subject, by topic; topics without one (no registry, or it could not be reached when
        # the pipeline loaded) keep the single-object encoding, which every StreamML reader also reads.
        self.schema_registry = SchemaRegistry.from_settings(settings)
        self.prediction_encoders: dict[str, FramedEncoder] = {}

    # -- control topics -------------------------------------------------------------------------------
    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        if record["deleted"]:
            self.pipelines.pop(name, None)
            self.engines.pop(name, None)
            self.by_topic = {t: p for t, p in self.by_topic.items() if p != name}
            return
        engine = FeatureEngine(record)
        self.pipelines[name] = record
        self.engines[name] = engine
        self.by_topic[self.catalogue.features(name).name] = name
        self._register_predictions(name)
        frame_dead_letters(self.catalogue, name)
        self.registry.regression[name] = record["task"] == "REGRESSION"
        self._report(self.registry.retry(name))

    def _register_predictions(self, pipeline: str) -> None:
        """Register the Prediction contract under the pipeline's prediction topics' subjects (once per
        process and topic: the id is cached) and write those topics framed with it."""
        if self.schema_registry is None:
            return
        contract = generic_contract("Prediction")
        topics = (self.catalogue.predictions(pipeline).name, self.catalogue.shadow_predictions(pipeline).name)
        for topic in topics:
            if topic in self.prediction_encoders:
                continue
            try:
                schema_id = self.schema_registry.register(topic, contract)
            except RegistryError as exc:
                log.error("%s: predictions stay single-object encoded: %s", topic, exc)
                continue
            self.prediction_encoders[topic] = FramedEncoder(contract, schema_id)
            log.info("%s: predictions in the Confluent wire format (schema id %d)", topic, schema_id)

    def _fetch_version(self, pipeline: str, name: str, version: int) -> dict[str, Any] | None:
        """One version's record, read back from the model-versions topic at the offset it was seen at
        (its artifact was dropped from memory): one record fetched, not the whole topic."""
        where = self.version_offsets.get((pipeline, name, version))
        if where is None:
            return None
        if self._fetcher is None:
            self._fetcher = make_consumer(
                self.settings, f"{self.settings.topic_prefix}-{SERVICE}-fetch", **{"fetch.wait.max.ms": 10}
            )
        topic = self.catalogue.model_versions().name
        self._fetcher.assign([TopicPartition(topic, where[0], where[1])])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = self._fetcher.poll(0.05)
                if msg is None or msg.error():
                    continue
                if msg.key() != f"{pipeline}/{name}/{version}".encode() or msg.value() is None:
                    return None  # compacted away or replaced since: nothing to serve
                log.info("%s: read %s v%d back from %s@%d", pipeline, name, version, topic, where[1])
                return codec_for("ModelVersion").decode(msg.value() or b"")
            return None
        finally:
            self._fetcher.unassign()  # (assigned, an idle consumer would go on fetching from the broker)

    def on_version(self, record: dict[str, Any] | None, msg: Any) -> None:
        if record is not None:
            offset = msg.offset() if callable(getattr(msg, "offset", None)) else getattr(msg, "offset", None)
            partition = (
                msg.partition() if callable(getattr(msg, "partition", None)) else getattr(msg, "partition", 0)
            )
            if isinstance(offset, int):
                key = (record["pipeline"], record["model_name"], int(record["version"]))
                self.version_offsets[key] = (int(partition or 0), offset)
            definition = self.pipelines.get(record["pipeline"])
            if definition is None or record["model_name"] not in {m["name"] for m in definition["models"]}:
                # Nothing serves it now (its pipeline or model may still be on its way): only where it is
                # is kept, so versions of undeclared pipelines cost no memory; a decision reads it back.
                return
            self._report(self.registry.on_version(record))

    def on_promotion(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is not None:
            check_declared_model(self.pipelines, record)
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
                log.warning(
                    "%s: %s v%s rejected unloaded: %s", ev.pipeline, ev.model_name, ev.version, ev.reason
                )
                self.alerts.produce(
                    self.catalogue.drift_alerts().name,
                    encoder_for(self.catalogue.drift_alerts().name, "DriftAlert").encode(
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

    async def caught_up(self) -> bool:
        """Every pipeline revision, model version and promotion written so far is applied. Awaited before
        the predictor reads partitions it was assigned: their previous owner served with what it had
        applied, all of it written before the hand-over, so the new owner never serves an older version."""
        c = self.catalogue
        topics = (c.pipelines().name, c.model_versions().name, c.promotions().name)
        done = await asyncio.gather(*(self.control.caught_up(t, CATCH_UP_TIMEOUT_S) for t in topics))
        return all(done)

    def follow(self, app: faust.App) -> None:
        c = self.catalogue
        self.control.follow(app, c.pipelines().name, "PipelineDefinition", self.on_pipeline)
        self.control.follow(app, c.model_versions().name, "ModelVersion", self.on_version)
        self.control.follow(app, c.promotions().name, "Promotion", self.on_promotion)

    # -- data path ------------------------------------------------------------------------------------
    def topics(self) -> set[str]:
        """Features topics of pipelines that have a live model (the others wait in Kafka)."""
        return {t for t, p in self.by_topic.items() if p in self.registry.live}

    def handle(self, msgs: list[Message]) -> list[Output]:
        """Predictions for a batch: grouped per pipeline so batch-capable models score it in one call."""
        now = now_ms()
        decode = self._features.decode
        outputs: list[Output] = []
        groups: dict[str, list[tuple[Message, dict[str, Any]]]] = {}
        by_topic, engines = self.by_topic, self.engines
        for msg in msgs:
            # The pipeline is the one whose topic the record came from, never the one it claims.
            pipeline = by_topic.get(msg.topic() or "")
            if pipeline is None:  # deleted while its records were in flight
                metrics.SKIPPED.labels(SERVICE, "pipeline_deleted").inc()
                continue
            try:
                fv = decode(msg.value() or b"")
                if fv["pipeline"] != pipeline:
                    raise ValidationError(f"a {fv['pipeline'][:80]!r} feature vector on {pipeline}'s topic")
                engines[pipeline].check_vector(fv)
            except Exception as exc:  # not a valid feature vector of this pipeline: dead-letter it
                outputs.append(dead_letter(self.catalogue, SERVICE, pipeline, msg, exc))
                continue
            groups.setdefault(pipeline, []).append((msg, fv))
        for pipeline, items in groups.items():
            outputs += self._predict_pipeline(pipeline, items, now)
        return outputs

    def _predict_pipeline(
        self, pipeline: str, items: list[tuple[Message, dict[str, Any]]], now: int
    ) -> list[Output]:
        outputs: list[Output] = []
        live = self.registry.live.get(pipeline)
        if live is None:
            exc = StreamMLError(f"pipeline {pipeline!r} has no live model")
            return [dead_letter(self.catalogue, SERVICE, pipeline, msg, exc) for msg, _ in items]
        topic = self.catalogue.predictions(pipeline).name
        encode = self.prediction_encoders.get(topic, self._predictions).encode
        served: list[dict[str, Any]] = []
        append = outputs.append
        if not is_batch_model(live):  # River, one event at a time: the hot path, kept flat
            for msg, fv in items:
                try:
                    value = encode(prediction_record(live, fv, now))
                except Exception as exc:  # a model that cannot score it, or an unencodable answer
                    append(dead_letter(self.catalogue, SERVICE, pipeline, msg, exc))
                    continue
                append(Output(topic, fv["event_id"].encode(), value))
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
                served.append(fv)
        metrics.EVENTS_OUT.labels(SERVICE, topic, pipeline).inc(len(served))
        metrics.observe_many(
            metrics.E2E_SECONDS.labels(pipeline), [max(0, now - fv["event_time"]) / 1000 for fv in served]
        )
        challenger = self.registry.shadow.get(pipeline)
        if challenger is not None and served:
            try:
                shadow_records = prediction_records(challenger, served, now, shadow=True)
            except Exception:  # a challenger failing must never affect serving
                log.exception("%s: shadow model v%s failed", pipeline, challenger.version)
                return outputs
            shadow_topic = self.catalogue.shadow_predictions(pipeline).name
            encode = self.prediction_encoders.get(shadow_topic, self._predictions).encode
            outputs.extend(Output(shadow_topic, r["event_id"].encode(), encode(r)) for r in shadow_records)
        return outputs

    # -- HTTP -----------------------------------------------------------------------------------------
    def predict_http(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of one POST /predict: 4xx with the reason for anything but a valid request.

        Scoring errors are the request's fault as far as the caller can act on them (a value the model
        cannot use): 422 with the reason, never a 500 with a stack trace.
        """
        if len(body) > MAX_BODY_BYTES:
            return 413, {"error": f"request body over {MAX_BODY_BYTES} bytes"}
        try:
            req = PredictRequest.model_validate_json(body)
        except RequestError as exc:
            problems = [
                limits.clip(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}", 200)
                for e in exc.errors()[:20]
            ]
            return 400, {"error": "invalid request", "details": problems}
        if (req.features is None) == (req.event is None):
            return 400, {"error": "give exactly one of 'features' (model inputs) or 'event' (raw fields)"}
        engine = self.engines.get(req.pipeline)
        if engine is None:
            return 404, {"error": f"unknown pipeline {req.pipeline!r}", "pipelines": sorted(self.pipelines)}
        live = self.registry.live.get(req.pipeline)
        if live is None:
            return 503, {"error": f"pipeline {req.pipeline!r} has no live model version yet"}
        try:
            if req.event is not None:
                check_fields(req.event)
                fv = engine.preview({"fields": req.event, "event_time": None}, now_ms=now_ms())
                features = fv["features"]
            else:
                features = dict(req.features or {})
                engine.check_vector({"event_id": req.event_id, "features": features, "label": None})
            now = now_ms()
            fake = {"event_id": req.event_id, "key": None, "pipeline": req.pipeline, "features": features,
                    "event_time": now, "feature_time": now}  # fmt: skip
            record = prediction_record(live, fake, now)
        except Exception as exc:  # the request's values cannot be scored: say why
            return 422, {"error": limits.clip(f"cannot predict: {type(exc).__name__}: {exc}", 500)}
        answer = {k: record[k] for k in ("event_id", "pipeline", "model_name", "model_version",
                                         "prediction", "score", "probabilities")}  # fmt: skip
        return 200, finite_json(answer)


async def _read_body(request: web.Request) -> bytes:
    """The request body, read up to one byte past the limit (so an oversized one is recognised)."""
    chunks, size = [], 0
    while size <= MAX_BODY_BYTES:
        chunk = await request.content.read(MAX_BODY_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def finite_json(value: Any) -> Any:
    """`value` with non-finite floats as null: JSON has no NaN or Infinity, and clients must parse it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def _attempt(live: LiveModel, fv: dict[str, Any], now: int) -> dict[str, Any] | Exception:
    """The prediction record, or the exception that prevented it (the event is then dead-lettered)."""
    try:
        return prediction_record(live, fv, now)
    except Exception as exc:
        return exc


def build(settings: Settings) -> tuple[faust.App, Predictor, BatchLoop]:
    catalogue = prepare(settings, SERVICE)
    predictor = Predictor(settings, catalogue)
    predictor.bootstrap()
    app = faust_app(
        SERVICE, settings, app_id=f"{settings.topic_prefix}-{SERVICE}-{settings.instance_id}", web=True
    )
    predictor.follow(app)
    token = api_token(settings)

    def refused(request: web.Request) -> web.Response | None:
        if authorized(request.headers, token):
            return None
        return web.json_response(
            {"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.page("/predict")
    class PredictView(faust.web.View):  # type: ignore[misc]
        async def post(self, request: web.Request) -> web.Response:
            if (denied := refused(request)) is not None:
                return denied
            if (request.content_length or 0) > MAX_BODY_BYTES:
                status, body = 413, {"error": f"request body over {MAX_BODY_BYTES} bytes"}
            else:
                try:
                    status, body = predictor.predict_http(await _read_body(request))
                except Exception as exc:  # never a 500 for what a client sent
                    log.exception("POST /predict failed")
                    status, body = 422, {"error": limits.clip(f"{type(exc).__name__}: {exc}", 500)}
            return web.json_response(
                body, status=status, dumps=lambda o: json.dumps(o, default=str, allow_nan=False)
            )

    @app.page("/healthz")
    class Health(faust.web.View):  # type: ignore[misc]
        async def get(self, request: web.Request) -> web.Response:
            if (denied := refused(request)) is not None:
                return denied
            live = {
                p: {"model": m.model_name, "version": m.version} for p, m in predictor.registry.live.items()
            }
            return web.json_response({"status": "ok", "live": live})

    loop = BatchLoop(
        settings,
        name=SERVICE,
        handler=predictor.handle,
        topics=predictor.topics,
        dead_letter=lambda msg, exc: dead_letter(catalogue, SERVICE, None, msg, exc),
        catch_up=predictor.caught_up,
        # one topic per pipeline: a sibling stopping or joining pauses only the partitions that move
        cooperative=True,
    )
    return app, predictor, loop


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _predictor, loop = build(settings)
        return app, [loop]

    run_service(SERVICE, compose)
