"""The trainer end to end: requests in, signed BATCH versions with exact lineage and reasoned rejections out,
replays reproducing the model, and the predictor serving a trained version once it is promoted."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient
from river import datasets

from streamml import artifacts
from streamml.codec import codec_for
from streamml.sources import open_source
from tests.e2e.conftest import System, SystemFactory, promote

N_EVENTS = 3000
DELETED = 100  # records deleted from the start of partition 1, as retention would
HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
TREE = "sklearn.tree.DecisionTreeClassifier"


def _events() -> list[dict[str, Any]]:
    spec = "drift:agrawal?position=100000&width=1000&before=0&after=4&seed=5"  # no drift in the first 3k
    return [e.value for e in open_source(spec, limit=N_EVENTS)]


def _request(system: System, request_id: str, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": request_id,
        "pipeline": "agrawal",
        "model_name": "batch",
        "estimator_spec": HGB,
        "params": {HGB: json.dumps({"max_iter": 30})},
        "param_grid": {f"{HGB}.max_depth": ["2", "6"]},
        "data_ranges": [],
        "time_from": None,
        "time_to": None,
        "validation_split": 0.2,
        "seed": 42,
        "reason": "e2e",
        "requested_by": "test",
        "requested_at": int(time.time() * 1000),
    }
    record.update(overrides)
    return record


def _send(system: System, requests: list[dict[str, Any]]) -> None:
    producer = system.producer()
    codec = codec_for("TrainingRequest")
    for r in requests:
        producer.produce(system.catalogue.training_requests().name, codec.encode(r), r["pipeline"].encode())
    assert producer.flush(10) == 0


def _results(system: System, ids: set[str]) -> dict[str, dict[str, Any]]:
    topic = system.catalogue.training_results().name

    def answered(msgs: list[Any]) -> bool:
        return ids <= {r["request_id"] for r in system.records(msgs, "TrainingResult")}

    return {r["request_id"]: r for r in system.records(system.read(topic, answered, 60), "TrainingResult")}


def _versions(system: System, n: int) -> dict[int, dict[str, Any]]:
    def enough(msgs: list[Any]) -> bool:
        return sum(1 for v in system.records(msgs, "ModelVersion") if v["model_name"] == "batch") >= n

    msgs = system.read(system.catalogue.model_versions().name, enough, 30)
    return {v["version"]: v for v in system.records(msgs, "ModelVersion") if v["model_name"] == "batch"}


def test_trainer_trains_exact_slices_reproducibly_and_rejects_bad_requests(
    make_system: SystemFactory,
) -> None:
    system = make_system(partitions=2)
    system.apply("agrawal", promotion="manual")
    system.stack.start("features")
    system.stack.start("trainer")
    system.stack.wait_ready("features")
    system.stack.wait_ready("trainer")
    produced_from = int(time.time() * 1000)
    events = _events()
    producer = system.producer()
    for event in events:
        producer.produce(system.catalogue.raw("agrawal").name, json.dumps(event).encode())
    assert producer.flush(30) == 0
    features_topic = system.catalogue.features("agrawal").name
    feature_msgs = system.read(features_topic, lambda m: len(m) >= N_EVENTS, 60)
    ends = system.end_offsets(features_topic)
    assert sum(ends.values()) == N_EVENTS

    admin = AdminClient({"bootstrap.servers": system.settings.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(features_topic, 1, DELETED)]).values():
        assert future.result().low_watermark == DELETED  # the low watermark moved: offsets 0-99 are gone

    ranges = [
        {"topic": features_topic, "partition": 0, "start_offset": 0, "end_offset": ends[0]},
        {"topic": features_topic, "partition": 1, "start_offset": DELETED, "end_offset": ends[1]},
    ]
    tag = uuid.uuid4().hex[:6]
    valid = _request(system, f"valid-{tag}", data_ranges=ranges)
    bad = {
        "os-system": _request(system, f"os-{tag}", estimator_spec="os.system", param_grid={}, params={},
                              data_ranges=ranges),
        "river": _request(system, f"river-{tag}", estimator_spec="linear_model.LogisticRegression",
                          param_grid={}, params={}, data_ranges=ranges),
        "empty": _request(system, f"empty-{tag}", data_ranges=[{**ranges[0], "start_offset": 10,
                                                                "end_offset": 10}]),
        "beyond": _request(system, f"beyond-{tag}", data_ranges=[{**ranges[0], "end_offset": ends[0] + 50}]),
        "deleted": _request(system, f"deleted-{tag}", data_ranges=[{**ranges[1], "start_offset": 0,
                                                                    "end_offset": 50}]),
        "unknown": _request(system, f"unknown-{tag}", pipeline="no-such-pipeline", data_ranges=ranges),
    }  # fmt: skip
    replay = {**valid, "request_id": f"replay-{tag}"}
    _send(system, [valid, *bad.values(), replay])
    results = _results(
        system, {valid["request_id"], replay["request_id"], *(r["request_id"] for r in bad.values())}
    )

    # (c) rejected, each with a reason a person can act on, and the service still answers what follows
    reasons = {name: results[r["request_id"]]["reason"] for name, r in bad.items()}
    assert all(results[r["request_id"]]["status"] == "REJECTED" for r in bad.values()), results
    assert "'os.system' is not allowed" in reasons["os-system"]
    assert "is a River (online) estimator" in reasons["river"]
    assert "empty range" in reasons["empty"]
    assert f"goes beyond the end of the partition: its next offset is {ends[0]}" in reasons["beyond"]
    assert f"no longer exists: records before offset {DELETED} were deleted" in reasons["deleted"]
    assert "unknown pipeline 'no-such-pipeline'" in reasons["unknown"]
    assert all(results[r["request_id"]]["model_version"] is None for r in bad.values())

    # (a) a signed BATCH version whose lineage is the request
    first, second = results[valid["request_id"]], results[replay["request_id"]]
    assert (first["status"], first["reason"], first["model_version"]) == ("SUCCEEDED", "", 1), first
    labelled = N_EVENTS - DELETED
    assert (first["train_records"], first["holdout_records"]) == (labelled - 580, 580)
    assert first["metrics"]["accuracy"] > 0.9, first["metrics"]
    versions = _versions(system, 2)
    v1 = versions[1]
    assert (v1["kind"], v1["pipeline"], v1["estimator_spec"], v1["parent_version"]) == (
        "BATCH", "agrawal", HGB, None
    )  # fmt: skip
    assert v1["training_data"] == ranges and v1["events_seen"] == first["train_records"]
    assert (
        json.loads(v1["params"][HGB])["max_iter"] == 30
        and json.loads(v1["params"][HGB])["random_state"] == 42
    )
    assert json.loads(v1["params"][HGB])["max_depth"] in (2, 6)
    assert v1["metrics"] == first["metrics"]
    model_1 = artifacts.load(v1, system.key)["model"]  # verifies checksum and signature first

    # (b) the replay is a new version with the same model: same predictions, same metrics
    assert (second["status"], second["model_version"]) == ("SUCCEEDED", 2)
    assert second["metrics"] == first["metrics"]
    v2 = versions[2]
    assert (v2["training_data"], v2["params"]) == (v1["training_data"], v1["params"])
    model_2 = artifacts.load(v2, system.key)["model"]
    vectors = system.records(feature_msgs[:300], "FeatureVector")
    sample = [fv["features"] for fv in vectors]
    assert [model_1.predict_proba_one(x) for x in sample] == [model_2.predict_proba_one(x) for x in sample]
    assert {model_1.predict_one(x) for x in sample} == {0, 1}

    # the predictor loads and serves the trained version once it is promoted
    promote(system, "agrawal", 1, model_name="batch")
    system.stack.start("predictor")
    system.stack.wait_ready("predictor")
    preds = system.records(
        system.read(system.catalogue.predictions("agrawal").name, lambda m: len(m) >= 1, 30), "Prediction"
    )
    pred = preds[0]
    assert (pred["model_name"], pred["model_version"]) == ("batch", 1)
    fv = next(v for v in system.records(feature_msgs, "FeatureVector") if v["event_id"] == pred["event_id"])
    assert pred["prediction"] == model_1.predict_one(fv["features"])
    assert pred["score"] == max(model_1.predict_proba_one(fv["features"]).values())

    # a time range resolves to the same offsets, and the parent is the version live when it arrived
    by_time = _request(system, f"time-{tag}", estimator_spec=TREE, params={}, param_grid={},
                       time_from=produced_from)  # fmt: skip
    _send(system, [by_time])
    third = _results(system, {by_time["request_id"]})[by_time["request_id"]]
    assert (third["status"], third["model_version"]) == ("SUCCEEDED", 3), third
    v3 = _versions(system, 3)[3]
    assert v3["training_data"] == ranges and v3["parent_version"] == 1
    print(
        f"trained {labelled} records: grid of 2 HGB fits in {first['duration_ms']} ms, "
        f"replay {second['duration_ms']} ms, decision tree {third['duration_ms']} ms"
    )


def test_labels_topic_is_joined_by_event_id_and_recorded_in_the_lineage(make_system: SystemFactory) -> None:
    system = make_system(partitions=1)
    system.apply("phishing", label={"source": "topic", "field": None}, promotion="manual")
    system.stack.start("features")
    system.stack.start("trainer")
    rows = list(datasets.Phishing())
    producer = system.producer()
    for i, (x, _) in enumerate(rows):
        producer.produce(
            system.catalogue.raw("phishing").name, json.dumps({"event_id": f"p-{i}", **x}).encode()
        )
    labels_topic = system.catalogue.labels("phishing").name
    codec = codec_for("Label")
    labelled = [(f"p-{i}", y) for i, (_, y) in enumerate(rows[:1000])] + [("never-seen", True)]
    for event_id, y in labelled:
        label = {"event_id": event_id, "pipeline": "phishing", "label": y, "label_time": 0}
        producer.produce(labels_topic, codec.encode(label), event_id.encode())
    assert producer.flush(30) == 0
    features_topic = system.catalogue.features("phishing").name
    system.read(features_topic, lambda m: len(m) >= len(rows), 60)
    system.stack.wait_ready("trainer")

    features = {"topic": features_topic, "partition": 0, "start_offset": 0, "end_offset": len(rows)}
    some_labels = {"topic": labels_topic, "partition": 0, "start_offset": 0, "end_offset": 500}
    spec = "sklearn.preprocessing.StandardScaler | sklearn.linear_model.LogisticRegression"
    every = _request(system, "all-labels", pipeline="phishing", estimator_spec=spec, params={}, param_grid={},
                     data_ranges=[features])  # fmt: skip
    first_500 = {**every, "request_id": "first-500", "data_ranges": [features, some_labels]}
    _send(system, [every, first_500])
    results = _results(system, {"all-labels", "first-500"})
    assert results["all-labels"]["status"] == "SUCCEEDED", results["all-labels"]
    assert results["all-labels"]["train_records"] + results["all-labels"]["holdout_records"] == 1000
    assert results["all-labels"]["metrics"]["accuracy"] > 0.8
    assert results["first-500"]["train_records"] + results["first-500"]["holdout_records"] == 500
    versions = _versions(system, 2)
    every_labels = {"topic": labels_topic, "partition": 0, "start_offset": 0, "end_offset": len(labelled)}
    assert versions[1]["training_data"] == [features, every_labels]  # the labels read, as of the request
    assert versions[2]["training_data"] == [features, some_labels]
