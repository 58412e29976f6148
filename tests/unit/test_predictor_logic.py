"""ModelRegistry and prediction records without a broker: promotions, swaps, rejected artifacts."""

from __future__ import annotations

from typing import Any

import numpy as np
from river import linear_model, preprocessing

from streamml import artifacts
from streamml.codec import codec_for
from streamml.records import Prediction
from streams.predictor import LiveModel, ModelRegistry, RegistryEvent, predict_one, prediction_record

KEY = b"predictor-test-key"
PIPE = "loans"
PROBE = {"x": 2.0, "y": -1.0}


def classifier(n: int) -> Any:
    """A River classifier trained on n points; different n gives different probabilities."""
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    for i in range(n):
        model.learn_one({"x": float(i % 7), "y": float(i % 3) - 1.0}, i % 7 > 3)
    return model


def regressor(n: int) -> Any:
    model = linear_model.LinearRegression()
    for i in range(n):
        model.learn_one({"x": float(i % 5), "y": 1.0}, 2.0 * (i % 5) + 1.0)
    return model


def version(
    model: Any, v: int, *, name: str = "online", pipeline: str = PIPE, key: bytes = KEY
) -> dict[str, Any]:
    """A ModelVersion record like the learner publishes (artifact = {"model": ..., "metrics": ...})."""
    data = artifacts.serialize({"model": model, "metrics": {}})
    return {
        "pipeline": pipeline,
        "model_name": name,
        "version": v,
        "kind": "ONLINE",
        "estimator_spec": "preprocessing.StandardScaler | linear_model.LogisticRegression",
        "params": {},
        "artifact_format": "pickle",
        "artifact": data,
        "artifact_uri": None,
        "sha256": artifacts.sha256_hex(data),
        "signature": artifacts.sign(data, key),
        "library_versions": {},
        "metrics": {},
        "training_data": [],
        "events_seen": v * 10,
        "parent_version": v - 1 or None,
        "created_at": 1_700_000_000_000 + v,
    }


def decision(
    v: int, action: str = "PROMOTE", *, name: str = "online", pipeline: str = PIPE
) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "model_name": name,
        "action": action,
        "version": v,
        "previous_version": None,
        "actor": "auto",
        "reason": "test",
        "metrics": {},
        "decided_at": 1_700_000_000_000 + v,
    }


