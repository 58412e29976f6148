"""The whole loop through topics only: drift, alert, retrain, shadow challenger, promotion, recovery."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from streamml.sources import open_source
from tests.e2e.conftest import System, SystemFactory

DRIFT_AT = 10_000
WIDTH = 100  # 4·position/width = 400 stays under River's math.exp limit (709)
TOTAL = 32_000


def _stream() -> list[dict[str, Any]]:
    spec = f"drift:agrawal?position={DRIFT_AT}&width={WIDTH}&before=0&after=4&seed=11"
    return [e.value for e in open_source(spec, limit=TOTAL)]


def _produce(system: System, events: list[dict[str, Any]], rate: float) -> None:
    producer = system.producer()
    topic = system.catalogue.raw("agrawal").name
    start = time.monotonic()
    for i, event in enumerate(events):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, json.dumps(event).encode())
        producer.poll(0)
    assert producer.flush(30) == 0


@pytest.mark.slow
def test_drift_is_detected_retrained_and_the_challenger_promoted(make_system: SystemFactory) -> None:
    system = make_system(partitions=1)
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
    _produce(system, events, rate=1000.0)

    def promoted(msgs: list) -> bool:
        return any(
            d["action"] == "PROMOTE" and d["actor"] == "controller" for d in system.records(msgs, "Promotion")
        )

    decisions = system.records(
        system.read(system.catalogue.promotions().name, promoted, timeout_s=120), "Promotion"
    )
    promotion = next(d for d in decisions if d["action"] == "PROMOTE" and d["actor"] == "controller")
    assert any(d["action"] == "SHADOW" and d["version"] == promotion["version"] for d in decisions)
    alerts = system.records(
        system.read(system.catalogue.drift_alerts().name, lambda m: len(m) > 0), "DriftAlert"
    )
    concept = [a for a in alerts if a["kind"] == "CONCEPT"]
    assert concept, f"no concept drift alert: {alerts}"

    preds = system.records(
        system.read(system.catalogue.predictions("agrawal").name, lambda m: len(m) >= TOTAL, timeout_s=120),
        "Prediction",
    )
    by_index = sorted(preds, key=lambda p: index[p["event_id"]])
    # Detection delay in events: the alert's window ends at the labelled event that made the detector fire.
    # One partition and no malformed events, so a features-topic offset is the event's position in the stream.
    features_topic = system.catalogue.features("agrawal").name
    first = min(concept, key=lambda a: a["detected_at"])
    detected_at_event = max(r["end_offset"] for r in first["window"] if r["topic"] == features_topic) - 1
    delay = detected_at_event - DRIFT_AT
    print(f"drift alert after {delay} events; promoted {promotion['model_name']} v{promotion['version']}")
    assert 0 <= delay <= 500

    def accuracy(rows: list[dict[str, Any]]) -> float:
        return sum(1 for p in rows if p["prediction"] == labels[p["event_id"]]) / len(rows)

    before = accuracy([p for p in by_index if DRIFT_AT - 5000 <= index[p["event_id"]] < DRIFT_AT])
    served_by_challenger = [p for p in by_index if p["model_name"] == promotion["model_name"]
                            and p["model_version"] == promotion["version"]][:5000]  # fmt: skip
    assert len(served_by_challenger) == 5000
    after = accuracy(served_by_challenger)
    print(f"served accuracy: {before:.4f} before the drift, {after:.4f} over 5k events after the promotion")
    assert after >= before - 0.02
