"""Pure statistics of the benchmark: percentiles, rates from service-side stamps, swap latencies, the
closed loop's drift delay and recovery, targets.

Kept free of Kafka and processes so the arithmetic that turns raw stamps into the reported numbers is
unit-tested on its own (tests/unit/test_bench_stats.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Distribution of a latency sample (same unit as the input)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("cannot summarize an empty sample")
    return Summary(
        count=len(values),
        mean=math.fsum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        max=max(values),
    )


def windowed_p50(samples: Sequence[tuple[float, float]], window: float) -> list[tuple[float, float]]:
    """(window start relative to the first sample, median value) per window of `window` time units.

    Shows whether latency is steady or grows through the run (a backlog: the system is not keeping up).
    """
    if window <= 0:
        raise ValueError("window must be positive")
    if not samples:
        return []
    start = min(t for t, _ in samples)
    buckets: dict[int, list[float]] = {}
    for t, value in samples:
        buckets.setdefault(int((t - start) // window), []).append(value)
    return [(i * window, percentile(values, 50)) for i, values in sorted(buckets.items())]


def group_stamps(stamps: Iterable[float]) -> list[tuple[float, int]]:
    """(stamp, how many records carry it), oldest first: a service stamps every record of a batch alike."""
    counts: dict[float, int] = {}
    for stamp in stamps:
        counts[stamp] = counts.get(stamp, 0) + 1
    return sorted(counts.items())


def rate_from_batches(batches: Sequence[tuple[float, int]]) -> float:
    """Events/s of a run of batches, each stamped (in seconds) when its processing started.

    Between the first and the last stamp every batch but the last one was processed, so the rate is
    (events - last batch) / (last stamp - first stamp); neither start-up nor the last batch's tail skews it.
    """
    ordered = sorted(batches)
    if len(ordered) < 2:
        raise ValueError("need at least two batches (distinct stamps) to compute a rate")
    elapsed = ordered[-1][0] - ordered[0][0]
    if elapsed <= 0:
        raise ValueError("batch stamps do not advance")
    done = sum(n for _, n in ordered[:-1])
    return done / elapsed


def rate_between(points: Sequence[tuple[int, float]]) -> float:
    """Events/s between the first and last (cumulative event count, time in seconds) points."""
    ordered = sorted(points, key=lambda p: p[1])
    if len(ordered) < 2:
        raise ValueError("need at least two points to compute a rate")
    (first_n, first_t), (last_n, last_t) = ordered[0], ordered[-1]
    if last_t <= first_t or last_n <= first_n:
        raise ValueError("points do not advance in both count and time")
    return (last_n - first_n) / (last_t - first_t)


def first_stamp_by(pairs: Iterable[tuple[int, float]]) -> dict[int, float]:
    """The earliest stamp per key, e.g. the first prediction_time of each model version."""
    first: dict[int, float] = {}
    for key, stamp in pairs:
        if key not in first or stamp < first[key]:
            first[key] = stamp
    return first


def swap_latencies(
    promoted_at: Mapping[int, float], first_used: Mapping[int, float]
) -> dict[int, float | None]:
    """Per promoted version: first prediction by it minus when its promotion was produced (None = never)."""
    out: dict[int, float | None] = {}
    for version, produced in sorted(promoted_at.items()):
        used = first_used.get(version)
        out[version] = None if used is None else used - produced
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# -- the closed loop (issue 4) ------------------------------------------------------------------------------
def controller_promotion(decisions: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first PROMOTE decided by the controller (automatic, not a person's or the learner's AUTO)."""
    return next((d for d in decisions if d["action"] == "PROMOTE" and d["actor"] == "controller"), None)