def tampered(record: dict[str, Any]) -> dict[str, Any]:
    data = bytearray(record["artifact"])
    data[len(data) // 2] ^= 0xFF
    return {**record, "artifact": bytes(data)}


def feature_vector(event_id: str = "e-1", features: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "key": "k-1",
        "pipeline": PIPE,
        "pipeline_revision": 1,
        "features": PROBE if features is None else features,
        "label": None,
        "event_time": 1_700_000_000_100,
        "feature_time": 1_700_000_000_200,
        "source": None,
    }


def test_version_without_promotion_does_not_go_live() -> None:
    registry = ModelRegistry(signing_key=KEY)
    assert registry.on_version(version(classifier(10), 1)) == []
    assert registry.live == {}


def test_promotion_of_a_received_version_swaps_it_in() -> None:
    registry = ModelRegistry(signing_key=KEY)
    model = classifier(30)
    registry.on_version(version(model, 1))
    events = registry.on_promotion(decision(1))
    assert events == [RegistryEvent("swap", PIPE, "online", 1, None)]
    live = registry.live[PIPE]
    assert (live.pipeline, live.model_name, live.version, live.regression) == (PIPE, "online", 1, False)
    assert live.model.predict_proba_one(PROBE) == model.predict_proba_one(PROBE)


def test_promotion_before_the_version_arrives_activates_on_arrival() -> None:
    registry = ModelRegistry(signing_key=KEY)
    assert registry.on_promotion(decision(1)) == []
    assert registry.live == {} and registry.wanted == {PIPE: ("online", 1)}
    assert registry.on_version(version(classifier(5), 2)) == []  # not the one wanted
    assert registry.live == {}
    assert registry.on_version(version(classifier(5), 1)) == [RegistryEvent("swap", PIPE, "online", 1, None)]
    assert registry.live[PIPE].version == 1 and registry.wanted == {}


def test_swap_reports_the_previous_version_and_rollback_goes_back() -> None:
    registry = ModelRegistry(signing_key=KEY)
    for v in (1, 2, 3):
        registry.on_version(version(classifier(10 * v), v))
    registry.on_promotion(decision(1))
    assert registry.on_promotion(decision(3)) == [RegistryEvent("swap", PIPE, "online", 3, 1)]
    assert registry.on_promotion(decision(2, "ROLLBACK")) == [RegistryEvent("swap", PIPE, "online", 2, 3)]
    assert registry.live[PIPE].version == 2


def test_tampered_version_is_rejected_and_the_live_model_keeps_serving() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    before = registry.live[PIPE]
    registry.on_version(tampered(version(classifier(40), 2)))
    events = registry.on_promotion(decision(2))
    assert len(events) == 1
    event = events[0]
    assert (event.kind, event.pipeline, event.model_name, event.version, event.previous_version) == (
        "rejected", PIPE, "online", 2, 1,
    )  # fmt: skip
    assert "SHA-256 mismatch" in event.reason
    assert registry.live[PIPE] is before
    assert (PIPE, "online", 2) in registry.rejected
    assert registry.wanted == {}
    assert prediction_record(registry.live[PIPE], feature_vector(), 5)["model_version"] == 1


def test_version_signed_with_another_key_is_rejected_when_it_arrives_after_promotion() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    assert registry.on_promotion(decision(2)) == []
    events = registry.on_version(version(classifier(40), 2, key=b"attacker"))
    assert [(e.kind, e.version, e.previous_version) for e in events] == [("rejected", 2, 1)]
    assert "bad signature" in events[0].reason
    assert registry.live[PIPE].version == 1
    # the rejected promotion is not pending any more: a re-delivered record does not retry the swap
    assert registry.on_version(version(classifier(40), 2, key=b"attacker")) == []


def test_a_forged_version_promoted_then_overridden_is_still_rejected_when_it_arrives() -> None:
    # The decision overtakes its version record, a later decision overrides it before the record arrives:
    # the forgery is never served, and it is still reported (verified without unpickling) on arrival.
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    assert registry.on_promotion(decision(99) | {"actor": "user"}) == []
    registry.on_version(version(classifier(30), 2))
    assert [(e.kind, e.version) for e in registry.on_promotion(decision(2))] == [("swap", 2)]
    events = registry.on_version(version(classifier(40), 99, key=b"attacker"))
    assert [(e.kind, e.version) for e in events] == [("rejected", 99)]
    assert "bad signature" in events[0].reason
    assert registry.live[PIPE].version == 2 and (PIPE, "online", 99) in registry.rejected
    assert registry.on_version(version(classifier(40), 99, key=b"attacker")) == []  # reported once
    # A genuine version named the same way is verified quietly and stays available.
    assert registry.on_promotion(decision(3) | {"actor": "user"}) == []
    registry.on_promotion(decision(2) | {"actor": "user"})
    assert registry.on_version(version(classifier(50), 3)) == []
    assert registry.live[PIPE].version == 2 and (PIPE, "online", 3) not in registry.rejected


def test_registry_without_a_key_rejects_everything() -> None:
    registry = ModelRegistry(signing_key=None)
    registry.on_version(version(classifier(5), 1))
    events = registry.on_promotion(decision(1))
    assert [e.kind for e in events] == ["rejected"] and "no verify keys" in events[0].reason
    assert registry.live == {}


def test_repromoting_the_live_version_is_a_no_op() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    live = registry.live[PIPE]
    assert registry.on_promotion(decision(1)) == []
    assert registry.on_promotion(decision(1, "ROLLBACK")) == []
    assert registry.live[PIPE] is live


def test_discard_does_not_swap() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    registry.on_version(version(classifier(40), 2))
    assert registry.on_promotion(decision(2, "DISCARD")) == []
    assert registry.on_promotion(decision(3, "DISCARD")) == []
    assert registry.live[PIPE].version == 1
    assert registry.wanted == {}
    assert registry.on_version(version(classifier(40), 3)) == []


def test_shadow_scores_a_challenger_without_serving_it() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    registry.on_version(version(classifier(40), 2))
    events = registry.on_promotion(decision(2, "SHADOW"))
    assert [e.kind for e in events] == ["shadow"]
    assert registry.live[PIPE].version == 1 and registry.shadow[PIPE].version == 2
    # promoting the challenger makes it the champion and ends the shadow
    assert [e.kind for e in registry.on_promotion(decision(2))] == ["swap"]
    assert registry.live[PIPE].version == 2 and PIPE not in registry.shadow
    # a discarded challenger stops being scored
    registry.on_version(version(classifier(60), 3))
    registry.on_promotion(decision(3, "SHADOW"))
    assert [e.kind for e in registry.on_promotion(decision(3, "DISCARD"))] == ["unshadow"]
    assert PIPE not in registry.shadow and registry.live[PIPE].version == 2
    # a SHADOW decision that overtakes its version record takes effect when the version arrives
    assert registry.on_promotion(decision(9, "SHADOW")) == []
    assert [e.kind for e in registry.on_version(version(classifier(60), 9))] == ["shadow"]
    assert registry.shadow[PIPE].version == 9 and registry.live[PIPE].version == 2


def test_pipelines_are_independent() -> None:
    registry = ModelRegistry(signing_key=KEY, regression={"prices": True})
    registry.on_version(version(classifier(20), 1))
    registry.on_version(version(regressor(20), 1, pipeline="prices"))
    registry.on_promotion(decision(1))
    registry.on_promotion(decision(1, pipeline="prices"))
    assert registry.live[PIPE].regression is False
    assert registry.live["prices"].regression is True
    assert registry.live["prices"].model is not registry.live[PIPE].model


def test_rollback_to_the_live_version_cancels_a_pending_promotion() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    registry.on_promotion(decision(2))  # v2 not received yet: pending
    registry.on_promotion(decision(1, "ROLLBACK"))  # the operator goes back to v1 (still live)
    registry.on_version(version(classifier(40), 2))  # v2 arrives late
    assert registry.live[PIPE].version == 1  # the latest decision says v1


def test_classification_prediction_record() -> None:
    model = classifier(50)
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(model, 4))
    registry.on_promotion(decision(4))
    record = prediction_record(registry.live[PIPE], feature_vector(), 1_700_000_000_999)
    proba = model.predict_proba_one(PROBE)
    best = max(proba, key=proba.__getitem__)
    assert record == {
        "event_id": "e-1",
        "key": "k-1",
        "pipeline": PIPE,
        "model_name": "online",
        "model_version": 4,
        "prediction": best,
        "score": proba[best],
        "probabilities": {"False": proba[False], "True": proba[True]},
        "shadow": False,
        "event_time": 1_700_000_000_100,
        "feature_time": 1_700_000_000_200,
        "prediction_time": 1_700_000_000_999,
        "source": None,
    }
    assert isinstance(record["prediction"], bool)
    assert Prediction.model_validate(record).to_avro() == record
    assert codec_for("Prediction").decode(codec_for("Prediction").encode(record)) == record


