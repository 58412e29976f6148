"""Batch training logic of the trainer: request checks, the dataset of an exact slice, seeded scikit-learn
training with a small grid, holdout metrics, and the signed ModelVersion and TrainingResult records.

Pure (no Kafka, no Faust): the trainer service resolves offsets, reads the slice and publishes records.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import threading
import zlib
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.base import is_classifier, is_regressor
from sklearn.feature_extraction import DictVectorizer
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, mean_squared_error, roc_auc_score
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from streamml import artifacts, estimators
from streamml.codec import codec_for
from streamml.errors import DecodeError, StreamMLError, ValidationError
from streamml.signing import Keys
from streamml.topics import MODEL_MAX_BYTES, Catalogue

log = logging.getLogger(__name__)

MAX_GRID = 64  # "a small grid": each candidate is a full fit on the request's slice
MAX_SEED = 2**32 - 1  # scikit-learn's random_state range
MAX_MODEL_NAME = 63


class RequestRejectedError(ValidationError):
    """The request cannot be trained as asked; the message says what the requester should change."""


class TrainingFailedError(StreamMLError):
    """The request was valid but training (or reading its data) failed."""


# -- what the trainer knows from the control topics ---------------------------------------------------
@dataclass
class TrainerState:
    """Pipelines, the highest version per (pipeline, model) and the live version per pipeline."""

    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    live: dict[str, int] = field(default_factory=dict)

    def on_pipeline(self, record: Mapping[str, Any] | None, key: str | None = None) -> None:
        """A definition, a deleted marker, or a tombstone (None, identified by its record key)."""
        if record is None:
            if key:
                self.pipelines.pop(key, None)
                self.deleted.add(key)
            return
        name = record["name"]
        if record["deleted"]:
            self.pipelines.pop(name, None)
            self.deleted.add(name)
            return
        self.deleted.discard(name)
        self.pipelines[name] = dict(record)

    def on_version(self, record: Mapping[str, Any]) -> None:
        key = (record["pipeline"], record["model_name"])
        self.versions[key] = max(self.versions.get(key, 0), int(record["version"]))

    def on_promotion(self, record: Mapping[str, Any]) -> None:
        if record["action"] in ("PROMOTE", "ROLLBACK"):  # what the predictor serves from now on
            self.live[record["pipeline"]] = int(record["version"])

    def next_version(self, pipeline: str, model_name: str) -> int:
        """The number the next version of (pipeline, model) gets: the highest published + 1.

        Numbers are unique because one instance at a time allocates them for a pipeline (the owner of its
        requests partition, see `owner_partition`), after it has read every version published before, and
        records each one it publishes (`on_version`) once its transaction commits. A number taken by an
        answer that was never committed is free again. The learner numbers its ONLINE model, under
        another name, itself.
        """
        return self.versions.get((pipeline, model_name), 0) + 1


# -- who answers a request --------------------------------------------------------------------------------
def owner_partition(pipeline: str, partitions: int) -> int:
    """The requests partition whose owner answers (and numbers versions) for `pipeline`: the partition
    librdkafka's default partitioner (CRC-32 of the key) gives a request keyed by its pipeline."""
    return zlib.crc32(pipeline.encode()) % partitions


@dataclass(frozen=True)
class Route:
    """What the owner of a requests partition does with one request."""

    action: Literal["answer", "skip", "forward"]
    partition: int  # where it is answered (forward: the partition it is produced to)
    reason: str = ""


def route_request(
    request_id: str, pipeline: str, partition: int, partitions: int, answered: Container[str]
) -> Route:
    """Answer it here; skip it (answered before, e.g. a replay after a failover); or forward it to the
    partition of its pipeline when a producer keyed it otherwise, so one pipeline's versions are always
    numbered by one owner."""
    owner = owner_partition(pipeline, partitions)
    if request_id in answered:
        return Route("skip", owner, f"request {request_id} was answered before")
    if owner != partition:
        return Route("forward", owner, f"pipeline {pipeline} is answered on partition {owner}")
    return Route("answer", partition)


