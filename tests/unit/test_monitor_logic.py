"""The monitor's pure logic: label join with TTL, per-version River metrics, drift detectors, evaluations."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from river import metrics, utils
from scipy.stats import ks_2samp

from streams.monitor import (
    MIN_RETRAIN_EVENTS,
    ConceptWatch,
    Monitor,
    MonitorOutput,
    PartitionedKS,
    PipelineMonitor,
    ks_test,
    offset_ranges,
    stateful_features,
)
from tests.unit.fakes import FakeMessage

FEATURES = "s.p.features"
PREDICTIONS = "s.p.predictions"


def definition(
    task: str = "BINARY",
    source: str = "INLINE",
    ttl: float = 60.0,
    steps: list[dict[str, Any]] | None = None,
    **monitoring: Any,
) -> dict[str, Any]:
    return {
        "name": "p",
        "task": task,
        "label": {"source": source, "field": "label" if source == "INLINE" else None, "ttl_seconds": ttl},
        "feature_steps": steps or [],
        "monitoring": {
            "concept_detector": "ADWIN",
            "concept_params": {},
            "data_window": 1000,
            "data_threshold": 1e-4,
            "cooldown_events": 2000,
            "metrics_window": 1000,
            **monitoring,
        },
        "deleted": False,
    }


def fv(event_id: str, features: dict[str, Any] | None = None, label: Any = None) -> dict[str, Any]:
    return {"event_id": event_id, "key": None, "pipeline": "p", "pipeline_revision": 1,
            "features": features or {}, "label": label, "event_time": 0, "feature_time": 0,
            "source": None}  # fmt: skip


def pred(
    event_id: str, prediction: Any, proba: dict[str, float] | None = None, version: int = 1,
    model: str = "online", shadow: bool = False,
) -> dict[str, Any]:  # fmt: skip
    proba = proba or {}
    return {"event_id": event_id, "key": None, "pipeline": "p", "model_name": model,
            "model_version": version, "prediction": prediction,
            "score": max(proba.values()) if proba else None, "probabilities": proba, "shadow": shadow,
            "event_time": 0, "feature_time": 0, "prediction_time": 0}  # fmt: skip


def promotion(
    version: int, action: str = "PROMOTE", actor: str = "auto", model: str = "online"
) -> dict[str, Any]:
    return {"pipeline": "p", "model_name": model, "action": action, "version": version, "actor": actor}


class Stream:
    """Feeds a PipelineMonitor as the service does: features (with inline label), then the prediction."""

    def __init__(self, pm: PipelineMonitor) -> None:
        self.pm = pm
        self.n = 0
        self.outputs: list[MonitorOutput] = []

    def event(
        self, features: dict[str, Any], label: Any, prediction: Any, proba: dict[str, float] | None = None,
        version: int = 1, model: str = "online",
    ) -> str:  # fmt: skip
        event_id = f"e{self.n}"
        self.outputs += self.pm.on_features(fv(event_id, features, label), (FEATURES, 0, self.n), 0.0, 0)
        record = pred(event_id, prediction, proba, version, model)
        self.outputs += self.pm.on_prediction(record, (PREDICTIONS, 0, self.n), 0.0, 0)
        self.n += 1
        return event_id

    def alerts(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [o.record for o in self.outputs if o.kind == "alert" and kind in (None, o.record["kind"])]


# -- the join ------------------------------------------------------------------------------------------------
def test_join_late_early_and_missing_labels_with_ttl_expiry() -> None:
    pm = PipelineMonitor(definition(source="TOPIC", ttl=10.0))
    pm.on_features(fv("a", {"x": 1.0}), (FEATURES, 0, 0), 0.0, 0)
    pm.on_prediction(pred("a", True, {"True": 0.9, "False": 0.1}), None, 0.0, 0)
    assert (pm.counts.labelled, pm.counts.unlabelled) == (0, 1)
    pm.on_label("a", True, 5.0, 0)  # late label, within the TTL
    assert (pm.counts.labelled, pm.counts.unlabelled) == (1, 0)

    pm.on_label("b", False, 6.0, 0)  # label before its prediction
    pm.on_features(fv("b", {"x": 2.0}), (FEATURES, 0, 1), 6.0, 0)
    pm.on_prediction(pred("b", True, {"True": 0.6, "False": 0.4}), None, 6.5, 0)
    assert pm.counts.labelled == 2
    assert not pm.entries, "fully joined events leave the join"

    pm.on_features(fv("c", {"x": 3.0}), (FEATURES, 0, 2), 7.0, 0)
    pm.on_prediction(pred("c", False, {"True": 0.2, "False": 0.8}), None, 7.0, 0)  # label never comes
    pm.on_label("d", True, 8.0, 0)  # prediction never comes
    pm.on_prediction(pred("a", True, {"True": 0.9, "False": 0.1}), None, 8.0, 0)  # redelivered duplicate
    assert pm.counts.unlabelled == 1
    pm.expire(16.9)
    assert (pm.counts.expired_unlabelled, pm.counts.expired_unpredicted) == (0, 0)
    pm.expire(17.0)  # c is 10 s old
    assert (pm.counts.expired_unlabelled, pm.counts.unlabelled) == (1, 0)
    pm.expire(18.0)
    assert pm.counts.expired_unpredicted == 1
    pm.on_label("c", False, 19.0, 0)  # too late: c expired, nothing is scored
    assert pm.counts.labelled == 2
    assert pm.versions[("online", 1)].all["accuracy"].get() == 0.5  # a right, b wrong


def test_join_state_is_bounded() -> None:
    pm = PipelineMonitor(definition(source="TOPIC", ttl=3600.0), max_pending=10)
    for i in range(25):
        pm.on_prediction(pred(f"e{i}", True, {"True": 1.0}), None, float(i), 0)
    assert len(pm.entries) == 10
    assert (pm.counts.expired_unlabelled, pm.counts.unlabelled) == (15, 10)
    assert next(iter(pm.entries)) == "e15", "the oldest events are dropped first"


def test_no_label_source_keeps_nothing_waiting() -> None:
    pm = PipelineMonitor(definition(source="NONE"))
    for i in range(50):
        pm.on_features(fv(f"e{i}", {"x": float(i)}), (FEATURES, 0, i), 0.0, 0)
        pm.on_prediction(pred(f"e{i}", True, {"True": 0.7}), None, 0.0, 0)
    assert not pm.entries and pm.counts.unlabelled == 0 and pm.counts.labelled == 0


# -- metrics -------------------------------------------------------------------------------------------------
def test_binary_metrics_per_version_equal_river_computed_by_hand() -> None:
    rng = random.Random(3)
    pm = PipelineMonitor(definition(metrics_window=50))
    stream = Stream(pm)
    by_hand: dict[int, dict[str, Any]] = {}
    for i in range(400):
        version = 1 if i < 150 else 2
        y = rng.random() < 0.4
        p_true = min(1.0, max(0.0, (0.7 if y else 0.35) + rng.uniform(-0.3, 0.3)))
        proba = {True: p_true, False: 1 - p_true}
        y_pred = p_true >= 0.5
        stream.event({"x": rng.random()}, y, y_pred, {str(k): v for k, v in proba.items()}, version=version)
        m = by_hand.setdefault(version, {
            "accuracy": (metrics.Accuracy(), utils.Rolling(metrics.Accuracy, window_size=50)),
            "roc_auc": (metrics.ROCAUC(), metrics.RollingROCAUC(window_size=50)),
            "log_loss": (metrics.CrossEntropy(), utils.Rolling(metrics.CrossEntropy, window_size=50)),
        })  # fmt: skip
        for name, pair in m.items():
            for metric in pair:
                metric.update(y, y_pred if name == "accuracy" else proba)
    for version, m in by_hand.items():
        values = pm.versions[("online", version)].values()
        for name, (all_, rolling) in m.items():
            assert values[(name, "all")] == pytest.approx(all_.get(), abs=1e-12), (version, name)
            assert values[(name, "rolling")] == pytest.approx(rolling.get(), abs=1e-12), (version, name)
    assert pm.counts.labelled == 400
    assert 0.5 < by_hand[2]["roc_auc"][0].get() < 1.0  # a non-trivial check


def test_log_loss_counts_a_true_class_the_model_gave_no_probability() -> None:
    pm = PipelineMonitor(definition(task="MULTICLASS"))
    stream = Stream(pm)
    stream.event({}, "c", "a", {"a": 0.7, "b": 0.3})  # class c unseen by the model
    by_hand = metrics.CrossEntropy()
    by_hand.update("c", {"a": 0.7, "b": 0.3, "c": 0.0})
    assert pm.versions[("online", 1)].values()[("log_loss", "all")] == pytest.approx(by_hand.get())
    assert by_hand.get() > 30  # River clamps the probability at 1e-15


def test_regression_metrics_equal_river() -> None:
    pm = PipelineMonitor(definition(task="REGRESSION", metrics_window=20))
    stream = Stream(pm)
    mae, rmse = metrics.MAE(), utils.Rolling(metrics.RMSE, window_size=20)
    rng = random.Random(1)
    for _ in range(100):
        y, y_pred = rng.gauss(10, 3), rng.gauss(10, 3)
        stream.event({}, y, y_pred)
        mae.update(y, y_pred)
        rmse.update(y, y_pred)
    values = pm.versions[("online", 1)].values()
    assert values[("mae", "all")] == pytest.approx(mae.get())
    assert values[("rmse", "rolling")] == pytest.approx(rmse.get())


def test_exported_versions_are_the_live_and_shadow_ones() -> None:
    pm = PipelineMonitor(definition())
    stream = Stream(pm)
    for version in (1, 2, 3, 4, 5, 6, 7):
        pm.on_promotion(promotion(version))
        stream.event({}, True, True, {"True": 0.9}, version=version)
    pm.on_promotion(promotion(9, action="SHADOW", actor="controller", model="batch"))
    assert pm.exported() == {("online", 7), ("batch", 9)}
    assert len(pm.versions) <= 5, "only recent versions keep metric state"


def feed_error_rise(
    stream: Stream, rng: random.Random, change: int, before: float, after: float = 0.5
) -> None:
    """`change` events at error rate `before`, then 1000 at `after` (binary labels, a fixed probability)."""
    for i in range(change + 1000):
        error_rate = before if i < change else after
        y = rng.random() < 0.5
        stream.event({}, y, y if rng.random() >= error_rate else not y, {"True": 0.8, "False": 0.2})


# -- concept drift -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("detector", "name"),
    [
        ("ADWIN", "river.drift.ADWIN"),
        ("PageHinkley", "river.drift.PageHinkley"),
        ("DDM", "river.drift.binary.DDM"),
    ],
)
def test_concept_detector_fires_on_an_abrupt_error_rate_rise(detector: str, name: str) -> None:
    rng = random.Random(7)
    pm = PipelineMonitor(definition(concept_detector=detector))
    stream = Stream(pm)
    change = 3000
    feed_error_rise(stream, rng, change, before=0.05)
    alerts = stream.alerts("CONCEPT")
    detected = [a["window"][-1]["end_offset"] - 1 for a in alerts]  # the labelled events that fired
    if detector != "DDM":  # DDM is known to raise false alarms on a stationary stream; the others don't
        assert all(at >= change for at in detected), detected
    after = [(at, a) for at, a in zip(detected, alerts, strict=True) if at >= change]
    assert after, detected
    detected_at, alert = after[0]
    assert detected_at < change + 300, detected_at
    assert alert["detector"] == name and alert["severity"] == "CRITICAL"
    assert alert["threshold"] < 0.15 < alert["statistic"], "error level before and after"
    assert alert["window"][0]["topic"] == FEATURES
    assert alert["alert_id"].endswith(f"/e{detected_at}")


def test_a_falling_error_rate_is_not_drift() -> None:
    rng = random.Random(8)
    pm = PipelineMonitor(definition(concept_detector="ADWIN"))
    stream = Stream(pm)
    for i in range(6000):
        y = rng.random() < 0.5
        wrong = rng.random() < (0.5 if i < 3000 else 0.05)
        stream.event({}, y, (not y) if wrong else y, {"True": 0.8, "False": 0.2})
    assert stream.alerts() == []


def test_invalid_detector_parameters_fall_back_to_adwin() -> None:
    pm = PipelineMonitor(definition(concept_detector="PageHinkley", concept_params={"nope": "1"}))
    assert pm.concept.detector_name == "river.drift.ADWIN"


# -- data and prediction drift -------------------------------------------------------------------------------
def test_ks_test_agrees_with_scipy() -> None:
    rng = np.random.default_rng(0)
    ref = np.sort(rng.normal(0, 1, 1000))
    for shift, threshold in ((0.0, 1e-4), (0.3, 1e-4), (0.3, 0.5)):
        cur = rng.normal(shift, 1, 1000)
        p, d = ks_test(ref, cur, threshold)
        expected = ks_2samp(ref, cur, method="asymp")
        assert d == pytest.approx(expected.statistic)
        assert (p < threshold) == (expected.pvalue < threshold)
        if p < 100 * threshold:
            assert p == pytest.approx(expected.pvalue)


def test_ks_fires_on_a_shifted_feature_only() -> None:
    rng = random.Random(1)
    steps = [{"op": "rolling_mean", "output": "x_mean", "inputs": ["x"], "params": {}},
             {"op": "ratio", "output": "r", "inputs": ["x_mean", "y"], "params": {}}]  # fmt: skip
    pm = PipelineMonitor(definition(steps=steps, data_window=500, cooldown_events=100_000))
    assert stateful_features(steps) == {"x_mean", "r"}
    stream = Stream(pm)
    for i in range(2500):
        x = rng.gauss(0 if i < 1500 else 1.0, 1)
        y = rng.gauss(5, 2)
        ramp = float(i)  # a warming-up rolling feature would look like this: it must not be tested
        features = {"x": x, "y": y, "color": "red", "x_mean": ramp, "r": ramp}
        stream.event(features, True, True, {"True": 0.9, "False": 0.1})
    data = stream.alerts("DATA")
    assert [a["feature"] for a in data] == ["x"]
    alert = data[0]
    # x and y are tested (the ramps are skipped, colour is not numeric): 1e-4 Bonferroni-corrected over 2
    assert alert["detector"] == "ks" and alert["statistic"] < alert["threshold"] == 1e-4 / 2
    ((window),) = alert["window"]
    assert (window["topic"], window["partition"]) == (FEATURES, 0)
    end = window["end_offset"]
    assert end - window["start_offset"] == 500, "the current window"
    assert 1500 < end <= 1500 + 500, "found within one window of the shift"
    assert pm.reference_window == [{"topic": FEATURES, "partition": 0, "start_offset": 0, "end_offset": 500}]
    assert stream.alerts("PREDICTION") == [] and stream.alerts("CONCEPT") == []


def test_prediction_drift_on_scores() -> None:
    rng = random.Random(2)
    pm = PipelineMonitor(definition(data_window=300))
    stream = Stream(pm)
    for i in range(1200):
        p = min(0.99, max(0.01, rng.gauss(0.3 if i < 700 else 0.6, 0.1)))
        stream.event({}, p > 0.5, p > 0.5, {"True": p, "False": 1 - p})
    alerts = stream.alerts("PREDICTION")
    assert len(alerts) == 1 and alerts[0]["window"][0]["topic"] == PREDICTIONS
    assert 700 < alerts[0]["window"][0]["end_offset"] <= 1000


def test_late_predictions_of_a_replaced_version_stay_out_of_the_score_watch() -> None:
    """A backlog read in runs per partition brings v1's predictions after v2's first ones; the two versions
    score differently, so mixing them into v2's reference would alert on a stream that never changed."""
    rng = random.Random(5)
    pm = PipelineMonitor(definition(data_window=300))
    stream = Stream(pm)

    def event(version: int) -> None:
        p = min(0.99, max(0.01, rng.gauss(0.3 if version == 1 else 0.7, 0.05)))
        stream.event({}, p > 0.5, p > 0.5, {"True": p, "False": 1 - p}, version=version)

    for _ in range(400):
        event(1)
    for i in range(600):  # v2 is live; every other record is still one of v1's
        event(1 if i % 2 else 2)
    for _ in range(1500):
        event(2)
    assert stream.alerts("PREDICTION") == []
    assert pm.served_model == ("online", 2)


