"""The product end to end: raw JSON events in, predictions and dead letters out, learning as it goes."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from river import datasets, metrics

from streamml import estimators
from tests.e2e.conftest import System, SystemFactory

PHISHING = [(x, y) for x, y in datasets.Phishing()]


def _events() -> list[dict[str, Any]]:
    return [{"event_id": f"p-{i}", **x, "label": y} for i, (x, y) in enumerate(PHISHING)]


def _malformed() -> list[tuple[bytes, str]]:
    """~1 % broken events, each with (part of) the reason it must be dead-lettered with."""
    good = {"event_id": "bad", **PHISHING[0][0], "label": True}
    cases: list[tuple[bytes, str]] = []
    for i in range(13):
        kind = i % 5
        if kind == 0:
            cases.append((b'{"event_id": "bad-%d", "https": ' % i, "invalid JSON"))
        elif kind == 1:
            event = {**good, "event_id": f"bad-{i}"}
            del event["https"]
            cases.append((json.dumps(event).encode(), "missing required field 'https'"))
        elif kind == 2:
            cases.append((json.dumps({**good, "event_id": f"bad-{i}", "popup_window": "often"}).encode(),
                          "field 'popup_window': expected float"))  # fmt: skip
        elif kind == 3:
            cases.append((json.dumps({**good, "event_id": f"bad-{i}", "long_url": {"v": 1}}).encode(),
                          "field 'long_url' is an object"))  # fmt: skip
        else:
            event = {**good}
            del event["event_id"]
            cases.append((json.dumps(event).encode(), "missing or invalid event id"))
    return cases


def _metric_total(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_phishing_json_events_with_malformed_ones(system: System) -> None:
    system.apply("phishing", snapshot_every_events=250)
    system.stack.start_all(["features", "learner", "predictor"])
    events = _events()
    bad = _malformed()
    producer = system.producer()  # a plain confluent-kafka producer, not our CLI
    raw_topic = system.catalogue.raw("phishing").name
    step = len(events) // len(bad)
    sent_bad = 0
    for i, event in enumerate(events):
        producer.produce(raw_topic, json.dumps(event).encode())
        if i % step == step - 1 and sent_bad < len(bad):
            producer.produce(raw_topic, bad[sent_bad][0])
            sent_bad += 1
        producer.poll(0)
    assert producer.flush(30) == 0 and sent_bad == len(bad)

    predictions_topic = system.catalogue.predictions("phishing").name
    msgs = system.read(predictions_topic, lambda m: len(m) >= len(events))
    preds = system.records(msgs, "Prediction")
    ids = [p["event_id"] for p in preds]
    assert len(ids) == len(events), "one prediction per valid event"
    assert set(ids) == {e["event_id"] for e in events}
    assert all(p["model_version"] >= 1 and p["model_name"] == "online" for p in preds)
    assert all(p["prediction"] in (True, False) and 0.5 <= p["score"] <= 1.0 for p in preds)

    dlq_topic = system.catalogue.dead_letter("phishing").name
    dead = system.records(system.read(dlq_topic, lambda m: len(m) >= len(bad)), "DeadLetter")
    assert len(dead) == len(bad)
    by_bytes = {d["original_value"]: d for d in dead}
    for payload, reason in bad:
        letter = by_bytes[payload]  # the original bytes, unchanged
        assert reason in letter["error"], (reason, letter["error"])
        assert letter["source_topic"] == raw_topic and letter["service"] == "features"
        assert re.fullmatch(r"[A-Za-z]+Error", letter["error_type"])

    # counts add up in the service's own metrics: in = out + dead-lettered
    text = system.stack.services["features"].metrics_text()
    consumed = _metric_total(text, "streamml_events_in_total", service="features")
    produced = _metric_total(text, "streamml_events_out_total", service="features")
    dead_count = _metric_total(text, "streamml_events_dead_lettered_total", service="features")
    assert consumed == len(events) + len(bad)
    assert (produced, dead_count) == (len(events), len(bad))


def test_learner_accuracy_equals_in_process_river(make_system: SystemFactory) -> None:
    """Fidelity: same events, same order (one partition), same River pipeline → same prequential accuracy."""
    system = make_system(partitions=1)
    definition = system.apply("phishing", snapshot_every_events=250)
    system.stack.start("features")
    system.stack.start("learner")
    system.stack.wait_ready("features")
    system.stack.wait_ready("learner")
    producer = system.producer()
    for event in _events():
        producer.produce(system.catalogue.raw("phishing").name, json.dumps(event).encode())
    assert producer.flush(30) == 0

    def final_version(msgs: list) -> bool:
        return any(v["events_seen"] == len(PHISHING) for v in system.records(msgs, "ModelVersion"))

    versions = system.records(
        system.read(system.catalogue.model_versions().name, final_version), "ModelVersion"
    )
    last = next(v for v in versions if v["events_seen"] == len(PHISHING))
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5]
    assert [v["parent_version"] for v in versions] == [None, 1, 2, 3, 4]
    assert last["training_data"] == [
        {"topic": system.catalogue.features("phishing").name, "partition": 0, "start_offset": 0,
         "end_offset": len(PHISHING)}
    ]  # fmt: skip

    model_spec = definition["models"][0]
    model = estimators.build(model_spec["estimator_spec"], estimators.decode_params(model_spec["params"]))
    accuracy = metrics.Accuracy()
    for x, y in PHISHING:
        x = {k: float(v) for k, v in x.items()}
        proba = model.predict_proba_one(x)
        accuracy.update(y, max(proba, key=proba.__getitem__) if proba else None)
        model.learn_one(x, y)
    assert last["metrics"]["accuracy"] == accuracy.get()
    assert 0.8 < accuracy.get() < 1.0
