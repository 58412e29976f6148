"""Each crash of the hostile-producer report, replayed against the handlers without a broker.

One test per finding: the record that used to stop a service now has exactly one fate (processed,
dead-lettered with the reason, or skipped with a metric and a CONTROL alert) and valid records after it
are still processed.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from river import linear_model, preprocessing

from services.features import app as features_app
from services.learner import app as learner_app
from services.predictor import app as predictor_app
from streamml import artifacts, limits
from streamml import service as service_module
from streamml.codec import codec_for
from streamml.errors import BrokerUnavailableError
from streamml.pipelines import load_file, to_definition
from streamml.runtime import BatchLoop, Output
from streamml.service import ControlFollower, dead_letter
from streamml.settings import Settings
from streamml.topics import Catalogue
from tests.unit.fakes import FakeMessage, FakeProducer

REPO = Path(__file__).resolve().parents[2]
KEY = b"poison-test-key"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for module in (features_app, learner_app):
        monkeypatch.setattr(module, "ensure_topics", lambda *_a, **_k: None)
    monkeypatch.setattr(predictor_app, "make_producer", lambda *_a, **_k: FakeProducer())
    return Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="p", signing_key="k")  # type: ignore[arg-type]


def agrawal() -> dict[str, Any]:
    spec = load_file(REPO / "pipelines" / "agrawal.yaml")
    return to_definition(spec, raw_topic="p.agrawal.raw").to_avro()


def valid_event(i: int) -> dict[str, Any]:
    return {
        "event_id": f"e-{i}", "salary": 50_000.0, "commission": 0.0, "age": 40, "elevel": 1, "car": 3,
        "zipcode": 2, "hvalue": 100_000.0, "hyears": 10, "loan": 20_000.0, "label": i % 2,
    }  # fmt: skip


HOSTILE_RAW: dict[str, bytes] = {
    "int_over_float_range": json.dumps({**valid_event(0), "salary": 10**309}).encode(),
    "int_over_4300_digits": b'{"event_id": "x", "salary": ' + b"9" * 5000 + b"}",
    "json_nested_10000_deep": b"[" * 10_000 + b"]" * 10_000,
    "float_1e999": json.dumps(valid_event(0)).replace("50000.0", "1e999").encode(),
    "string_900_kb": json.dumps({**valid_event(0), "car": "x" * 900_000}).encode()[
        : limits.MAX_RAW_BYTES - 1
    ],
    "event_id_900_kb": json.dumps({**valid_event(0), "event_id": "i" * 400_000}).encode(),
    "label_garbage": json.dumps({**valid_event(0), "label": "garbage"}).encode(),
    "label_3": json.dumps({**valid_event(0), "label": 3}).encode(),
    "string_feature": json.dumps({**valid_event(0), "age": "forty"}).encode(),
    "random_bytes": bytes(range(256)) * 4,
    "null_value": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_RAW))
def test_features_dead_letters_each_hostile_raw_event_and_keeps_going(settings: Settings, name: str) -> None:
    service = features_app.Features(settings, Catalogue(settings))
    service.on_pipeline(agrawal(), None)
    msgs = [FakeMessage("p.agrawal.raw", json.dumps(valid_event(1)).encode(), 0)]
    msgs.append(FakeMessage("p.agrawal.raw", HOSTILE_RAW[name] or None, 1))
    msgs.append(FakeMessage("p.agrawal.raw", json.dumps(valid_event(2)).encode(), 2))
    outputs = service.handle_through(msgs)  # type: ignore[arg-type]
    assert [o.topic for o in outputs] == ["p.agrawal.features", "p.agrawal.dead-letter", "p.agrawal.features"]
    letter = codec_for("DeadLetter").decode(outputs[1].value or b"")
    assert letter["source_offset"] == 1 and letter["error"] and letter["service"] == "features"
    assert len(outputs[1].value or b"") < 100_000  # always fits a Kafka message


def test_dead_letter_echo_is_capped_and_says_so(settings: Settings) -> None:
    msg = FakeMessage("p.agrawal.raw", b"x" * 900_000, 5, key=b"k" * 5000)
    out = dead_letter(Catalogue(settings), "features", "agrawal", msg, ValueError("e" * 100_000))  # type: ignore[arg-type]
    letter = codec_for("DeadLetter").decode(out.value or b"")
    assert len(letter["original_value"]) == limits.DEAD_LETTER_VALUE_BYTES
    assert len(letter["original_key"]) == limits.DEAD_LETTER_KEY_BYTES
    assert "truncated" in letter["error"] and len(letter["error"]) < 3_000


def test_dead_letters_go_to_the_source_topics_pipeline_not_the_one_a_record_names(settings: Settings) -> None:
    cat = Catalogue(settings)
    from_features = FakeMessage("p.agrawal.features", b"junk", 0)
    assert dead_letter(cat, "predictor", "BAD NAME!/..", from_features, ValueError()).topic == (  # type: ignore[arg-type]
        "p.agrawal.dead-letter"
    )
    from_control = FakeMessage("p.model-versions", b"junk", 0)
    assert dead_letter(cat, "x", "ghost", from_control, ValueError()).topic == "p.dead-letter"  # type: ignore[arg-type]


def test_the_loop_survives_a_handler_that_raises_and_dead_letters_only_the_culprit(
    settings: Settings,
) -> None:
    def handler(msgs: list[Any]) -> list[Output]:
        if any(m.value() == b"poison" for m in msgs):
            raise RuntimeError("boom")
        return [Output("out", None, m.value()) for m in msgs]

    loop = BatchLoop(
        settings,
        name="t",
        handler=handler,
        topics=set,
        dead_letter=lambda msg, exc: dead_letter(Catalogue(settings), "t", None, msg, exc),
    )
    msgs = [FakeMessage("p.agrawal.raw", v, i) for i, v in enumerate([b"a", b"poison", b"b"])]
    outputs = loop._handle(msgs)  # type: ignore[arg-type]
    assert [(o.topic, o.value) for o in outputs if o.topic == "out"] == [("out", b"a"), ("out", b"b")]
    assert [o.topic for o in outputs if o.topic != "out"] == ["p.agrawal.dead-letter"]


def online_version(pipeline: str = "agrawal", version: int = 1) -> dict[str, Any]:
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    model.learn_one({"salary": 1.0}, True)
    data = artifacts.serialize({"model": model, "metrics": {}})
    return {
        "pipeline": pipeline, "model_name": "online", "version": version, "kind": "ONLINE",
        "estimator_spec": "x", "params": {}, "artifact_format": artifacts.FORMAT, "artifact": data,
        "artifact_uri": None, "sha256": artifacts.sha256_hex(data), "signature": artifacts.sign(data, KEY),
        "library_versions": artifacts.library_versions(), "metrics": {}, "training_data": [],
        "events_seen": 1, "parent_version": None, "created_at": 1,
    }  # fmt: skip


def promotion(model: str = "online", version: int = 1, actor: str = "auto") -> dict[str, Any]:
    return {
        "pipeline": "agrawal", "model_name": model, "action": "PROMOTE", "version": version,
        "previous_version": None, "actor": actor, "reason": "", "metrics": {}, "decided_at": 1,
    }  # fmt: skip


def live_predictor(settings: Settings) -> predictor_app.Predictor:
    predictor = predictor_app.Predictor(settings, Catalogue(settings))
    predictor.registry.signing_key = KEY
    predictor.registry.fetch = None
    predictor.on_pipeline(agrawal(), None)
    predictor.on_version(online_version(), None)
    predictor.on_promotion(promotion(), None)
    assert "agrawal" in predictor.registry.live
    return predictor


def test_predictor_dead_letters_a_vector_naming_an_invalid_pipeline(settings: Settings) -> None:
    predictor = live_predictor(settings)
    fv = {
        "event_id": "e", "key": None, "pipeline": "BAD NAME!/..", "pipeline_revision": 1,
        "features": {"salary": 1.0}, "label": None, "event_time": 1, "feature_time": 1, "source": None,
    }  # fmt: skip
    good = {**fv, "pipeline": "agrawal", "event_id": "g"}
    stringy = {**good, "features": {"salary": "a lot"}}
    encode = codec_for("FeatureVector").encode
    msgs = [FakeMessage("p.agrawal.features", encode(v), i) for i, v in enumerate([fv, stringy, good])]
    outputs = predictor.handle(msgs)  # type: ignore[arg-type]
    assert sorted(o.topic for o in outputs) == [
        "p.agrawal.dead-letter",
        "p.agrawal.dead-letter",
        "p.agrawal.predictions",
    ]


def test_learner_dead_letters_bad_labels_and_string_features_and_keeps_learning(settings: Settings) -> None:
    learner = learner_app.Learner(settings, Catalogue(settings), KEY)
    learner.on_pipeline(agrawal(), None)
    base = {
        "event_id": "e", "key": None, "pipeline": "agrawal", "pipeline_revision": 1,
        "features": {"salary": 1.0}, "label": 1, "event_time": 1, "feature_time": 1, "source": None,
    }  # fmt: skip
    encode = codec_for("FeatureVector").encode
    values = [base, {**base, "label": "garbage"}, {**base, "features": {"salary": "high"}}, base]
    outputs = learner.handle([FakeMessage("p.agrawal.features", encode(v), i) for i, v in enumerate(values)])  # type: ignore[arg-type]
    assert [o.topic for o in outputs] == ["p.agrawal.dead-letter", "p.agrawal.dead-letter"]
    assert learner.learners["agrawal"].events_seen == 2


def test_a_promote_of_a_model_that_does_not_exist_never_stops_auto_promotion(settings: Settings) -> None:
    learner = learner_app.Learner(settings, Catalogue(settings), KEY)
    learner.on_pipeline(agrawal(), None)
    follower = ControlFollower(settings, "learner")
    follower._alerts = FakeProducer()
    value = codec_for("Promotion").encode(promotion(model="ghost", version=99, actor="mallory"))
    follower._apply("p.promotions", "Promotion", 0, 0, value, learner.on_promotion, None)
    assert follower.skipped == 1 and learner.live_model == {}
    # a declared model but a version nobody published: waits, and AUTO promotion goes on meanwhile
    learner.on_promotion(promotion(model="batch", version=99, actor="mallory"), None)
    assert learner.live_model == {} and learner.pending["agrawal"]["version"] == 99


FUNC_TRANSFORMER = {
    "name": "online",
    "kind": "ONLINE",
    "estimator_spec": "compose.FuncTransformer",
    "params": {"compose.FuncTransformer": '{"func": "os.system"}'},
}
BAD_DEFINITIONS = {
    "name": lambda d: {**d, "name": "BAD NAME!/.."},
    "step_param_not_json": lambda d: {
        **d,
        "feature_steps": [{"op": "log1p", "output": "y", "inputs": ["salary"], "params": {"x": "{not json"}}],
    },
    "window_1e999": lambda d: {
        **d,
        "feature_steps": [
            {"op": "rolling_mean", "output": "y", "inputs": ["salary"], "params": {"window": "1e999"}}
        ],
    },
    "no_online_model": lambda d: {**d, "models": [m for m in d["models"] if m["kind"] != "ONLINE"]},
    "func_transformer": lambda d: {**d, "models": [FUNC_TRANSFORMER]},
    "raw_topic_is_a_control_topic": lambda d: {**d, "raw_topic": "p.model-versions"},
}


@pytest.mark.parametrize("name", sorted(BAD_DEFINITIONS))
def test_a_bad_definition_is_skipped_with_a_control_alert_and_the_good_revision_stays(
    settings: Settings, name: str
) -> None:
    service = features_app.Features(settings, Catalogue(settings))
    follower = ControlFollower(settings, "features")
    alerts = follower._alerts = FakeProducer()
    good = agrawal()
    encode = codec_for("PipelineDefinition").encode
    follower._apply("p.pipelines", "PipelineDefinition", 0, 0, encode(good), service.on_pipeline, None)
    follower._apply(
        "p.pipelines",
        "PipelineDefinition",
        0,
        1,
        encode(BAD_DEFINITIONS[name](good)),
        service.on_pipeline,
        None,
    )
    follower._apply("p.pipelines", "PipelineDefinition", 0, 2, b"\x00garbage", service.on_pipeline, None)
    assert follower.skipped == 2 and set(service.engines) == {"agrawal"}
    assert service.engines["agrawal"].revision == good["revision"]
    kinds = [codec_for("DriftAlert").decode(value)["kind"] for _t, value, _k in alerts.produced]
    assert kinds == ["CONTROL", "CONTROL"]


def test_a_control_record_that_meets_a_broker_away_waits_and_applies_in_order_when_it_is_back(
    settings: Settings,
) -> None:
    """Neither skipped nor applied out of order: the definition waits, the record after it waits behind
    it, both apply once the broker answers; a refusal (not "not now") is still skipped at once."""
    follower = ControlFollower(settings, "features")
    alerts = follower._alerts = FakeProducer()
    broker_away = True
    applied: list[int] = []

    def apply(record: dict[str, Any] | None, _msg: Any) -> None:
        if broker_away:
            raise BrokerUnavailableError("cannot read the configs of topic p.agrawal.features: _TRANSPORT")
        assert record is not None
        applied.append(record["revision"])

    encode = codec_for("PipelineDefinition").encode
    first, second = agrawal(), {**agrawal(), "revision": agrawal()["revision"] + 1}
    follower._apply("p.pipelines", "PipelineDefinition", 0, 0, encode(first), apply, None)
    follower._apply("p.pipelines", "PipelineDefinition", 0, 1, encode(second), apply, None)
    assert follower.waiting() == 2 and follower.skipped == 0 and applied == []
    t0 = time.monotonic()
    assert follower.retry_waiting(t0 + 1) == 0  # its pause is not over
    assert follower.retry_waiting(t0 + 5) == 0 and follower.waiting() == 2  # still away: waits longer
    broker_away = False
    assert follower.retry_waiting(t0 + 6) == 0  # the pause doubled
    assert follower.retry_waiting(t0 + 60) == 2 and follower.waiting() == 0
    assert applied == [first["revision"], second["revision"]] and follower.skipped == 0
    follower._apply("p.pipelines", "PipelineDefinition", 0, 2, b"\x00garbage", apply, None)
    assert follower.skipped == 1 and follower.waiting() == 0 and len(alerts.produced) == 1


def test_a_control_record_still_not_applicable_after_the_longest_wait_is_skipped_with_an_alert(
    settings: Settings,
) -> None:
    follower = ControlFollower(settings, "features")
    alerts = follower._alerts = FakeProducer()

    def away(_record: dict[str, Any] | None, _msg: Any) -> None:
        raise KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN))

    follower._apply(
        "p.pipelines",
        "PipelineDefinition",
        0,
        0,
        codec_for("PipelineDefinition").encode(agrawal()),
        away,
        None,
    )
    assert follower.waiting() == 1
    assert follower.retry_waiting(time.monotonic() + service_module.WAIT_GIVE_UP_S + 1) == 1
    assert follower.waiting() == 0 and follower.skipped == 1
    (alert,) = [codec_for("DriftAlert").decode(v) for _t, v, _k in alerts.produced]
    assert (
        alert["kind"] == "CONTROL"
        and alert["pipeline"] == "agrawal"
        and "_ALL_BROKERS_DOWN" in alert["message"]
    )


def test_a_bad_alert_is_skipped_without_an_alert_about_it(settings: Settings) -> None:
    follower = ControlFollower(settings, "controller")
    alerts = follower._alerts = FakeProducer()
    follower._apply("p.drift-alerts", "DriftAlert", 0, 0, b"junk", lambda *_: None, None)
    assert follower.skipped == 1 and alerts.produced == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"pipeline": "agrawal", "features": {"salary": "a lot"}}', 422),
        (b'{"pipeline": "agrawal", "features": {"salary": NaN}}', 400),
        (b'{"pipeline": "agrawal", "features": {"salary": Infinity}}', 400),
        (b'{"pipeline": "agrawal", "event": {"event_id": "e", "salary": ' + b"9" * 400 + b"}}", 422),
        (b'{"pipeline": "agrawal", "event": {"event_id": "e", "salary": 1e400}}', 400),
        (b'{"pipeline": "agrawal", "features": {"nope": 1.0}}', 422),
        (b"[" * 5000, 400),
        (b"x" * (predictor_app.MAX_BODY_BYTES + 1), 413),
        (b'{"pipeline": "agrawal", "features": {"salary": 50000.0}}', 200),
    ],
)
def test_predict_http_answers_4xx_for_bad_bodies_and_valid_json_always(
    settings: Settings, body: bytes, status: int
) -> None:
    predictor = live_predictor(settings)
    got, answer = predictor.predict_http(body)
    assert got == status, answer
    json.dumps(answer, allow_nan=False)  # valid JSON: no NaN or Infinity


def test_predict_http_turns_a_non_finite_score_into_null() -> None:
    assert predictor_app.finite_json({"score": float("nan"), "p": {"a": float("inf")}, "x": 1.0}) == {
        "score": None, "p": {"a": None}, "x": 1.0,
    }  # fmt: skip


def test_a_forged_version_with_the_largest_number_never_sets_the_learners_numbering(
    settings: Settings,
) -> None:
    learner = learner_app.Learner(settings, Catalogue(settings), KEY)
    forged = {**online_version(version=2**63 - 1), "signature": "00" * 32}
    follower = ControlFollower(settings, "learner")
    follower._alerts = FakeProducer()
    value = codec_for("ModelVersion").encode(forged)
    follower._apply("p.model-versions", "ModelVersion", 0, 0, value, learner.on_version, None)
    assert follower.skipped == 1 and learner.known_versions == set()


def test_versions_of_undeclared_pipelines_cost_the_predictor_no_artifact_memory(settings: Settings) -> None:
    predictor = live_predictor(settings)
    for i in range(20):
        predictor.on_version({**online_version(pipeline=f"ghost-{i}"), "artifact": b"x" * 100_000}, None)
    assert not [k for k in predictor.registry.versions if k[0].startswith("ghost")]


def test_the_monitor_dead_letters_forged_predictions(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.monitor import app as monitor_app

    monkeypatch.setattr(monitor_app, "ensure_topics", lambda *_a, **_k: None)
    service = monitor_app.MonitorService(settings, Catalogue(settings))
    service.on_pipeline(agrawal(), None)
    base = {
        "event_id": "e", "key": None, "pipeline": "agrawal", "model_name": "online", "model_version": 1,
        "prediction": True, "score": 0.9, "probabilities": {"True": 0.9, "False": 0.1}, "shadow": False,
        "event_time": 1, "feature_time": 1, "prediction_time": 1, "source": None,
    }  # fmt: skip
    forged = [
        {**base, "model_name": "evil", "model_version": 2**62},
        {**base, "score": float("nan")},
        {**base, "pipeline": "ghost"},
        {**base, "shadow": True},
    ]
    encode = codec_for("Prediction").encode
    msgs = [FakeMessage("p.agrawal.predictions", encode(r), i) for i, r in enumerate([*forged, base])]
    outputs = service.handle(msgs)  # type: ignore[arg-type]
    assert [o.topic for o in outputs].count("p.agrawal.dead-letter") == len(forged)


def test_predictor_catch_up_waits_for_every_control_topic_a_previous_owner_served_by(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before reading partitions it was handed, a predictor has applied the pipelines, model versions and
    promotions written so far; one topic not caught up in time makes the whole catch-up False."""
    predictor = live_predictor(settings)
    asked: list[tuple[str, float]] = []
    behind = {predictor.catalogue.promotions().name}

    async def caught_up(topic: str, timeout_s: float) -> bool:
        asked.append((topic, timeout_s))
        return topic not in behind

    monkeypatch.setattr(predictor.control, "caught_up", caught_up)
    c = predictor.catalogue
    assert asyncio.run(predictor.caught_up()) is False
    assert sorted(t for t, _ in asked) == sorted(
        [c.pipelines().name, c.model_versions().name, c.promotions().name]
    )
    assert {s for _, s in asked} == {predictor_app.CATCH_UP_TIMEOUT_S}
    behind.clear()
    assert asyncio.run(predictor.caught_up()) is True
