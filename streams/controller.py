"""The closed-loop policy: drift alert → retrain on recent data → challenger in shadow → promote or discard.

Pure (no Kafka, no Faust): the controller service feeds it pipeline definitions, drift alerts, training
results, promotion decisions, evaluations and the progress of each features topic, and publishes the
TrainingRequest and Promotion records it returns.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
ACTOR = "controller"

Ranges = list[dict[str, Any]]
# recent(n, alert): the offset ranges to retrain on (see retraining_ranges)
Recent = Callable[[int, Mapping[str, Any] | None], Ranges]


@dataclass
class LoopState:
    """Where one pipeline is in the loop."""

    retrain_due_at: int | None = None  # features-topic progress at which to request training
    alert: dict[str, Any] | None = None  # the drift alert that triggered the pending retrain
    in_flight: dict[str, dict[str, Any]] = field(default_factory=dict)  # request_id -> alert
    challenger: tuple[str, int] | None = None
    champion: tuple[str, int] | None = None
    decided: set[tuple[str, int]] = field(default_factory=set)


# The retraining slice holds at most this many times `retrain_window_events` (a controller that was away
# long finds much more post-drift data than it asked for).
MAX_SLICE_FACTOR = 4


def retraining_ranges(
    topic: str, marks: Mapping[int, tuple[int, int]], n: int, alert: Mapping[str, Any] | None
) -> Ranges:
    """The slice a drift alert's retraining learns from: in each partition of the features topic, the
    events after the alert's detection point in that partition (the end of the alert's window there),
    up to the partition's end now.

    Per partition, not n / partitions of each: a keyed topic's partitions fill at different rates (one
    holding one key, another four), and the last n / partitions events of a slow partition reach back
    before the drift, teaching the challenger the old concept again. A partition the alert's window does
    not name falls back to its share of n. More than MAX_SLICE_FACTOR * n events in all are cut back in
    proportion to each partition's part, keeping the newest.
    """
    since = {
        int(r["partition"]): int(r["end_offset"])
        for r in (alert or {}).get("window") or []
        if r.get("topic") == topic
    }
    share = math.ceil(n / max(1, len(marks)))
    starts = {
        p: min(high, max(low, since[p] if p in since else high - share)) for p, (low, high) in marks.items()
    }
    total = sum(high - starts[p] for p, (_low, high) in marks.items())
    cap = MAX_SLICE_FACTOR * n
    if total > cap:
        for p, (_low, high) in marks.items():
            starts[p] = max(starts[p], high - math.ceil(cap * (high - starts[p]) / total))
    return [
        {"topic": topic, "partition": p, "start_offset": starts[p], "end_offset": high}
        for p, (_low, high) in sorted(marks.items())
        if high > starts[p]
    ]


def open_work(st: LoopState) -> dict[str, Any]:
    """What a new writer needs of a pipeline's loop to carry on (the rest follows from the promotions,
    which every instance reads): the pending retrain and the requests waiting for results."""
    return {
        "retrain_due_at": st.retrain_due_at,
        "alert_json": None if st.alert is None else json.dumps(st.alert, sort_keys=True),
        "in_flight_json": json.dumps(st.in_flight, sort_keys=True),
    }


def resume_work(st: LoopState, snapshot: Mapping[str, Any]) -> None:
    st.retrain_due_at = snapshot["retrain_due_at"]
    st.alert = None if snapshot["alert_json"] is None else json.loads(snapshot["alert_json"])
    st.in_flight = json.loads(snapshot["in_flight_json"])


class Controller:
    def __init__(self, now_ms: Callable[[], int]) -> None:
        self.now_ms = now_ms
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.state: dict[str, LoopState] = {}

    def _state(self, pipeline: str) -> LoopState:
        return self.state.setdefault(pipeline, LoopState())

    def on_pipeline(self, record: Mapping[str, Any]) -> None:
        if record["deleted"]:
            self.pipelines.pop(record["name"], None)
            self.state.pop(record["name"], None)
        else:
            self.pipelines[record["name"]] = dict(record)

    def batch_model(self, pipeline: str) -> dict[str, Any] | None:
        definition = self.pipelines.get(pipeline)
        if definition is None:
            return None
        return next((m for m in definition["models"] if m["kind"] == "BATCH"), None)

    # -- drift → retrain ---------------------------------------------------------------------------
    def on_alert(self, alert: Mapping[str, Any], progress: int) -> None:
        """A concept-drift alert schedules one retraining, once `retrain_window_events` new events exist."""
        pipeline = alert["pipeline"]
        definition = self.pipelines.get(pipeline)
        if definition is None or alert["kind"] != "CONCEPT" or not definition["policy"]["retrain_on_drift"]:
            return
        st = self._state(pipeline)
        if st.retrain_due_at is not None or st.in_flight or st.challenger is not None:
            log.info(
                "%s: drift alert %s ignored: a retrain/challenger is already under way",
                pipeline,
                alert["alert_id"],
            )
            return
        if self.batch_model(pipeline) is None:
            log.warning(
                "%s: drift alert %s: the pipeline has no batch model to retrain", pipeline, alert["alert_id"]
            )
            return
        # Wait for a full window of post-drift data: training on the window that straddles the drift
        # would teach the old concept again.
        st.retrain_due_at = progress + int(definition["policy"]["retrain_window_events"])
        st.alert = dict(alert)

    def on_progress(self, pipeline: str, progress: int, recent: Recent) -> list[dict[str, Any]]:
        """TrainingRequest records that are due; `recent(n, alert)` gives the offset ranges to learn
        from: the events after the alert's detection (retraining_ranges)."""
        st = self.state.get(pipeline)
        definition = self.pipelines.get(pipeline)
        model = self.batch_model(pipeline)
        if st is None or st.retrain_due_at is None or progress < st.retrain_due_at or definition is None:
            return []
        if model is None:
            st.retrain_due_at = None
            return []
        alert = st.alert or {}
        request = {
            "request_id": f"{pipeline}-{uuid.uuid4().hex[:12]}",
            "pipeline": pipeline,
            "model_name": model["name"],
            "estimator_spec": model["estimator_spec"],
            "params": dict(model["params"]),
            "param_grid": {},
            "data_ranges": recent(int(definition["policy"]["retrain_window_events"]), st.alert),
            "time_from": None,
            "time_to": None,
            # events that happened before the drift was seen are left out, wherever they sit in the ranges
            "event_time_from": alert.get("event_time"),
            "validation_split": 0.2,
            "seed": 0,
            "reason": f"{alert.get('kind', '?')} drift alert {alert.get('alert_id', '?')} "
            f"({alert.get('detector', '?')}) on v{alert.get('model_version', '?')}",
            "requested_by": ACTOR,
            "requested_at": self.now_ms(),
        }
        st.retrain_due_at = None
        st.in_flight[request["request_id"]] = alert
        return [request]

    def on_training_result(self, result: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A candidate trained for one of our requests goes into shadow as the challenger."""
        st = self.state.get(result["pipeline"])
        if st is None or result["request_id"] not in st.in_flight:
            return []
        alert = st.in_flight.pop(result["request_id"])
        if result["status"] != "SUCCEEDED" or result["model_version"] is None:
            log.warning("%s: retraining %s %s: %s", result["pipeline"], result["request_id"],
                        result["status"], result["reason"])  # fmt: skip
            return []
        metrics = dict(result["metrics"])
        reason = (
            f"retrained after drift alert {alert.get('alert_id', '?')}; holdout "
            + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
            + "; scoring in shadow against the champion"
        )
        return [self._decision(result["pipeline"], result["model_name"], int(result["model_version"]),
                               "SHADOW", reason, metrics)]  # fmt: skip

    # -- champion / challenger ---------------------------------------------------------------------
    def on_promotion(self, record: Mapping[str, Any]) -> None:
        """Track champion and challenger from every decision on the topic (ours, users', the learner's)."""
        st = self._state(record["pipeline"])
        key = (record["model_name"], int(record["version"]))
        if record["action"] == "SHADOW":
            st.challenger = key
        elif record["action"] in ("PROMOTE", "ROLLBACK"):
            st.champion = key
            if st.challenger == key:
                st.challenger = None
        elif record["action"] == "DISCARD" and st.challenger == key:
            st.challenger = None
        if record["action"] in ("PROMOTE", "DISCARD") and record["actor"] == ACTOR:
            st.decided.add(key)

    def on_evaluation(self, ev: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Promote a challenger that wins by the margin over enough labels; discard one that does not."""
        pipeline = ev["pipeline"]
        definition = self.pipelines.get(pipeline)
        st = self._state(pipeline)
        key = (ev["challenger_model"], int(ev["challenger_version"]))
        if definition is None or key in st.decided or st.challenger != key:
            return []
        policy = definition["policy"]
        gain = ev["challenger_value"] - ev["champion_value"]
        if not ev["higher_is_better"]:
            gain = -gain
        numbers = {
            "champion": ev["champion_value"],
            "challenger": ev["challenger_value"],
            "labels": float(ev["labels"]),
        }
        versus = (
            f"{ev['challenger_model']} v{ev['challenger_version']} vs champion {ev['champion_model']} "
            f"v{ev['champion_version']}: {ev['metric']} {ev['challenger_value']:.4f} "
            f"vs {ev['champion_value']:.4f} over {ev['labels']} paired labels"
        )
        if ev["labels"] >= policy["challenger_min_labels"] and gain >= policy["challenger_margin"]:
            st.decided.add(key)
            reason = f"challenger won by {gain:.4f} (margin {policy['challenger_margin']}): {versus}"
            return [self._decision(pipeline, key[0], key[1], "PROMOTE", reason, numbers)]
        if ev["labels"] >= policy["challenger_max_labels"]:
            st.decided.add(key)
            reason = f"challenger did not win by {policy['challenger_margin']}: {versus}"
            return [self._decision(pipeline, key[0], key[1], "DISCARD", reason, numbers)]
        return []

    def _decision(
        self, pipeline: str, model: str, version: int, action: str, reason: str, metrics: Mapping[str, float]
    ) -> dict[str, Any]:
        st = self._state(pipeline)
        return {
            "pipeline": pipeline,
            "model_name": model,
            "action": action,
            "version": version,
            "previous_version": st.champion[1] if st.champion else None,
            "actor": ACTOR,
            "reason": reason,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "decided_at": self.now_ms(),
        }