# -- checking a request --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A request that passed every check that needs no data: what to read and what to train."""

    request: dict[str, Any]
    pipeline: dict[str, Any]
    regression: bool
    features_topic: str
    labels_topic: str | None  # set when labels come from the labels topic (joined by event id)
    params: dict[str, dict[str, Any]]  # per step as written in the spec, with random_state filled in
    candidates: list[dict[str, dict[str, Any]]]  # grid overrides per step, in grid order ([{}] if none)
    parent_version: int | None

    @property
    def spec(self) -> str:
        return str(self.request["estimator_spec"])


def plan_request(request: Mapping[str, Any], state: TrainerState, catalogue: Catalogue) -> Plan:
    """Every check that needs no Kafka read; raises RequestRejectedError with a reason a person can act on."""
    name = request["pipeline"]
    if name in state.deleted and name not in state.pipelines:
        raise RequestRejectedError(f"pipeline {name!r} was deleted: apply it again to train models for it")
    pipeline = state.pipelines.get(name)
    if pipeline is None:
        known = ", ".join(sorted(state.pipelines)) or "none"
        raise RequestRejectedError(
            f"unknown pipeline {name!r} (known: {known}); apply it first with `streamml pipeline apply`"
        )
    if pipeline["label"]["source"] == "NONE":
        raise RequestRejectedError(f"pipeline {name!r} has no labels (label source none): nothing to learn")
    _check_model_name(request["model_name"], pipeline)
    split = float(request["validation_split"])
    if not 0.0 < split < 1.0:
        raise RequestRejectedError(
            f"validation_split must be between 0 and 1 (exclusive), got {split}: "
            "a fraction of the slice must be held out to evaluate the candidate"
        )
    seed = int(request["seed"])
    if not 0 <= seed <= MAX_SEED:
        raise RequestRejectedError(
            f"seed must be between 0 and {MAX_SEED} (scikit-learn's range), got {seed}"
        )
    _check_data_form(request)
    regression = pipeline["task"] == "REGRESSION"
    spec = request["estimator_spec"]
    steps = check_estimator(spec)
    params = seeded_params(steps, _step_params(steps, request["params"]), seed)
    candidates = expand_grid(steps, request["param_grid"])
    # Parameters and every grid candidate pass the same checks as any estimator spec (estimators.build
    # checks before it constructs): values are data, never files, callables or modules. Unknown parameter
    # names fail here too, not after reading the data.
    for overrides in candidates:
        try:
            model = estimators.build(spec, merge_params(params, overrides))
        except ValidationError as exc:
            raise RequestRejectedError(str(exc)) from exc
        _check_task(spec, model, regression, name)
    labels_topic = catalogue.labels(name).name if pipeline["label"]["source"] == "TOPIC" else None
    return Plan(
        request=dict(request),
        pipeline=pipeline,
        regression=regression,
        features_topic=catalogue.features(name).name,
        labels_topic=labels_topic,
        params=params,
        candidates=candidates,
        parent_version=state.live.get(name),
    )


def _check_model_name(model_name: str, pipeline: Mapping[str, Any]) -> None:
    if not 0 < len(model_name) <= MAX_MODEL_NAME or "/" in model_name or model_name.strip() != model_name:
        raise RequestRejectedError(
            f"invalid model_name {model_name!r}: use 1-{MAX_MODEL_NAME} characters without '/' or spaces "
            "at the ends (e.g. 'batch')"
        )
    online = [m["name"] for m in pipeline["models"] if m["kind"] == "ONLINE"]
    if model_name in online:
        raise RequestRejectedError(
            f"model name {model_name!r} belongs to the pipeline's online (River) model, whose versions the "
            "learner numbers: publish batch candidates under another name (e.g. 'batch')"
        )


def _check_data_form(request: Mapping[str, Any]) -> None:
    time_from, time_to = request["time_from"], request["time_to"]
    if request["data_ranges"]:
        if time_from is not None or time_to is not None:
            raise RequestRejectedError(
                "give the data either as data_ranges or as time_from/time_to, not both"
            )
        return
    if time_from is None:
        raise RequestRejectedError(
            "no training data: give data_ranges (offset ranges of the features topic) or time_from "
            "(and optionally time_to)"
        )
    if time_to is not None and time_to <= time_from:
        raise RequestRejectedError(
            f"empty time range: time_to ({time_to}) must be after time_from ({time_from}) "
            "(time_to is exclusive)"
        )


