"""The loop's policy without Kafka: alert → (wait for a window) → request → shadow → promote/discard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streams.controller import Controller, retraining_ranges


def definition(**policy: Any) -> dict[str, Any]:
    base = {
        "retrain_on_drift": True,
        "retrain_window_events": 3000,
        "reset_online_on_drift": False,
        "challenger_margin": 0.01,
        "challenger_min_labels": 500,
        "challenger_max_labels": 5000,
    }
    return {
        "name": "agrawal",
        "deleted": False,
        "models": [
            {
                "name": "online",
                "kind": "ONLINE",
                "estimator_spec": "tree.HoeffdingTreeClassifier",
                "params": {},
            },
            {
                "name": "batch",
                "kind": "BATCH",
                "estimator_spec": "sklearn.tree.DecisionTreeClassifier",
                "params": {},
            },
        ],
        "policy": {**base, **policy},
    }


def alert(kind: str = "CONCEPT", alert_id: str = "a1") -> dict[str, Any]:
    return {"alert_id": alert_id, "pipeline": "agrawal", "kind": kind, "detector": "river.drift.ADWIN",
            "model_version": 7}  # fmt: skip


def recent(n: int, _alert: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"topic": "f", "partition": 0, "start_offset": 10_000 - n, "end_offset": 10_000}]


def evaluation(challenger: float, champion: float, labels: int, version: int = 3) -> dict[str, Any]:
    return {
        "pipeline": "agrawal",
        "champion_model": "online",
        "champion_version": 7,
        "challenger_model": "batch",
        "challenger_version": version,
        "metric": "accuracy",
        "higher_is_better": True,
        "champion_value": champion,
        "challenger_value": challenger,
        "labels": labels,
    }


def controller() -> Controller:
    c = Controller(lambda: 1000)
    c.on_pipeline(definition())
    c.on_promotion(
        {"pipeline": "agrawal", "model_name": "online", "version": 7, "action": "PROMOTE", "actor": "auto"}
    )
    return c


def test_concept_alert_requests_training_once_a_full_window_of_new_data_exists() -> None:
    c = controller()
    c.on_alert(alert(), progress=7000)
    assert c.on_progress("agrawal", 9999, recent) == []  # still mostly pre-drift data
    [request] = c.on_progress("agrawal", 10_000, recent)
    assert request["data_ranges"] == recent(3000)
    assert (
        request["estimator_spec"] == "sklearn.tree.DecisionTreeClassifier"
        and request["model_name"] == "batch"
    )
    assert "a1" in request["reason"] and request["requested_by"] == "controller"
    assert c.on_progress("agrawal", 20_000, recent) == []  # once


def test_the_request_learns_only_from_events_after_the_alert_s_event_time() -> None:
    c = controller()
    c.on_alert({**alert(), "event_time": 1_700_000_000_000}, progress=7000)
    [request] = c.on_progress("agrawal", 10_000, recent)
    assert request["event_time_from"] == 1_700_000_000_000
    c = controller()
    c.on_alert(alert(), progress=7000)  # an alert written before the field existed
    [request] = c.on_progress("agrawal", 10_000, recent)
    assert request["event_time_from"] is None


def test_alerts_while_a_retrain_is_under_way_do_not_pile_up() -> None:
    c = controller()
    c.on_alert(alert(alert_id="a1"), progress=0)
    c.on_alert(alert(alert_id="a2"), progress=100)
    [request] = c.on_progress("agrawal", 3000, recent)
    assert "a1" in request["reason"]
    c.on_alert(alert(alert_id="a3"), progress=3100)  # in flight: ignored
    assert c.on_progress("agrawal", 10_000, recent) == []


def test_data_drift_and_disabled_policy_do_not_retrain() -> None:
    c = controller()
    c.on_alert(alert(kind="DATA"), progress=0)
    assert c.on_progress("agrawal", 10_000, recent) == []
    c.on_pipeline(definition(retrain_on_drift=False))
    c.on_alert(alert(), progress=0)
    assert c.on_progress("agrawal", 10_000, recent) == []


def test_successful_training_shadows_the_candidate_and_failures_do_not() -> None:
    c = controller()
    c.on_alert(alert(), progress=0)
    [request] = c.on_progress("agrawal", 3000, recent)
    failed = {"request_id": request["request_id"], "pipeline": "agrawal", "model_name": "batch",
              "status": "FAILED", "reason": "boom", "model_version": None, "metrics": {}}  # fmt: skip
    assert c.on_training_result(failed) == []
    c.on_alert(alert(alert_id="a2"), progress=3000)
    [request] = c.on_progress("agrawal", 6000, recent)
    ok = {**failed, "request_id": request["request_id"], "status": "SUCCEEDED", "model_version": 3,
          "metrics": {"accuracy": 0.99}}  # fmt: skip
    [decision] = c.on_training_result(ok)
    assert (decision["action"], decision["model_name"], decision["version"]) == ("SHADOW", "batch", 3)
    assert decision["previous_version"] == 7
    assert c.on_training_result({**ok, "request_id": "someone-else"}) == []


def test_challenger_promoted_only_when_it_wins_by_the_margin_over_enough_labels() -> None:
    c = controller()
    c.on_promotion({"pipeline": "agrawal", "model_name": "batch", "version": 3, "action": "SHADOW",
                    "actor": "controller"})  # fmt: skip
    assert c.on_evaluation(evaluation(0.99, 0.80, labels=400)) == []  # not enough labels yet
    assert c.on_evaluation(evaluation(0.805, 0.80, labels=600)) == []  # better, but not by the margin
    [decision] = c.on_evaluation(evaluation(0.99, 0.80, labels=600))
    assert decision["action"] == "PROMOTE" and "0.19" in decision["reason"]
    c.on_promotion(decision)
    assert c.on_evaluation(evaluation(0.99, 0.80, labels=700)) == []  # decided once


def test_worse_challenger_is_discarded_never_promoted() -> None:
    c = controller()
    c.on_promotion(
        {"pipeline": "agrawal", "model_name": "batch", "version": 4, "action": "SHADOW", "actor": "u"}
    )
    decisions = [
        d for n in range(100, 5001, 100) for d in c.on_evaluation(evaluation(0.7, 0.9, n, version=4))
    ]
    assert [d["action"] for d in decisions] == ["DISCARD"]
    assert "did not win" in decisions[0]["reason"]


def test_lower_is_better_metrics() -> None:
    c = controller()
    c.on_promotion(
        {"pipeline": "agrawal", "model_name": "batch", "version": 3, "action": "SHADOW", "actor": "u"}
    )
    ev = {**evaluation(2.0, 3.0, labels=600), "metric": "mae", "higher_is_better": False}
    [decision] = c.on_evaluation(ev)
    assert decision["action"] == "PROMOTE"


# -- the retraining slice -----------------------------------------------------------------------------------
def _window(*ends: tuple[int, int], topic: str = "f") -> dict[str, Any]:
    return {"window": [{"topic": topic, "partition": p, "start_offset": 0, "end_offset": e} for p, e in ends]}


def test_the_slice_is_what_came_after_the_detection_in_every_partition() -> None:
    # A keyed topic: partition 0 holds four keys, partition 1 one. The drift was detected at offset 8,000 of
    # partition 0 and 2,000 of partition 1; since then 2,400 and 600 events arrived.
    marks = {0: (0, 10_400), 1: (0, 2_600)}
    ranges = retraining_ranges("f", marks, 3000, _window((0, 8_000), (1, 2_000)))
    assert [(r["partition"], r["start_offset"], r["end_offset"]) for r in ranges] == [
        (0, 8_000, 10_400), (1, 2_000, 2_600),
    ]  # fmt: skip
    # n / partitions of each would have taken partition 1 back to offset 1,100: 900 pre-drift events
    before = retraining_ranges("f", marks, 3000, None)
    assert [(r["start_offset"]) for r in before] == [8_900, 1_100]


def test_partitions_the_alert_does_not_name_take_their_share_and_offsets_stay_in_the_topic() -> None:
    marks = {0: (500, 1_000), 1: (0, 4_000), 2: (0, 0)}
    alert = {"window": _window((0, 100), (1, 9_999))["window"] + _window((2, 3), topic="other")["window"]}
    ranges = retraining_ranges("f", marks, 300, alert)
    # partition 0: the detection point (100) is below the low watermark (500): from 500; partition 1: the
    # point is past the end (a reset topic): nothing; partition 2: empty; the other topic's range ignored
    assert [(r["partition"], r["start_offset"], r["end_offset"]) for r in ranges] == [(0, 500, 1_000)]


def test_a_slice_far_larger_than_asked_for_keeps_the_newest_in_proportion() -> None:
    marks = {0: (0, 100_000), 1: (0, 25_000)}  # a controller away for long: 80k + 20k since the detection
    ranges = retraining_ranges("f", marks, 1000, _window((0, 20_000), (1, 5_000)))
    sizes = {r["partition"]: r["end_offset"] - r["start_offset"] for r in ranges}
    assert sizes == {0: 3_200, 1: 800}  # 4 x 1,000 in all, 4:1 as the partitions filled
