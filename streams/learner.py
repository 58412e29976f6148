"""Online learning logic: prequential evaluation (predict, then learn) and versioned, signed snapshots.

Pure (no Kafka, no Faust). The learner service feeds it feature vectors with their source offsets and
labels, and publishes the ModelVersion records it returns. The offsets in a snapshot are the resume
point: after a restart the service loads the last version and seeks to them, so no event is learned
twice and none is skipped.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from river import metrics

from streamml import artifacts, estimators
from streamml.signing import Keys


def new_metrics(regression: bool) -> dict[str, Any]:
    if regression:
        return {"mae": metrics.MAE(), "rmse": metrics.RMSE()}
    return {"accuracy": metrics.Accuracy(), "log_loss": metrics.CrossEntropy()}  # also right for multiclass


@dataclass
class LabelJoin:
    """Features waiting for a late label and labels waiting for their features, each kept `ttl_s`."""

    ttl_s: float
    features: OrderedDict[str, tuple[float, dict[str, Any]]] = field(default_factory=OrderedDict)
    labels: OrderedDict[str, tuple[float, Any]] = field(default_factory=OrderedDict)
    expired: int = 0

    def add_features(self, fv: dict[str, Any], now: float) -> dict[str, Any] | None:
        hit = self.labels.pop(fv["event_id"], None)
        if hit is not None:
            return {**fv, "label": hit[1]}
        self.features[fv["event_id"]] = (now, fv)
        return None

    def add_label(self, event_id: str, label: Any, now: float) -> dict[str, Any] | None:
        hit = self.features.pop(event_id, None)
        if hit is not None:
            return {**hit[1], "label": label}
        self.labels[event_id] = (now, label)
        return None

    def expire(self, now: float) -> None:
        for store in (self.features, self.labels):
            while store:
                first = next(iter(store.values()))
                if now - first[0] < self.ttl_s:
                    break
                store.popitem(last=False)
                self.expired += 1


@dataclass
class OnlineLearner:
    """One pipeline's online model, its running metrics and the lineage of what it learned."""

    pipeline: str
    model_name: str
    estimator_spec: str
    params: dict[str, str]
    regression: bool
    signing_key: bytes | Keys
    model: Any = None
    version: int = 0
    events_seen: int = 0
    since_snapshot: int = 0
    last_snapshot: float = field(default_factory=time.monotonic)
    metrics: dict[str, Any] = field(default_factory=dict)
    first_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = estimators.build(self.estimator_spec, estimators.decode_params(self.params))
        if not self.metrics:
            self.metrics = new_metrics(self.regression)

    @classmethod
    def resume(cls, record: Mapping[str, Any], regression: bool, signing_key: bytes | Keys) -> OnlineLearner:
        """Continue from a published (and verified) version: its model, metrics state and offsets."""
        state = artifacts.load(record, signing_key)
        learner = cls(
            pipeline=record["pipeline"],
            model_name=record["model_name"],
            estimator_spec=record["estimator_spec"],
            params=dict(record["params"]),
            regression=regression,
            signing_key=signing_key,
            model=state["model"],
            version=int(record["version"]),
            events_seen=int(record["events_seen"]),
            metrics=state["metrics"],
        )
        for r in record["training_data"]:
            learner.first_offsets[(r["topic"], r["partition"])] = r["start_offset"]
            learner.positions[(r["topic"], r["partition"])] = r["end_offset"]
        return learner

    def consumed(self, topic: str, partition: int, offset: int) -> None:
        """Advance the resume point over a record (labelled or not)."""
        self.first_offsets.setdefault((topic, partition), offset)
        self.positions[(topic, partition)] = offset + 1

    def learn(self, features: Mapping[str, Any], label: Any) -> Any:
        """Prequential step: predict with the model as it is, score it, then learn. Returns the prediction."""
        if self.regression:
            y_pred = self.model.predict_one(features)
            y = float(label)
            self.metrics["mae"].update(y, y_pred)
            self.metrics["rmse"].update(y, y_pred)
        else:
            proba = self.model.predict_proba_one(features)
            y = label
            y_pred = max(proba, key=proba.__getitem__) if proba else None
            self.metrics["accuracy"].update(y, y_pred)
            self.metrics["log_loss"].update(y, proba)
        self.model.learn_one(features, y)
        self.events_seen += 1
        self.since_snapshot += 1
        return y_pred

    def metric_values(self) -> dict[str, float]:
        values = {name: float(m.get()) for name, m in self.metrics.items()}
        values["events_seen"] = float(self.events_seen)
        return values

    def due(self, every_events: int, every_seconds: float) -> bool:
        if self.since_snapshot == 0:
            return False
        return self.since_snapshot >= every_events or time.monotonic() - self.last_snapshot >= every_seconds

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        """A new signed ModelVersion record of the current state (model + metric state)."""
        data = artifacts.serialize({"model": self.model, "metrics": self.metrics})
        parent = self.version or None
        self.version += 1
        self.since_snapshot = 0
        self.last_snapshot = time.monotonic()
        record = {
            "pipeline": self.pipeline,
            "model_name": self.model_name,
            "version": self.version,
            "kind": "ONLINE",
            "estimator_spec": self.estimator_spec,
            "params": dict(self.params),
            "artifact_format": artifacts.FORMAT,
            "artifact": data,
            "artifact_uri": None,
            "sha256": artifacts.sha256_hex(data),
            "signature": None,
            "library_versions": artifacts.library_versions(),
            "metrics": self.metric_values(),
            "training_data": [
                {"topic": t, "partition": p, "start_offset": self.first_offsets[(t, p)], "end_offset": end}
                for (t, p), end in sorted(self.positions.items())
            ],
            "events_seen": self.events_seen,
            "parent_version": parent,
            "created_at": now_ms,
        }
        record["signature"] = artifacts.signature(record, data, self.signing_key)
        return record


def auto_promotion(version: Mapping[str, Any], decided_at: int) -> dict[str, Any]:
    """The Promotion record the learner publishes for each new version in promotion mode AUTO."""
    return {
        "pipeline": version["pipeline"],
        "model_name": version["model_name"],
        "action": "PROMOTE",
        "version": version["version"],
        "previous_version": version["parent_version"],
        "actor": "auto",
        "reason": "promotion mode AUTO: each new online version goes live",
        "metrics": version["metrics"],
        "decided_at": decided_at,
    }
