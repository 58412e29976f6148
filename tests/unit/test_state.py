"""streamml.state without a broker: per-partition windows, their changelog records, restore, drop, replay."""

from __future__ import annotations

from pathlib import Path

from streamml.codec import codec_for
from streamml.runtime import Output
from streamml.state import KeyedWindows, PartitionedStore
from tests.unit.test_feature_engine import engine_from, with_steps

CHANGELOG = "p.shop.windows"
INPUT = "p.shop.repartition"


def store() -> PartitionedStore:
    return PartitionedStore("shop", INPUT, CHANGELOG, changelog_partitions=4)


def apply(windows: KeyedWindows, key: str, offset: int | None, value: float, size: int = 3) -> list[float]:
    """One event of `key` at `offset` through two rolling outputs, as a FeatureEngine applies it."""
    windows.begin(key, offset)
    windows.push("sum", key, value, size)
    return list(windows.push("mean", key, value, size))


def records(outputs: list[Output]) -> list[dict[str, object]]:
    return [codec_for("WindowState").decode(o.value or b"") for o in outputs]


def test_changes_are_one_record_per_dirty_key_pinned_to_the_input_partition_then_nothing() -> None:
    s = store()
    apply(s.get(2), "c1", 10, 1.0)
    apply(s.get(2), "c1", 11, 2.0)
    apply(s.get(3), "c2", 5, 7.0)
    outputs = sorted(s.changes(), key=lambda o: o.partition or 0)
    assert [(o.topic, o.partition, o.key) for o in outputs] == [
        (CHANGELOG, 2, b"2/c1"),
        (CHANGELOG, 3, b"3/c2"),
    ]
    first = records(outputs)[0]
    assert first == {
        "pipeline": "shop", "input_topic": INPUT, "partition": 2, "key": "c1", "offset": 11,
        "windows": {"sum": [1.0, 2.0], "mean": [1.0, 2.0]}, "sources": {},
    }  # fmt: skip
    assert s.changes() == []  # written once: nothing changed since
    apply(s.get(2), "c1", 12, 3.0)
    (again,) = records(s.changes())
    assert again["offset"] == 12 and again["windows"] == {"sum": [1.0, 2.0, 3.0], "mean": [1.0, 2.0, 3.0]}


def test_a_key_record_holds_all_its_windows_even_those_the_batch_did_not_change() -> None:
    w = KeyedWindows()
    w.begin("k", 1)
    w.push("a", "k", 1.0, 2)
    w.push("b", "k", 5.0, 2)
    w.take_dirty()
    w.begin("k", 2)
    w.push("a", "k", 2.0, 2)  # this event has no value for "b"
    s = store()
    s.parts[0] = w
    (record,) = records(s.changes())
    assert record["windows"] == {"a": [1.0, 2.0], "b": [5.0]}


def test_restore_reads_back_the_latest_record_per_key_and_windows_continue() -> None:
    writer = store()
    apply(writer.get(1), "c1", 0, 1.0)
    apply(writer.get(1), "c1", 1, 2.0)
    log = [o.value for o in writer.changes()]
    apply(writer.get(1), "c1", 2, 3.0)
    apply(writer.get(1), "c2", 3, 9.0)
    log += [o.value for o in writer.changes()]
    reader = store()
    assert reader.restore(1, log) == 2
    assert reader.owned() == {1}
    restored = reader.get(1)
    assert restored.offsets == {"c1": 2, "c2": 3}
    assert apply(restored, "c1", 4, 4.0) == [2.0, 3.0, 4.0]  # the size comes back with the next push
    assert apply(restored, "c2", 5, 1.0) == [9.0, 1.0]


def test_restore_skips_other_partitions_other_input_topics_and_garbage() -> None:
    s = store()
    apply(s.get(5), "c5", 0, 5.0)  # partition 5 shares changelog partition 1 (5 % 4) with partition 1
    other_input = PartitionedStore("shop", "p.shop.raw", CHANGELOG, 4)
    apply(other_input.get(1), "c1", 0, 100.0)
    log = [o.value for o in s.changes() + other_input.changes()] + [b"garbage", None]
    reader = store()
    assert reader.changelog_partition(5) == 1
    assert reader.restore(1, log) == 0
    assert reader.restore(5, log) == 1 and reader.get(5).offsets == {"c5": 0}


