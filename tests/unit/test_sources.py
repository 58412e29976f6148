"""Unit tests for streamml.sources: files, River datasets and built-in generators, no broker."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamml.errors import ValidationError
from streamml.sources import (
    JsonScalar,
    SourceEvent,
    _iter_river,
    _to_json_scalar,
    describe_sources,
    open_source,
)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def values(spec: str, **kwargs: Any) -> list[dict[str, JsonScalar]]:
    return [event.value for event in open_source(spec, **kwargs)]


# --- JSONL -----------------------------------------------------------------------------------------------


def test_jsonl_yields_objects_with_their_physical_line_numbers(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "data.jsonl",
        '{"a": 1, "b": "x"}\n\n   \n{"a": 2.5, "b": null, "c": true}\r\n{"a": -3}\n',
    )
    events = list(open_source(spec))
    assert events == [
        SourceEvent(line=1, value={"a": 1, "b": "x"}),
        SourceEvent(line=4, value={"a": 2.5, "b": None, "c": True}),
        SourceEvent(line=5, value={"a": -3}),
    ]


def test_ndjson_suffix_and_limit(tmp_path: Path) -> None:
    spec = write(tmp_path, "data.NDJSON", "".join(f'{{"i": {i}}}\n' for i in range(10)))
    assert values(spec, limit=3) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert values(spec, limit=0) == []


def test_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    spec = write(tmp_path, "data.jsonl", '{"a": 1}\n{"a": 2}\n\n{"a": 3,}\n{"a": 4}\n')
    events = open_source(spec)
    assert next(events).line == 1  # good lines before the bad one are still delivered
    with pytest.raises(ValidationError, match=r"data\.jsonl line 4: not valid JSON \(") as info:
        list(events)
    assert str(info.value).startswith(spec)


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    spec = write(tmp_path, "data.jsonl", '{"a": 1}\n' * 6 + "[1, 2]\n")
    with pytest.raises(ValidationError) as info:
        list(open_source(spec))
    assert str(info.value) == f"{spec} line 7: not a JSON object (got a list)"


@pytest.mark.parametrize(
    ("line", "expected"),
    [("42", "a number"), ('"text"', "a string"), ("null", "null"), ("true", "a boolean")],
)
def test_jsonl_non_object_scalars_are_named(tmp_path: Path, line: str, expected: str) -> None:
    spec = write(tmp_path, "data.jsonl", line + "\n")
    with pytest.raises(ValidationError, match=rf"line 1: not a JSON object \(got {expected}\)"):
        list(open_source(spec))


@pytest.mark.parametrize(
    ("line", "kind"), [('{"a": 1, "meta": {"k": 1}}', "object"), ('{"a": 1, "meta": [1, 2]}', "list")]
)
def test_jsonl_nested_value(tmp_path: Path, line: str, kind: str) -> None:
    spec = write(tmp_path, "data.jsonl", '{"a": 0}\n{"a": 0}\n' + line + "\n")
    with pytest.raises(ValidationError, match=rf"data\.jsonl line 3: field 'meta' holds a nested {kind}"):
        list(open_source(spec))


def test_jsonl_rejects_nan_which_is_not_json(tmp_path: Path) -> None:
    spec = write(tmp_path, "data.jsonl", '{"a": NaN}\n')
    with pytest.raises(ValidationError, match=r"line 1: not valid JSON \(NaN is not valid JSON\)"):
        list(open_source(spec))


def test_jsonl_rejects_numbers_that_overflow_to_infinity(tmp_path: Path) -> None:
    spec = write(tmp_path, "data.jsonl", '{"a": 1}\n{"big": 1e400}\n')
    with pytest.raises(ValidationError, match=r"line 2: field 'big' is a number too large"):
        list(open_source(spec))


def test_jsonl_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValidationError, match=r"line 2: not valid UTF-8"):
        list(open_source(str(path)))


def test_missing_file_fails_before_iteration(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="file not found"):
        open_source(str(tmp_path / "absent.jsonl"))
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValidationError, match="not a regular file"):
        open_source(str(tmp_path / "dir.csv"))


# --- CSV -------------------------------------------------------------------------------------------------


def test_csv_converts_cells(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "data.csv",
        "id,count,ratio,flag,note,empty,zip\n"
        "1,42,0.5,true,hello,,01234\n"
        '2,-7,1e3,FALSE,"a, b",  ,0\n'
        "3,+3,-.25,yes,nan, 12 ,007\n",
    )
    assert values(spec) == [
        {"id": 1, "count": 42, "ratio": 0.5, "flag": True, "note": "hello", "empty": None, "zip": "01234"},
        {"id": 2, "count": -7, "ratio": 1000.0, "flag": False, "note": "a, b", "empty": None, "zip": 0},
        {"id": 3, "count": 3, "ratio": -0.25, "flag": "yes", "note": "nan", "empty": 12, "zip": "007"},
    ]
    types = [type(v) for v in values(spec)[0].values()]
    assert types == [int, int, float, bool, str, type(None), str]


def test_csv_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    spec = write(tmp_path, "data.csv", 'a,b\n1,"multi\nline"\n\n2,x\n')
    events = list(open_source(spec))
    assert [(e.line, e.value) for e in events] == [(2, {"a": 1, "b": "multi\nline"}), (5, {"a": 2, "b": "x"})]


def test_csv_header_with_bom_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeffa, b\n1,2\n".encode())
    assert values(str(path)) == [{"a": 1, "b": 2}]


@pytest.mark.parametrize(("row", "got"), [("1,2,3,4", 4), ("1,2", 2)])
def test_csv_wrong_column_count(tmp_path: Path, row: str, got: int) -> None:
    spec = write(tmp_path, "data.csv", "a,b,c\n1,2,3\n4,5,6\n" + row + "\n7,8,9\n")
    with pytest.raises(ValidationError) as info:
        list(open_source(spec))
    assert str(info.value) == f"{spec} line 4: expected 3 columns (as in the header) but got {got}"


def test_csv_header_problems(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="empty file; a header row"):
        list(open_source(write(tmp_path, "empty.csv", "\n\n")))
    with pytest.raises(ValidationError, match=r"dup\.csv line 1: header repeats column 'a'"):
        list(open_source(write(tmp_path, "dup.csv", "a,b,a\n1,2,3\n")))
    with pytest.raises(ValidationError, match="header has an empty column name"):
        list(open_source(write(tmp_path, "blank.csv", "a,,c\n1,2,3\n")))


# --- River -----------------------------------------------------------------------------------------------


def test_river_phishing_is_bundled_and_json_ready() -> None:
    events = list(open_source("river:Phishing"))
    assert len(events) == 1250
    assert all(e.line is None for e in events)
    first = events[0].value
    assert first["event_id"] == "Phishing-0"
    assert isinstance(first["label"], bool)
    assert {e.value["label"] for e in events} == {True, False}
    assert len({e.value["event_id"] for e in events}) == 1250
    assert json.loads(json.dumps([e.value for e in events]))[1249]["event_id"] == "Phishing-1249"


def test_river_custom_label_and_id_fields() -> None:
    value = values("river:TrumpApproval", limit=1, label_field="y", id_field="key")[0]
    assert value["key"] == "TrumpApproval-0"
    assert isinstance(value["y"], float)
    assert "label" not in value and "event_id" not in value


def test_river_datetimes_become_iso_strings() -> None:
    value = values("river:AirlinePassengers", limit=1)[0]
    assert value == {"event_id": "AirlinePassengers-0", "month": "1949-01-01T00:00:00", "label": 112}


def test_river_multi_output_label_is_flattened() -> None:
    value = values("river:synth.Logical")[0]
    assert set(value) == {"event_id", "A", "B", "label.OR", "label.XOR", "label.AND"}


def test_river_synth_is_deterministic_for_a_seed() -> None:
    first = values("river:synth.Agrawal?seed=1", limit=100)
    second = values("river:synth.Agrawal?seed=1", limit=100)
    other = values("river:synth.Agrawal?seed=2", limit=100)
    assert len(first) == 100
    assert first == second
    assert first != other
    assert first[99]["event_id"] == "synth.Agrawal-99"
    json.dumps(first)


def test_river_params_are_typed_and_passed() -> None:
    f0 = values("river:synth.Agrawal?classification_function=0&seed=3", limit=200)
    f5 = values("river:synth.Agrawal?classification_function=5&seed=3", limit=200)
    features = [{k: v for k, v in e.items() if k != "label"} for e in f0]
    assert features == [{k: v for k, v in e.items() if k != "label"} for e in f5]  # same seed, same x
    assert [e["label"] for e in f0] != [e["label"] for e in f5]  # different concept, different y


def test_river_default_seed_comes_from_open_source() -> None:
    assert values("river:synth.SEA", limit=20, seed=7) == values("river:synth.SEA?seed=7", limit=20)
    assert values("river:synth.SEA", limit=20, seed=7) != values("river:synth.SEA", limit=20, seed=8)


@pytest.mark.parametrize("spec", ["river:synth.Agrawal", "river:synth.FriedmanDrift?seed=1"])
def test_infinite_river_stream_needs_limit(spec: str) -> None:
    with pytest.raises(ValidationError, match="infinite generator; give --limit"):
        open_source(spec)


def test_finite_river_generator_needs_no_limit() -> None:
    assert len(values("river:synth.Logical?n_tiles=2")) == 8


@pytest.mark.parametrize(
    "spec", ["river:os.system", "river:base", "river:synth.base.SyntheticDataset", "river:phishing"]
)
def test_river_only_allows_dataset_classes(spec: str) -> None:
    with pytest.raises(ValidationError) as info:
        open_source(spec)
    message = str(info.value)
    assert "river.datasets and river.datasets.synth" in message
    assert "Phishing" in message and "synth.Agrawal" in message


def test_river_unknown_or_bad_params() -> None:
    with pytest.raises(ValidationError, match=r"unknown parameter.* foo; accepted: classification_function"):
        open_source("river:synth.Agrawal?foo=1", limit=1)
    with pytest.raises(ValidationError, match="invalid parameters"):
        open_source("river:synth.Agrawal?classification_function=99", limit=1)
    with pytest.raises(ValidationError, match="key=value"):
        open_source("river:synth.Agrawal?seed", limit=1)
    with pytest.raises(ValidationError, match="given twice"):
        open_source("river:synth.Agrawal?seed=1&seed=2", limit=1)


def test_river_remote_dataset_asks_for_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RIVER_DATA", str(tmp_path))  # an empty data home: nothing is downloaded
    with pytest.raises(ValidationError, match=r"river:Elec2 is not bundled .* needs a download") as info:
        open_source("river:Elec2")
    assert "datasets.Elec2().download()" in str(info.value)
    assert list(tmp_path.rglob("*.*")) == []  # and nothing was fetched


def test_river_label_field_clashing_with_a_feature() -> None:
    with pytest.raises(ValidationError, match="feature 'age' has the same name as the label"):
        list(open_source("river:synth.Agrawal", limit=1, label_field="age"))


def test_river_keeps_an_id_the_data_already_has() -> None:
    rows = [({"event_id": "abc", 3: np.float32(1.5)}, np.bool_(True))]
    events = list(_iter_river(rows, "Fake", "label", "event_id"))
    assert events == [SourceEvent(line=None, value={"event_id": "abc", "3": 1.5, "label": True})]
    assert type(events[0].value["label"]) is bool


def test_to_json_scalar_conversions() -> None:
    assert _to_json_scalar(np.int64(5), "w") == 5 and type(_to_json_scalar(np.int64(5), "w")) is int
    assert type(_to_json_scalar(np.float64(0.5), "w")) is float
    assert _to_json_scalar(np.bool_(False), "w") is False
    assert _to_json_scalar(np.str_("s"), "w") == "s"
    assert _to_json_scalar(dt.date(2024, 1, 2), "w") == "2024-01-02"
    assert _to_json_scalar(math.nan, "w") is None
    assert _to_json_scalar(np.float32("inf"), "w") is None
    with pytest.raises(ValidationError, match="w: cannot represent a complex value"):
        _to_json_scalar(1j, "w")


# --- built-in generators ---------------------------------------------------------------------------------


def test_synthetic_classification_shape() -> None:
    events = values("synthetic:classification", limit=500)
    assert len(events) == 500
    assert set(events[0]) == {"event_id", *(f"f{i}" for i in range(10)), "color", "label"}
    assert events[0]["event_id"] == "synthetic-classification-0"
    assert {e["label"] for e in events} == {True, False}
    assert {e["color"] for e in events} == {"red", "green", "blue", "yellow"}
    assert all(isinstance(e["f3"], float) for e in events)
    json.dumps(events)


def test_synthetic_classification_is_deterministic_per_seed() -> None:
    assert values("synthetic:classification", limit=50, seed=1) == values(
        "synthetic:classification", limit=50, seed=1
    )
    assert values("synthetic:classification", limit=50, seed=1) != values(
        "synthetic:classification", limit=50, seed=2
    )


def test_synthetic_regression_has_numeric_target() -> None:
    events = values("synthetic:regression", limit=100, label_field="target")
    assert all(isinstance(e["target"], float) for e in events)
    assert len({e["target"] for e in events}) == 100


def test_synthetic_needs_limit_and_a_known_kind() -> None:
    with pytest.raises(ValidationError, match="infinite generator; give --limit"):
        open_source("synthetic:classification")
    with pytest.raises(ValidationError, match="available: classification, regression"):
        open_source("synthetic:images", limit=1)
    with pytest.raises(ValidationError, match="'color' is a feature name"):
        open_source("synthetic:classification", limit=1, label_field="color")


# --- spec handling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["data.txt", "kafka:topic", "", "river"])
def test_unrecognised_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(ValidationError, match="unrecognised source") as info:
        open_source(spec)
    assert "river:NAME" in str(info.value) and "synthetic:regression" in str(info.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValidationError, match="limit must be zero or positive"):
        open_source("synthetic:classification", limit=-1)
    with pytest.raises(ValidationError, match="must differ"):
        open_source("synthetic:classification", limit=1, label_field="x", id_field="x")


def test_describe_sources_mentions_every_form() -> None:
    text = describe_sources()
    for form in (
        ".jsonl",
        ".ndjson",
        ".csv",
        "river:",
        "synthetic:classification",
        "synthetic:regression",
        "drift:agrawal",
        "--limit",
    ):
        assert form in text


# --- concept drift ---------------------------------------------------------------------------------------

DRIFT = "drift:agrawal?position=3000&width=100&before=0&after=4"


def agrawal_function_0(event: dict[str, JsonScalar]) -> int:
    """Agrawal's classification function 0, written out: class 1 for applicants under 40 or 60 and over."""
    age = event["age"]
    assert isinstance(age, int)
    return int(age < 40 or age >= 60)


