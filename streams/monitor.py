"""Monitoring logic: how well the served models do on joined labels, and when errors, data or scores drift.

Pure (no Kafka, no Faust): the monitor service feeds it feature vectors, labels, served and shadow
predictions and promotion records, and publishes the DriftAlert and Evaluation records it returns.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from river import drift, metrics, utils
from river.drift import binary
from scipy.special import kolmogorov
from scipy.stats import ks_2samp

from streamml.errors import ConfigError

log = logging.getLogger(__name__)

Src = tuple[str, int, int]  # (topic, partition, offset) of the record an event was read from
ModelKey = tuple[str, int]  # (model name, version)

DETECTORS: dict[str, tuple[str, Any]] = {
    "ADWIN": ("river.drift.ADWIN", drift.ADWIN),
    "PageHinkley": ("river.drift.PageHinkley", drift.PageHinkley),
    "DDM": ("river.drift.binary.DDM", binary.DDM),
}
KS = "ks"
EVALUATE_EVERY = 100  # paired labels between two Evaluation records
RECENT_ERRORS = 100  # errors averaged for the "after" level of detectors that reset themselves
LEVEL_ERRORS = 500  # errors averaged for the level a held-back rise must reach (steadier than the last 100)
# A CONCEPT alert's retraining slice holds at least this many of the latest labelled events (when the
# detector attributes fewer to the new concept): enough to train on and hold out a validation fifth.
MIN_RETRAIN_EVENTS = 300
MAX_WINDOW_EVENTS = 20_000  # labelled events whose offsets are kept for concept-drift windows
DONE_MEMORY = 20_000  # ids of joined events remembered, so redelivered duplicates are ignored
KEEP_RETIRED = 4  # versions replaced recently, whose late predictions are still attributed to them
POSITIVE_NAMES = ("True", "1", "true", "yes", "1.0")


def offset_ranges(sources: Iterable[Src | None]) -> list[dict[str, Any]]:
    """OffsetRange records covering the given records: one contiguous slice per topic partition."""
    bounds: dict[tuple[str, int], list[int]] = {}
    for src in sources:
        if src is None:
            continue
        topic, partition, offset = src
        b = bounds.get((topic, partition))
        if b is None:
            bounds[(topic, partition)] = [offset, offset]
        elif offset < b[0]:
            b[0] = offset
        elif offset > b[1]:
            b[1] = offset
    return [
        {"topic": t, "partition": p, "start_offset": lo, "end_offset": hi + 1}
        for (t, p), (lo, hi) in sorted(bounds.items())
    ]


def proba_of(probabilities: Mapping[str, float], label: Any) -> float:
    """Probability a prediction gave to `label` (keys are the classes as strings); 0 if it gave none."""
    p = probabilities.get(str(label))
    if p is None and isinstance(label, float) and label.is_integer():
        p = probabilities.get(str(int(label)))
    return 0.0 if p is None else float(p)


def positive_class(classes: Iterable[str]) -> str | None:
    """The class ROC AUC treats as positive: True/1/yes if present, else the larger of two classes."""
    known = set(classes)
    for name in POSITIVE_NAMES:
        if name in known:
            return name
    return max(known) if len(known) >= 2 else None


def stateful_features(steps: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Features computed from earlier events (rolling aggregates, and what is derived from them).

    Data drift skips them: consecutive values are strongly autocorrelated (and they warm up after a
    start), which breaks the independence the KS test assumes and makes it fire on stationary data.
    """
    out: set[str] = set()
    for step in steps:
        if step["output"] and (step["op"].startswith("rolling_") or out.intersection(step["inputs"])):
            out.add(step["output"])
    return frozenset(out)


class Served:
    """The fields of a Prediction record the monitor needs (served or shadow)."""

    __slots__ = ("model", "prediction", "probabilities", "score", "version")

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.model: str = record["model_name"]
        self.version: int = int(record["model_version"])
        self.prediction: Any = record["prediction"]
        self.score: float | None = record["score"]
        self.probabilities: Mapping[str, float] = record["probabilities"]

    @property
    def key(self) -> ModelKey:
        return (self.model, self.version)


class _Entry:
    """What is known about one event id while it waits in the join."""

    __slots__ = ("born", "event_time", "features", "has_label", "label", "paired", "sampled", "scored",
                 "served", "shadow", "shadow_scored", "src")  # fmt: skip

    def __init__(self, born: float) -> None:
        self.born = born
        self.has_label = False
        self.label: Any = None
        self.served: Served | None = None
        self.shadow: Served | None = None
        self.features: Mapping[str, Any] | None = None
        self.src: Src | None = None  # where its feature vector was read
        self.event_time: int | None = None  # when the event happened (its feature vector or prediction says)
        self.scored = False  # served prediction compared with the label
        self.sampled = False  # features added to the data-drift windows
        self.paired = False  # served and shadow predictions compared on the label
        self.shadow_scored = False  # shadow prediction added to its version's metrics


