"""The features service's repartition hop and per-partition windows, without a broker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from services.features import app as features_app
from streamml.codec import codec_for
from streamml.errors import ValidationError
from streamml.pipelines import load_file, to_definition
from streamml.runtime import BatchLoop, Output
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.repartition import SOURCE_HEADER, Source, key_of, murmur2, partition_for
from tests.unit.fakes import FakeMessage

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="p", signing_key="k", default_partitions=4)  # type: ignore[arg-type]
CATALOGUE = Catalogue(SETTINGS)
RAW = "p.agrawal.raw"
HOP = CATALOGUE.repartition("agrawal").name
FEATURES = CATALOGUE.features("agrawal").name
WINDOWS = CATALOGUE.windows("agrawal").name


@pytest.fixture(autouse=True)
def no_broker() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features_app, "ensure_topics", lambda *_a, **_k: [])
        yield


def agrawal(**changes: Any) -> dict[str, Any]:
    definition = to_definition(load_file(REPO / "pipelines" / "agrawal.yaml"), raw_topic=RAW).to_avro()
    return definition | changes


def event(i: int, zipcode: int | None = 3, salary: float = 1000.0) -> bytes:
    fields = dict(event_id=f"e{i}", salary=salary, commission=0.0, age=40, elevel=1, car=1, zipcode=zipcode,
                  hvalue=1.0, hyears=1, loan=1.0, label=1)  # fmt: skip
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


class HeaderMessage(FakeMessage):
    """A record read from a topic, with its headers."""

    def __init__(self, out: Output, offset: int) -> None:
        super().__init__(
            out.topic, out.value, offset, partition=out.partition or 0, key=out.key, headers=out.headers
        )


def service(definition: dict[str, Any] | None = None) -> features_app.Features:
    s = features_app.Features(SETTINGS, CATALOGUE)
    s.on_pipeline(definition or agrawal(), None)
    return s


# -- pure routing -----------------------------------------------------------------------------------------
def test_partition_is_kafkas_default_of_the_key_text_and_keyless_events_go_to_partition_0() -> None:
    assert murmur2(b"21") == (-973932308) & 0xFFFFFFFF  # Kafka's own test vector
    assert partition_for(b"21", 4) == ((-973932308) & 0x7FFFFFFF) % 4
    assert partition_for(None, 4) == 0
    assert {partition_for(str(k).encode(), 4) for k in range(100)} == {0, 1, 2, 3}


def test_the_key_is_the_key_fields_text_as_the_windows_see_it() -> None:
    assert key_of({"fields": {"zip": 94107}}, "zip") == b"94107"
    assert key_of({"fields": {"zip": True}}, "zip") == b"True"
    assert key_of({"fields": {"zip": 1.5}}, "zip") == b"1.5"
    assert key_of({"fields": {"other": 1}}, "zip") is None
    assert key_of({"fields": {"zip": None}}, "zip") is None


def test_source_headers_round_trip_and_malformed_ones_are_ignored() -> None:
    source = Source("raw.topic-1", 2, 77, 1_700_000_000_000, b"orig")
    assert Source.from_headers(source.headers()) == source
    assert Source.from_headers(Source("t", 0, 0, 5).headers()) == Source("t", 0, 0, 5)
    for bad in ([(SOURCE_HEADER, b"t/x/1/2")], [(SOURCE_HEADER, b"\xff")], [(SOURCE_HEADER, b"t/-1/0/0")],
                [(SOURCE_HEADER, None)], [], None, {"a": b"b"}):  # fmt: skip
        assert Source.from_headers(bad) is None, bad


# -- stage 1: raw → repartition ---------------------------------------------------------------------------
def test_raw_events_are_forwarded_unchanged_keyed_by_the_key_field_with_their_source() -> None:
    s = service()
    assert s.topics() == {RAW, HOP}
    value = event(0, zipcode=7)
    msg = FakeMessage(RAW, value, offset=41, partition=2, key=b"producer-key")
    (out,) = s.handle([msg])  # type: ignore[list-item]
    assert (out.topic, out.key, out.value) == (HOP, b"7", value)
    assert out.partition == partition_for(b"7", 4)
    assert Source.from_headers(out.headers) == Source(RAW, 2, 41, msg.timestamp()[1], b"producer-key")


def test_undecodable_raw_is_dead_lettered_at_the_hop_and_keyless_events_go_to_partition_0() -> None:
    s = service()
    dead, keyless = s.handle([FakeMessage(RAW, b"{nope", 5), FakeMessage(RAW, event(1, zipcode=None), 6)])  # type: ignore[list-item]
    assert dead.topic == CATALOGUE.dead_letter("agrawal").name
    assert codec_for("DeadLetter").decode(dead.value or b"")["source_offset"] == 5
    assert (keyless.topic, keyless.key, keyless.partition) == (HOP, None, 0)


# -- stage 2: repartition → features + changelog ----------------------------------------------------------
def test_feature_vectors_point_at_the_raw_record_and_changed_windows_go_to_the_same_partition() -> None:
    s = service()
    hop = s.handle([FakeMessage(RAW, event(i, salary=float(i)), offset=100 + i, partition=1) for i in (1, 2)])  # type: ignore[misc]
    read = [HeaderMessage(o, offset) for offset, o in enumerate(hop)]
    outputs = s.handle(read) + s.state_changes()  # type: ignore[arg-type]
    vectors = [codec_for("FeatureVector").decode(o.value or b"") for o in outputs if o.topic == FEATURES]
    assert [v["source"] for v in vectors] == [
        {"topic": RAW, "partition": 1, "start_offset": 100 + i, "end_offset": 101 + i} for i in (1, 2)
    ]
    assert [v["features"]["zipcode_mean_salary_100"] for v in vectors] == [1.0, 1.5]
    (changelog,) = [o for o in outputs if o.topic == WINDOWS]
    assert changelog.partition == hop[0].partition and changelog.key == f"{hop[0].partition}/3".encode()
    assert codec_for("WindowState").decode(changelog.value or b"")["offset"] == 1


def test_a_raw_record_the_hop_forwarded_twice_enters_its_keys_windows_once() -> None:
    """At least once: the hop's input is read again after a crash, so raw records 101-102 reach the
    repartition topic twice, at new offsets. The copies get the values the first ones had; the windows,
    the changelog and a restore from it count each raw record once."""
    s = service()
    raw = [FakeMessage(RAW, event(i, salary=float(i)), offset=100 + i, partition=1) for i in range(4)]
    first = s.handle(raw[:3])  # type: ignore[arg-type]
    again = s.handle(raw[1:])  # type: ignore[arg-type]  # the next owner starts from the committed 101
    read = [HeaderMessage(o, offset) for offset, o in enumerate([*first, *again])]
    outputs = s.handle(read) + s.state_changes()  # type: ignore[arg-type]
    vectors = [codec_for("FeatureVector").decode(o.value or b"") for o in outputs if o.topic == FEATURES]
    got = [(v["source"]["start_offset"], v["features"]["zipcode_count_100"]) for v in vectors]
    assert got == [(100, 1.0), (101, 2.0), (102, 3.0), (101, 3.0), (102, 3.0), (103, 4.0)]
    assert vectors[-1]["features"]["zipcode_mean_salary_100"] == 1.5  # (0 + 1 + 2 + 3) / 4
    (changelog,) = [o for o in outputs if o.topic == WINDOWS]
    state = codec_for("WindowState").decode(changelog.value or b"")
    assert state["sources"] == {f"{RAW}/1": 103}

    restored = service()
    part = changelog.partition or 0
    restored.stores[HOP].restore(part, [changelog.value])
    replay = HeaderMessage(again[1], 10)  # raw 102 once more, after a restart
    (fv,) = [o for o in restored.handle([replay]) if o.topic == FEATURES]  # type: ignore[list-item]
    assert codec_for("FeatureVector").decode(fv.value or b"")["features"]["zipcode_count_100"] == 4.0


def test_a_refused_event_after_the_hop_is_dead_lettered_with_the_raw_coordinates() -> None:
    s = service()
    bad = json.dumps({"event_id": "x", "zipcode": 3, "salary": "lots"}).encode()
    (hop,) = s.handle([FakeMessage(RAW, bad, offset=9, partition=3, key=b"pk")])  # type: ignore[list-item]
    (dead,) = s.handle([HeaderMessage(hop, 0)])  # type: ignore[list-item]
    letter = codec_for("DeadLetter").decode(dead.value or b"")
    assert (letter["source_topic"], letter["source_partition"], letter["source_offset"]) == (RAW, 3, 9)
    assert (letter["original_key"], letter["original_value"]) == (b"pk", bad)
    assert dead.key == f"{RAW}/3/9".encode()


@pytest.mark.parametrize("definition", [agrawal(raw_keyed=True), agrawal(key_field=None)])
def test_keyed_raw_topics_and_pipelines_without_a_key_skip_the_hop(definition: dict[str, Any]) -> None:
    s = service(definition)
    assert s.topics() == {RAW} and set(s.stores) == {RAW}
    outputs = s.handle([FakeMessage(RAW, event(0), offset=4, partition=2)])  # type: ignore[list-item]
    outputs += s.state_changes()
    assert [o.topic for o in outputs] == [FEATURES, WINDOWS]
    assert outputs[1].partition == 2


def test_a_new_revision_keeps_the_windows_and_a_new_input_topic_starts_a_new_store() -> None:
    s = service()
    store = s.stores[HOP]
    s.on_pipeline(agrawal(revision=2), None)
    assert s.stores[HOP] is store
    s.on_pipeline(agrawal(revision=3, raw_keyed=True), None)
    assert set(s.stores) == {RAW} and s.topics() == {RAW}
    s.on_pipeline(agrawal(revision=4, deleted=True), None)
    assert s.stores == {} and s.topics() == set()


# -- assignment -------------------------------------------------------------------------------------------
def test_assignment_restores_exactly_the_new_partitions_and_revocation_drops_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = service()
    hop = writer.handle([FakeMessage(RAW, event(i, salary=10.0), offset=i) for i in range(3)])  # type: ignore[misc]
    partition = hop[0].partition or 0
    writer.handle([HeaderMessage(o, i) for i, o in enumerate(hop)])  # type: ignore[misc]
    log = [o.value for o in writer.state_changes()]

    reads: list[dict[int, int]] = []

    def read_changelog(_settings: Settings, topic: str, partitions: dict[int, int]) -> dict[int, list[Any]]:
        assert topic == WINDOWS
        reads.append(dict(partitions))
        return {p: log if c == partition else [] for p, c in partitions.items()}

    monkeypatch.setattr(features_app, "read_changelog", read_changelog)
    reader = service()
    assigned = [
        TopicPartition(HOP, partition),
        TopicPartition(HOP, (partition + 1) % 4),
        TopicPartition(RAW, 0),
    ]
    assert reader.on_assign(assigned) == assigned
    assert reads == [{partition: partition, (partition + 1) % 4: (partition + 1) % 4}]
    assert reader.stores[HOP].owned() == {partition, (partition + 1) % 4}
    # the restored windows continue where the writer stopped, and replayed offsets are not counted again
    (fresh,) = writer.handle([FakeMessage(RAW, event(3, salary=10.0), offset=3)])  # type: ignore[misc]
    again = reader.handle([HeaderMessage(hop[2], 2), HeaderMessage(fresh, 3)])  # type: ignore[list-item]
    counts = [codec_for("FeatureVector").decode(o.value or b"")["features"]["zipcode_count_100"]
              for o in again if o.topic == FEATURES]  # fmt: skip
    assert counts == [3.0, 4.0]
    reader.on_revoke([TopicPartition(HOP, partition), TopicPartition(RAW, 0)])
    assert reader.stores[HOP].owned() == {(partition + 1) % 4}


def test_windows_made_outside_an_assignment_are_replaced_by_the_changelog_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every partition held is put aside before an assignment (the revocation, the rewind): windows held
    when a partition is assigned were made by records of a partition this instance did not own (a record
    fetched before a revocation), so they are not its committed state and are restored like any other."""
    writer = service()
    hop = writer.handle([FakeMessage(RAW, event(i, salary=10.0), offset=i) for i in range(3)])  # type: ignore[misc]
    partition = hop[0].partition or 0
    writer.handle([HeaderMessage(o, i) for i, o in enumerate(hop)])  # type: ignore[misc]
    log = [o.value for o in writer.state_changes()]
    monkeypatch.setattr(
        features_app,
        "read_changelog",
        lambda _s, _t, parts: {p: log if p == partition else [] for p in parts},
    )
    reader = service()
    # a record of the partition handled while the instance did not own it: a window of one event
    reader.handle([HeaderMessage(hop[2], 2)])  # type: ignore[list-item]
    assert set(map(tuple, reader.stores[HOP].get(partition).state_of("3").values())) == {(10.0,)}
    reader.on_assign([TopicPartition(HOP, partition, 3)])
    restored = reader.stores[HOP].get(partition)
    assert restored.offsets == {"3": 2} and all(len(w) == 3 for w in restored.state_of("3").values())
    # the next event meets the three before it
    (fresh,) = writer.handle([FakeMessage(RAW, event(3, salary=10.0), offset=3)])  # type: ignore[misc]
    (out,) = reader.handle([HeaderMessage(fresh, 3)])  # type: ignore[list-item]
    assert codec_for("FeatureVector").decode(out.value or b"")["features"]["zipcode_count_100"] == 4.0


