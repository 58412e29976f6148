"""What must hold after scale-out and fail-over, computed from the records on the topics alone.

Shared by the e2e test (tests/e2e/test_scale_out.py) and `make chaos` (bench/chaos.py): pure functions on
decoded records, no broker. Each returns numbers plus a few examples, so a failure says what went wrong.
"""

from __future__ import annotations

import bisect
import collections
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Where = tuple[str, int, int]  # topic, partition, offset
Record = Mapping[str, Any]
EXAMPLES = 5


def where_of(source: Record | None) -> Where | None:
    """(topic, partition, offset) of an OffsetRange naming one record (a `source` field), else None."""
    if not source or source.get("end_offset") != source.get("start_offset", -1) + 1:
        return None
    return (str(source["topic"]), int(source["partition"]), int(source["start_offset"]))


# -- every event predicted, once ---------------------------------------------------------------------------
@dataclass
class PredictionCount:
    expected: int  # valid raw events written (acknowledged by the broker)
    predicted: int  # of them, with at least one served prediction
    lost: int  # of them, with none
    duplicates: int  # served predictions beyond the first, summed over expected events
    unexpected: int  # served predictions of events that were not expected (invalid or unknown ids)
    lost_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[tuple[str, int]] = field(default_factory=list)


def count_predictions(expected_ids: Iterable[str], predictions: Iterable[Record]) -> PredictionCount:
    """Loss and duplication of served predictions (shadow ones are not answers and are not counted)."""
    expected = set(expected_ids)
    counts = collections.Counter(str(p["event_id"]) for p in predictions if not p.get("shadow"))
    lost = sorted(expected - set(counts))
    repeated = sorted((e, c) for e, c in counts.items() if c > 1 and e in expected)
    return PredictionCount(
        expected=len(expected),
        predicted=len(expected) - len(lost),
        lost=len(lost),
        duplicates=sum(c - 1 for _, c in repeated),
        unexpected=sum(c for e, c in counts.items() if e not in expected),
        lost_examples=lost[:EXAMPLES],
        duplicate_examples=repeated[:EXAMPLES],
    )


# -- one version lineage per (pipeline, model) -------------------------------------------------------------
@dataclass
class Lineage:
    models: dict[tuple[str, str], list[int]]  # (pipeline, model) -> distinct version numbers, sorted
    conflicting: int  # version numbers published with two or more different artifacts (sha256)
    repeated: int  # records repeating a version with the same artifact (harmless replays, but counted)
    gaps: int  # numbers missing between 1 and the highest version of a model
    conflict_examples: list[tuple[str, str, int, list[str]]] = field(default_factory=list)


