"""ModelHistory (what is live, what a rollback restores), and reading control topics around bad records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastavro.utils import generate_one

from streamml import control, pipelines
from streamml.codec import codec_for
from streamml.control import ModelHistory, find_version
from streamml.errors import ValidationError
from streamml.pipelines import validate_definition
from streamml.schemas import get_schema
from streamml.settings import Settings
from tests.unit.fakes import FakeMessage

ROOT = Path(__file__).resolve().parents[2]


def decision(version: int, action: str = "PROMOTE", model_name: str = "online") -> dict[str, Any]:
    return {
        "pipeline": "p",
        "model_name": model_name,
        "action": action,
        "version": version,
        "previous_version": None,
        "actor": "test",
        "reason": "",
        "metrics": {},
        "decided_at": 0,
    }


def live_version(history: ModelHistory) -> int | None:
    live = history.live()
    return None if live is None else int(live["version"])


def previous_version(history: ModelHistory) -> int | None:
    previous = history.previous_live()
    return None if previous is None else int(previous["version"])


def stack(history: ModelHistory) -> list[int]:
    return [d["version"] for d in history.live_stack()]


def test_empty_history_has_nothing_live() -> None:
    history = ModelHistory()
    assert history.live() is None and history.previous_live() is None and history.live_stack() == []


def test_promote_then_rollback_twice_then_promote_again() -> None:
    history = ModelHistory()
    for v in (1, 2, 3):
        history.decisions.append(decision(v))
    assert (live_version(history), previous_version(history)) == (3, 2)
    assert stack(history) == [1, 2, 3]

    # `model rollback` restores previous_live() as a ROLLBACK decision
    history.decisions.append(decision(previous_version(history) or 0, "ROLLBACK"))
    assert (live_version(history), previous_version(history)) == (2, 1)
    assert history.live() == decision(2, "ROLLBACK")

    history.decisions.append(decision(previous_version(history) or 0, "ROLLBACK"))
    assert (live_version(history), previous_version(history)) == (1, None)
    assert stack(history) == [1]

    history.decisions.append(decision(4))
    assert (live_version(history), previous_version(history)) == (4, 1)
    assert stack(history) == [1, 4]


def test_discard_and_shadow_do_not_change_what_is_live() -> None:
    history = ModelHistory(
        decisions=[decision(1), decision(2), decision(3, "SHADOW"), decision(4, "DISCARD")]
    )
    assert (live_version(history), previous_version(history)) == (2, 1)
    assert stack(history) == [1, 2]


def test_promoting_the_live_version_again_is_not_a_new_entry() -> None:
    history = ModelHistory(decisions=[decision(1), decision(2), decision(2)])
    assert stack(history) == [1, 2] and previous_version(history) == 1


def test_same_version_number_of_different_models_are_different_entries() -> None:
    history = ModelHistory(decisions=[decision(1, model_name="online"), decision(1, model_name="batch")])
    assert [(d["model_name"], d["version"]) for d in history.live_stack()] == [("online", 1), ("batch", 1)]
    assert history.live() is not None and history.live()["model_name"] == "batch"


def version(v: int, model_name: str = "online") -> dict[str, Any]:
    return {"pipeline": "p", "model_name": model_name, "version": v}


def test_find_version() -> None:
    history = ModelHistory(versions=[version(1), version(2), version(1, "batch")])
    assert find_version(history, 2, None) == version(2)
    assert find_version(history, 1, "batch") == version(1, "batch")
    with pytest.raises(ValidationError, match=r"no version 7"):
        find_version(history, 7, None)
    with pytest.raises(ValidationError, match=r"no version 2"):
        find_version(history, 2, "batch")
    with pytest.raises(ValidationError, match=r"version 1 exists for several models: pass --model"):
        find_version(history, 1, None)


# --- a PROMOTE of a version that does not exist is never live ---------------------------------------


def auto(version: int) -> dict[str, Any]:
    return {**decision(version), "actor": "auto"}


def test_a_decision_for_a_missing_version_is_not_live_and_auto_promotion_goes_on() -> None:
    history = ModelHistory(
        versions=[version(1), version(2), version(3)],
        decisions=[auto(1), decision(1, model_name="ghost"), auto(2), decision(9), auto(3)],
    )
    # Counted as live, the ghost would have made every later AUTO promotion of "online" a no-op.
    assert stack(history) == [1, 2, 3]
    assert (live_version(history), previous_version(history)) == (3, 2)
    assert history.live() == auto(3)
    assert history.ignored() == [decision(1, model_name="ghost"), decision(9)]


def test_a_rollback_to_a_missing_version_is_ignored_too() -> None:
    history = ModelHistory(versions=[version(1), version(2)], decisions=[decision(1), decision(2)])
    history.decisions.append(decision(7, "ROLLBACK"))
    assert (live_version(history), previous_version(history)) == (2, 1)


def test_with_no_versions_nothing_is_live_unless_versions_were_not_read() -> None:
    # `streamml status` reads decisions only (versions None): then every decision counts
    assert ModelHistory(versions=[], decisions=[decision(1)]).live() is None
    assert live_version(ModelHistory(decisions=[decision(1)])) == 1


def test_find_version_names_the_missing_model() -> None:
    history = ModelHistory(versions=[version(1), version(2)])
    with pytest.raises(ValidationError, match=r"no model 'ghost' in this pipeline: its models are online"):
        find_version(history, 1, "ghost")
    with pytest.raises(ValidationError, match=r"no version 3 of model 'online'"):
        find_version(history, 3, "online")
    with pytest.raises(
        ValidationError, match=r"no model 'online' in this pipeline: it has no model versions"
    ):
        find_version(ModelHistory(versions=[]), 1, "online")


# --- reading control topics around bad records -------------------------------------------------------

PIPELINES = "t.pipelines"


def messages(topic: str, *pairs: tuple[bytes | None, bytes | None]) -> list[FakeMessage]:
    return [FakeMessage(topic, value, offset, key=key) for offset, (key, value) in enumerate(pairs)]


@pytest.fixture(scope="module")
def agrawal() -> dict[str, Any]:
    spec = pipelines.load_file(ROOT / "pipelines" / "agrawal.yaml")
    return pipelines.to_definition(spec, "t.agrawal.raw").to_avro()


def definition_bytes(record: dict[str, Any]) -> bytes:
    return codec_for("PipelineDefinition").encode(record)


def bad_definitions(good: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Definitions that decode but that no service can run, by what is wrong with them."""
    step = {**good["feature_steps"][0], "params": {"window": "{not json"}}
    return {
        "invalid pipeline name": {**good, "name": "BAD NAME!/.."},
        "not JSON": {**good, "feature_steps": [step]},
        "online": {**good, "models": [{**m, "kind": "BATCH"} for m in good["models"]]},
    }