def count_kinds(alerts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Drift alerts per kind (CONCEPT, DATA, PREDICTION, ...), most frequent first."""
    return dict(Counter(a["kind"] for a in alerts).most_common())


def drift_delay(
    alerts: Sequence[Mapping[str, Any]], features_topic: str, position_of: Mapping[int, int], drift_at: int
) -> int | None:
    """Events from the drift to the first concept-drift alert (None: no such alert).

    The alert's window ends at the labelled event that made the detector fire; `position_of` maps
    a features-topic offset to the event's position in the produced stream.
    """
    concept = [a for a in alerts if a["kind"] == "CONCEPT"]
    if not concept:
        return None
    first = min(concept, key=lambda a: int(a["detected_at"]))
    ends = [int(r["end_offset"]) for r in first["window"] if r["topic"] == features_topic]
    if not ends:
        return None
    return position_of[max(ends) - 1] - drift_at


def accuracy(pairs: Iterable[tuple[Any, Any]]) -> float | None:
    """Share of (prediction, label) pairs that agree; None for no pairs."""
    n = right = 0
    for predicted, label in pairs:
        n += 1
        right += predicted == label
    return right / n if n else None


@dataclass(frozen=True)
class Recovery:
    """Served accuracy before the drift against the promoted challenger's first predictions."""

    events: int | None  # first event served by the promoted model, counted from the drift position
    before: float | None  # served accuracy over the `window` events before the drift
    after: float | None  # accuracy of the promoted model's first `window` served predictions
    after_events: int  # predictions `after` covers (fewer than `window` if the stream ended first)

    @property
    def gap_pts(self) -> float | None:
        """Accuracy lost, in points (accuracy x 100): positive when the challenger serves worse."""
        if self.before is None or self.after is None:
            return None
        return 100 * (self.before - self.after)


def recovery(
    predictions: Iterable[Mapping[str, Any]],
    position: Mapping[str, int],
    labels: Mapping[str, Any],
    promoted: tuple[str, int] | None,
    drift_at: int,
    window: int,
) -> Recovery:
    """Recovery of served accuracy after the drift; a redelivered duplicate prediction counts once."""
    first: dict[str, Mapping[str, Any]] = {}
    for p in predictions:
        first.setdefault(p["event_id"], p)
    ordered = sorted(first.values(), key=lambda p: position[p["event_id"]])
    before = accuracy(
        (p["prediction"], labels[p["event_id"]])
        for p in ordered
        if drift_at - window <= position[p["event_id"]] < drift_at
    )
    if promoted is None:
        return Recovery(None, before, None, 0)
    served = [p for p in ordered if (p["model_name"], int(p["model_version"])) == promoted][:window]
    if not served:
        return Recovery(None, before, None, 0)
    after = accuracy((p["prediction"], labels[p["event_id"]]) for p in served)
    return Recovery(position[served[0]["event_id"]] - drift_at, before, after, len(served))


@dataclass(frozen=True)
class Target:
    """One goal of the issue, checked against a measured value."""

    name: str
    text: str
    value: float | None
    met: bool | None  # None: not measured


def at_least(name: str, text: str, value: float | None, bound: float) -> Target:
    return Target(name, text, value, None if value is None else value >= bound)


def at_most(name: str, text: str, value: float | None, bound: float) -> Target:
    return Target(name, text, value, None if value is None else value <= bound)


def between(name: str, text: str, value: float | None, low: float, high: float) -> Target:
    return Target(name, text, value, None if value is None else low <= value <= high)


def targets(result: Mapping[str, float | None]) -> list[Target]:
    """The issue's targets for a result dict with the JSON keys of `python -m bench`."""
    return [
        at_least("predictor_eps", "predictor >= 25,000 events/s", result.get("predictor_eps"), 25_000),
        at_least("predictor_ratio", "predictor >= 0.6 x pass-through", result.get("predictor_ratio"), 0.6),
        at_most("e2e_p99_ms", "e2e p99 <= 100 ms at 5k events/s", result.get("e2e_p99_ms"), 100.0),
        at_most("swap_p99_ms", "swap p99 <= 1 s", result.get("swap_p99_ms"), 1000.0),
        at_least("learner_ratio", "learner >= 0.7 x in-process River", result.get("learner_ratio"), 0.7),
        # issue 11 (typed contracts and a data path twice as fast)
        at_least("predictor_eps_40k", "predictor >= 40,000 events/s", result.get("predictor_eps"), 40_000),
        at_least("features_eps", "features >= 40,000 events/s", result.get("features_eps"), 40_000),
        at_least("capacity_eps", "system keeps up with >= 8,000 events/s", result.get("capacity_eps"), 8_000),
        at_least("features_vs_quix", "features >= 2 x Quix Streams", result.get("features_vs_quix"), 2.0),
        at_least("predictor_vs_quix", "predictor >= 2 x Quix Streams", result.get("predictor_vs_quix"), 2.0),
        # An alert before the drift is a false alarm, not a fast detection: the delay must be >= 0.
        between(
            "drift_delay_events",
            "concept-drift alert <= 500 events after the drift",
            result.get("drift_delay_events"),
            0,
            500,
        ),
        at_most(
            "recovery_gap_pts",
            "challenger's 5k-event accuracy within 2 pts of pre-drift",
            result.get("recovery_gap_pts"),
            2.0,
        ),
        at_most(
            "false_alarms_stationary",
            "no drift alert in 100k stationary events",
            result.get("false_alarms_stationary"),
            0,
        ),
    ]