def disagreement(events: list[dict[str, JsonScalar]]) -> float:
    return sum(agrawal_function_0(e) != e["label"] for e in events) / len(events)


def test_drift_events_look_like_agrawal_loans() -> None:
    events = values(DRIFT, limit=50)
    assert len(events) == 50
    assert events[0]["event_id"] == "agrawal-drift-0" and events[49]["event_id"] == "agrawal-drift-49"
    assert set(events[0]) == {
        "event_id",
        *("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"),
        "label",
    }
    assert {e["label"] for e in events} == {0, 1}
    json.dumps(events)


def test_drift_is_deterministic_per_seed() -> None:
    assert values(DRIFT, limit=200, seed=3) == values(DRIFT, limit=200, seed=3)
    assert values(DRIFT, limit=200, seed=3) != values(DRIFT, limit=200, seed=4)
    assert values(DRIFT + "&seed=3", limit=200) == values(DRIFT, limit=200, seed=3)  # spec wins


def test_drift_labels_switch_concept_after_the_position() -> None:
    events = values(DRIFT, limit=6000)
    before, after = events[:2500], events[3500:]
    assert disagreement(before) == 0.0  # pure function 0 until the transition starts
    assert disagreement(after) > 0.3  # function 4 labels many applicants differently
    # The transition is centred on the position: about half of the events there are from the new concept.
    assert 0.05 < disagreement(events[2950:3050]) < disagreement(after)