def test_undecodable_and_invalid_definitions_are_skipped_with_where_and_why(agrawal: dict[str, Any]) -> None:
    bad = bad_definitions(agrawal)
    msgs = messages(
        PIPELINES,
        (b"garbage", b"\x00\xffnot avro"),
        (b"agrawal", definition_bytes(agrawal)),
        (b"BAD NAME!/..", definition_bytes(bad["invalid pipeline name"])),
        (b"x", definition_bytes(bad["not JSON"])),
        (b"y", definition_bytes(bad["online"])),
        (b"z", codec_for("Promotion").encode(decision(1))),  # another record type on the topic
    )
    records, skipped = control.read_around(msgs, "PipelineDefinition", validate_definition)
    assert [(k, r["name"]) for k, r in records] == [(b"agrawal", "agrawal")]
    assert [(s.where, s.key) for s in skipped] == [
        ("t.pipelines[0]@0", b"garbage"),
        ("t.pipelines[0]@2", b"BAD NAME!/.."),
        ("t.pipelines[0]@3", b"x"),
        ("t.pipelines[0]@4", b"y"),
        ("t.pipelines[0]@5", b"z"),
    ]
    assert "not Avro" in skipped[0].reason
    for s, expected in zip(skipped[1:4], bad, strict=True):
        assert expected in s.reason, (expected, s.reason)
    assert skipped[1].name == "BAD NAME!/.."  # so `pipeline delete 'BAD NAME!/..'` finds it
    assert "Promotion" in skipped[4].reason


