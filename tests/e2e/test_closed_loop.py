"""The whole loop through topics only: drift, alert, retrain, shadow challenger, promotion, recovery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Message

from streamml import control
from streamml.sources import open_source
from tests.e2e.conftest import System, SystemFactory, promote, publish_version

DRIFT_AT = 10_000
WIDTH = 100  # 4·position/width = 400 stays under River's math.exp limit (709)
TOTAL = 60_000  # produced until the promoted challenger has served 5k events (usually ~25k in all)


def _stream() -> list[dict[str, Any]]:
    spec = f"drift:agrawal?position={DRIFT_AT}&width={WIDTH}&before=0&after=4&seed=11"
    return [e.value for e in open_source(spec, limit=TOTAL)]


def _produce(system: System, events: list[dict[str, Any]], rate: float, stop: threading.Event) -> None:
    producer = system.producer()
    topic = system.catalogue.raw("agrawal").name
    start = time.monotonic()
    for i, event in enumerate(events):
        if stop.is_set():
            break
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, json.dumps(event).encode())
        producer.poll(0)
    assert producer.flush(30) == 0


@pytest.mark.slow
def test_drift_is_detected_retrained_and_the_challenger_promoted(make_system: SystemFactory) -> None:
    run_closed_loop(make_system(partitions=1))


def run_closed_loop(system: System) -> None:
    """Drift → alert → retrain → shadow → promotion → recovery, checked on the topics (one partition)."""
    system.apply(
        "agrawal",
        snapshot_every_events=2000,
        snapshot_every_seconds=3600.0,
        policy={"retrain_window_events": 3000, "challenger_min_labels": 500, "challenger_margin": 0.01},
    )
    system.stack.start_all(["features", "learner", "predictor", "monitor", "trainer", "controller"])
    events = _stream()
    index = {e["event_id"]: i for i, e in enumerate(events)}
    labels = {e["event_id"]: e["label"] for e in events}
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(system, events, 1000.0, stop))
    producer.start()
    try:
        decisions = system.records(
            system.read(system.catalogue.promotions().name, _controller_promoted(system), timeout_s=90),
            "Promotion",
        )
        promotion = next(d for d in decisions if d["action"] == "PROMOTE" and d["actor"] == "controller")
        promoted = (promotion["model_name"], promotion["version"])
        predictions_topic = system.catalogue.predictions("agrawal").name
        msgs = system.read(predictions_topic, _served_by(system, promoted, 5000), timeout_s=90)
    finally:  # events flow until the promoted challenger has served 5k of them
        stop.set()
        producer.join()
    assert any(d["action"] == "SHADOW" and d["version"] == promotion["version"] for d in decisions)
    alerts = system.records(
        system.read(system.catalogue.drift_alerts().name, lambda m: len(m) > 0), "DriftAlert"
    )
    concept = [a for a in alerts if a["kind"] == "CONCEPT"]
    assert concept, f"no concept drift alert: {alerts}"

    # Detection delay in events: the alert's window ends at the labelled event that made the detector fire.
    # One partition and no malformed events, so a features-topic offset is the event's position in the stream.
    features_topic = system.catalogue.features("agrawal").name
    first = min(concept, key=lambda a: a["detected_at"])
    detected_at_event = max(r["end_offset"] for r in first["window"] if r["topic"] == features_topic) - 1
    delay = detected_at_event - DRIFT_AT
    by_index = sorted(system.records(msgs, "Prediction"), key=lambda p: index[p["event_id"]])
    served_by_challenger = [p for p in by_index if (p["model_name"], p["model_version"]) == promoted][:5000]
    recovery = index[served_by_challenger[0]["event_id"]] - DRIFT_AT
    print(
        f"drift alert after {delay} events; {promoted} promoted and serving {recovery} events after the drift"
    )
    assert 0 <= delay <= 500

    def accuracy(rows: list[dict[str, Any]]) -> float:
        return sum(1 for p in rows if p["prediction"] == labels[p["event_id"]]) / len(rows)

    before = accuracy([p for p in by_index if DRIFT_AT - 5000 <= index[p["event_id"]] < DRIFT_AT])
    assert len(served_by_challenger) == 5000
    after = accuracy(served_by_challenger)
    print(f"served accuracy: {before:.4f} before the drift, {after:.4f} over 5k events after the promotion")
    assert after >= before - 0.02


def _controller_promoted(system: System) -> Callable[[list[Message]], bool]:
    def check(msgs: list[Message]) -> bool:
        return any(
            d["action"] == "PROMOTE" and d["actor"] == "controller" for d in system.records(msgs, "Promotion")
        )

    return check


def _served_by(system: System, model: tuple[str, int], n: int) -> Callable[[list[Message]], bool]:
    """Counts incrementally: the predictions topic grows to tens of thousands of records."""
    seen = {"decoded": 0, "matching": 0}

    def check(msgs: list[Message]) -> bool:
        new = system.records(msgs[seen["decoded"] :], "Prediction")
        seen["decoded"] = len(msgs)
        seen["matching"] += sum(1 for p in new if (p["model_name"], p["model_version"]) == model)
        return seen["matching"] >= n

    return check


def test_a_worse_challenger_is_discarded_never_promoted(make_system: SystemFactory) -> None:
    """A challenger trained on another concept (function 4) shadows a champion that fits the stream (0)."""
    from tests.e2e.test_monitor import _agrawal_version

    system = make_system(partitions=1)
    definition = system.apply(
        "agrawal",
        promotion="manual",
        snapshot_every_events=1_000_000,
        snapshot_every_seconds=3600.0,
        policy={"challenger_min_labels": 300, "challenger_max_labels": 1500, "challenger_margin": 0.0},
    )
    publish_version(system, _agrawal_version(system, definition, 1, function=0))
    publish_version(system, _agrawal_version(system, definition, 2, function=4))
    promote(system, "agrawal", 1)
    shadow = {"pipeline": "agrawal", "model_name": "online", "action": "SHADOW", "version": 2,
              "previous_version": 1, "actor": "test", "reason": "a worse challenger", "metrics": {},
              "decided_at": int(time.time() * 1000)}  # fmt: skip
    control.publish(
        system.settings, system.catalogue.promotions().name, "Promotion", "agrawal/online/w", shadow
    )
    system.stack.start_all(["features", "predictor", "monitor", "controller"])
    events = [
        e.value for e in open_source("river:synth.Agrawal?classification_function=0&seed=5", limit=3000)
    ]
    stop = threading.Event()
    _produce(system, events, 2000.0, stop)

    def decided(msgs: list[Message]) -> bool:
        return any(d["actor"] == "controller" for d in system.records(msgs, "Promotion"))

    decisions = system.records(
        system.read(system.catalogue.promotions().name, decided, timeout_s=60), "Promotion"
    )
    by_controller = [d for d in decisions if d["actor"] == "controller"]
    assert [(d["action"], d["version"]) for d in by_controller] == [("DISCARD", 2)]
    assert "did not win" in by_controller[0]["reason"]
    evaluations = system.records(
        system.read(system.catalogue.evaluations().name, lambda m: len(m) > 0), "Evaluation"
    )
    assert all(e["challenger_value"] < e["champion_value"] for e in evaluations)
    preds = system.records(
        system.read(system.catalogue.predictions("agrawal").name, lambda m: len(m) >= 3000), "Prediction"
    )
    assert {(p["model_name"], p["model_version"]) for p in preds} == {("online", 1)}, "never served"