def check_estimator(spec: str) -> list[estimators.Step]:
    """Only allowlisted scikit-learn estimators: River models are the learner's, anything else is refused."""
    try:
        steps = estimators.parse_spec(spec)
    except ValidationError as exc:
        raise RequestRejectedError(str(exc)) from exc
    for step in steps:
        if step.short.startswith("sklearn."):
            continue
        if _is_river_class(step.path):
            raise RequestRejectedError(
                f"{step.short!r} is a River (online) estimator: the trainer trains scikit-learn estimators "
                "(sklearn.*, e.g. 'sklearn.linear_model.LogisticRegression'); River models are learned "
                "by the learner"
            )
        raise RequestRejectedError(
            f"estimator {step.short!r} is not allowed: a batch training request names scikit-learn "
            "estimator classes from the allowlist (sklearn.*), e.g. 'sklearn.linear_model.LogisticRegression'"
        )
    if estimators.library_of(spec) != "sklearn":  # implied by the loop; the rule, stated once
        raise RequestRejectedError(f"{spec!r} is not a scikit-learn estimator")
    for step in steps:
        try:
            estimators.resolve_class(step.path)
        except ValidationError as exc:
            raise RequestRejectedError(str(exc)) from exc
    return steps


def _check_task(spec: str, model: Any, regression: bool, pipeline: str) -> None:
    if regression and not is_regressor(model):
        raise RequestRejectedError(
            f"{spec!r} is not a regressor, but pipeline {pipeline!r} is a regression task"
        )
    if not regression and not is_classifier(model):
        raise RequestRejectedError(
            f"{spec!r} is not a classifier, but pipeline {pipeline!r} is a classification task"
        )


def _is_river_class(path: str) -> bool:
    try:
        estimators.resolve_class(path)
    except ValidationError:
        return False
    return path.startswith("river.")