def test_regression_prediction_record_has_no_probabilities() -> None:
    model = regressor(200)
    registry = ModelRegistry(signing_key=KEY, regression={PIPE: True})
    registry.on_version(version(model, 1))
    registry.on_promotion(decision(1))
    record = prediction_record(
        registry.live[PIPE], feature_vector(features={"x": 3.0, "y": 1.0}), 7, shadow=True
    )
    assert record["prediction"] == model.predict_one({"x": 3.0, "y": 1.0})
    assert isinstance(record["prediction"], float)
    assert record["score"] is None and record["probabilities"] == {}
    assert record["shadow"] is True and record["model_version"] == 1
    assert codec_for("Prediction").decode(codec_for("Prediction").encode(record)) == record


def test_every_prediction_names_the_live_version() -> None:
    registry = ModelRegistry(signing_key=KEY)
    for v in (1, 2):
        registry.on_version(version(classifier(10 * v), v))
    served = []
    for v in (1, 2, 1):
        registry.on_promotion(decision(v, "PROMOTE" if v == 2 else "ROLLBACK"))
        live = registry.live[PIPE]
        served += [prediction_record(live, feature_vector(f"e{i}"), i)["model_version"] for i in range(3)]
    assert served == [1, 1, 1, 2, 2, 2, 1, 1, 1]


class _NoAnswer:
    def predict_proba_one(self, x: dict[str, Any]) -> dict[Any, float]:
        return {}

    def predict_one(self, x: dict[str, Any]) -> None:
        return None


class _NumpyLabels:
    def predict_proba_one(self, x: dict[str, Any]) -> dict[Any, float]:
        return {np.int64(0): 0.25, np.int64(1): 0.75}