def test_drift_position_moves_the_switch() -> None:
    events = values("drift:agrawal?position=500&width=50", limit=2000)
    assert disagreement(events[:400]) == 0.0
    assert disagreement(events[700:]) > 0.3


def test_drift_width_that_would_overflow_river_is_rejected_with_a_minimum() -> None:
    with pytest.raises(ValidationError, match=r"width=100 is too narrow for position=20000") as info:
        open_source("drift:agrawal?position=20000&width=100", limit=10)
    assert "use width>=113" in str(info.value)
    # The suggested minimum really works, from the very first event (where River's exponent is largest).
    assert len(values("drift:agrawal?position=20000&width=113", limit=5)) == 5


def test_drift_defaults_match_the_documented_ones() -> None:
    spec = "drift:agrawal?position=20000&width=1000&before=0&after=4&seed=42"
    assert values("drift:agrawal", limit=100, seed=42) == values(spec, limit=100)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("drift:sea", "unknown drift stream; available: agrawal"),
        ("drift:agrawal?speed=2", r"unknown parameter\(s\) speed; accepted: position, width"),
        ("drift:agrawal?width=0", "width must be at least 1, got 0"),
        ("drift:agrawal?position=-5", "position must be at least 0"),
        ("drift:agrawal?position=1.5", "position must be a whole number"),
        ("drift:agrawal?width=true", "width must be a whole number"),
        ("drift:agrawal?after=10", r"after=10 is not an Agrawal classification function \(0-9\)"),
        ("drift:agrawal?before=4&after=4", "nothing would drift"),
    ],
)
def test_drift_bad_parameters(spec: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        open_source(spec, limit=1)


def test_drift_needs_limit_and_a_free_label_name() -> None:
    with pytest.raises(ValidationError, match="infinite generator; give --limit"):
        open_source("drift:agrawal")
    with pytest.raises(ValidationError, match="'age' is a feature name"):
        open_source("drift:agrawal", limit=1, label_field="age")