def test_the_retraining_slice_of_a_concept_alert_is_the_new_concept_not_the_whole_detector_window() -> None:
    """ADWIN held 3,000 errors of the old level when it fired: the slice is the part it keeps after its cut
    (at least MIN_RETRAIN_EVENTS), not the whole window of the old concept."""
    rng = random.Random(3)
    pm = PipelineMonitor(definition(concept_detector="ADWIN"))
    stream = Stream(pm)
    change = 3000
    feed_error_rise(stream, rng, change, before=0.02)
    alert = stream.alerts("CONCEPT")[0]
    (window,) = alert["window"]
    fired = window["end_offset"] - 1
    assert change <= fired < change + 300
    size = window["end_offset"] - window["start_offset"]
    assert size >= MIN_RETRAIN_EVENTS
    assert window["start_offset"] >= min(change, fired + 1 - MIN_RETRAIN_EVENTS), window


def lagging_partitions_stream(
    pm: PipelineMonitor, rng: random.Random, change: int, lag: int, now_ms: int, start_ms: int = 1_000_000
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """World event k happens at start_ms + 10 k ms, error rate 0.02 before `change` and 0.5 from it; even k
    go to partition 0, odd k to partition 1, which the monitor reads `lag` events behind (a partition whose
    reader stalled after a crash). The alerts, and k of each (partition, offset) read."""
    outputs: list[MonitorOutput] = []
    world: dict[int, int] = {}  # (partition 1 offsets) -> k; partition 0 offset o is k = 2 o
    for step in range(change // 2 + 800):
        for partition, k in ((0, 2 * step), (1, 2 * (step - lag // 2) + 1)):
            if k < 0:
                continue
            offset = k // 2
            world[offset] = k
            y = rng.random() < 0.5
            wrong = rng.random() < (0.02 if k < change else 0.5)
            record = fv(f"e{k}", {}, y)
            record["event_time"] = start_ms + 10 * k
            outputs += pm.on_features(record, (FEATURES, partition, offset), 0.0, now_ms)
            p = pred(f"e{k}", (not y) if wrong else y, {"True": 0.8, "False": 0.2})
            p["event_time"] = start_ms + 10 * k
            outputs += pm.on_prediction(p, (PREDICTIONS, partition, offset), 0.0, now_ms)
    return [o.record for o in outputs if o.kind == "alert" and o.record["kind"] == "CONCEPT"], world


def test_a_concept_alert_says_from_which_event_time_on_to_retrain_when_a_partition_lags() -> None:
    """The alert's window ends, in the lagging partition, among events from before the change: learning
    after it there would teach the old concept again. Its event_time is the newest labelled event's time,
    after the change, and no later than the detection."""
    change, now_ms = 8000, 10**13
    alerts, world = lagging_partitions_stream(
        PipelineMonitor(definition(concept_detector="ADWIN")), random.Random(5), change, 3000, now_ms
    )
    alert = alerts[0]
    ends = {r["partition"]: r["end_offset"] for r in alert["window"]}
    assert world[ends[1] - 1] < change, "the lagging partition's window ends before the change"
    change_ms, newest_ms = 1_000_000 + 10 * change, 1_000_000 + 10 * 2 * (ends[0] - 1)
    assert change_ms <= alert["event_time"] == newest_ms


def test_a_concept_alert_s_event_time_is_never_after_its_detection() -> None:
    """An event stamped in the future (a producer's clock) cannot push the retraining past what exists."""
    alerts, _ = lagging_partitions_stream(
        PipelineMonitor(definition(concept_detector="ADWIN")), random.Random(5), 8000, 0, now_ms=1_050_000
    )
    assert alerts and all(a["event_time"] == 1_050_000 == a["detected_at"] for a in alerts)


def test_late_predictions_of_a_replaced_version_stay_out_of_the_concept_detector() -> None:
    """v1 (trained on little data) errs 25 % of the time, its successor 2 %: v1's late predictions, arriving
    among v2's, are no rise of v2's error."""
    rng = random.Random(6)
    pm = PipelineMonitor(definition())
    stream = Stream(pm)

    def event(version: int) -> None:
        right = rng.random() >= (0.25 if version == 1 else 0.02)
        stream.event({}, True, right, {"True": 0.9, "False": 0.1} if right else {"True": 0.1, "False": 0.9},
                     version=version)  # fmt: skip

    for _ in range(3000):
        event(2) if stream.n >= 1000 else event(1)
    for _ in range(1500):  # a partition's backlog of v1's predictions comes in late
        event(1 if rng.random() < 0.7 else 2)
    for _ in range(2000):
        event(2)
    assert stream.alerts("CONCEPT") == []
    assert pm.versions[("online", 1)].all["accuracy"].get() < 0.8, "still counted as v1's"


def test_the_key_field_is_not_ks_tested() -> None:
    """Events reach the monitor in runs per partition, and partitions hold key groups: the key's values
    come clustered on a stationary stream."""
    pm = PipelineMonitor({**definition(data_window=200), "key_field": "zone"})
    stream = Stream(pm)
    for i in range(1200):
        stream.event({"zone": float((i // 300) % 2), "x": float(i % 7)}, True, True, {"True": 0.9})
    assert stream.alerts("DATA") == []
    pm = PipelineMonitor(definition(data_window=200))  # without a key field the same column is tested
    stream = Stream(pm)
    for i in range(1200):
        stream.event({"zone": float((i // 300) % 2), "x": float(i % 7)}, True, True, {"True": 0.9})
    assert [a["feature"] for a in stream.alerts("DATA")] == ["zone"]


def test_cooldown_suppresses_repeats() -> None:
    rng = random.Random(4)
    pm = PipelineMonitor(definition(data_window=200, cooldown_events=1000))
    stream = Stream(pm)
    for i in range(3400):
        x = rng.gauss(0 if i < 400 else 3, 1)  # shifted for good from event 400: every test is significant
        stream.event({"x": x}, True, True, {"True": 0.9, "False": 0.1})
    data = stream.alerts("DATA")
    ends = [a["window"][0]["end_offset"] for a in data]
    # reference: events 0-199; tests every 50 events once the current window is full (event 399); the
    # first one seeing 50 shifted events fires, then the cool-down lets one through per 1000 events
    assert ends == [450, 1450, 2450], ends
    assert pm.suppressed[("DATA", "ks")] == len(range(500, 3401, 50)) - 2


def test_stationary_stream_raises_no_alert() -> None:
    rng = random.Random(5)
    pm = PipelineMonitor(definition(data_window=500, cooldown_events=500))
    stream = Stream(pm)
    for _ in range(20_000):
        y = rng.random() < 0.5
        p = min(0.99, max(0.01, rng.gauss(0.7 if y else 0.3, 0.15)))
        features = {"a": rng.gauss(0, 1), "b": rng.expovariate(1.0), "c": float(rng.randint(0, 9))}
        stream.event(features, y, p >= 0.5, {"True": p, "False": 1 - p})
    assert stream.alerts() == []
    assert 0.8 < pm.versions[("online", 1)].values()[("accuracy", "all")] < 0.95


# -- versions and lineage ------------------------------------------------------------------------------------
def test_learner_snapshots_keep_the_detectors_and_deliberate_promotions_restart_them() -> None:
    pm = PipelineMonitor(definition(data_window=100))
    stream = Stream(pm)
    pm.on_promotion(promotion(1))
    for _ in range(150):
        stream.event({"x": 1.0}, True, True, {"True": 0.9})
    concept, reference = pm.concept, pm.reference_window
    pm.on_promotion(promotion(2))  # the online learner's next snapshot, auto-promoted
    stream.event({"x": 1.0}, True, True, {"True": 0.9}, version=2)
    assert pm.concept is concept and pm.reference_window == reference
    assert pm.scores.ref_n == 1, "the score reference is per version"
    pm.on_promotion(promotion(7, actor="controller", model="batch"))
    stream.event({"x": 1.0}, True, True, {"True": 0.9}, version=7, model="batch")
    assert pm.concept is not concept and isinstance(pm.data, PartitionedKS)
    assert [w.ref_n for w in pm.data.watches.values()] == [1]


def test_each_input_partition_has_its_own_data_reference() -> None:
    """Keyed features: a partition holds some keys, and a key-dependent feature differs between partitions;
    each is compared with its own reference, never a reference read from another partition."""
    watch = PartitionedKS(size=200, threshold=1e-4)
    rng = random.Random(3)
    alerts = []
    for i in range(3000):
        partition = i % 3
        value = rng.uniform(0, 1) + partition  # each partition's own, stationary distribution
        src = ("t.features", partition, i // 3)
        # the first 600 events all come from partition 0, as one batch of a busy reader would
        if i < 600:
            value, src = rng.uniform(0, 1), ("t.features", 0, 10_000 + i)
        alerts += [r for r in watch.watch(src).add({"x": value}, src) if r[1] < 1e-4]
    assert alerts == []
    assert sorted(watch.watches) == [0, 1, 2]


def test_promotion_arriving_after_its_first_predictions_still_restarts() -> None:
    pm = PipelineMonitor(definition())
    stream = Stream(pm)
    stream.event({}, True, True, {"True": 0.9}, version=1)
    stream.event({}, True, True, {"True": 0.9}, version=2)  # looks like a learner snapshot...
    concept = pm.concept
    pm.on_promotion(promotion(2, action="ROLLBACK", actor="alice"))  # ...but a person decided it
    assert pm.concept is not concept
    stream.event({}, True, True, {"True": 0.9}, version=1)  # a late prediction of the replaced version
    assert pm.served_model == ("online", 2) and pm.versions[("online", 1)].labelled == 2
    pm.on_promotion(promotion(1, action="ROLLBACK", actor="alice"))
    stream.event({}, True, True, {"True": 0.9}, version=1)  # the rollback to it
    assert pm.served_model == ("online", 1) and pm.lineage_model == ("online", 1)


# -- champion / challenger -----------------------------------------------------------------------------------
def test_evaluation_pairs_only_events_both_models_predicted() -> None:
    pm = PipelineMonitor(definition())
    pm.on_promotion(promotion(3, action="SHADOW", actor="controller", model="batch"))
    outputs: list[MonitorOutput] = []
    for i in range(700):
        eid = f"e{i}"
        paired = i % 2 == 0
        # champion: wrong on every unpaired event, right on 80 % of the paired ones; challenger right on 90 %
        champion_right = paired and (i // 2) % 5 != 0
        challenger_right = (i // 2) % 10 != 0
        outputs += pm.on_features(fv(eid, {}, True), (FEATURES, 0, i), 0.0, 0)
        outputs += pm.on_prediction(pred(eid, champion_right, {"True": 0.9}), None, 0.0, 0)
        if paired:
            shadow = pred(eid, challenger_right, {"True": 0.9}, version=3, model="batch", shadow=True)
            outputs += pm.on_prediction(shadow, None, 0.0, 0)
    evaluations = [o.record for o in outputs if o.kind == "evaluation"]
    assert [e["labels"] for e in evaluations] == [100, 200, 300]
    last = evaluations[-1]
    assert last["champion_value"] == pytest.approx(0.8) and last["challenger_value"] == pytest.approx(0.9)
    assert (last["champion_model"], last["champion_version"]) == ("online", 1)
    assert (last["challenger_model"], last["challenger_version"], last["metric"]) == ("batch", 3, "accuracy")
    assert last["higher_is_better"] is True
    challenger_metrics = pm.versions[("batch", 3)].values()  # its own metrics, exported beside the champion's
    assert challenger_metrics[("accuracy", "all")] == pytest.approx(0.9)
    assert pm.entries and all(int(e[1:]) % 2 for e in pm.entries), "paired events leave the join"

    pm.on_promotion(promotion(3, action="DISCARD", actor="controller", model="batch"))
    assert pm.challenger is None and pm.pairs is None


def test_shadow_prediction_before_the_served_one_is_paired() -> None:
    pm = PipelineMonitor(definition(task="REGRESSION", source="TOPIC"))
    outputs: list[MonitorOutput] = []
    for i in range(100):
        eid = f"e{i}"
        outputs += pm.on_prediction(pred(eid, 1.0, version=2, model="batch", shadow=True), None, 0.0, 0)
        outputs += pm.on_prediction(pred(eid, 3.0), None, 0.0, 0)
        outputs += pm.on_label(eid, 2.5, 0.0, 0)
    (evaluation,) = [o.record for o in outputs if o.kind == "evaluation"]
    assert evaluation["metric"] == "mae" and evaluation["higher_is_better"] is False
    assert (evaluation["champion_value"], evaluation["challenger_value"]) == (0.5, 1.5)


# -- odds and ends -------------------------------------------------------------------------------------------
def test_offset_ranges_cover_each_partition() -> None:
    srcs = [("t", 1, 7), ("t", 0, 3), None, ("t", 0, 5), ("t", 1, 4)]
    assert offset_ranges(srcs) == [
        {"topic": "t", "partition": 0, "start_offset": 3, "end_offset": 6},
        {"topic": "t", "partition": 1, "start_offset": 4, "end_offset": 8},
    ]


def test_monitor_applies_promotions_received_before_the_pipeline() -> None:
    monitor = Monitor()
    monitor.on_promotion(promotion(4, action="SHADOW", actor="controller", model="batch"))
    monitor.on_pipeline(definition())
    assert monitor.pipelines["p"].challenger == ("batch", 4)
    monitor.on_pipeline({**definition(), "deleted": True})
    assert monitor.pipelines == {}


# -- the service's handler (no broker) -----------------------------------------------------------------------
def test_service_handler_routes_records_dead_letters_and_exports_live_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import REGISTRY

    from services.monitor import app
    from streamml.codec import codec_for
    from streamml.settings import Settings
    from streamml.topics import Catalogue

    monkeypatch.setattr(app, "ensure_topics", lambda *_a, **_k: None)
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="unit", _env_file=None)
    catalogue = Catalogue(settings)
    service = app.MonitorService(settings, catalogue)
    name = "monitor-unit"
    full = {"revision": 1, "event_id_field": "id", "key_field": None, "event_time_field": None,
            "fields": [{"name": "x", "type": "FLOAT", "required": True, "default": None}]}  # fmt: skip
    service.on_pipeline({**definition(data_window=50, cooldown_events=1000), **full, "name": name}, None)
    assert set(service.inputs()) == {catalogue.features(name).name, catalogue.predictions(name).name,
                                     catalogue.shadow_predictions(name).name}  # fmt: skip
    features, predictions = codec_for("FeatureVector"), codec_for("Prediction")
    msgs: list[Any] = []
    for i in range(300):
        x = float(i >= 200)  # a constant feature that jumps: data drift once the reference is taken
        vector = {**fv(f"e{i}", {"x": x}, True), "pipeline": name}
        msgs.append(FakeMessage(catalogue.features(name).name, features.encode(vector), i))
        version = 1 if i < 250 else 2
        record = {**pred(f"e{i}", True, {"True": 0.9, "False": 0.1}, version), "pipeline": name}
        msgs.append(FakeMessage(catalogue.predictions(name).name, predictions.encode(record), i))
    msgs.append(FakeMessage(catalogue.predictions(name).name, b"not avro", 300))
    service.on_promotion({**promotion(1), "pipeline": name}, None)
    outputs = service.handle(msgs[:500])

    alerts = [
        codec_for("DriftAlert").decode(o.value or b"") for o in outputs if o.topic.endswith("drift-alerts")
    ]
    assert [(a["kind"], a["feature"]) for a in alerts] == [("DATA", "x")]
    labels = {"pipeline": name, "model": "online", "version": "1", "metric": "accuracy", "window": "all"}
    assert REGISTRY.get_sample_value("streamml_model_metric", labels) == 1.0
    assert REGISTRY.get_sample_value("streamml_drift_alerts_total", {"pipeline": name, "kind": "DATA",
                                                                     "detector": "ks"}) == 1.0  # fmt: skip

    service.on_promotion({**promotion(2), "pipeline": name}, None)
    outputs = service.handle(msgs[500:])
    (dead,) = outputs
    assert dead.topic == catalogue.dead_letter(name).name
    letter = codec_for("DeadLetter").decode(dead.value or b"")
    assert (letter["service"], letter["source_offset"], letter["original_value"]) == (
        "monitor",
        300,
        b"not avro",
    )
    assert REGISTRY.get_sample_value("streamml_model_metric", labels) is None, "stale version series removed"
    assert REGISTRY.get_sample_value("streamml_model_metric", {**labels, "version": "2"}) == 1.0
    assert REGISTRY.get_sample_value("streamml_monitor_labelled_events_total", {"pipeline": name}) == 300


class _CutDetector:
    """An ADWIN stand-in that cuts once, at update `at`, keeping the latest `kept` errors."""

    def __init__(self, at: int, kept: int, kept_mean: float) -> None:
        self.at, self.width, self.estimation, self.seen = at, kept, kept_mean, 0
        self.drift_detected = False

    def update(self, _error: float) -> None:
        self.seen += 1
        self.drift_detected = self.seen == self.at


def test_an_adwin_cut_after_a_burst_that_has_passed_is_not_a_rise() -> None:
    # 2,000 errors at 1 %, a burst of 150 errors, then 300 without one: the kept part (the last 500) has the
    # higher mean, but the latest errors are back below the old level (the chaos run's "rise from 0.005
    # to 0" at event 19,115, long before the drift).
    errors = [1.0 if i % 100 == 0 else 0.0 for i in range(2000)] + [1.0] * 150 + [0.0] * 350
    watch = ConceptWatch("ADWIN", {}, regression=False)
    watch.detector = _CutDetector(at=len(errors), kept=500, kept_mean=sum(errors[-500:]) / 500)
    assert [h for e in errors if (h := watch.update(e)) is not None] == []

    rising = [1.0 if i % 100 == 0 else 0.0 for i in range(2000)] + [
        1.0 if i % 3 == 0 else 0.0 for i in range(500)
    ]
    watch = ConceptWatch("ADWIN", {}, regression=False)
    watch.detector = _CutDetector(at=len(rising), kept=500, kept_mean=sum(rising[-500:]) / 500)
    [hit] = [h for e in rising if (h := watch.update(e)) is not None]
    assert hit.before == pytest.approx(0.01) and hit.after > 0.3 and hit.changed == 500


def test_a_significant_but_negligible_error_rise_is_held_back() -> None:
    """A near-perfect model going from 0.25 % to ~2 % errors (a chaos run's false CONCEPT alert, long before
    the drift, "from 0.0025 to 0.04" in the last 100): significant for ADWIN, below concept_min_rise."""
    errors = [1.0 if i % 400 == 0 else 0.0 for i in range(8000)] + [
        1.0 if i % 50 == 0 else 0.0 for i in range(2000)
    ]
    for min_rise, reported in ((0.05, 0), (0.0, 1)):
        watch = ConceptWatch("ADWIN", {}, regression=False, min_rise=min_rise)
        watch.detector = _CutDetector(at=8100, kept=100, kept_mean=0.02)
        hits = [h for e in errors if (h := watch.update(e)) is not None]
        assert (len(hits), watch.negligible) == (reported, 1 - reported)


def test_a_held_back_rise_is_reported_once_the_error_level_reaches_the_minimum() -> None:
    """River's ADWIN flagged the change once, early (its kept part still mostly the old level), and not
    again: the rise is reported when the mean of the last 500 errors has risen by concept_min_rise."""
    rng = random.Random(7)
    errors = [1.0 if rng.random() < 0.05 else 0.0 for _ in range(3000)]
    errors += [1.0 if rng.random() < 0.5 else 0.0 for _ in range(1000)]
    watch = ConceptWatch("ADWIN", {}, regression=False, min_rise=0.3)
    hits = [(i, h) for i, e in enumerate(errors) if (h := watch.update(e)) is not None]
    assert watch.negligible == 1, "first detected below the minimum"
    [(at, hit)] = hits
    assert 3000 + 250 <= at < 3000 + 500, at  # when the 500-mean had risen 0.3 over ~0.05 (~330 events)
    assert hit.before < 0.08 and hit.after > 0.35
    assert hit.changed >= at - 3000 - 50, "the retraining slice covers the new level"


def test_for_regression_the_minimum_rise_is_a_share_of_the_error_level() -> None:
    errors = [10.0] * 2000 + [10.1] * 500  # +1 %: below 5 %
    watch = ConceptWatch("ADWIN", {}, regression=True, min_rise=0.05)
    watch.detector = _CutDetector(at=2100, kept=100, kept_mean=10.1)
    assert [h for e in errors if (h := watch.update(e)) is not None] == [] and watch.negligible == 1
    errors = [10.0] * 2000 + [11.0] * 500  # +10 %
    watch = ConceptWatch("ADWIN", {}, regression=True, min_rise=0.05)
    watch.detector = _CutDetector(at=2100, kept=100, kept_mean=11.0)
    assert len([h for e in errors if (h := watch.update(e)) is not None]) == 1


def test_the_pipeline_s_concept_min_rise_reaches_the_detector() -> None:
    pm = PipelineMonitor(definition(concept_detector="ADWIN"))
    assert pm.concept.min_rise == 0.05
    d = definition(concept_detector="ADWIN")
    d["monitoring"]["concept_min_rise"] = 0.1
    pm.configure(d)
    assert pm.concept.min_rise == 0.1