def test_exactly_once_an_event_its_windows_already_held_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Exactly once the windows are the committed state of the offset read from: a record they already
    hold means they were ahead of the input. Never silent (at least once it is an ordinary replay)."""
    from streamml.metrics import ERRORS

    def replays() -> float:
        return ERRORS.labels("features", "window_replay")._value.get()

    for guarantee, counted in (("at_least_once", 0), ("exactly_once", 1)):
        s = features_app.Features(SETTINGS.model_copy(update={"processing_guarantee": guarantee}), CATALOGUE)
        s.on_pipeline(agrawal(), None)
        (hop,) = s.handle([FakeMessage(RAW, event(0), offset=0)])  # type: ignore[misc]
        before = replays()
        s.handle([HeaderMessage(hop, 0)])  # type: ignore[list-item]
        with caplog.at_level("WARNING"):
            (again,) = s.handle([HeaderMessage(hop, 0)])  # type: ignore[list-item]
        assert again.topic == FEATURES, "the record is still featured"
        assert replays() - before == counted
        assert ("ahead of the committed input" in caplog.text) is bool(counted)


# -- the declaration --------------------------------------------------------------------------------------
def test_a_pipeline_file_declares_its_raw_topic_keyed_only_with_a_key_field(tmp_path: Path) -> None:
    text = (REPO / "pipelines" / "agrawal.yaml").read_text()
    assert agrawal()["raw_keyed"] is False  # the default: the hop
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(text + "\nraw_keyed: true\n")
    assert to_definition(load_file(keyed), raw_topic=RAW).to_avro()["raw_keyed"] is True
    unkeyed = tmp_path / "unkeyed.yaml"
    unkeyed.write_text(text.replace("key_field: zipcode\n", "") + "\nraw_keyed: true\n")
    with pytest.raises(ValidationError, match="raw_keyed: true needs a key_field"):
        load_file(unkeyed)


def test_repartitioned_records_are_ordered_by_their_raw_records_time() -> None:
    """The hop forwards a batch in one burst: every record bears nearly the same produce time. Aligned
    reading orders by the raw record's time from the source header, so key groups come out as they came
    in, not at equal rates."""
    from streams.repartition import source_time

    def hop_record(partition: int, offset: int, raw_ts: int) -> FakeMessage:
        headers = Source(RAW, 0, raw_ts, raw_ts).headers()
        return FakeMessage(HOP, b"{}", offset, partition=partition, headers=headers, timestamp=(1, 5_000))

    assert source_time(hop_record(0, 0, 42)) == 42
    assert source_time(FakeMessage(HOP, b"{}", 0, timestamp=(1, 7))) == 7, "no header: the record's time"
    assert source_time(FakeMessage(HOP, b"{}", 0, headers=[(SOURCE_HEADER, b"junk")], timestamp=(1, 8))) == 8

    class Consumer:  # two assigned partitions, both read to the end
        def assignment(self) -> list[TopicPartition]:
            return [TopicPartition(HOP, 0), TopicPartition(HOP, 1)]

        def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
            return 0, 10

        def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
            return [TopicPartition(tp.topic, tp.partition, 10) for tp in tps]

    def order(**kw: Any) -> list[int]:
        loop = BatchLoop(SETTINGS, name="t", handler=lambda msgs: [], topics=set, aligned=bool, **kw)
        loop._consumer = Consumer()  # type: ignore[assignment]
        batch = [hop_record(0, o, ts) for o, ts in enumerate([10, 11, 12, 13, 30, 31])]
        batch += [hop_record(1, o, ts) for o, ts in enumerate([20, 21])]
        return [source_time(m) for m in loop._take_aligned(batch)]  # type: ignore[arg-type]

    assert order(order_time=source_time) == [10, 11, 12, 13, 20, 21, 30, 31]
    assert order() == [10, 20, 11, 21, 12, 13, 30, 31], "by produce time all tie: turns"