class VersionMetrics:
    """River metrics of one model version's served predictions: since start and over a rolling window."""

    def __init__(self, task: str, window: int) -> None:
        self.regression = task == "REGRESSION"
        kinds: dict[str, Any]
        if self.regression:
            kinds = {"mae": metrics.MAE, "rmse": metrics.RMSE}
        else:
            kinds = {"accuracy": metrics.Accuracy, "log_loss": metrics.CrossEntropy}
            if task == "BINARY":
                kinds["roc_auc"] = metrics.ROCAUC
        self.all: dict[str, Any] = {name: cls() for name, cls in kinds.items()}
        self.rolling: dict[str, Any] = {
            name: utils.Rolling(cls, window_size=window) for name, cls in kinds.items() if name != "roc_auc"
        }
        if "roc_auc" in kinds:
            # River's own rolling ROC AUC: exact over the window and ~30x cheaper than Rolling(ROCAUC),
            # which reverts ten confusion matrices per event.
            self.rolling["roc_auc"] = metrics.RollingROCAUC(window_size=window)
        self.labelled = 0
        self.dirty = False

    def update(self, label: Any, served: Served, positive: str | None) -> None:
        self.labelled += 1
        self.dirty = True
        if self.regression:
            if served.prediction is None:
                return
            y, y_pred = float(label), float(served.prediction)
            for group in (self.all, self.rolling):
                group["mae"].update(y, y_pred)
                group["rmse"].update(y, y_pred)
            return
        for group in (self.all, self.rolling):
            group["accuracy"].update(label, served.prediction)
        proba = served.probabilities
        if not proba:  # the model could not answer: accuracy counts it wrong, the others cannot score it
            return
        # CrossEntropy only reads the probability of the true class, whatever the key type.
        p_true = {True: proba_of(proba, label)}
        for group in (self.all, self.rolling):
            group["log_loss"].update(True, p_true)
        if positive is not None and "roc_auc" in self.all:
            is_positive = proba_of({positive: 1.0}, label) == 1.0  # the label is the positive class
            p_positive = float(proba.get(positive, 0.0))
            for group in (self.all, self.rolling):
                group["roc_auc"].update(is_positive, p_positive)

    def values(self) -> dict[tuple[str, str], float]:
        """(metric, window) → value, window being "all" or "rolling"."""
        out = {(name, "all"): float(m.get()) for name, m in self.all.items()}
        out.update({(name, "rolling"): float(m.get()) for name, m in self.rolling.items()})
        out[("labelled", "all")] = float(self.labelled)  # how much the figures cover (and which is newest)
        return out


@dataclass(frozen=True)
class ConceptHit:
    """A detector saw the error rise from the level `before` it to `after` (the mean of the last 100 errors).

    `window` is the number of errors the detector held when it fired; `changed` how many of the latest of
    them it attributes to the new level (ADWIN: the part of its window it keeps after the cut; the others
    do not locate the change, so all of `window`).
    """

    before: float
    after: float
    window: int
    changed: int