def test_tombstones_and_later_valid_records_replace_bad_ones_a_bad_one_replaces_nothing(
    agrawal: dict[str, Any],
) -> None:
    v2 = {**agrawal, "revision": 2}
    msgs = messages(
        PIPELINES,
        (b"agrawal", definition_bytes(agrawal)),
        (b"agrawal", b"garbage over a valid revision"),  # the services keep revision 1: so do we
        (b"gone", b"garbage"),
        (b"gone", None),  # tombstone: compaction removes the record before it
        (b"later", b"garbage"),
        (b"later", definition_bytes({**agrawal, "name": "later"})),  # a valid record replaces it
    )
    records, skipped = control.read_around(msgs, "PipelineDefinition", validate_definition)
    assert [(k, r["name"], r["revision"]) for k, r in records] == [
        (b"agrawal", "agrawal", 1),
        (b"later", "later", 1),
    ]
    assert [s.offset for s in skipped] == [1]

    records, skipped = control.read_around(
        [*msgs, FakeMessage(PIPELINES, definition_bytes(v2), 6, key=b"agrawal")], "PipelineDefinition"
    )
    assert [(k, r["revision"]) for k, r in records if k == b"agrawal"] == [(b"agrawal", 2)] and skipped == []


def model_version(v: int, pipeline: str = "p", model_name: str = "online") -> dict[str, Any]:
    record = generate_one(get_schema("ModelVersion").parsed)
    return {**record, "pipeline": pipeline, "model_name": model_name, "version": v, "metrics": {}}


def test_model_history_reads_around_bad_versions_and_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    versions, promotions = codec_for("ModelVersion"), codec_for("Promotion")
    topics = {
        "t.model-versions": messages(
            "t.model-versions",
            (b"p/online/1", versions.encode(model_version(1))),
            (b"junk", b"\xc3\x01 truncated"),
            (b"BAD/online/1", versions.encode(model_version(1, pipeline="BAD NAME!/.."))),
            (b"q/online/1", versions.encode(model_version(1, pipeline="q"))),
        ),
        "t.promotions": messages(
            "t.promotions",
            (b"p/online/1", promotions.encode(decision(1))),
            (b"p/ghost/2", promotions.encode(decision(1, model_name="ghost"))),
            (b"junk", b"junk"),
            (b"BAD/online/3", promotions.encode({**decision(1), "pipeline": "Not/A/Pipeline"})),
        ),
    }
    monkeypatch.setattr(control, "read_to_end", lambda _settings, topic: topics[topic])
    history = control.model_history(Settings(topic_prefix="t"), "p")
    assert [v["version"] for v in history.versions or []] == [1]
    assert [d["model_name"] for d in history.decisions] == ["online", "ghost"]
    assert live_version(history) == 1 and history.ignored() == [decision(1, model_name="ghost")]
    assert sorted(s.where for s in history.skipped) == [
        "t.model-versions[0]@1",
        "t.model-versions[0]@2",
        "t.promotions[0]@2",
        "t.promotions[0]@3",
    ]
    assert any("invalid pipeline name 'Not/A/Pipeline'" in s.reason for s in history.skipped)


def test_read_pipelines_keeps_the_key_of_each_revision(
    monkeypatch: pytest.MonkeyPatch, agrawal: dict[str, Any]
) -> None:
    msgs = messages(PIPELINES, (b"agrawal", definition_bytes(agrawal)), (b"\xff\xfe", b"garbage"))
    monkeypatch.setattr(control, "read_to_end", lambda _settings, _topic: msgs)
    state = control.read_pipelines(Settings(topic_prefix="t"))
    assert list(state.current) == ["agrawal"] and state.keys == {"agrawal": b"agrawal"}
    assert [s.key for s in state.skipped] == [b"\xff\xfe"]
    assert control.key_text(b"\xff\xfe") is None and control.key_text(b"BAD NAME!/..") == "BAD NAME!/.."
    assert control.current_pipelines(Settings(topic_prefix="t")) == state.current