def test_model_without_an_answer_yet() -> None:
    assert predict_one(LiveModel(PIPE, "m", 1, _NoAnswer(), regression=False), PROBE) == (None, None, {})
    assert predict_one(LiveModel(PIPE, "m", 1, _NoAnswer(), regression=True), PROBE) == (None, None, {})
    record = prediction_record(LiveModel(PIPE, "m", 1, _NoAnswer(), regression=False), feature_vector(), 1)
    assert record["prediction"] is None and record["score"] is None and record["probabilities"] == {}


def test_numpy_labels_become_plain_python_values() -> None:
    record = prediction_record(LiveModel(PIPE, "m", 2, _NumpyLabels(), regression=False), feature_vector(), 1)
    assert record["prediction"] == 1 and type(record["prediction"]) is int
    assert record["score"] == 0.75 and record["probabilities"] == {"0": 0.25, "1": 0.75}
    assert codec_for("Prediction").encode(record)


def test_auto_promotions_never_override_another_model_put_live() -> None:
    registry = ModelRegistry(signing_key=KEY)
    registry.on_version(version(classifier(20), 1))
    registry.on_promotion(decision(1))
    registry.on_version({**version(classifier(40), 1), "model_name": "batch"})
    registry.on_promotion({**decision(1, name="batch"), "actor": "controller"})
    assert (registry.live[PIPE].model_name, registry.live[PIPE].version) == ("batch", 1)
    registry.on_version(version(classifier(60), 2))
    assert registry.on_promotion(decision(2)) == []  # the learner's AUTO promotion arrives late: ignored
    assert registry.live[PIPE].model_name == "batch"
    assert [e.kind for e in registry.on_promotion({**decision(2), "actor": "alice"})] == ["swap"]


def test_batch_scoring_equals_one_by_one_for_river_and_scikit_learn_models() -> None:
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.tree import DecisionTreeClassifier

    from streams.predictor import LiveModel, prediction_record, prediction_records
    from streams.trainer import BatchModel

    xs = [{"a": float(i % 7), "b": float(i % 3)} for i in range(60)]
    ys = [x["a"] > 3 for x in xs]
    vectorizer = DictVectorizer(sort=True)
    tree = DecisionTreeClassifier(random_state=0).fit(vectorizer.fit_transform(xs), [int(y) for y in ys])
    river_model = classifier(20)
    base = {"key": None, "pipeline": PIPE, "event_time": 1, "feature_time": 2}
    fvs = [{**base, "event_id": f"e{i}", "features": x} for i, x in enumerate(xs)]
    for model in (BatchModel(vectorizer, tree, [False, True]), river_model):
        live = LiveModel(PIPE, "m", 1, model, regression=False)
        assert prediction_records(live, fvs, 5) == [prediction_record(live, fv, 5) for fv in fvs]


def test_only_servable_artifacts_stay_in_memory_and_old_ones_are_read_back_on_demand() -> None:
    published = {v: version(classifier(10 * v), v) for v in range(1, 8)}
    fetched: list[int] = []

    def fetch(pipeline: str, name: str, v: int) -> dict[str, Any] | None:
        fetched.append(v)
        return published.get(v)

    registry = ModelRegistry(signing_key=KEY, fetch=fetch, spare_bytes=0)
    registry.on_version(published[1])
    registry.on_promotion(decision(1))
    for v in range(2, 8):
        registry.on_version(published[v])
    registry.on_promotion(decision(5))  # v5 was dropped when v6 arrived: read back from the topic
    held = sorted(v for (_p, _m, v), r in registry.versions.items() if r["artifact"] is not None)
    assert held == [1, 5, 7]  # rollback target, live, newest
    assert fetched == [5]
    assert registry.live[PIPE].version == 5
    assert registry.on_promotion(decision(1, "ROLLBACK")) == [RegistryEvent("swap", PIPE, "online", 1, 5)]
    assert fetched == [5]  # the rollback target was kept


def test_a_rejected_artifact_is_not_kept() -> None:
    registry = ModelRegistry(signing_key=KEY, fetch=lambda *_: None)
    bad = {**version(classifier(10), 1), "signature": "00" * 32}
    registry.on_version(bad)
    registry.on_version(version(classifier(20), 2))
    assert registry.on_promotion(decision(1))[0].kind == "rejected"
    assert registry.versions[(PIPE, "online", 1)]["artifact"] is None