def check_lineage(versions: Iterable[Record]) -> Lineage:
    """Unique version numbers: no (pipeline, model, version) with two artifacts, which is a forked lineage."""
    shas: dict[tuple[str, str, int], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for v in versions:
        shas[(str(v["pipeline"]), str(v["model_name"]), int(v["version"]))][str(v["sha256"])] += 1
    models: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for pipeline, model, number in sorted(shas):
        models[(pipeline, model)].append(number)
    conflicts = [(p, m, n, sorted(c)) for (p, m, n), c in sorted(shas.items()) if len(c) > 1]
    return Lineage(
        models=dict(models),
        conflicting=len(conflicts),
        repeated=sum(sum(c.values()) - len(c) for c in shas.values()),
        gaps=sum(max(nums) - len(set(nums)) for nums in models.values()),
        conflict_examples=[(p, m, n, [s[:12] for s in c]) for p, m, n, c in conflicts[:EXAMPLES]],
    )


@dataclass
class ServedOrder:
    regressions: int  # served predictions whose version is below one already served before them
    examples: list[tuple[int, int, str, int, int]] = field(default_factory=list)  # partition, offset, ...


def served_regressions(predictions: Iterable[tuple[int, int, Record]]) -> ServedOrder:
    """Versions as served never go back: per predictions partition, in offset order, per model name.

    Predictions are keyed by event id like the feature vectors, so a predictions partition is the output of
    the one predictor instance owning the same features partition: its order is the serving order. A new
    owner after a rebalance must not serve an older version than its predecessor did.
    """
    by_partition: dict[int, list[tuple[int, Record]]] = collections.defaultdict(list)
    for partition, offset, p in predictions:
        if not p.get("shadow"):
            by_partition[partition].append((offset, p))
    regressions = 0
    examples: list[tuple[int, int, str, int, int]] = []
    for partition, rows in sorted(by_partition.items()):
        highest: dict[tuple[str, str], int] = {}
        for offset, p in sorted(rows, key=lambda r: r[0]):
            model = (str(p["pipeline"]), str(p["model_name"]))
            version = int(p["model_version"])
            top = highest.get(model, version)
            if version < top:
                regressions += 1
                if len(examples) < EXAMPLES:
                    examples.append((partition, offset, model[1], version, top))
            highest[model] = max(top, version)
    return ServedOrder(regressions, examples)


# -- per-key rolling windows -------------------------------------------------------------------------------
ROLLING_OPS = ("rolling_mean", "rolling_count", "rolling_sum")


@dataclass(frozen=True)
class RollingStep:
    op: str
    output: str
    input: str
    window: int


def rolling_steps(steps: Iterable[Record]) -> list[RollingStep]:
    """The rolling steps of a pipeline, from a PipelineDefinition's feature_steps (params JSON-encoded)
    or a pipeline file's `features` list (window inline)."""
    out = []
    for s in steps:
        if s["op"] not in ROLLING_OPS:
            continue
        params = s.get("params") or {}
        window = s.get("window", json.loads(params["window"]) if "window" in params else 10)
        out.append(RollingStep(str(s["op"]), str(s["output"]), str(s["inputs"][0]), int(window)))
    return out


def rolling_value(op: str, window: Sequence[float]) -> float:
    """What streams.features computes for a window (to within the checks' tolerance: the exact sum)."""
    if op == "rolling_count":
        return float(len(window))
    if op == "rolling_sum":
        return math.fsum(window)
    return math.fsum(window) / len(window)


@dataclass
class FeatureCheck:
    records: int  # feature records with a key and a rolling feature
    keys: int
    mismatches: int  # records whose rolling features differ from the reference
    unordered: int  # records without a usable `source` (not checked)
    copies: int = 0  # (read-order check) later feature records of an already featured raw record
    examples: list[dict[str, Any]] = field(default_factory=list)


def check_rolling_features(
    features: Iterable[Record],
    steps: Sequence[RollingStep],
    raw: Mapping[Where, Record] | None = None,
    rel_tol: float = 1e-9,
) -> FeatureCheck:
    """Rolling features equal a per-key reference recomputed from the events in the order the service saw.

    The reference. For one key, every distinct event (by its `source` coordinates) enters the key's window
    once, in the order the window processor read it. That order is what a correct deployment guarantees
    and nothing more: events of one source partition keep their offset order (a partition is read in order,
    also through a repartition topic written by one producer per source partition at a time), while events
    from different source partitions may interleave in any way. So the events of a key form one queue per
    source (topic, partition), sorted by offset, and the reference is the merge of those queues the service
    made: it is rebuilt step by step, taking next the queue head whose own record matches the reference
    window plus its value. Equal input values give equal windows whatever their order, so ties between heads
    do not matter; only a coincidentally equal mean of two different windows could mislead the merge. When
    no head matches, the record is a mismatch and the head closest to its record is taken, so the reference
    goes on as a correct service would have (a lost window shows until it has refilled).

    Repeated records of one event (an at-least-once replay) must each carry the value at that event's
    place: a window that counted the event twice, or lost events on a fail-over, makes mismatches. When
    `source` names the repartition topic (a key in one partition) the merge is simply its offset order.
    Input values come from `raw` (the events as written, by coordinates) when given, else from the record.
    """
    steps = list(steps)
    check = FeatureCheck(0, 0, 0, 0)
    if not steps:
        return check
    per_key: dict[str, dict[tuple[str, int], dict[int, list[Record]]]] = collections.defaultdict(
        lambda: collections.defaultdict(dict)
    )
    for fv in features:
        key, spot = fv.get("key"), where_of(fv.get("source"))
        if key is None or not any(s.output in fv["features"] for s in steps):
            continue
        check.records += 1
        if spot is None:
            check.unordered += 1
            continue
        per_key[str(key)][(spot[0], spot[1])].setdefault(spot[2], []).append(fv)
    check.keys = len(per_key)

    for key, streams in per_key.items():
        _merge_key(key, streams, steps, raw, rel_tol, check)
    return check


def check_rolling_in_read_order(
    features: Iterable[Record],
    steps: Sequence[RollingStep],
    read_order: Iterable[tuple[str, Where]],
    raw: Mapping[Where, Record],
    rel_tol: float = 1e-9,
) -> FeatureCheck:
    """Rolling features against a per-key reference built in the order the window processor read its
    input: `read_order` is (key, raw record) per record of the repartition topic, partition by partition in
    offset order (a key lives in one partition). A raw record met again (the hop forwarded it twice) adds
    nothing to the reference. The first feature record of a raw record (in `features` order: the copies of
    one event share a partition) must carry the value at its place; later copies (an at-least-once replay)
    carry the windows as they stood when the copy was made, and are counted in `copies` instead. Unlike
    `check_rolling_features` nothing is inferred: a mismatch is a wrong window."""
    steps = list(steps)
    check = FeatureCheck(0, 0, 0, 0)
    expected: dict[Where, dict[str, float | None]] = {}
    windows: dict[str, dict[str, collections.deque[float]]] = {}
    for key, spot in read_order:
        if spot in expected or spot not in raw:
            continue
        per_key = windows.setdefault(key, {s.output: collections.deque(maxlen=s.window) for s in steps})
        event = raw[spot]
        want: dict[str, float | None] = {}
        for s in steps:
            v = event.get(s.input)
            v = float(v) if isinstance(v, int | float) else None
            want[s.output] = None if v is None else rolling_value(s.op, [*per_key[s.output], v][-s.window :])
            if v is not None:
                per_key[s.output].append(v)
        expected[spot] = want
    check.keys = len(windows)
    featured: set[Where] = set()
    for fv in features:
        spot = where_of(fv.get("source"))
        if fv.get("key") is None or not any(s.output in fv["features"] for s in steps):
            continue
        check.records += 1
        if spot is None or spot not in expected:
            check.unordered += 1
            continue
        if spot in featured:
            check.copies += 1
            continue
        featured.add(spot)
        bad = {
            out: (fv["features"].get(out), want)
            for out, want in expected[spot].items()
            if not _same(fv["features"].get(out), want, rel_tol)
        }
        if bad:
            check.mismatches += 1
            if len(check.examples) < EXAMPLES:
                check.examples.append({"key": fv.get("key"), "source": spot, "got_vs_reference": bad})
    return check


def _input(raw: Mapping[Where, Record] | None, spot: Where, fv: Record, step: RollingStep) -> float | None:
    event = raw.get(spot) if raw is not None else None
    if event is not None and isinstance(event.get(step.input), int | float):
        return float(event[step.input])
    got = fv["features"].get(step.input)
    return float(got) if isinstance(got, int | float) else None


def _merge_key(
    key: str,
    streams: Mapping[tuple[str, int], Mapping[int, list[Record]]],
    steps: Sequence[RollingStep],
    raw: Mapping[Where, Record] | None,
    rel_tol: float,
    check: FeatureCheck,
) -> None:
    """The greedy merge of one key's source queues (see check_rolling_features), counting mismatches."""
    queues = {tp: sorted(events.items()) for tp, events in streams.items()}
    heads = dict.fromkeys(queues, 0)
    windows: dict[str, collections.deque[float]] = {
        s.output: collections.deque(maxlen=s.window) for s in steps
    }

    def cost(tp: tuple[str, int]) -> tuple[float, dict[str, float | None]]:
        offset, copies = queues[tp][heads[tp]]
        expected: dict[str, float | None] = {}
        worst = 0.0
        for s in steps:
            v = _input(raw, (tp[0], tp[1], offset), copies[0], s)
            expected[s.output] = (
                None if v is None else rolling_value(s.op, [*windows[s.output], v][-s.window :])
            )
            for fv in copies:
                got, want = fv["features"].get(s.output), expected[s.output]
                if not _same(got, want, rel_tol):
                    if not isinstance(got, int | float) or want is None:
                        worst = math.inf
                    else:
                        worst = max(worst, abs(got - want) / max(abs(want), 1.0))
        return worst, expected

    while True:
        live = [tp for tp in queues if heads[tp] < len(queues[tp])]
        if not live:
            return
        (worst, expected), tp = min(((cost(tp), tp) for tp in live), key=lambda x: (x[0][0], x[1]))
        offset, copies = queues[tp][heads[tp]]
        if worst > 0:
            for fv in copies:
                bad = {
                    s.output: (fv["features"].get(s.output), expected[s.output])
                    for s in steps
                    if not _same(fv["features"].get(s.output), expected[s.output], rel_tol)
                }
                if bad:
                    check.mismatches += 1
                    if len(check.examples) < EXAMPLES:
                        check.examples.append(
                            {"key": key, "source": (tp[0], tp[1], offset), "got_vs_reference": bad}
                        )
        for s in steps:
            v = _input(raw, (tp[0], tp[1], offset), copies[0], s)
            if v is not None:
                windows[s.output].append(v)
        heads[tp] += 1


def _same(got: Any, want: float | None, rel_tol: float) -> bool:
    if want is None or not isinstance(got, int | float):
        return want is None and got is None
    return math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-9)