def test_restore_replaces_what_was_held_and_drop_forgets_a_partition() -> None:
    s = store()
    apply(s.get(0), "stale", 0, 1.0)
    s.changes()
    s.restore(0, [])
    assert s.get(0).windows == {} and s.owned() == {0}
    s.drop(0)
    s.drop(7)  # not owned: nothing to do
    assert s.owned() == set()


def test_revoked_windows_come_back_only_at_the_offset_they_stand_at() -> None:
    """Eager rebalances revoke every partition and assign most back: windows kept in memory are taken back
    when the partition is read on from exactly where they stand, else restored from the changelog."""
    s = store()
    for p in (0, 1, 2):
        apply(s.get(p), f"k{p}", 9, 1.0)
        s.get(p).position = 10
    s.changes()  # (the revocation's commit took them)
    for p in (0, 1, 2):
        s.suspend(p)
    s.suspend(7)  # not owned: nothing to put aside
    assert s.owned() == set() and set(s.suspended) == {0, 1, 2}
    assert s.resume(0, 10) and s.get(0).state_of("k0") == {"sum": [1.0], "mean": [1.0]}
    assert not s.resume(1, 8)  # the commit did not get there (failed, or aborted): restore
    assert not s.resume(3, 10)  # never here
    s.forget_suspended()  # 2 went to another instance
    assert s.owned() == {0} and not s.suspended
    assert not s.resume(2, 10)  # a later assignment: another instance may have read on
    fresh = KeyedWindows()
    s.parts[4] = fresh
    s.suspend(4)
    assert not s.resume(4, -1001)  # nothing handled, nothing committed: restore


def test_an_event_at_or_before_its_keys_last_offset_is_not_applied_again() -> None:
    w = KeyedWindows()
    assert apply(w, "k", 0, 1.0) == [1.0]
    assert apply(w, "k", 1, 2.0) == [1.0, 2.0]
    w.take_dirty()
    # a crash: offsets 0 and 1 are read again; the windows already hold them
    assert w.begin("k", 0) is False
    assert list(w.push("mean", "k", 1.0, 3)) == [1.0, 2.0]  # the window as it stands
    assert w.begin("k", 1) is False
    assert w.take_dirty() == {} and w.replayed == 2
    assert apply(w, "k", 2, 3.0) == [1.0, 2.0, 3.0]  # the next new event counts
    assert w.offsets == {"k": 2}
    # another key's history is its own: offset 1 of key "j" is new
    assert apply(w, "j", 1, 8.0) == [8.0]


def test_replay_through_the_engine_does_not_double_count(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, with_steps("- {op: rolling_count, output: n, inputs: [a], window: 10}"))
    windows = KeyedWindows()

    def count(offset: int) -> float:
        raw = {"fields": {"event_id": str(offset), "user": "u", "a": 1, "b": 0}, "event_time": None}
        fv = engine.transform(raw, timestamp_ms=1, now_ms=1, windows=windows, offset=offset)
        return float(fv["features"]["n"])

    assert [count(o) for o in (0, 1, 2)] == [1.0, 2.0, 3.0]
    assert [count(o) for o in (1, 2, 3)] == [3.0, 3.0, 4.0]  # 1 and 2 read again after a crash
    assert engine.windows.windows == {}  # the engine's own windows (POST /predict's) are not touched


def test_preview_leaves_windows_and_offsets_alone() -> None:
    w = KeyedWindows()
    apply(w, "k", 3, 1.0)
    w.take_dirty()
    w.frozen = True
    assert list(w.push("mean", "k", 5.0, 3)) == [1.0, 5.0]
    w.frozen = False
    assert list(w.windows[("mean", "k")]) == [1.0] and w.offsets == {"k": 3} and not w.dirty


def test_rollback_takes_a_refused_event_out_of_every_window_it_entered() -> None:
    windows = KeyedWindows()
    windows.begin("k", 0)
    windows.push("a", "k", 1.0, 2)
    windows.begin("k", 1)
    windows.push("a", "k", 2.0, 2)
    windows.take_dirty()
    windows.begin("k", 2)  # a full window (pushes 1.0 out), a new one, then the event is refused
    windows.push("a", "k", 3.0, 2)
    windows.push("b", "k", 9.0, 5)
    windows.rollback()
    assert windows.state_of("k") == {"a": [1.0, 2.0]}
    assert windows.offsets["k"] == 1 and windows.take_dirty() == {}