class ConceptWatch:
    """A River drift detector on one pipeline's error stream; only rises of the error are reported, and only
    once they reach `min_rise` over the level before them (a significant rise can be negligible: a
    near-perfect model going from 0.25 % to 1.5 % errors). A smaller rise stays pending: it is reported
    when the mean of the last LEVEL_ERRORS errors reaches the minimum, so a drift whose first detection
    came early is not lost (River's ADWIN may not flag the rest of the same change again)."""

    def __init__(self, name: str, params: Mapping[str, Any], regression: bool, min_rise: float = 0.0) -> None:
        if name not in DETECTORS:
            raise ConfigError(f"unknown concept detector {name!r}; use one of {', '.join(DETECTORS)}")
        if name == "DDM" and regression:
            raise ConfigError("DDM needs a binary error stream: use ADWIN or PageHinkley for regression")
        kwargs = dict(params)
        if name == "PageHinkley":
            kwargs.setdefault("mode", "up")  # a falling error is good news, not drift
        self.name = name
        self.detector_name, cls = DETECTORS[name]
        try:
            self.detector = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} parameters {dict(params)}: {exc}") from exc
        self.adaptive = name == "ADWIN"  # ADWIN keeps the recent part of its window after a change
        self.regression = regression
        self.min_rise = min_rise  # error rate points (classification), a share of the level (regression)
        self.n = 0  # errors in the detector's window (since its last reset)
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT_ERRORS)
        self.level: deque[float] = deque(maxlen=LEVEL_ERRORS)
        self.level_sum = 0.0
        self.pending: ConceptHit | None = None  # a rise detected but below min_rise so far
        self.negligible = 0  # rises held back as below min_rise (reported later or never)

    def _needed(self, before: float) -> float:
        return self.min_rise * (abs(before) if self.regression else 1.0)

    def update(self, error: float) -> ConceptHit | None:
        det = self.detector
        det.update(error)
        self.n += 1
        self.total += error
        self.recent.append(error)
        if len(self.level) == self.level.maxlen:
            self.level_sum -= self.level[0]
        self.level.append(error)
        self.level_sum += error
        if not det.drift_detected:
            pending = self.pending
            if pending is not None and self.level_sum / len(self.level) - pending.before >= self._needed(
                pending.before
            ):
                self.pending = None
                grown = pending.changed + (self.n - pending.window)
                return ConceptHit(pending.before, sum(self.recent) / len(self.recent), self.n, grown)
            return None
        window = self.n
        k = len(self.recent)
        recent = sum(self.recent) / k
        if self.adaptive:
            # ADWIN dropped the oldest part of its window: the change is a rise if that part was lower.
            kept = int(det.width)
            kept_mean = float(det.estimation)
            dropped = window - kept
            before = (self.total - kept_mean * kept) / dropped if dropped > 0 else kept_mean
            # A rise that is still there: ADWIN cuts where the two parts of its window differ, and a burst
            # of errors that has passed (a replay after a failover, a short-lived bad version) leaves a
            # kept part with a higher mean while the latest errors are back below the old level.
            rise = kept_mean > before and recent > before
            self.n, self.total = kept, kept_mean * kept
            changed = kept
        else:  # PageHinkley and DDM restart from scratch after a detection
            before = (self.total - recent * k) / (window - k) if window > k else recent
            rise = recent > before
            self.n, self.total = 0, 0.0
            self.recent.clear()
            changed = window
        self.pending = None
        if not rise:
            return None
        hit = ConceptHit(before, recent, self.n, changed)
        level = self.level_sum / len(self.level)
        if max(level, recent) - before < self._needed(before):
            self.negligible += 1
            self.pending = hit
            log.info(
                "%s: error rise from %.4g to %.4g (last %d) held back until it reaches concept_min_rise %g",
                self.name, before, level, len(self.level), self.min_rise,
            )  # fmt: skip
            return None
        return ConceptHit(before, recent, window, changed)


def ks_test(ref_sorted: np.ndarray, sample: Iterable[float], threshold: float) -> tuple[float, float]:
    """(p-value, statistic) of the two-sample Kolmogorov-Smirnov test, as `scipy.stats.ks_2samp` gives.

    scipy's function costs ~2 ms a call; most tests are far from significant, so the statistic is
    computed here and the limiting Kolmogorov distribution screens them (~0.1 ms). Only when that
    p-value is within 100x of the threshold is scipy asked for the exact asymptotic p-value, so the
    decision p < threshold is scipy's.
    """
    cur = np.sort(np.fromiter(sample, dtype=float))
    both = np.concatenate([ref_sorted, cur])
    n1, n2 = len(ref_sorted), len(cur)
    cdf1 = np.searchsorted(ref_sorted, both, side="right") / n1
    cdf2 = np.searchsorted(cur, both, side="right") / n2
    d = float(np.max(np.abs(cdf1 - cdf2)))
    screen = float(kolmogorov(math.sqrt(n1 * n2 / (n1 + n2)) * d))
    if screen >= 100 * threshold:
        return screen, d
    res = ks_2samp(ref_sorted, cur, method="asymp")
    return float(res.pvalue), float(res.statistic)


class PartitionedKS:
    """One KSWatch per input partition of the features topic, each with its own reference.

    Features are keyed by the pipeline's key field, so a partition holds a subset of the keys, and a
    feature that depends on the key (Agrawal's house value on the zipcode) is distributed differently in
    each: a reference read from one partition against a window from others was a false DATA alert
    (2 of them in a stationary e2e run). Within a partition the mix of keys is stationary.
    """

    def __init__(self, size: int, threshold: float, skip: Iterable[str] = ()) -> None:
        self.size, self.threshold, self.skip = size, threshold, frozenset(skip)
        self.watches: dict[int, KSWatch] = {}

    def watch(self, src: Src | None) -> KSWatch:
        partition = src[1] if src is not None else -1
        found = self.watches.get(partition)
        if found is None:
            found = self.watches[partition] = KSWatch(self.size, self.threshold, self.skip)
        return found