# -- the closed loop ---------------------------------------------------------------------------------------
@dataclass
class AlertCount:
    records: int  # alert records of the kind
    distinct: int  # distinct alert ids among them
    duplicates: int  # records beyond `expected` (a replayed alert, or a second detector firing)
    lineages: list[tuple[Any, Any]] = field(default_factory=list)  # (model, version) each alert is about

    @property
    def one_per_lineage(self) -> bool:
        """No served lineage alerted twice and no alert record repeated: a second writer or a replay would
        break it; a later detection on another model (a retrained challenger) does not."""
        return len(set(self.lineages)) == len(self.lineages) == self.distinct


def count_alerts(alerts: Iterable[Record], kind: str = "CONCEPT", expected: int = 1) -> AlertCount:
    of_kind = [a for a in alerts if a["kind"] == kind]
    lineages = [(a.get("model_name"), a.get("model_version")) for a in of_kind]
    return AlertCount(
        len(of_kind), len({a["alert_id"] for a in of_kind}), max(0, len(of_kind) - expected),
        lineages=lineages,
    )  # fmt: skip


def alerts_due(alerts: Iterable[Record], later_times_ms: Sequence[int], events: int) -> int:
    """Alerts followed by at least `events` records (of the topic whose times are `later_times_ms`)
    after their `detected_at`: the controller schedules a retraining a window of events after an alert,
    so only those must have been answered by a request when a run ends."""
    times = sorted(later_times_ms)
    return sum(1 for a in alerts if len(times) - bisect.bisect_right(times, int(a["detected_at"])) >= events)


