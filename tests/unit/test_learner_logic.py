"""OnlineLearner and LabelJoin without a broker: prequential metrics, signed snapshots, exact resume."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import pytest
from river import datasets, linear_model, metrics, preprocessing

from streamml import artifacts
from streamml.artifacts import ArtifactRejectedError
from streamml.codec import codec_for
from streamml.records import ModelVersion
from streams.learner import LabelJoin, OnlineLearner

KEY = b"learner-test-key"
SPEC = "preprocessing.StandardScaler | linear_model.LogisticRegression"
TOPIC = "streamml.phishing.features"


def phishing() -> list[tuple[dict[str, Any], bool]]:
    return list(datasets.Phishing())


def new_learner(**overrides: Any) -> OnlineLearner:
    kwargs: dict[str, Any] = {
        "pipeline": "phishing",
        "model_name": "online",
        "estimator_spec": SPEC,
        "params": {},
        "regression": False,
        "signing_key": KEY,
    }
    kwargs.update(overrides)
    return OnlineLearner(**kwargs)


def test_prequential_accuracy_equals_a_hand_written_river_loop() -> None:
    data = phishing()
    learner = new_learner()
    got = [learner.learn(x, y) for x, y in data]

    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    accuracy = metrics.Accuracy()
    expected = []
    for x, y in data:
        proba = model.predict_proba_one(x)
        y_pred = max(proba, key=proba.__getitem__) if proba else None
        accuracy.update(y, y_pred)
        model.learn_one(x, y)
        expected.append(y_pred)

    assert got == expected
    values = learner.metric_values()
    assert values["accuracy"] == accuracy.get()
    assert values["events_seen"] == 1250.0 and learner.events_seen == 1250
    assert 0.8 < values["accuracy"] < 1.0
    assert set(values) == {"accuracy", "log_loss", "events_seen"}


def test_regression_learner_tracks_mae_and_rmse_like_river() -> None:
    data = list(itertools.islice(datasets.TrumpApproval(), 200))
    learner = new_learner(
        pipeline="trump",
        estimator_spec="preprocessing.StandardScaler | linear_model.LinearRegression",
        params={"linear_model.LinearRegression": '{"intercept_lr": 0.1}'},
        regression=True,
    )
    got = [learner.learn(x, str(y)) for x, y in data]  # labels as text are read as numbers

    model = preprocessing.StandardScaler() | linear_model.LinearRegression(intercept_lr=0.1)
    mae, rmse = metrics.MAE(), metrics.RMSE()
    expected = []
    for x, y in data:
        y_pred = model.predict_one(x)
        mae.update(y, y_pred)
        rmse.update(y, y_pred)
        model.learn_one(x, y)
        expected.append(y_pred)
    assert got == expected
    values = learner.metric_values()
    assert (values["mae"], values["rmse"]) == (mae.get(), rmse.get())
    assert set(values) == {"mae", "rmse", "events_seen"}


def test_snapshot_fields_and_lineage() -> None:
    data = phishing()
    learner = new_learner(params={"linear_model.LogisticRegression": '{"l2": 0.0}'})
    for offset, (x, y) in enumerate(data[:10], start=100):
        learner.consumed(TOPIC, 0, offset)
        learner.learn(x, y)
    learner.consumed(TOPIC, 1, 5)  # an unlabelled record still advances the resume point
    first = learner.snapshot(now_ms=1_700_000_000_000)

    assert (first["pipeline"], first["model_name"], first["kind"]) == ("phishing", "online", "ONLINE")
    assert (first["version"], first["parent_version"], first["events_seen"]) == (1, None, 10)
    assert first["estimator_spec"] == SPEC
    assert first["params"] == {"linear_model.LogisticRegression": '{"l2": 0.0}'}
    assert first["artifact_format"] == "pickle" and first["artifact_uri"] is None
    assert first["sha256"] == artifacts.sha256_hex(first["artifact"])
    assert first["signature"] == artifacts.sign(first["artifact"], KEY)
    assert artifacts.verify(first, KEY) == first["artifact"]
    assert first["training_data"] == [
        {"topic": TOPIC, "partition": 0, "start_offset": 100, "end_offset": 110},
        {"topic": TOPIC, "partition": 1, "start_offset": 5, "end_offset": 6},
    ]
    assert first["metrics"] == learner.metric_values() and first["metrics"]["events_seen"] == 10.0
    assert first["created_at"] == 1_700_000_000_000
    assert first["library_versions"]["river"] == "0.26.1"
    state = artifacts.load(first, KEY)
    assert set(state) == {"model", "metrics"}
    assert state["model"].predict_proba_one(data[10][0]) == learner.model.predict_proba_one(data[10][0])

    assert ModelVersion.model_validate(first).to_avro() == first
    codec = codec_for("ModelVersion")
    assert codec.decode(codec.encode(first)) == first

    for offset, (x, y) in enumerate(data[10:15], start=110):
        learner.consumed(TOPIC, 0, offset)
        learner.learn(x, y)
    second = learner.snapshot(now_ms=1_700_000_000_001)
    assert (second["version"], second["parent_version"], second["events_seen"]) == (2, 1, 15)
    assert second["training_data"][0] == {
        "topic": TOPIC,
        "partition": 0,
        "start_offset": 100,
        "end_offset": 115,
    }
    assert second["sha256"] != first["sha256"]


def test_snapshot_signature_does_not_verify_with_another_key() -> None:
    learner = new_learner()
    x, y = phishing()[0]
    learner.learn(x, y)
    with pytest.raises(ArtifactRejectedError, match="bad signature"):
        artifacts.verify(learner.snapshot(now_ms=1), b"other-key")


def test_resume_continues_with_identical_predictions() -> None:
    data = phishing()
    original = new_learner()
    for offset, (x, y) in enumerate(data[:300]):
        original.consumed(TOPIC, 0, offset)
        original.learn(x, y)
    codec = codec_for("ModelVersion")
    record = codec.decode(codec.encode(original.snapshot(now_ms=1)))  # as read back from the topic

    resumed = OnlineLearner.resume(record, regression=False, signing_key=KEY)
    assert (resumed.version, resumed.events_seen, resumed.estimator_spec) == (1, 300, SPEC)
    assert resumed.metric_values() == original.metric_values()
    assert resumed.positions == {(TOPIC, 0): 300} and resumed.first_offsets == {(TOPIC, 0): 0}
    assert resumed.model is not original.model

    next_events = list(enumerate(data[300:400], start=300))
    for offset, _event in next_events:
        original.consumed(TOPIC, 0, offset)
        resumed.consumed(TOPIC, 0, offset)
    a = [original.learn(x, y) for _o, (x, y) in next_events]
    b = [resumed.learn(x, y) for _o, (x, y) in next_events]
    assert len(a) == 100 and a == b
    probe = data[400][0]
    assert resumed.model.predict_proba_one(probe) == original.model.predict_proba_one(probe)
    assert resumed.metric_values() == original.metric_values()

    snap = resumed.snapshot(now_ms=2)
    assert (snap["version"], snap["parent_version"], snap["events_seen"]) == (2, 1, 400)
    assert snap["training_data"] == [{"topic": TOPIC, "partition": 0, "start_offset": 0, "end_offset": 400}]


def test_resume_refuses_an_artifact_signed_with_another_key() -> None:
    learner = new_learner()
    x, y = phishing()[0]
    learner.learn(x, y)
    with pytest.raises(ArtifactRejectedError):
        OnlineLearner.resume(learner.snapshot(now_ms=1), regression=False, signing_key=b"other")


def test_due_by_events() -> None:
    data = phishing()
    learner = new_learner()
    assert not learner.due(every_events=3, every_seconds=3600)
    for x, y in data[:2]:
        learner.learn(x, y)
    assert not learner.due(every_events=3, every_seconds=3600)
    learner.learn(*data[2])
    assert learner.due(every_events=3, every_seconds=3600)
    learner.snapshot(now_ms=1)
    assert not learner.due(every_events=3, every_seconds=3600)


def test_due_by_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    data = phishing()
    learner = new_learner()
    learner.learn(*data[0])
    learner.snapshot(now_ms=1)  # the snapshot clock starts at 1000.0
    clock[0] = 1100.0
    assert not learner.due(every_events=1000, every_seconds=60)  # time passed but nothing new learned
    clock[0] = 1000.0
    learner.learn(*data[1])
    clock[0] = 1059.9
    assert not learner.due(every_events=1000, every_seconds=60)
    clock[0] = 1060.0
    assert learner.due(every_events=1000, every_seconds=60)
    learner.snapshot(now_ms=2)
    learner.learn(*data[2])
    assert not learner.due(every_events=1000, every_seconds=60)


class _FixedProba:
    """A stand-in model whose probabilities are known, to check the log loss exactly."""

    def __init__(self, proba: dict[Any, float]) -> None:
        self.proba = proba

    def predict_proba_one(self, x: dict[str, Any]) -> dict[Any, float]:
        return self.proba

    def learn_one(self, x: dict[str, Any], y: Any) -> None:
        return None


def test_log_loss_of_boolean_labels() -> None:
    learner = new_learner(model=_FixedProba({True: 0.9, False: 0.1}))
    assert learner.learn({}, True) is True
    assert learner.metric_values()["log_loss"] == pytest.approx(-math.log(0.9))


def test_log_loss_of_string_labels() -> None:
    learner = new_learner(model=_FixedProba({"cat": 0.9, "dog": 0.05, "eel": 0.05}))
    assert learner.learn({}, "cat") == "cat"
    assert learner.metric_values()["log_loss"] == pytest.approx(-math.log(0.9))


# --- label join ----------------------------------------------------------------------------------


def fv(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "pipeline": "p", "features": {"x": 1.0}, "label": None}


def test_label_after_features_joins() -> None:
    join = LabelJoin(ttl_s=10)
    features = fv("e1")
    assert join.add_features(features, now=0.0) is None
    assert join.add_label("e1", "spam", now=1.0) == {**features, "label": "spam"}
    assert features["label"] is None  # the stored vector is not mutated
    assert not join.features and not join.labels


def test_label_before_features_joins() -> None:
    join = LabelJoin(ttl_s=10)
    assert join.add_label("e1", 4.5, now=0.0) is None
    assert join.add_features(fv("e1"), now=2.0) == {**fv("e1"), "label": 4.5}
    assert not join.features and not join.labels


def test_unrelated_ids_do_not_join() -> None:
    join = LabelJoin(ttl_s=10)
    assert join.add_features(fv("e1"), now=0.0) is None
    assert join.add_label("e2", True, now=0.0) is None
    assert list(join.features) == ["e1"] and list(join.labels) == ["e2"]


def test_entries_expire_after_the_ttl_and_are_counted() -> None:
    join = LabelJoin(ttl_s=10)
    join.add_features(fv("old"), now=0.0)
    join.add_features(fv("new"), now=5.0)
    join.add_label("orphan", 1, now=3.0)
    join.expire(now=9.9)
    assert join.expired == 0
    join.expire(now=10.0)
    assert join.expired == 1 and list(join.features) == ["new"] and list(join.labels) == ["orphan"]
    join.expire(now=15.0)
    assert join.expired == 3 and not join.features and not join.labels
    # a label for expired features waits on its own instead of joining
    assert join.add_label("old", 1, now=16.0) is None
    assert list(join.labels) == ["old"]
