"""Serving logic of the predictor: which model version is live per pipeline, swaps, and predicting.

Pure (no Kafka, no Faust): the predictor service feeds it model-version and promotion records and
batches of feature vectors. A version is unpickled only when it is promoted and only after its
checksum and signature verify; a rejected artifact leaves the current model serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamml.artifacts import ArtifactRejectedError, load, verify
from streamml.signing import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveModel:
    pipeline: str
    model_name: str
    version: int
    model: Any
    regression: bool


@dataclass(frozen=True)
class RegistryEvent:
    """Something an operator should see: a swap or a rejected artifact (the service turns it into records)."""

    kind: str  # "swap" | "rejected"
    pipeline: str
    model_name: str
    version: int
    previous_version: int | None = None
    reason: str = ""


@dataclass
class ModelRegistry:
    """Model versions seen so far and the live one per pipeline."""

    signing_key: bytes | Keys | None  # verifies versions (a predictor needs no private key)
    regression: dict[str, bool] = field(default_factory=dict)  # pipeline -> task is regression
    versions: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    live: dict[str, LiveModel] = field(default_factory=dict)
    shadow: dict[str, LiveModel] = field(default_factory=dict)  # challenger scored beside the champion
    wanted: dict[str, tuple[str, int]] = field(default_factory=dict)  # promoted but not yet received
    wanted_shadow: dict[str, tuple[str, int]] = field(default_factory=dict)  # shadowed, not yet received
    rejected: set[tuple[str, str, int]] = field(default_factory=set)
    previous: dict[str, tuple[str, int]] = field(default_factory=dict)  # the rollback target per pipeline
    # Versions a decision named before their record arrived: each is verified when it arrives, even if a
    # later decision overrode it meanwhile, so a promoted forgery is always reported, never silently dropped.
    named: set[tuple[str, str, int]] = field(default_factory=set)
    # Reads one version's record (with its artifact) back from the model-versions topic, for a decision
    # about a version whose artifact was dropped from memory; None where there is no such source.
    fetch: Callable[[str, str, int], Mapping[str, Any] | None] | None = None
    spare_bytes: int = 32 * 1024 * 1024  # artifacts kept beyond the servable ones, per pipeline

    def on_version(self, record: Mapping[str, Any]) -> list[RegistryEvent]:
        key = (record["pipeline"], record["model_name"], int(record["version"]))
        self.versions[key] = dict(record)
        named = key in self.named
        self.named.discard(key)
        if self.wanted.get(key[0]) == (key[1], key[2]):
            events = self._activate(*key)
        elif self.wanted_shadow.get(key[0]) == (key[1], key[2]):
            events = self._shadow(*key)
        elif named:
            events = self._check(*key)
        else:
            events = []
        self._trim(key[0])
        return events

    def _check(self, pipeline: str, name: str, version: int) -> list[RegistryEvent]:
        """Verify (never unpickle) a version a decision named that is no longer wanted."""
        try:
            verify(self.versions[(pipeline, name, version)], self.signing_key)
        except ArtifactRejectedError as exc:
            self.rejected.add((pipeline, name, version))
            return [RegistryEvent("rejected", pipeline, name, version, None, str(exc))]
        return []

    def retry(self, pipeline: str) -> list[RegistryEvent]:
        """Decisions waiting for a version that was seen but not kept (its pipeline was not known yet)."""
        events: list[RegistryEvent] = []
        for pending in (self.wanted.get(pipeline), self.wanted_shadow.get(pipeline)):
            if pending is None or (pipeline, *pending) in self.versions or self.fetch is None:
                continue
            fetched = self.fetch(pipeline, pending[0], pending[1])
            if fetched is not None:
                events += self.on_version(fetched)
        return events

    def _trim(self, pipeline: str) -> None:
        """Keep artifacts only of versions this predictor may serve next: live, shadow, rollback target,
        decisions waiting for their version, the newest version of each model, and the most recent others
        within `spare_bytes` (never a rejected one). The rest keep their metadata: a later decision about
        one reads its artifact back from the topic, so memory does not grow with every version published."""
        if self.fetch is None:  # nowhere to read a dropped artifact back from: keep them all
            return
        keep = {self.wanted.get(pipeline), self.wanted_shadow.get(pipeline), self.previous.get(pipeline)}
        newest: dict[str, int] = {}  # the newest version of each model: the likely next decision
        for p, name, version in self.versions:
            if p == pipeline and version > newest.get(name, -1):
                newest[name] = version
        keep.update(newest.items())
        for held in (self.live.get(pipeline), self.shadow.get(pipeline)):
            if held is not None:
                keep.add((held.model_name, held.version))
        budget = self.spare_bytes  # beyond those, the most recent versions while they fit the budget
        for (p, name, version), record in sorted(self.versions.items(), key=lambda kv: -kv[0][2]):
            artifact = record.get("artifact")
            if p != pipeline or artifact is None:
                continue
            if (p, name, version) in self.rejected:
                record["artifact"] = None
            elif (name, version) not in keep:
                budget -= len(artifact)
                if budget < 0:
                    record["artifact"] = None

    def _record(self, pipeline: str, name: str, version: int) -> Mapping[str, Any] | None:
        record = self.versions.get((pipeline, name, version))
        if record is not None and record.get("artifact") is None and self.fetch is not None:
            fetched = self.fetch(pipeline, name, version)
            if fetched is not None:
                record = self.versions[(pipeline, name, version)] = dict(fetched)
        return record

    def on_promotion(self, record: Mapping[str, Any]) -> list[RegistryEvent]:
        pipeline, name, version = record["pipeline"], record["model_name"], int(record["version"])
        challenger = self.shadow.get(pipeline)
        is_challenger = challenger is not None and (challenger.model_name, challenger.version) == (
            name,
            version,
        )
        if (
            record["action"] in ("SHADOW", "PROMOTE", "ROLLBACK")
            and (pipeline, name, version) not in self.versions
        ):
            self.named.add((pipeline, name, version))
        if record["action"] == "SHADOW":
            return self._shadow(pipeline, name, version)
        if record["action"] == "DISCARD":
            if self.wanted_shadow.get(pipeline) == (name, version):
                del self.wanted_shadow[pipeline]
            if is_challenger:
                del self.shadow[pipeline]
                return [RegistryEvent("unshadow", pipeline, name, version)]
            return []
        if record["action"] not in ("PROMOTE", "ROLLBACK"):
            return []
        current = self.live.get(pipeline)
        if record["actor"] == "auto" and current is not None and current.model_name != name:
            # AUTO promotes each new online version only while the online model serves: it never
            # overrides a model the controller or a user put live (decided in topic order, so no races).
            return []
        if is_challenger:
            del self.shadow[pipeline]  # the challenger becomes the champion
        current = self.live.get(pipeline)
        if current is not None and (current.model_name, current.version) == (name, version):
            self.wanted.pop(pipeline, None)  # a later decision overrides an earlier pending one
            return []
        if (pipeline, name, version) in self.rejected:  # rejected once, rejected for good (no re-read)
            return [RegistryEvent("rejected", pipeline, name, version, None, "rejected before")]
        self.wanted[pipeline] = (name, version)
        if (pipeline, name, version) not in self.versions and self.fetch is not None:
            fetched = self.fetch(pipeline, name, version)  # seen but not kept (undeclared at the time)
            if fetched is not None:
                self.versions[(pipeline, name, version)] = dict(fetched)
        if (pipeline, name, version) in self.versions:
            return self._activate(pipeline, name, version)
        return []  # the version record has not arrived yet: activate when it does

    def _shadow(self, pipeline: str, name: str, version: int) -> list[RegistryEvent]:
        if (pipeline, name, version) not in self.versions and self.fetch is not None:
            fetched = self.fetch(pipeline, name, version)
            if fetched is not None:
                self.versions[(pipeline, name, version)] = dict(fetched)
        record = self._record(pipeline, name, version)
        if record is None:  # the decision overtook the version record: shadow it when it arrives
            self.wanted_shadow[pipeline] = (name, version)
            return []
        self.wanted_shadow.pop(pipeline, None)
        try:
            state = load(record, self.signing_key)
        except ArtifactRejectedError as exc:
            self.rejected.add((pipeline, name, version))
            self._trim(pipeline)
            return [RegistryEvent("rejected", pipeline, name, version, None, str(exc))]
        model = state["model"] if isinstance(state, dict) else state
        self.shadow[pipeline] = LiveModel(
            pipeline, name, version, model, self.regression.get(pipeline, False)
        )
        self._trim(pipeline)
        return [RegistryEvent("shadow", pipeline, name, version)]

    def _activate(self, pipeline: str, name: str, version: int) -> list[RegistryEvent]:
        record = self._record(pipeline, name, version)
        assert record is not None  # callers check the version was seen
        previous = self.live.get(pipeline)
        prev_version = previous.version if previous else None
        try:
            state = load(record, self.signing_key)
            model = state["model"] if isinstance(state, dict) else state
        except ArtifactRejectedError as exc:
            self.rejected.add((pipeline, name, version))
            self.wanted.pop(pipeline, None)
            log.warning("rejected %s/%s v%d: %s", pipeline, name, version, exc)
            self._trim(pipeline)
            return [RegistryEvent("rejected", pipeline, name, version, prev_version, str(exc))]
        self.wanted.pop(pipeline, None)
        self.live[pipeline] = LiveModel(pipeline, name, version, model, self.regression.get(pipeline, False))
        if previous is not None:
            self.previous[pipeline] = (previous.model_name, previous.version)
        self._trim(pipeline)
        return [RegistryEvent("swap", pipeline, name, version, prev_version)]


def predict_one(live: LiveModel, features: Mapping[str, Any]) -> tuple[Any, float | None, dict[str, float]]:
    """(prediction, score, probabilities) of one feature dict."""
    if live.regression:
        y = live.model.predict_one(features)
        return (None if y is None else float(y)), None, {}
    proba = live.model.predict_proba_one(features)
    if not proba:
        return None, None, {}
    label = max(proba, key=proba.__getitem__)
    return label, float(proba[label]), {str(k): float(v) for k, v in proba.items()}


def is_batch_model(live: LiveModel) -> bool:
    """Whether the model scores a batch in one call (scikit-learn models from the trainer)."""
    return hasattr(live.model, "predict_proba_batch" if not live.regression else "predict_batch")


def answers_for(
    live: LiveModel, batch: list[Mapping[str, Any]]
) -> list[tuple[Any, float | None, dict[str, float]]]:
    """(prediction, score, probabilities) per feature dict, in one call when the model has a batch API
    (scikit-learn models from the trainer: `predict_batch` / `predict_proba_batch`); River models predict
    one event at a time (their `*_many` methods want DataFrames and cost more than they save here)."""
    model = live.model
    if live.regression and hasattr(model, "predict_batch"):
        return [(None if y is None else float(y), None, {}) for y in model.predict_batch(batch)]
    if not live.regression and hasattr(model, "predict_proba_batch"):
        out: list[tuple[Any, float | None, dict[str, float]]] = []
        for proba in model.predict_proba_batch(batch):
            if not proba:
                out.append((None, None, {}))
                continue
            label = max(proba, key=proba.__getitem__)
            out.append((label, float(proba[label]), {str(k): float(v) for k, v in proba.items()}))
        return out
    return [predict_one(live, x) for x in batch]


def prediction_records(
    live: LiveModel, fvs: Sequence[Mapping[str, Any]], now_ms: int, *, shadow: bool = False
) -> list[dict[str, Any]]:
    """Prediction records of a batch of feature vectors by one model."""
    answers = answers_for(live, [fv["features"] for fv in fvs])
    return [_record(live, fv, answer, now_ms, shadow) for fv, answer in zip(fvs, answers, strict=True)]


def prediction_record(
    live: LiveModel, fv: Mapping[str, Any], now_ms: int, *, shadow: bool = False
) -> dict[str, Any]:
    return _record(live, fv, predict_one(live, fv["features"]), now_ms, shadow)


def _record(
    live: LiveModel,
    fv: Mapping[str, Any],
    answer: tuple[Any, float | None, dict[str, float]],
    now_ms: int,
    shadow: bool,
) -> dict[str, Any]:
    label, score, proba = answer
    if isinstance(label, bool | int | float | str) or label is None:
        value = label
    else:  # numpy scalars and the like
        value = label.item() if hasattr(label, "item") else str(label)
    return {
        "event_id": fv["event_id"],
        "key": fv["key"],
        "pipeline": fv["pipeline"],
        "model_name": live.model_name,
        "model_version": live.version,
        "prediction": value,
        "score": score,
        "probabilities": proba,
        "shadow": shadow,
        "event_time": fv["event_time"],
        "feature_time": fv["feature_time"],
        "prediction_time": now_ms,
        "source": fv.get("source"),  # the raw event's offset: tells apart events that share an id
    }