class KSWatch:
    """Reference window (the first `size` samples) against the latest `size` samples, KS-tested per name.

    The test runs every `size // 4` samples once the current window is full; samples are dicts of
    name → value, non-numeric values are ignored.
    """

    def __init__(self, size: int, threshold: float, skip: Iterable[str] = ()) -> None:
        self.size = size
        self.threshold = threshold
        self.every = max(1, size // 4)
        self.skip = frozenset(skip)
        self.reset()

    def reset(self) -> None:
        self.ref: dict[str, list[float]] = {}
        self.ref_sorted: dict[str, np.ndarray] = {}
        self.ref_n = 0
        self.ref_src: list[Src | None] = []
        self.cur: dict[str, deque[float]] = {}
        self.cur_src: deque[Src | None] = deque(maxlen=self.size)
        self.since = 0

    @property
    def reference_window(self) -> list[dict[str, Any]]:
        return offset_ranges(self.ref_src)

    @property
    def current_window(self) -> list[dict[str, Any]]:
        return offset_ranges(self.cur_src)

    def _numeric(self, values: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
        skip = self.skip
        for name, v in values.items():
            if type(v) is float and name not in skip and math.isfinite(v):
                yield name, v

    def add(self, values: Mapping[str, Any], src: Src | None) -> list[tuple[str, float, float]]:
        """(name, p-value, KS statistic) of each name tested after this sample (usually none)."""
        if self.ref_n < self.size:
            self.ref_n += 1
            self.ref_src.append(src)
            ref = self.ref
            for name, v in self._numeric(values):
                sample = ref.get(name)
                if sample is None:
                    sample = ref[name] = []
                sample.append(v)
            if self.ref_n == self.size:
                self.ref_sorted = {name: np.sort(np.asarray(v, dtype=float)) for name, v in ref.items()}
            return []
        cur = self.cur
        for name, v in self._numeric(values):
            window = cur.get(name)
            if window is None:
                window = cur[name] = deque(maxlen=self.size)
            window.append(v)
        self.cur_src.append(src)
        self.since += 1
        if len(self.cur_src) < self.size or self.since < self.every:
            return []
        self.since = 0
        results = []
        minimum = max(20, self.size // 10)
        for name, ref_sample in self.ref_sorted.items():
            latest = cur.get(name)
            if latest is None or len(ref_sample) < minimum or len(latest) < minimum:
                continue
            p, d = ks_test(ref_sample, latest, self.threshold)
            results.append((name, p, d))
        return results


@dataclass
class PairStats:
    """Champion and challenger scored on the same labelled events since the challenger started shadowing."""

    challenger: ModelKey
    regression: bool
    champion: ModelKey = ("", 0)
    labels: int = 0
    champion_metric: Any = None
    challenger_metric: Any = None

    def __post_init__(self) -> None:
        cls = metrics.MAE if self.regression else metrics.Accuracy
        self.champion_metric, self.challenger_metric = cls(), cls()

    @property
    def metric(self) -> str:
        return "mae" if self.regression else "accuracy"

    def update(self, label: Any, served: Served, shadow: Served) -> bool:
        """Score both on one event; False if a regression model gave no answer (the pair is not counted)."""
        if self.regression:
            if served.prediction is None or shadow.prediction is None:
                return False
            y = float(label)
            self.champion_metric.update(y, float(served.prediction))
            self.challenger_metric.update(y, float(shadow.prediction))
        else:
            self.champion_metric.update(label, served.prediction)
            self.challenger_metric.update(label, shadow.prediction)
        self.champion = served.key
        self.labels += 1
        return True


@dataclass(frozen=True)
class MonitorOutput:
    kind: Literal["alert", "evaluation"]
    pipeline: str
    record: dict[str, Any]


@dataclass
class JoinCounts:
    """Monotonic counts of the join, read by the service for its metrics."""

    labelled: int = 0  # served predictions joined with their label
    unlabelled: int = 0  # served predictions waiting for a label now (a level, not a count)
    expired_unlabelled: int = 0  # served predictions whose label never came within the TTL
    expired_unpredicted: int = 0  # labels whose served prediction never came within the TTL


class PipelineMonitor:
    """One pipeline: the label join, per-version metrics, drift detectors and the challenger comparison."""

    # The newest event time among the labelled events scored (a class default: snapshots pickled before it
    # existed restore without it).
    newest_labelled_ms: int | None = None

    def __init__(self, definition: Mapping[str, Any], max_pending: int = 200_000) -> None:
        self.name: str = definition["name"]
        self.max_pending = max_pending
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.done: OrderedDict[str, None] = OrderedDict()  # recently joined event ids
        self.counts = JoinCounts()
        self.versions: dict[ModelKey, VersionMetrics] = {}
        self.served_model: ModelKey | None = None
        self.lineage_model: ModelKey | None = None  # version at which the detectors last restarted
        self.retired: deque[ModelKey] = deque(maxlen=KEEP_RETIRED)
        self.live: ModelKey | None = None  # from promotions
        self.deliberate: set[ModelKey] = set()  # versions made live by a controller or a person
        self.challenger: ModelKey | None = None
        self.ended_challengers: deque[ModelKey] = deque(maxlen=KEEP_RETIRED)
        self.pairs: PairStats | None = None
        self.classes: set[str] = set()
        self.positive: str | None = None
        self.served_events = 0  # the clock of the cool-downs
        self.silent_until: dict[tuple[str, str], int] = {}
        self.suppressed: Counter[tuple[str, str]] = Counter()  # (kind, detector) → detections silenced
        self.reference_window: list[dict[str, Any]] = []
        self.labelled_src: deque[Src | None] = deque(maxlen=MAX_WINDOW_EVENTS)
        self.monitoring: dict[str, Any] = {}
        self.stateful: frozenset[str] = frozenset()
        self.configure(definition)

    # -- configuration ------------------------------------------------------------------------------
    def configure(self, definition: Mapping[str, Any]) -> None:
        """Apply a (new revision of the) definition; detectors restart only if their settings changed."""
        self.task: str = definition["task"]
        self.regression = self.task == "REGRESSION"
        self.ttl_s = float(definition["label"]["ttl_seconds"])
        self.expects_label = definition["label"]["source"] != "NONE"
        monitoring = dict(definition["monitoring"])
        stateful = stateful_features(definition["feature_steps"])
        if definition.get("key_field"):
            # The key field is what the features service partitions by: how its values mix within "the
            # last N events" follows how far each partition has got, not the data (measured: the zipcode of
            # a stationary Agrawal stream alerted in ~1 run of 5, D 0.10-0.11). Not KS-tested.
            stateful = stateful | {definition["key_field"]}
        if monitoring != self.monitoring or stateful != self.stateful:
            self.stateful = stateful
            self.monitoring = monitoring
            self.concept_min_rise = float(monitoring.get("concept_min_rise", 0.05))
            try:
                params = {k: json.loads(v) for k, v in monitoring["concept_params"].items()}
                self.concept_settings: tuple[str, dict[str, Any]] = (monitoring["concept_detector"], params)
                ConceptWatch(*self.concept_settings, self.regression)
            except (ConfigError, ValueError) as exc:  # keep watching the pipeline with the default detector
                log.error("%s: concept detector settings rejected (%s); using ADWIN defaults", self.name, exc)
                self.concept_settings = ("ADWIN", {})
            self.data_window = int(monitoring["data_window"])
            self.data_threshold = float(monitoring["data_threshold"])
            self.cooldown = int(monitoring["cooldown_events"])
            self.metrics_window = int(monitoring["metrics_window"])
            self.versions.clear()
            self._restart_detectors()

    def _restart_detectors(self) -> None:
        self.concept = ConceptWatch(*self.concept_settings, self.regression, self.concept_min_rise)
        window, threshold = self.data_window, self.data_threshold
        self.data: PartitionedKS | KSWatch = PartitionedKS(window, threshold, self.stateful)
        self.scores = KSWatch(self.data_window, self.data_threshold)
        self.silent_until.clear()
        self.reference_window = []
        self.labelled_src.clear()

    # -- control --------------------------------------------------------------------------------------
    def on_promotion(self, record: Mapping[str, Any]) -> None:
        key: ModelKey = (record["model_name"], int(record["version"]))
        action = record["action"]
        if action == "SHADOW":
            self._set_challenger(key)
        elif action == "DISCARD":
            if key == self.challenger:
                self._end_challenger()
        elif action in ("PROMOTE", "ROLLBACK"):
            if key == self.challenger:
                self._end_challenger()
            self.live = key
            if record["actor"] != "auto":
                self.deliberate.add(key)
                if self.served_model == key and self.lineage_model != key:
                    self._new_lineage(key)  # the decision arrived after its first predictions

    def _set_challenger(self, key: ModelKey) -> None:
        if key != self.challenger:
            self.challenger = key
            self.pairs = None

    def _end_challenger(self) -> None:
        if self.challenger is not None:
            self.ended_challengers.append(self.challenger)
        self.challenger = None
        self.pairs = None

    def _switch(self, key: ModelKey) -> None:
        """A served prediction of another version: new lineage (restart everything) or a learner update."""
        current = self.served_model
        if key == current:
            return
        if key in self.retired:
            if key != self.live:
                return  # late predictions of a replaced version are still attributed to it
            self.retired.remove(key)  # a rollback to a recent version
        if current is not None:
            self.retired.append(current)
        self.served_model = key
        if current is None or current[0] != key[0] or key in self.deliberate:
            self._new_lineage(key)
        else:
            # The online learner's next snapshot: its error stream and inputs continue, so the concept
            # detector and the data reference carry on (a fresh detector would miss a drift that happens
            # right after a snapshot); its scores are a new model's, so their reference restarts.
            self.scores.reset()
        keep = {key, *self.retired, *self.exported()}
        for old in [k for k in self.versions if k not in keep]:
            del self.versions[old]

    def _new_lineage(self, key: ModelKey) -> None:
        log.info("%s: %s v%d is a new live lineage: drift detectors restart", self.name, *key)
        self.lineage_model = key
        self._restart_detectors()
        self.pairs = None  # the challenger is now compared with the new champion only

    def exported(self) -> set[ModelKey]:
        """Versions whose metrics are exported: the served (live) one and the challenger."""
        return {k for k in (self.served_model, self.live, self.challenger) if k is not None}

    # -- data -------------------------------------------------------------------------------------------
    def _entry(self, event_id: str, now: float) -> _Entry | None:
        """The event's join entry (created on its first record); None for an event already joined."""
        entry = self.entries.get(event_id)
        if entry is None:
            if event_id in self.done:
                return None  # a redelivered duplicate (at-least-once) of an event already counted
            if len(self.entries) >= self.max_pending:
                self._drop(self.entries.popitem(last=False)[1])
            entry = self.entries[event_id] = _Entry(now)
        return entry

    def on_features(
        self, fv: Mapping[str, Any], src: Src | None, now: float, now_ms: int
    ) -> list[MonitorOutput]:
        entry = self._entry(fv["event_id"], now)
        if entry is None:
            return []
        entry.src = src
        entry.event_time = fv.get("event_time")
        if not entry.sampled:
            entry.features = fv["features"]
        if fv["label"] is not None and not entry.has_label and self.expects_label:
            self._set_label(entry, fv["label"])
        return self._progress(fv["event_id"], entry, now_ms)

    def on_label(self, event_id: str, label: Any, now: float, now_ms: int) -> list[MonitorOutput]:
        entry = self._entry(event_id, now)
        if entry is None or entry.has_label:
            return []
        self._set_label(entry, label)
        return self._progress(event_id, entry, now_ms)

    def _set_label(self, entry: _Entry, label: Any) -> None:
        entry.has_label = True
        entry.label = label
        if entry.served is not None:
            self.counts.unlabelled -= 1
        if not self.regression and self.positive is None:
            self.classes.add(str(label))
            self.positive = positive_class(self.classes)

    def on_prediction(
        self, record: Mapping[str, Any], src: Src | None, now: float, now_ms: int
    ) -> list[MonitorOutput]:
        served = Served(record)
        event_id = record["event_id"]
        if record["shadow"]:
            if served.key in self.ended_challengers:
                return []
            self._set_challenger(served.key)
            entry = self._entry(event_id, now)
            if entry is None or entry.shadow is not None:
                return []
            entry.shadow = served
            return self._progress(event_id, entry, now_ms)
        entry = self._entry(event_id, now)
        if entry is None or entry.served is not None:
            return []  # a duplicate (at-least-once redelivery)
        self._switch(served.key)
        entry.served = served
        if (
            getattr(entry, "event_time", None) is None
        ):  # (an entry restored from an older snapshot has no slot)
            entry.event_time = record.get("event_time")
        self.served_events += 1
        if not entry.has_label and self.expects_label:
            self.counts.unlabelled += 1
        if not self.regression and self.positive is None and served.probabilities:
            self.classes.update(served.probabilities)
            self.positive = positive_class(self.classes)
        out = self._score_drift(served, event_id, src, now_ms)
        return out + self._progress(event_id, entry, now_ms)

    def _progress(self, event_id: str, entry: _Entry, now_ms: int) -> list[MonitorOutput]:
        shadow = entry.shadow
        if shadow is not None and entry.has_label and not entry.shadow_scored:
            entry.shadow_scored = True  # the challenger's own metrics, exported beside the champion's
            self._version_metrics(shadow.key).update(entry.label, shadow, self.positive)
        served = entry.served
        if served is None:
            return []
        out: list[MonitorOutput] = []
        if not entry.sampled and entry.features is not None:
            entry.sampled = True
            out += self._data_drift(entry.features, entry.src, served, event_id, now_ms)
            entry.features = None
        if entry.has_label:
            if not entry.scored:
                entry.scored = True
                out += self._score(entry, served, event_id, now_ms)
            if entry.shadow is not None and not entry.paired:
                entry.paired = True
                out += self._pair(entry.label, served, entry.shadow, now_ms)
        labelled_done = entry.scored or not self.expects_label
        if entry.sampled and labelled_done and (entry.paired or self.challenger is None):
            del self.entries[event_id]
            done = self.done
            done[event_id] = None
            if len(done) > DONE_MEMORY:
                done.popitem(last=False)
        return out

    def expire(self, now: float) -> None:
        """Drop events older than the label TTL (oldest first: entries are in arrival order)."""
        entries = self.entries
        deadline = now - self.ttl_s
        while entries:
            entry = next(iter(entries.values()))
            if entry.born > deadline:
                break
            entries.popitem(last=False)
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        if entry.served is not None and not entry.has_label and self.expects_label:
            self.counts.expired_unlabelled += 1
            self.counts.unlabelled -= 1
        elif entry.has_label and entry.served is None:
            self.counts.expired_unpredicted += 1

    # -- evaluation -------------------------------------------------------------------------------------
    def _score(self, entry: _Entry, served: Served, event_id: str, now_ms: int) -> list[MonitorOutput]:
        label = entry.label
        self._version_metrics(served.key).update(label, served, self.positive)
        self.counts.labelled += 1
        if self.regression:
            if served.prediction is None:
                return []
            error = abs(float(served.prediction) - float(label))
        else:
            error = 0.0 if served.prediction == label else 1.0
        if served.key != self.served_model:
            # A late prediction of a version already replaced (a backlog drained in runs per partition): its
            # error is that version's (counted in its metrics above), not the served model's.
            return []
        self.labelled_src.append(entry.src)
        event_time = getattr(entry, "event_time", None)
        if event_time is not None and (
            self.newest_labelled_ms is None or event_time > self.newest_labelled_ms
        ):
            self.newest_labelled_ms = int(event_time)
        hit = self.concept.update(error)
        if hit is None:
            return []
        detector = self.concept.detector_name
        if self._cooling("CONCEPT", detector, ""):
            return []
        # The retraining slice: the labelled events of the new concept (those the detector attributes to
        # the new error level, at least MIN_RETRAIN_EVENTS of the latest). The whole detector window would
        # be mostly the old concept when the detection came soon after the change, and a model trained on
        # it is weak on the new one (its own error rise then raised a second CONCEPT alert).
        n = min(max(hit.changed, MIN_RETRAIN_EVENTS), hit.window, len(self.labelled_src))
        window = offset_ranges(list(self.labelled_src)[-n:]) if n else []
        what = "absolute error" if self.regression else "error rate"
        message = (
            f"{self.concept.name} saw the {what} of {served.model} v{served.version} rise from "
            f"{hit.before:.4g} to {hit.after:.4g} (last {RECENT_ERRORS} labelled events; "
            f"{hit.window} in the detector's window, detected at event {event_id})"
        )
        alert = self._alert("CONCEPT", detector, None, hit.after, hit.before, window, "CRITICAL", message,
                            served, event_id, now_ms)  # fmt: skip
        if self.newest_labelled_ms is not None:
            # Where the retraining begins in event time: a partition that lagged behind the change (a stall
            # after a crash) still held old-concept events after its part of the window, and a challenger
            # trained on them was weak on the new concept (measured: a second CONCEPT alert on it).
            alert.record["event_time"] = min(self.newest_labelled_ms, now_ms)
        return [alert]

    def _version_metrics(self, key: ModelKey) -> VersionMetrics:
        vm = self.versions.get(key)
        if vm is None:
            vm = self.versions[key] = VersionMetrics(self.task, self.metrics_window)
        return vm

    def _pair(self, label: Any, served: Served, shadow: Served, now_ms: int) -> list[MonitorOutput]:
        if shadow.key != self.challenger:
            return []
        pairs = self.pairs
        if pairs is None or pairs.challenger != shadow.key:
            pairs = self.pairs = PairStats(shadow.key, self.regression)
        if not pairs.update(label, served, shadow) or pairs.labels % EVALUATE_EVERY:
            return []
        record = {
            "pipeline": self.name,
            "champion_model": pairs.champion[0],
            "champion_version": pairs.champion[1],
            "challenger_model": pairs.challenger[0],
            "challenger_version": pairs.challenger[1],
            "metric": pairs.metric,
            "higher_is_better": not self.regression,
            "champion_value": float(pairs.champion_metric.get()),
            "challenger_value": float(pairs.challenger_metric.get()),
            "labels": pairs.labels,
            "evaluated_at": now_ms,
        }
        return [MonitorOutput("evaluation", self.name, record)]

    # -- drift of inputs and scores ---------------------------------------------------------------------
    def _data_drift(
        self, features: Mapping[str, Any], src: Src | None, served: Served, event_id: str, now_ms: int
    ) -> list[MonitorOutput]:
        if not isinstance(self.data, PartitionedKS):  # restored from a snapshot of an earlier release
            self.data = PartitionedKS(self.data_window, self.data_threshold, self.stateful)
        watch = self.data.watch(src)
        first = watch.ref_n < watch.size
        results = watch.add(features, src)
        if first and watch.ref_n == watch.size:
            self.reference_window = watch.reference_window
        out = []
        # One test per feature each time: Bonferroni-corrected over the features tested together (as
        # Alibi Detect's feature-wise KS does), so a pipeline with more features raises no more false
        # alarms; measured uncorrected, 12 features of a stationary Agrawal stream alerted in ~1 run of 9.
        threshold = self.data_threshold / max(1, len(results))
        for feature, p, d in results:
            if p >= threshold or self._cooling("DATA", KS, feature):
                continue
            message = (
                f"feature {feature!r} of {self.name} changed: two-sample KS statistic {d:.3f}, p={p:.3g} "
                f"< {threshold:.3g} ({self.data_threshold:g} over {len(results)} features, Bonferroni; last "
                f"{watch.size} events of its partition served by {served.model} v{served.version} against "
                f"the reference {_describe(watch.reference_window)})"
            )
            window = watch.current_window
            out.append(self._alert("DATA", KS, feature, p, threshold, window, "WARNING", message,
                                   served, event_id, now_ms))  # fmt: skip
        return out

    def _score_drift(
        self, served: Served, event_id: str, src: Src | None, now_ms: int
    ) -> list[MonitorOutput]:
        if self.regression:
            score = None if served.prediction is None else float(served.prediction)
        elif self.task == "BINARY":  # the probability of the positive class, once that class is known
            if self.positive is None or not served.probabilities:
                return []
            score = float(served.probabilities.get(self.positive, 0.0))
        else:
            score = served.score
        if score is None or served.key != self.served_model:
            # A late prediction of a version already replaced: its score says nothing about the version the
            # watch describes (both windows hold only that version's scores).
            return []
        out = []
        for _name, p, d in self.scores.add({"score": score}, src):
            if p >= self.data_threshold or self._cooling("PREDICTION", KS, ""):
                continue
            what = "predicted values" if self.regression else "scores"
            message = (
                f"the {what} of {served.model} v{served.version} changed: two-sample KS statistic {d:.3f}, "
                f"p={p:.3g} < {self.data_threshold:g} (last {self.scores.size} predictions against its "
                f"first {self.scores.size} as this version)"
            )
            window = self.scores.current_window
            out.append(self._alert("PREDICTION", KS, None, p, self.data_threshold, window, "WARNING", message,
                                   served, event_id, now_ms))  # fmt: skip
        return out

    def _cooling(self, kind: str, detector: str, feature: str) -> bool:
        """True (and counted as suppressed) while the cool-down of the same detector and feature runs."""
        key = (f"{kind}/{detector}", feature)
        if self.served_events < self.silent_until.get(key, 0):
            self.suppressed[(kind, detector)] += 1
            return True
        self.silent_until[key] = self.served_events + self.cooldown
        return False

    def _alert(
        self,
        kind: str,
        detector: str,
        feature: str | None,
        statistic: float,
        threshold: float,
        window: list[dict[str, Any]],
        severity: str,
        message: str,
        served: Served,
        event_id: str,
        now_ms: int,
    ) -> MonitorOutput:
        # Derived from the event that triggered it, so a replay after a crash repeats the same id.
        alert_id = (
            f"{self.name}/{kind.lower()}/{feature or detector}/{served.model}/{served.version}/{event_id}"
        )
        log.warning("%s drift alert: %s", kind, message)
        record = {
            "alert_id": alert_id,
            "pipeline": self.name,
            "model_name": served.model,
            "model_version": served.version,
            "kind": kind,
            "detector": detector,
            "feature": feature,
            "statistic": statistic,
            "threshold": threshold,
            "window": window,
            "severity": severity,
            "message": message,
            "detected_at": now_ms,
            "event_time": None,
        }
        return MonitorOutput("alert", self.name, record)


def _describe(ranges: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['topic']}[{r['partition']}]@{r['start_offset']}..{r['end_offset']}" for r in ranges)


@dataclass
class Monitor:
    """All pipelines the monitor watches; promotions for a pipeline not defined yet wait for it."""

    max_pending: int = 200_000
    pipelines: dict[str, PipelineMonitor] = field(default_factory=dict)
    early: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)

    def on_pipeline(self, definition: Mapping[str, Any]) -> None:
        name = definition["name"]
        if definition["deleted"]:
            self.pipelines.pop(name, None)
            return
        current = self.pipelines.get(name)
        if current is not None:
            current.configure(definition)
            return
        pm = self.pipelines[name] = PipelineMonitor(definition, self.max_pending)
        for record in self.early.pop(name, []):
            pm.on_promotion(record)

    def on_promotion(self, record: Mapping[str, Any]) -> None:
        pm = self.pipelines.get(record["pipeline"])
        if pm is not None:
            pm.on_promotion(record)
        else:
            waiting = self.early.setdefault(record["pipeline"], [])
            waiting.append(record)
            del waiting[:-100]  # only the latest decisions matter

    def expire(self, now: float) -> None:
        for pm in self.pipelines.values():
            pm.expire(now)
