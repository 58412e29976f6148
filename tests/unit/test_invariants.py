"""The fail-over invariants (bench/invariants.py) on hand-made records: each check catches what it names."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bench import invariants as inv
from streamml import pipelines
from streams.features import FeatureEngine
from tests.e2e.conftest import REPO

RAW = "p.agrawal.raw"


def pred(event_id: str, version: int = 1, model: str = "online", shadow: bool = False) -> dict[str, Any]:
    return {"event_id": event_id, "pipeline": "agrawal", "model_name": model, "model_version": version,
            "shadow": shadow}  # fmt: skip


def test_predictions_lost_duplicated_and_unexpected_are_counted() -> None:
    preds = [pred("a"), pred("b"), pred("b"), pred("b"), pred("x"), pred("c", shadow=True)]
    count = inv.count_predictions(["a", "b", "c"], preds)
    assert (count.expected, count.predicted, count.lost, count.duplicates, count.unexpected) == (
        3,
        2,
        1,
        2,
        1,
    )
    assert count.lost_examples == ["c"] and count.duplicate_examples == [("b", 3)]


def version(n: int, sha: str, model: str = "online") -> dict[str, Any]:
    return {"pipeline": "agrawal", "model_name": model, "version": n, "sha256": sha}


def test_lineage_conflicts_repeats_and_gaps() -> None:
    records = [version(1, "a"), version(2, "b"), version(2, "b"), version(3, "c"), version(3, "d"),
               version(5, "e"), version(1, "z", model="batch")]  # fmt: skip
    lineage = inv.check_lineage(records)
    assert lineage.models == {("agrawal", "online"): [1, 2, 3, 5], ("agrawal", "batch"): [1]}
    assert (lineage.conflicting, lineage.repeated, lineage.gaps) == (1, 1, 1)
    assert lineage.conflict_examples == [("agrawal", "online", 3, ["c", "d"])]


def test_clean_lineage_has_nothing_to_report() -> None:
    lineage = inv.check_lineage([version(1, "a"), version(2, "b"), version(1, "z", model="batch")])
    assert (lineage.conflicting, lineage.repeated, lineage.gaps) == (0, 0, 0)


def test_served_versions_may_only_rise_per_partition_and_model() -> None:
    rows = [(0, 0, pred("a", 1)), (0, 1, pred("b", 2)), (0, 3, pred("c", 1)),  # went back: 1 after 2
            (0, 2, pred("d", 2)), (1, 0, pred("e", 1)),  # another partition may lag behind partition 0
            (0, 4, pred("f", 1, model="batch")), (0, 5, pred("g", 0, shadow=True))]  # fmt: skip
    order = inv.served_regressions(rows)
    assert order.regressions == 1
    assert order.examples == [(0, 3, "online", 1, 2)]


STEPS = [{"op": "rolling_mean", "output": "m", "inputs": ["salary"], "params": {"window": "3"}},
         {"op": "rolling_count", "output": "n", "inputs": ["salary"], "params": {"window": "3"}},
         {"op": "ratio", "output": "r", "inputs": ["a", "b"], "params": {}}]  # fmt: skip


def test_rolling_steps_from_a_definition_and_from_a_pipeline_file() -> None:
    assert inv.rolling_steps(STEPS) == [inv.RollingStep("rolling_mean", "m", "salary", 3),
                                        inv.RollingStep("rolling_count", "n", "salary", 3)]  # fmt: skip
    spec = pipelines.load_file(REPO / "pipelines" / "agrawal.yaml").model_dump()
    assert [(s.op, s.window, s.input) for s in inv.rolling_steps(spec["features"])] == [
        ("rolling_mean", 100, "salary"), ("rolling_count", 100, "salary")]  # fmt: skip


def fv(key: str, partition: int, offset: int, salary: float, m: float, n: float) -> dict[str, Any]:
    return {"key": key, "features": {"salary": salary, "m": m, "n": n},
            "source": {"topic": RAW, "partition": partition, "start_offset": offset,
                       "end_offset": offset + 1}}  # fmt: skip


def windows_of(events: list[tuple[str, int, int, float]]) -> list[dict[str, Any]]:
    """Records as a correct service computes them, for events in the order given."""
    seen: dict[str, list[float]] = {}
    out = []
    for key, partition, offset, salary in events:
        w = seen.setdefault(key, [])
        w.append(salary)
        last = w[-3:]
        out.append(fv(key, partition, offset, salary, sum(last) / len(last), float(len(last))))
    return out


STEPS_3 = inv.rolling_steps(STEPS)


def test_any_interleaving_of_source_partitions_matches_the_reference() -> None:
    rng = random.Random(3)
    # two keys, events spread over 3 source partitions; each partition's own order kept
    parts: dict[int, list[tuple[str, int, int, float]]] = {p: [] for p in range(3)}
    for _ in range(60):
        p = rng.randrange(3)
        parts[p].append((rng.choice("ab"), p, len(parts[p]), float(rng.randrange(1, 1000))))
    merged: list[tuple[str, int, int, float]] = []
    cursors = dict.fromkeys(parts, 0)
    while any(cursors[p] < len(parts[p]) for p in parts):
        p = rng.choice([q for q in parts if cursors[q] < len(parts[q])])
        merged.append(parts[p][cursors[p]])
        cursors[p] += 1
    records = windows_of(merged)
    rng.shuffle(records)  # the topic's order says nothing: only `source` does
    check = inv.check_rolling_features(records, STEPS_3)
    assert (check.records, check.keys, check.mismatches, check.unordered) == (60, 2, 0, 0)


def test_an_event_out_of_its_partition_order_is_a_mismatch() -> None:
    events = [("a", 0, 0, 10.0), ("a", 0, 1, 20.0), ("a", 0, 2, 30.0)]
    swapped = [events[0], events[2], events[1]]  # offset 2 seen before offset 1
    check = inv.check_rolling_features(windows_of(swapped), STEPS_3)
    assert check.mismatches == 2  # the window at offset 1 and at offset 2 both differ


def test_a_window_lost_on_fail_over_shows_until_it_refills() -> None:
    events = [("a", 0, i, float(10 * (i + 1))) for i in range(6)]
    before, after = windows_of(events[:3]), windows_of(events[3:])  # the new owner started from nothing
    check = inv.check_rolling_features(before + after, STEPS_3)
    assert check.mismatches == 2  # offsets 3 and 4 (count 1, 2 instead of 3); offset 5 is right again
    assert check.examples[0]["got_vs_reference"]["n"] == (1.0, 3.0)


def test_a_replayed_event_must_repeat_its_own_value_not_count_twice() -> None:
    events = [("a", 0, i, float(i + 1)) for i in range(4)]
    good = windows_of(events)
    same_again = [*good, good[2]]  # a replay that restored the state first: fine
    assert inv.check_rolling_features(same_again, STEPS_3).mismatches == 0
    counted_twice = windows_of([*events[:3], events[2], events[3]])  # offset 2 pushed twice
    check = inv.check_rolling_features(counted_twice, STEPS_3)
    assert check.mismatches == 2  # the second copy of offset 2 (window 2,3,3) and offset 3 (3,3,4)


def test_raw_values_are_the_inputs_when_given() -> None:
    records = windows_of([("a", 0, 0, 1.0), ("a", 0, 1, 2.0)])
    raw = {(RAW, 0, 0): {"salary": 1.0}, (RAW, 0, 1): {"salary": 5.0}}  # the service read 2.0: wrong
    assert inv.check_rolling_features(records, STEPS_3, raw).mismatches == 1


def test_the_features_engine_itself_matches_the_reference() -> None:
    spec = pipelines.load_file(REPO / "pipelines" / "agrawal.yaml")
    definition = pipelines.to_definition(spec, RAW).to_avro()
    engine = FeatureEngine(definition)
    from bench.hostile import agrawal_events

    records = []
    for offset, event in enumerate(agrawal_events(600)):
        source = {"topic": RAW, "partition": offset % 2, "start_offset": offset // 2,
                  "end_offset": offset // 2 + 1}  # fmt: skip
        records.append(engine.transform({"fields": event, "event_time": None}, timestamp_ms=1, now_ms=1,
                                        source=source))  # fmt: skip
    check = inv.check_rolling_features(records, inv.rolling_steps(definition["feature_steps"]))
    assert check.records == 600 and check.mismatches == 0 and check.keys > 1


def alert(i: str, kind: str = "CONCEPT") -> dict[str, Any]:
    return {"alert_id": i, "kind": kind}


def test_alerts_counted_per_kind() -> None:
    count = inv.count_alerts([alert("1"), alert("1"), alert("2"), alert("3", "DATA")])
    assert (count.records, count.distinct, count.duplicates) == (3, 2, 2)
    assert inv.count_alerts([], expected=1).duplicates == 0


def decision(action: str, v: int, model: str = "batch", actor: str = "controller") -> dict[str, Any]:
    return {"action": action, "version": v, "model_name": model, "actor": actor}


def test_the_loop_completes_once() -> None:
    promotions = [decision("PROMOTE", 3, "online", "auto"), decision("SHADOW", 1), decision("PROMOTE", 1)]
    out = inv.loop_outcome([{"request_id": "r"}], [{"request_id": "r"}], promotions)
    assert out.completed_once and out.challenger == ("batch", 1) and out.verdict == "PROMOTE"
    assert (out.requests, out.results, out.answered_twice) == (1, 1, 0)


@pytest.mark.parametrize(
    "promotions",
    [
        [decision("SHADOW", 1), decision("SHADOW", 1), decision("PROMOTE", 1)],  # shadowed twice
        [decision("SHADOW", 1), decision("PROMOTE", 1), decision("DISCARD", 1)],  # two verdicts
        [decision("PROMOTE", 1), decision("SHADOW", 1)],  # verdict before the shadow
        [decision("SHADOW", 1)],  # never decided
    ],
)
def test_the_loop_not_completed_once(promotions: list[dict[str, Any]]) -> None:
    assert not inv.loop_outcome([], [], promotions).completed_once


def test_a_request_answered_twice_is_counted() -> None:
    out = inv.loop_outcome([{"request_id": "r"}], [{"request_id": "r"}, {"request_id": "r"}], [])
    assert out.answered_twice == 1


def test_stall_is_the_longest_gap_after_a_kill_in_any_partition() -> None:
    steady = [i * 0.1 for i in range(100)]  # 0 .. 9.9 s
    stalled = [t for t in steady if not 5.0 < t < 8.0]  # nothing from 5.0 to 8.0
    assert inv.max_stall({0: steady, 1: stalled}, at=5.5) == pytest.approx(2.5)  # counted from the kill
    assert inv.max_stall({0: steady, 1: stalled}, at=1.0) == pytest.approx(3.0)  # within the horizon
    assert inv.max_stall({0: steady, 1: stalled}, at=1.0, horizon_s=2.0) == pytest.approx(0.1)
    assert inv.max_stall({0: [1.0, 2.0]}, at=3.0, horizon_s=30.0) == 30.0  # never resumed
    assert inv.max_stall({0: [1.0, 2.0]}, at=3.0, end=2.5) == 0.0  # the input had ended: silence is right
    assert inv.max_stall({0: [4.0, 5.0]}, at=3.0) is None  # no flow before the kill: nothing to measure
    # a pause already running when a second stop comes (at 7.0) is the first stop's, not the second's
    assert inv.max_stall({0: steady, 1: stalled}, at=7.0, began_after=6.0) == pytest.approx(0.1)
    assert inv.max_stall({0: steady, 1: stalled}, at=5.5, began_after=4.5) == pytest.approx(2.5)
    assert inv.max_stall({0: [1.0, 2.0]}, at=3.0, horizon_s=30.0, began_after=2.5) == 0.0
    # A partition (a key) whose last input came before the stop has nothing left to say; one with input
    # after the stop and no output is stalled up to the horizon.
    quiet = {0: [1.0, 2.0]}
    assert inv.max_stall(quiet, at=2.5, horizon_s=30.0, inputs={0: [0.9, 1.9]}) == 0.0
    assert inv.max_stall(quiet, at=2.5, horizon_s=30.0, inputs={0: [0.9, 1.9, 2.7]}) == 30.0
    assert inv.max_stall(quiet, at=2.5, horizon_s=30.0, inputs={}) == 0.0


def test_first_after_and_percentile() -> None:
    assert inv.first_after([1.0, 4.0, 6.0], 3.0) == pytest.approx(1.0)
    assert inv.first_after([1.0], 3.0) is None
    assert inv.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert inv.percentile([], 50) is None


def test_read_order_reference_counts_a_raw_record_once_and_flags_wrong_windows() -> None:
    events = [("a", 0, 0, 10.0), ("b", 1, 0, 5.0), ("a", 1, 1, 20.0), ("a", 0, 1, 30.0)]
    raw = {(RAW, p, o): {"salary": s} for _k, p, o, s in events}
    read = [(k, (RAW, p, o)) for k, p, o, _s in events]
    records = windows_of(events)
    assert inv.check_rolling_in_read_order(records, STEPS_3, read, raw).mismatches == 0
    forwarded_twice = [*read[:3], read[2], read[3]]  # the hop wrote raw (1, 1) twice: counted once
    assert inv.check_rolling_in_read_order(records, STEPS_3, forwarded_twice, raw).mismatches == 0
    counted_twice = windows_of([*events[:3], events[2], events[3]])
    check = inv.check_rolling_in_read_order(counted_twice, STEPS_3, forwarded_twice, raw)
    assert (check.records, check.copies, check.mismatches) == (5, 1, 1)  # the copy is a copy; (0, 1) is wrong
    assert check.examples[0]["source"] == (RAW, 0, 1)
    assert check.examples[0]["got_vs_reference"] == {"m": (70 / 3, 20.0)}  # 20 counted twice


def test_takeover_counts_only_slots_the_stopped_instance_wrote_a_pipeline_for() -> None:
    def claim(slot: int, instance: str, at_s: float, pipelines: list[str]) -> dict[str, Any]:
        return {"service": "controller", "slot": slot, "instance_id": instance, "claimed_at": at_s * 1000,
                "pipelines": pipelines}  # fmt: skip

    claims = [
        claim(0, "1", 100.0, ["agrawal"]),  # instance 1 writes agrawal (slot 0)
        claim(3, "0", 101.0, []),  # instance 0 holds an empty slot only
        claim(0, "0", 170.0, ["agrawal"]),  # a minute later, instance 0 restarted and took slot 0
        claim(0, "0", 215.0, ["agrawal"]),
    ]
    # stopping instance 0 at 110 s: it wrote for no pipeline, so nothing is taken over (not "60 s")
    assert inv.takeover(claims, "controller", "0", 110.0) is None
    # stopping instance 1 at 160 s: its slot 0 is claimed 10 s later
    assert inv.takeover(claims, "controller", "1", 160.0) == 10.0
    assert inv.takeover(claims, "controller", "0", 200.0) == 15.0
    assert inv.takeover(claims, "monitor", "0", 200.0) is None


def test_each_loop_once_accepts_a_second_loop_still_in_shadow_and_refuses_repeats() -> None:
    def p(action: str, version: int) -> dict[str, Any]:
        return {"action": action, "model_name": "batch", "version": version, "actor": "controller"}

    def each_once(*promotions: dict[str, Any]) -> bool:
        return inv.loop_outcome([], [], list(promotions)).each_once

    assert each_once(p("SHADOW", 1), p("PROMOTE", 1), p("SHADOW", 2))  # the second still in shadow
    assert each_once(p("SHADOW", 1), p("DISCARD", 1), p("SHADOW", 2), p("PROMOTE", 2))
    assert not each_once(p("SHADOW", 1), p("PROMOTE", 1), p("PROMOTE", 1))  # judged twice
    assert not each_once(p("SHADOW", 1), p("SHADOW", 1), p("PROMOTE", 1))  # shadowed twice
    assert not each_once(p("PROMOTE", 1), p("SHADOW", 1))  # judged before its shadow
    assert not each_once(p("SHADOW", 1), p("SHADOW", 2), p("PROMOTE", 2))  # the first never judged
    assert not each_once()


def test_concept_alerts_one_per_lineage() -> None:
    def alert(alert_id: str, model: str, version: int) -> dict[str, Any]:
        return {"kind": "CONCEPT", "alert_id": alert_id, "model_name": model, "model_version": version}

    assert inv.count_alerts([alert("a", "online", 2), alert("b", "batch", 1)]).one_per_lineage
    assert not inv.count_alerts([alert("a", "online", 2), alert("b", "online", 2)]).one_per_lineage
    assert not inv.count_alerts([alert("a", "online", 2), alert("a", "batch", 1)]).one_per_lineage


def test_an_alert_is_due_once_enough_records_came_after_it() -> None:
    alerts = [{"detected_at": 1_000}, {"detected_at": 5_000}]
    later = [900, 1_000, 1_001, 2_000, 4_999, 5_001, 6_000]  # 5 after the first alert, 2 after the second
    assert inv.alerts_due(alerts, later, 2) == 2
    assert inv.alerts_due(alerts, later, 3) == 1  # the second has 2 records after it, not 3
    assert inv.alerts_due(alerts, later, 6) == 0
    assert inv.alerts_due([], later, 1) == 0


def test_error_profile_by_event_index_and_by_prediction_order() -> None:
    """Late events of an older concept reaching a newer model: the errors rise in prediction order while
    they are flat by event index within the newer stream."""

    def pred(i: int, t: int, right: bool, model: tuple[str, int] = ("batch", 1)) -> dict[str, Any]:
        return {"event_id": f"a-drift-{i}", "model_name": model[0], "model_version": model[1],
                "prediction": right, "prediction_time": t, "shadow": False}  # fmt: skip

    labels = {f"a-drift-{i}": True for i in range(400)}
    preds = [pred(i, 1000 + i, True) for i in range(200, 400)]  # the newer stream, all right
    preds += [pred(i, 5000 + i, False) for i in range(0, 200)]  # old events, late, all wrong
    preds += [pred(5, 1, False, ("online", 2)), {**pred(7, 2, False), "shadow": True}]  # not batch v1
    by_index, by_time = inv.error_profile(preds, labels, ("batch", 1), parts=2)
    assert by_index == [(0, 1.0, 200), (200, 0.0, 200)]
    assert by_time == [(0.0, 200), (1.0, 200)]
    assert inv.error_profile(preds, labels, ("online", 9)) == ([], [])