def error_profile(
    preds: Iterable[Record], labels: Mapping[str, Any], model: tuple[Any, Any], parts: int = 4
) -> tuple[list[tuple[int, float, int]], list[tuple[float, int]]]:
    """How one served version erred: by event index (the number ending the event id, in buckets of a
    `parts`-th of its range: (first index, error rate, predictions)), and in the order it predicted (quarters
    by prediction time). A rise in one but not the other tells a changing stream from a changing order
    (late events of an older concept reaching a newer model)."""
    mine = []
    for p in preds:
        if p["shadow"] or (p["model_name"], p["model_version"]) != model or p["event_id"] not in labels:
            continue
        index = int(str(p["event_id"]).rsplit("-", 1)[-1]) if str(p["event_id"])[-1:].isdigit() else 0
        mine.append((index, int(p["prediction_time"]), p["prediction"] != labels[p["event_id"]]))
    if not mine:
        return [], []
    lo, hi = min(m[0] for m in mine), max(m[0] for m in mine) + 1
    width = max(1, -(-(hi - lo) // parts))
    by_index: dict[int, list[bool]] = collections.defaultdict(list)
    for index, _t, wrong in mine:
        by_index[lo + (index - lo) // width * width].append(wrong)
    mine.sort(key=lambda m: m[1])
    step = -(-len(mine) // parts)
    by_time = [mine[i : i + step] for i in range(0, len(mine), step)]
    return (
        [(start, sum(w) / len(w), len(w)) for start, w in sorted(by_index.items())],
        [(sum(m[2] for m in q) / len(q), len(q)) for q in by_time],
    )


@dataclass
class LoopOutcome:
    requests: int  # training requests on the topic
    results: int  # training results (answers) on the topic
    answered_twice: int  # requests with more than one result
    shadows: int  # SHADOW decisions by the controller
    verdicts: int  # PROMOTE or DISCARD decisions by the controller
    challenger: tuple[str, int] | None  # the model and version put in shadow, if exactly one was
    verdict: str | None  # PROMOTE or DISCARD of that challenger, if exactly one was made
    in_order: bool  # the challenger's SHADOW precedes its verdict on the promotions topic
    # every challenger put in shadow once and given at most one verdict, after it; the first one judged
    each_once: bool = False

    @property
    def completed_once(self) -> bool:
        return self.shadows == 1 and self.verdicts == 1 and self.verdict is not None and self.in_order


def loop_outcome(
    requests: Iterable[Record],
    results: Iterable[Record],
    promotions: Sequence[Record],
    actor: str = "controller",
) -> LoopOutcome:
    """Requests, answers and the controller's decisions; `promotions` in topic order (one partition)."""
    requests = list(requests)
    answers = collections.Counter(str(r["request_id"]) for r in results)
    mine = [(i, p) for i, p in enumerate(promotions) if p["actor"] == actor]
    shadows = [(i, p) for i, p in mine if p["action"] == "SHADOW"]
    verdicts = [(i, p) for i, p in mine if p["action"] in ("PROMOTE", "DISCARD")]
    challenger = (str(shadows[0][1]["model_name"]), int(shadows[0][1]["version"])) if shadows else None
    about = [(i, p) for i, p in verdicts if challenger and (p["model_name"], p["version"]) == challenger]
    return LoopOutcome(
        requests=len(requests),
        results=sum(answers.values()),
        answered_twice=sum(1 for c in answers.values() if c > 1),
        shadows=len(shadows),
        verdicts=len(verdicts),
        challenger=challenger if len(shadows) == 1 else None,
        verdict=str(about[0][1]["action"]) if len(about) == 1 else None,
        in_order=bool(shadows and about and shadows[0][0] < about[0][0]),
        each_once=_each_loop_once(shadows, verdicts),
    )


def _each_loop_once(shadows: list[tuple[int, Record]], verdicts: list[tuple[int, Record]]) -> bool:
    """Every challenger shadowed once and judged at most once, after its SHADOW; the first one judged (a
    later one may still be in shadow when the stream ends); no verdict about a challenger never shadowed."""
    shadowed = [(str(p["model_name"]), int(p["version"])) for _, p in shadows]
    if not shadows or len(set(shadowed)) != len(shadowed):
        return False
    when = dict(zip(shadowed, (i for i, _ in shadows), strict=True))
    judged = [((str(p["model_name"]), int(p["version"])), i) for i, p in verdicts]
    if len({m for m, _ in judged}) != len(judged) or shadowed[0] not in {m for m, _ in judged}:
        return False
    return all(m in when and i > when[m] for m, i in judged)


# -- stalls ------------------------------------------------------------------------------------------------
def max_stall(
    times_by_partition: Mapping[Any, Sequence[float]],
    at: float,
    horizon_s: float = 60.0,
    end: float | None = None,
    began_after: float | None = None,
    inputs: Mapping[Any, Sequence[float]] | None = None,
) -> float | None:
    """Longest pause in output, in any partition, from `at` (a kill) on: the longest gap between
    consecutive output times (seconds) that ends after `at` and starts within `horizon_s` of it, counted
    from `at` at the earliest. A partition that produced nothing after `at` counts up to `at + horizon_s`.
    None when no partition had produced anything before `at` (there was no flow to interrupt). `end` is
    when the input ended: a partition silent after a stop at or after it has nothing left to say. With
    `began_after`, a pause whose last output came before it (it was already running: an earlier stop's)
    is not counted. With `inputs` (when each partition's input was produced, by the same keys), a
    partition silent after `at` is only counted if input for it came after `at` (else it had nothing to
    say: a key whose last event came before a stop near the end of the stream)."""
    worst: float | None = None
    for partition, times in times_by_partition.items():
        ordered = sorted(times)
        before = [t for t in ordered if t <= at]
        previous = before[-1] if before else None
        if previous is None:
            continue  # the partition never produced before the kill: nothing to stall
        worst = worst or 0.0
        for t in ordered[len(before) :]:
            if previous > at + horizon_s:
                break
            if began_after is None or previous >= began_after:
                worst = max(worst, t - max(previous, at))
            previous = t
        else:
            earlier = began_after is not None and previous < began_after
            due = inputs is None or any(t > at for t in inputs.get(partition, ()))
            if previous <= at and (end is None or at < end) and not earlier and due:
                worst = max(worst, horizon_s)
    return worst


def first_after(times: Iterable[float], at: float) -> float | None:
    """Seconds from `at` to the first time after it (e.g. a writer claim after a kill), None if none."""
    later = [t - at for t in times if t > at]
    return min(later) if later else None


def takeover(claims: Iterable[Mapping[str, Any]], service: str, instance_id: str, at: float) -> float | None:
    """Seconds from a stop (at, epoch s) of one instance to the first new claim of a slot it was writing a
    pipeline for; None when it wrote for none (it held no slot, or only slots without pipelines: then
    nothing needs taking over, and the next claim, maybe a minute later, says nothing)."""
    ours = sorted((c for c in claims if c["service"] == service), key=lambda c: c["claimed_at"])
    owner: dict[int, Mapping[str, Any]] = {}
    for claim in ours:
        if claim["claimed_at"] / 1000 <= at:
            owner[claim["slot"]] = claim
    held = {slot for slot, c in owner.items() if c["instance_id"] == instance_id and c["pipelines"]}
    if not held:
        return None
    return first_after([c["claimed_at"] / 1000 for c in ours if c["slot"] in held], at)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