def _step_params(steps: Sequence[estimators.Step], encoded: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Decoded parameters keyed by each step's name as written in the spec (full paths accepted too)."""
    try:
        decoded = estimators.decode_params(encoded)
    except ValidationError as exc:
        raise RequestRejectedError(str(exc)) from exc
    out: dict[str, dict[str, Any]] = {}
    for key, value in decoded.items():
        step = _find_step(steps, key)
        if step is None:
            raise RequestRejectedError(
                f"parameters given for {key!r}, which is not a step of the spec "
                f"({', '.join(s.short for s in steps)})"
            )
        out.setdefault(step.short, {}).update(value)
    return out


def _find_step(steps: Sequence[estimators.Step], name: str) -> estimators.Step | None:
    return next((s for s in steps if name in (s.short, s.path)), None)


def seeded_params(
    steps: Sequence[estimators.Step], params: Mapping[str, Mapping[str, Any]], seed: int
) -> dict[str, dict[str, Any]]:
    """random_state=seed on every step that takes one (unless given), so a replay refits the same model."""
    out = {step: dict(p) for step, p in params.items()}
    for step in steps:
        cls = estimators.resolve_class(step.path)
        if "random_state" in inspect.signature(cls).parameters:
            out.setdefault(step.short, {}).setdefault("random_state", seed)
    return out


def expand_grid(
    steps: Sequence[estimators.Step], grid: Mapping[str, Sequence[str]]
) -> list[dict[str, dict[str, Any]]]:
    """Grid keys are '<step>.<parameter>' (or a bare parameter for a one-step spec), values JSON candidates.

    Combinations come in scikit-learn's ParameterGrid order: keys sorted, the last one varying fastest,
    values in the order given. The first best candidate wins, so this order is part of the contract.
    """
    axes: dict[tuple[str, str], list[Any]] = {}
    for key, values in grid.items():
        step_name, _, param = key.rpartition(".")
        step = _find_step(steps, step_name) if step_name else (steps[0] if len(steps) == 1 else None)
        if step is None or not param.isidentifier():
            raise RequestRejectedError(
                f"param_grid key {key!r} must be '<step>.<parameter>' with a step of the spec "
                f"({', '.join(s.short for s in steps)}), e.g. '{steps[-1].short}.C'"
            )
        if not values:
            raise RequestRejectedError(f"param_grid key {key!r} has no candidate values")
        decoded = []
        for text in values:
            if len(text) > estimators.MAX_PARAMS_TEXT:
                raise RequestRejectedError(
                    f"param_grid value of {key!r} is {len(text)} characters; at most "
                    f"{estimators.MAX_PARAMS_TEXT}"
                )
            try:
                decoded.append(json.loads(text))
            except (ValueError, RecursionError) as exc:  # also too deep, or an int of too many digits
                raise RequestRejectedError(
                    f"param_grid value {text[:80]!r} of {key!r} is not JSON: {exc}"
                ) from exc
        axes[(step.short, param)] = decoded
    keys = sorted(axes, key=lambda k: f"{k[0]}.{k[1]}")
    size = math.prod(len(axes[k]) for k in keys)
    if size > MAX_GRID:
        raise RequestRejectedError(f"param_grid has {size} combinations; at most {MAX_GRID} are trained")
    candidates: list[dict[str, dict[str, Any]]] = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        overrides: dict[str, dict[str, Any]] = {}
        for (step_name, param), value in zip(keys, combo, strict=True):
            overrides.setdefault(step_name, {})[param] = value
        candidates.append(overrides)
    return candidates


def merge_params(
    base: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    out = {step: dict(p) for step, p in base.items()}
    for step, p in overrides.items():
        out.setdefault(step, {}).update(p)
    return out


# -- the slice -----------------------------------------------------------------------------------------
Watermarks = Mapping[tuple[str, int], tuple[int, int]]  # (topic, partition) -> (low, high)


def check_ranges(
    ranges: Iterable[Mapping[str, Any]], features_topic: str, labels_topic: str | None, watermarks: Watermarks
) -> list[dict[str, Any]]:
    """The requested ranges, sorted, if each is non-empty, still stored and not beyond the end."""
    allowed = [t for t in (features_topic, labels_topic) if t]
    out: list[dict[str, Any]] = []
    for r in ranges:
        topic, partition = r["topic"], int(r["partition"])
        start, end = int(r["start_offset"]), int(r["end_offset"])
        where = f"{topic}[{partition}] offsets [{start}, {end})"
        if topic not in allowed:
            extra = f" or its labels topic {labels_topic!r}" if labels_topic else ""
            raise RequestRejectedError(
                f"range on topic {topic!r}: training data comes from the pipeline's features topic "
                f"{features_topic!r}{extra}"
            )
        marks = watermarks.get((topic, partition))
        if marks is None:
            count = sum(1 for t, _ in watermarks if t == topic)
            raise RequestRejectedError(f"topic {topic!r} has no partition {partition} (it has {count})")
        low, high = marks
        if start < 0 or start >= end:
            raise RequestRejectedError(
                f"empty range {where}: start_offset must be below end_offset (end_offset is exclusive)"
            )
        if end > high:
            raise RequestRejectedError(
                f"range {where} goes beyond the end of the partition: its next offset is {high}, so "
                f"end_offset can be at most {high}"
            )
        if start < low:
            raise RequestRejectedError(
                f"range {where} no longer exists: records before offset {low} were deleted (retention or "
                f"delete-records); the oldest offset still stored is {low}"
            )
        out.append({"topic": topic, "partition": partition, "start_offset": start, "end_offset": end})
    out.sort(key=lambda r: (r["topic"], r["partition"], r["start_offset"]))
    for a, b in itertools.pairwise(out):
        same = (a["topic"], a["partition"]) == (b["topic"], b["partition"])
        if same and b["start_offset"] < a["end_offset"]:
            raise RequestRejectedError(
                f"ranges overlap in {a['topic']}[{a['partition']}] ([{a['start_offset']}, {a['end_offset']}) "
                f"and [{b['start_offset']}, {b['end_offset']})): records would count twice"
            )
    if not any(r["topic"] == features_topic for r in out):
        raise RequestRejectedError(f"no range on the features topic {features_topic!r}")
    return out


@dataclass
class Dataset:
    """Labelled feature dicts of a slice, in slice order, and what was left out and why."""

    features: list[dict[str, Any]] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    read: int = 0
    unlabelled: int = 0
    duplicates: int = 0
    undecodable: int = 0
    earlier: int = 0  # events that happened before the request's event_time_from


def assemble(
    values: Iterable[bytes | None],
    labels: Mapping[str, Any] | None,
    *,
    pipeline: str,
    event_time_from: int | None = None,
) -> Dataset:
    """FeatureVector bytes (slice order) → labelled examples: inline labels, or `labels` by event id.

    An event id seen twice (a producer retry upstream) is used once, at its first offset. With
    `event_time_from`, events that happened before it are left out (counted as `earlier`).
    """
    codec = codec_for("FeatureVector")
    data = Dataset()
    seen: set[str] = set()
    for value in values:
        data.read += 1
        try:
            fv = codec.decode(value or b"")
        except DecodeError:
            data.undecodable += 1
            continue
        if fv["pipeline"] != pipeline:
            data.undecodable += 1
            continue
        if event_time_from is not None and fv["event_time"] < event_time_from:
            data.earlier += 1
            continue
        if fv["event_id"] in seen:
            data.duplicates += 1
            continue
        seen.add(fv["event_id"])
        label = fv["label"] if labels is None else labels.get(fv["event_id"])
        if label is None:
            data.unlabelled += 1
            continue
        data.features.append(fv["features"])
        data.labels.append(label)
    return data


def label_map(values: Iterable[bytes | None]) -> dict[str, Any]:
    """Label records (slice order) by event id; a later label of the same event replaces an earlier one."""
    codec = codec_for("Label")
    out: dict[str, Any] = {}
    for value in values:
        try:
            rec = codec.decode(value or b"")
        except DecodeError:
            continue
        out[rec["event_id"]] = rec["label"]
    return out


def holdout_size(n: int, validation_split: float) -> int:
    return math.ceil(validation_split * n)  # what train_test_split holds out for a float test_size


def check_dataset(data: Dataset, regression: bool, validation_split: float, labels_from: str) -> None:
    """Enough labelled records, of the right kind, to train and hold some out."""
    n = len(data.labels)
    if n == 0:
        raise RequestRejectedError(
            f"no labelled records in the slice: {data.read} feature vectors read"
            + (f", {data.earlier} of them before event_time_from" if data.earlier else "")
            + f", none (of the rest) has a label ({labels_from}); choose a range whose events are labelled"
        )
    if regression:
        bad = next((y for y in data.labels if isinstance(y, bool | str)), None)
        if bad is not None:
            raise RequestRejectedError(
                f"label {bad!r} is not a number, but the pipeline is a regression task"
            )
    else:
        classes = sorted_classes(data.labels)
        if len(classes) < 2:
            raise RequestRejectedError(
                f"the slice has one class only ({classes[0]!r} in {n} labelled records): "
                "classification needs at least 2; widen the range"
            )
    n_holdout = holdout_size(n, validation_split)
    if n_holdout < 1 or n - n_holdout < 2:
        raise RequestRejectedError(
            f"too few labelled records ({n}) to hold out {validation_split:.0%} and train on the rest"
        )


def sorted_classes(labels: Iterable[Any]) -> list[Any]:
    return sorted(set(labels), key=lambda v: (type(v).__name__, v))


# -- training ------------------------------------------------------------------------------------------
_serving = threading.local()


def _one_openmp_thread() -> None:
    """One-event predictions never gain from OpenMP threads, and threads spinning beside other busy
    processes made one HistGradientBoosting prediction ~100x slower (measured 0.1 s): the thread that
    serves a BatchModel runs OpenMP on one thread. (OpenMP limits are per calling thread.)"""
    if not getattr(_serving, "limited", False):
        threadpool_limits(1, user_api="openmp")
        _serving.limited = True


class BatchModel:
    """A fitted scikit-learn estimator behind River's one-dict interface, which the predictor calls.

    Classes are kept as the original label values (True/False, 0/1, strings): the estimator is fitted
    on their indices, so predictions come back exactly as the labels were written, never as numpy types.
    """

    def __init__(self, vectorizer: DictVectorizer, estimator: Any, classes: list[Any] | None) -> None:
        self.vectorizer = vectorizer
        self.estimator = estimator
        self.classes = classes  # None for regression

    def transform(self, xs: Sequence[Mapping[str, Any]]) -> Any:
        return self.vectorizer.transform(xs)

    def predict_proba_one(self, x: Mapping[str, Any]) -> dict[Any, float]:
        if self.classes is None:
            return {}
        _one_openmp_thread()
        return self._proba(self.transform([x]))[0]

    def predict_one(self, x: Mapping[str, Any]) -> Any:
        _one_openmp_thread()
        return self._predict(self.transform([x]))[0]

    def predict_proba_batch(self, xs: Sequence[Mapping[str, Any]]) -> list[dict[Any, float]]:
        """A whole batch in one vectorized call: scikit-learn's per-call overhead dominates one-row calls."""
        if self.classes is None:
            return [{} for _ in xs]
        _one_openmp_thread()
        return self._proba(self.transform(xs))

    def predict_batch(self, xs: Sequence[Mapping[str, Any]]) -> list[Any]:
        _one_openmp_thread()
        return self._predict(self.transform(xs))

    def _proba(self, matrix: Any) -> list[dict[Any, float]]:
        assert self.classes is not None
        classes = self.classes
        if not hasattr(self.estimator, "predict_proba"):  # e.g. LinearSVC: all mass on the predicted class
            return [{y: 1.0} for y in self._predict(matrix)]
        codes = [int(c) for c in self.estimator.classes_]
        return [
            {classes[c]: float(p) for c, p in zip(codes, row, strict=True)}
            for row in self.estimator.predict_proba(matrix)
        ]

    def _predict(self, matrix: Any) -> list[Any]:
        raw = self.estimator.predict(matrix)
        if self.classes is None:
            return [float(y) for y in raw]
        return [self.classes[int(y)] for y in raw]


@dataclass
class Outcome:
    model: BatchModel
    params: dict[str, dict[str, Any]]  # the chosen candidate's full parameters
    metrics: dict[str, float]
    train_records: int
    holdout_records: int
    candidates: list[dict[str, float]]  # each candidate's holdout metrics, in grid order
    chosen: int


def split_indices(
    labels: Sequence[Any], validation_split: float, seed: int, classification: bool
) -> tuple[list[int], list[int]]:
    """(train, holdout) indices: seeded, stratified by class when every class can be on both sides."""
    n = len(labels)
    stratify = None
    if classification:
        counts: dict[Any, int] = {}
        for y in labels:
            counts[y] = counts.get(y, 0) + 1
        n_holdout = holdout_size(n, validation_split)
        if min(counts.values()) >= 2 and len(counts) <= min(n_holdout, n - n_holdout):
            stratify = [repr(y) for y in labels]
    train, holdout = train_test_split(
        list(range(n)), test_size=validation_split, random_state=seed, stratify=stratify
    )
    return sorted(train), sorted(holdout)  # slice order on each side: the fit sees records as stored


def evaluate(model: BatchModel, matrix: Any, labels: Sequence[Any]) -> dict[str, float]:
    """Holdout metrics: accuracy, log loss (and ROC AUC when binary), or MAE and RMSE."""
    if model.classes is None:
        y_true = np.asarray(labels, dtype=float)
        y_pred = np.asarray(model._predict(matrix), dtype=float)
        return {
            "mae": float(mean_absolute_error(y_true, y_pred)),
            "rmse": float(math.sqrt(mean_squared_error(y_true, y_pred))),
        }
    index = {c: i for i, c in enumerate(model.classes)}
    codes = np.asarray([index[y] for y in labels])
    predicted = np.asarray([index[y] for y in model._predict(matrix)])
    out = {"accuracy": float(accuracy_score(codes, predicted))}
    if hasattr(model.estimator, "predict_proba"):
        proba = model.estimator.predict_proba(matrix)
        fitted = [int(c) for c in model.estimator.classes_]
        if set(codes.tolist()) <= set(fitted):
            out["log_loss"] = float(log_loss(codes, proba, labels=fitted))
        if len(fitted) == 2 and len(set(codes.tolist())) == 2:
            out["roc_auc"] = float(roc_auc_score(codes, proba[:, 1]))
    return out


def score(metrics: Mapping[str, float], regression: bool) -> float:
    """Higher is better: holdout accuracy, or minus RMSE."""
    return -metrics["rmse"] if regression else metrics["accuracy"]


def train(plan: Plan, data: Dataset) -> Outcome:
    """Split, vectorize (fitted on the training side), fit each candidate, keep the first best on holdout."""
    request = plan.request
    split, seed = float(request["validation_split"]), int(request["seed"])
    train_idx, hold_idx = split_indices(data.labels, split, seed, classification=not plan.regression)
    vectorizer = DictVectorizer(sort=True, sparse=False)
    x_train = vectorizer.fit_transform([data.features[i] for i in train_idx])
    x_hold = vectorizer.transform([data.features[i] for i in hold_idx])
    hold_labels = [data.labels[i] for i in hold_idx]
    classes: list[Any] | None = None
    if plan.regression:
        y_train = np.asarray([float(data.labels[i]) for i in train_idx])
    else:
        classes = sorted_classes(data.labels)
        index = {c: i for i, c in enumerate(classes)}
        y_train = np.asarray([index[data.labels[i]] for i in train_idx])
        if len(set(y_train.tolist())) < 2:
            raise RequestRejectedError("the training side of the split has one class only: widen the range")
    results: list[dict[str, float]] = []
    best: tuple[float, int, BatchModel, dict[str, dict[str, Any]]] | None = None
    for i, overrides in enumerate(plan.candidates):
        params = merge_params(plan.params, overrides)
        estimator = estimators.build(plan.spec, params)
        try:
            estimator.fit(x_train, y_train)
        except Exception as exc:  # estimators raise many types for bad parameter combinations or data
            where = f" (grid candidate {json.dumps(overrides, sort_keys=True)})" if overrides else ""
            raise TrainingFailedError(
                f"fitting {plan.spec}{where} failed: {type(exc).__name__}: {exc}"
            ) from exc
        model = BatchModel(vectorizer, estimator, classes)
        metrics = evaluate(model, x_hold, hold_labels)
        results.append(metrics)
        value = score(metrics, plan.regression)
        if best is None or value > best[0]:  # strictly better: ties keep the earlier candidate
            best = (value, i, model, params)
    assert best is not None
    _, chosen, model, params = best
    metrics = dict(results[chosen])
    metrics["train_records"] = float(len(train_idx))
    metrics["holdout_records"] = float(len(hold_idx))
    return Outcome(model, params, metrics, len(train_idx), len(hold_idx), results, chosen)


# -- records -------------------------------------------------------------------------------------------
def version_record(
    plan: Plan,
    outcome: Outcome,
    *,
    version: int,
    training_data: Sequence[Mapping[str, Any]],
    signing_key: bytes | Keys,
    now_ms: int,
) -> dict[str, Any]:
    """A signed BATCH ModelVersion whose lineage says exactly what was read and how it was trained."""
    data = artifacts.serialize({"model": outcome.model})
    if len(data) > MODEL_MAX_BYTES - 64 * 1024:
        raise TrainingFailedError(
            f"the model artifact is {len(data) / 1e6:.1f} MB, above the {MODEL_MAX_BYTES / 1e6:.0f} MB a "
            "model-versions record can hold: choose a smaller model (fewer trees, lower depth)"
        )
    request = plan.request
    record = {
        "pipeline": request["pipeline"],
        "model_name": request["model_name"],
        "version": version,
        "kind": "BATCH",
        "estimator_spec": request["estimator_spec"],
        "params": estimators.encode_params(outcome.params),
        "artifact_format": artifacts.FORMAT,
        "artifact": data,
        "artifact_uri": None,
        "sha256": artifacts.sha256_hex(data),
        "signature": None,
        "library_versions": artifacts.library_versions(),
        "metrics": dict(outcome.metrics),
        "training_data": [dict(r) for r in training_data],
        "events_seen": outcome.train_records,
        "parent_version": plan.parent_version,
        "created_at": now_ms,
    }
    record["signature"] = artifacts.signature(record, data, signing_key)
    return record


def result_record(
    request: Mapping[str, Any],
    status: str,
    *,
    now_ms: int,
    duration_ms: int,
    reason: str = "",
    version: int | None = None,
    outcome: Outcome | None = None,
) -> dict[str, Any]:
    return {
        "request_id": request["request_id"],
        "pipeline": request["pipeline"],
        "model_name": request["model_name"],
        "status": status,
        "reason": reason,
        "model_version": version,
        "metrics": dict(outcome.metrics) if outcome else {},
        "train_records": outcome.train_records if outcome else 0,
        "holdout_records": outcome.holdout_records if outcome else 0,
        "duration_ms": duration_ms,
        "finished_at": now_ms,
    }
