"""FeatureEngine without a broker: coercion, validation, feature steps, per-key windows, event time."""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamml.codec import codec_for
from streamml.errors import ValidationError
from streamml.pipelines import load_file, to_definition
from streamml.records import FeatureVector
from streams.features import FeatureEngine, KeyedWindows

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "pipelines").glob("*.yaml"))
KAFKA_TS = 1_700_000_000_000
NOW = 1_700_000_000_500

SHOP = """
name: shop
event_id_field: id
key_field: customer
event_time_field: ts
fields:
  amount: float
  qty: int
  member: bool
  country: string
  discount: {type: float, required: false, default: 0.5}
  note: {type: string, required: false}
label: {source: inline, field: label}
task: binary
models:
  - {estimator: linear_model.LogisticRegression}
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def engine_from(tmp_path: Path, text: str, revision: int = 1) -> FeatureEngine:
    definition = to_definition(load_file(write(tmp_path, text)), raw_topic="raw-test", revision=revision)
    return FeatureEngine(definition.to_avro())


def one_field(kind: str, extra: str = "") -> str:
    """A pipeline reading a single field `v` of the given type (plus optional YAML lines)."""
    return f"""
name: single
fields:
  v: {kind}
task: binary
models:
  - {{estimator: linear_model.LogisticRegression}}
{extra}
"""


def with_steps(steps: str, *, key: bool = True) -> str:
    """A pipeline of numeric fields a, b (required), c (optional) with the given feature steps."""
    return f"""
name: steps
{"key_field: user" if key else ""}
fields:
  a: float
  b: float
  c: {{type: float, required: false}}
  tag: {{type: string, required: false}}
task: regression
features:
{textwrap.indent(textwrap.dedent(steps).strip(), "  ")}
models:
  - {{estimator: linear_model.LinearRegression}}
"""


def run(engine: FeatureEngine, fields: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("timestamp_ms", KAFKA_TS)
    kwargs.setdefault("now_ms", NOW)
    return engine.transform({"fields": fields, "event_time": None}, **kwargs)


def shop_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "e-1",
        "customer": "c-9",
        "amount": "12.5",
        "qty": 3,
        "member": "true",
        "country": "NL",
        "label": True,
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not None}


# --- type coercion -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("float", 3, 3.0),
        ("float", 2.25, 2.25),
        ("float", "2.5", 2.5),
        ("float", " -7 ", -7.0),
        ("float", "1e3", 1000.0),
        ("int", 4, 4.0),
        ("int", "12", 12.0),
        ("int", 3.0, 3.0),
        ("bool", True, 1.0),
        ("bool", False, 0.0),
        ("bool", "true", 1.0),
        ("bool", " TRUE ", 1.0),
        ("bool", "false", 0.0),
        ("bool", "yes", 1.0),
        ("bool", "n", 0.0),
        ("bool", 1, 1.0),
        ("bool", 0, 0.0),
        ("bool", 1.0, 1.0),
        ("string", "x", "x"),
        ("string", 42, "42"),
        ("string", 1.5, "1.5"),
        ("string", True, "True"),
    ],
)
def test_each_field_type_is_coerced(tmp_path: Path, kind: str, raw: Any, expected: float | str) -> None:
    engine = engine_from(tmp_path, one_field(kind))
    features = run(engine, {"event_id": "e", "v": raw})["features"]
    assert features == {"v": expected}
    assert type(features["v"]) is type(expected)


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        ("float", "abc"),
        ("float", ""),
        ("float", "nan"),
        ("float", "inf"),
        ("float", float("nan")),
        ("int", 1.5),
        ("int", "2.5"),
        ("int", "four"),
        ("bool", 2),
        ("bool", "maybe"),
        ("bool", 0.5),
    ],
)
def test_wrong_type_is_a_validation_error_naming_the_field(tmp_path: Path, kind: str, raw: Any) -> None:
    engine = engine_from(tmp_path, one_field(kind))
    with pytest.raises(ValidationError, match=r"field 'v': expected"):
        run(engine, {"event_id": "e", "v": raw})


def test_missing_required_field_is_rejected(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    with pytest.raises(ValidationError, match=r"missing required field 'qty'"):
        run(engine, shop_event(qty=None))


def test_null_counts_as_missing(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    event = shop_event()
    event["amount"] = None
    with pytest.raises(ValidationError, match=r"missing required field 'amount'"):
        run(engine, event)


def test_optional_field_default_and_absence(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    out = run(engine, shop_event())
    assert out["features"] == {
        "amount": 12.5,
        "qty": 3.0,
        "member": 1.0,
        "country": "NL",
        "discount": 0.5,  # the declared default
    }  # `note` is optional without a default: absent, not None
    given = run(engine, shop_event(discount="0.25", note=7))["features"]
    assert given["discount"] == 0.25
    assert given["note"] == "7"


def test_fields_not_declared_are_ignored(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    out = run(engine, shop_event(extra="ignored", other=1))
    assert "extra" not in out["features"] and "other" not in out["features"]


@pytest.mark.parametrize("bad_id", [None, "", True, 1.5])
def test_missing_or_invalid_event_id_is_rejected(tmp_path: Path, bad_id: Any) -> None:
    engine = engine_from(tmp_path, SHOP)
    event = shop_event()
    event["id"] = bad_id
    with pytest.raises(ValidationError, match=r"missing or invalid event id field 'id'"):
        run(engine, event)


def test_integer_event_id_and_key_become_strings(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    out = run(engine, shop_event(id=42, customer=7))
    assert out["event_id"] == "42"
    assert out["key"] == "7"


def test_missing_key_gives_null_key(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    assert run(engine, shop_event(customer=None))["key"] is None


# --- feature steps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ("{op: sum, output: y, inputs: [a, b]}", 10.0 + 4.0),
        ("{op: sum, output: y, inputs: [a, b, a]}", 24.0),
        ("{op: product, output: y, inputs: [a, b]}", 40.0),
        ("{op: difference, output: y, inputs: [a, b]}", 6.0),
        ("{op: difference, output: y, inputs: [b, a]}", -6.0),
        ("{op: ratio, output: y, inputs: [a, b]}", 2.5),
        ("{op: log1p, output: y, inputs: [a]}", math.log1p(10.0)),
    ],
)
def test_arithmetic_steps(tmp_path: Path, step: str, expected: float) -> None:
    engine = engine_from(tmp_path, with_steps(f"- {step}"))
    features = run(engine, {"event_id": "e", "a": 10, "b": 4})["features"]
    assert features["y"] == expected
    assert features["a"] == 10.0 and features["b"] == 4.0  # inputs stay


def test_ratio_divide_by_zero_uses_on_zero(tmp_path: Path) -> None:
    default = engine_from(tmp_path, with_steps("- {op: ratio, output: y, inputs: [a, b]}"))
    assert run(default, {"event_id": "e", "a": 3, "b": 0})["features"]["y"] == 0.0
    custom = engine_from(tmp_path, with_steps("- {op: ratio, output: y, inputs: [a, b], on_zero: -1}"))
    assert run(custom, {"event_id": "e", "a": 3, "b": 0})["features"]["y"] == -1.0
    assert run(custom, {"event_id": "e", "a": 3, "b": "0.0"})["features"]["y"] == -1.0
    assert run(custom, {"event_id": "e", "a": 3, "b": 2})["features"]["y"] == 1.5


def test_log1p_of_a_negative_value_is_sign_preserving(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, with_steps("- {op: log1p, output: y, inputs: [a]}"))
    assert run(engine, {"event_id": "e", "a": -3, "b": 0})["features"]["y"] == -math.log(4.0)
    assert run(engine, {"event_id": "e", "a": 0, "b": 0})["features"]["y"] == 0.0


def test_a_missing_input_leaves_the_derived_feature_missing(tmp_path: Path) -> None:
    engine = engine_from(
        tmp_path,
        with_steps(
            """
            - {op: sum, output: s, inputs: [a, c]}
            - {op: log1p, output: l, inputs: [c]}
            - {op: rolling_mean, output: m, inputs: [c], window: 2}
            """
        ),
    )
    features = run(engine, {"event_id": "e", "a": 1, "b": 2})["features"]
    assert features == {"a": 1.0, "b": 2.0}


def test_steps_skip_string_features(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, with_steps("- {op: sum, output: s, inputs: [a, tag]}"))
    features = run(engine, {"event_id": "e", "a": 1, "b": 2, "tag": "red"})["features"]
    assert "s" not in features


def test_steps_see_the_outputs_of_earlier_steps(tmp_path: Path) -> None:
    engine = engine_from(
        tmp_path,
        with_steps(
            """
            - {op: sum, output: s, inputs: [a, b]}
            - {op: product, output: p, inputs: [s, b]}
            """
        ),
    )
    features = run(engine, {"event_id": "e", "a": 1, "b": 2})["features"]
    assert features["s"] == 3.0 and features["p"] == 6.0


def test_rolling_windows_are_per_key_and_respect_the_window_size(tmp_path: Path) -> None:
    engine = engine_from(
        tmp_path,
        with_steps(
            """
            - {op: rolling_mean, output: mean3, inputs: [a], window: 3}
            - {op: rolling_sum, output: sum3, inputs: [a], window: 3}
            - {op: rolling_count, output: count3, inputs: [a], window: 3}
            """
        ),
    )
    events = [("u1", 1), ("u2", 100), ("u1", 2), ("u1", 3), ("u1", 4), ("u2", 200), ("u1", 10)]
    got = []
    for i, (user, a) in enumerate(events):
        f = run(engine, {"event_id": f"e{i}", "user": user, "a": a, "b": 0})["features"]
        got.append((f["mean3"], f["sum3"], f["count3"]))
    assert got == [
        (1.0, 1.0, 1.0),  # u1: [1]
        (100.0, 100.0, 1.0),  # u2: [100] (own window)
        (1.5, 3.0, 2.0),  # u1: [1, 2]
        (2.0, 6.0, 3.0),  # u1: [1, 2, 3]
        (3.0, 9.0, 3.0),  # u1: [2, 3, 4] (oldest dropped)
        (150.0, 300.0, 2.0),  # u2: [100, 200]
        (17 / 3, 17.0, 3.0),  # u1: [3, 4, 10]
    ]


def test_rolling_without_a_key_field_shares_one_window(tmp_path: Path) -> None:
    engine = engine_from(
        tmp_path, with_steps("- {op: rolling_sum, output: s, inputs: [a], window: 2}", key=False)
    )
    sums = [
        run(engine, {"event_id": str(i), "a": a, "b": 0})["features"]["s"] for i, a in enumerate([1, 2, 4])
    ]
    assert sums == [1.0, 3.0, 6.0]


def test_keyed_windows_report_dirty_windows_once_and_restore() -> None:
    windows = KeyedWindows()
    windows.push("m", "k1", 1.0, 2)
    windows.push("m", "k1", 2.0, 2)
    windows.push("m", "k1", 3.0, 2)
    windows.push("m", "k2", 9.0, 2)
    assert windows.take_dirty() == {("m", "k1"): [2.0, 3.0], ("m", "k2"): [9.0]}
    assert windows.take_dirty() == {}
    restored = KeyedWindows()
    restored.restore("m", "k1", [2.0, 3.0], 2)
    assert list(restored.push("m", "k1", 4.0, 2)) == [3.0, 4.0]


def test_restored_windows_continue_in_the_engine(tmp_path: Path) -> None:
    text = with_steps("- {op: rolling_mean, output: m, inputs: [a], window: 3}")
    first = engine_from(tmp_path, text)
    for i, a in enumerate([1, 2]):
        run(first, {"event_id": str(i), "user": "u", "a": a, "b": 0})
    saved = first.windows.take_dirty()
    assert saved == {("m", "u"): [1.0, 2.0]}
    second = engine_from(tmp_path, text)
    for (output, key), values in saved.items():
        second.windows.restore(output, key, values, 3)
    assert run(second, {"event_id": "2", "user": "u", "a": 6, "b": 0})["features"]["m"] == 3.0


def test_fill_missing_fills_only_absent_features(tmp_path: Path) -> None:
    engine = engine_from(
        tmp_path,
        with_steps(
            """
            - {op: fill_missing, inputs: [c], value: -1}
            - {op: fill_missing, inputs: [tag], value: unknown}
            - {op: sum, output: s, inputs: [a, c]}
            """
        ),
    )
    filled = run(engine, {"event_id": "e", "a": 1, "b": 2})["features"]
    assert filled["c"] == -1.0 and filled["tag"] == "unknown" and filled["s"] == 0.0
    given = run(engine, {"event_id": "e", "a": 1, "b": 2, "c": 5, "tag": "red"})["features"]
    assert given["c"] == 5.0 and given["tag"] == "red" and given["s"] == 6.0


def test_fill_missing_defaults_to_zero(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, with_steps("- {op: fill_missing, inputs: [c]}"))
    assert run(engine, {"event_id": "e", "a": 1, "b": 2})["features"]["c"] == 0.0


def test_drop_removes_features(tmp_path: Path) -> None:
    engine = engine_from(
        tmp_path,
        with_steps(
            """
            - {op: ratio, output: r, inputs: [a, b]}
            - {op: drop, inputs: [a, b, c]}
            """
        ),
    )
    assert run(engine, {"event_id": "e", "a": 1, "b": 2})["features"] == {"r": 0.5}


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("{op: explode, output: y, inputs: [a]}", r"unknown feature step 'explode'"),
        ("{op: sum, output: y, inputs: [a, nope]}", r"reads unknown feature\(s\) \['nope'\]"),
        ("{op: rolling_mean, output: y, inputs: [zzz], window: 3}", r"unknown feature\(s\) \['zzz'\]"),
        ("{op: rolling_mean, output: y, inputs: [a], window: 0}", r"window must be 1\.\.100000"),
        ("{op: rolling_sum, output: y, inputs: [a], window: 100001}", r"window must be 1\.\.100000"),
        ("{op: rolling_count, output: y, inputs: [a], window: -5}", r"window must be 1\.\.100000"),
        ("{op: ratio, output: y, inputs: [a, b, a]}", r"'ratio' needs 2 input"),
        ("{op: difference, output: y, inputs: [a]}", r"'difference' needs 2 input"),
        ("{op: log1p, output: y, inputs: [a, b]}", r"'log1p' needs 1 input"),
        ("{op: sum, output: y, inputs: []}", r"'sum' needs one or more input"),
        ("{op: sum, inputs: [a, b]}", r"'sum' needs an 'output' name"),
        ("{op: drop, inputs: []}", r"'drop' needs one or more input"),
    ],
)
def test_bad_steps_are_rejected_when_the_definition_is_built(tmp_path: Path, step: str, message: str) -> None:
    spec = load_file(write(tmp_path, with_steps(f"- {step}")))
    with pytest.raises(ValidationError, match=message):
        to_definition(spec, raw_topic="raw-test")


def test_a_later_step_may_read_an_earlier_output_but_not_the_reverse(tmp_path: Path) -> None:
    spec = load_file(
        write(
            tmp_path,
            with_steps(
                """
                - {op: log1p, output: l, inputs: [s]}
                - {op: sum, output: s, inputs: [a, b]}
                """
            ),
        )
    )
    with pytest.raises(ValidationError, match=r"'log1p' reads unknown feature\(s\) \['s'\]"):
        to_definition(spec, raw_topic="raw-test")


def test_non_numeric_window_is_a_validation_error(tmp_path: Path) -> None:
    spec = load_file(write(tmp_path, with_steps("- {op: rolling_mean, output: y, inputs: [a], window: ten}")))
    with pytest.raises(ValidationError, match=r"window"):
        to_definition(spec, raw_topic="raw-test")


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [True, False, 1, 0])
def test_binary_label_is_kept_as_is(tmp_path: Path, label: Any) -> None:
    engine = engine_from(tmp_path, SHOP)
    out = run(engine, shop_event(label=label))
    assert out["label"] == label and type(out["label"]) is type(label)


@pytest.mark.parametrize(("raw", "expected"), [("yes", True), (" False ", False), (1.0, 1), ("0", False)])
def test_binary_label_text_and_integral_floats_become_one_type(
    tmp_path: Path, raw: Any, expected: Any
) -> None:
    out = run(engine_from(tmp_path, SHOP), shop_event(label=raw))
    assert out["label"] == expected and type(out["label"]) is type(expected)


@pytest.mark.parametrize("label", ["spam", "garbage", 3, -1, 0.5, "x" * 300])
def test_binary_label_outside_the_task_is_refused_before_windows_change(tmp_path: Path, label: Any) -> None:
    engine = engine_from(tmp_path, SHOP)
    with pytest.raises(ValidationError, match=r"label"):
        run(engine, shop_event(label=label))
    text = with_steps("- {op: rolling_count, output: n, inputs: [a], window: 5}").replace(
        "task: regression", "label: {source: inline, field: y}\ntask: binary"
    )
    rolling = engine_from(tmp_path, text)
    assert run(rolling, {"event_id": "1", "user": "u", "a": 1, "b": 2, "y": 1})["features"]["n"] == 1
    with pytest.raises(ValidationError, match=r"label"):
        run(rolling, {"event_id": "2", "user": "u", "a": 1, "b": 2, "y": label})
    # a refused event leaves no trace in the per-key windows
    assert run(rolling, {"event_id": "3", "user": "u", "a": 1, "b": 2, "y": 0})["features"]["n"] == 2


def test_missing_inline_label_is_null(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    assert run(engine, shop_event(label=None))["label"] is None


REGRESSION = """
name: prices
fields: {x: float}
label: {source: inline, field: price}
task: regression
models:
  - {estimator: linear_model.LinearRegression}
"""


@pytest.mark.parametrize(("raw", "expected"), [("3.5", 3.5), (2, 2.0), (7.25, 7.25), (" -1 ", -1.0)])
def test_regression_label_is_coerced_to_float(tmp_path: Path, raw: Any, expected: float) -> None:
    engine = engine_from(tmp_path, REGRESSION)
    label = run(engine, {"event_id": "e", "x": 1, "price": raw})["label"]
    assert label == expected and type(label) is float


def test_regression_label_that_is_not_a_number_is_rejected(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, REGRESSION)
    with pytest.raises(ValidationError, match=r"field 'price'"):
        run(engine, {"event_id": "e", "x": 1, "price": "cheap"})


def test_topic_labels_are_not_read_from_the_event(tmp_path: Path) -> None:
    text = REGRESSION.replace("{source: inline, field: price}", "{source: topic}")
    engine = engine_from(tmp_path, text)
    assert run(engine, {"event_id": "e", "x": 1, "price": 9})["label"] is None


# --- event time, source, output ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1_600_000_000_123, 1_600_000_000_123),
        (1_600_000_000_123.0, 1_600_000_000_123),
        ("2024-01-01T00:00:00+00:00", 1_704_067_200_000),
        ("2024-01-01T01:00:00+01:00", 1_704_067_200_000),
        ("2024-01-01T00:00:00Z", 1_704_067_200_000),
        ("2024-01-01T00:00:00.250+00:00", 1_704_067_200_250),
    ],
)
def test_event_time_from_a_field(tmp_path: Path, ts: Any, expected: int) -> None:
    engine = engine_from(tmp_path, SHOP)
    assert run(engine, shop_event(ts=ts))["event_time"] == expected


@pytest.mark.parametrize("ts", ["yesterday", "2024-13-01T00:00:00", True])
def test_bad_event_time_is_rejected(tmp_path: Path, ts: Any) -> None:
    engine = engine_from(tmp_path, SHOP)
    with pytest.raises(ValidationError, match=r"event time"):
        run(engine, shop_event(ts=ts))


def test_event_time_falls_back_to_raw_event_time_then_kafka_timestamp(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    assert run(engine, shop_event())["event_time"] == KAFKA_TS  # time field absent
    avro_raw = {"fields": shop_event(), "event_time": 1_650_000_000_000}
    assert engine.transform(avro_raw, timestamp_ms=KAFKA_TS, now_ms=NOW)["event_time"] == 1_650_000_000_000
    no_time_field = engine_from(tmp_path, one_field("float"))
    assert run(no_time_field, {"event_id": "e", "v": 1, "ts": 5})["event_time"] == KAFKA_TS


def test_iso_event_time_is_exact_to_the_millisecond(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    assert run(engine, shop_event(ts="2004-03-15T07:55:47.472+00:00"))["event_time"] == 1_079_337_347_472


@pytest.fixture
def tokyo_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("tokyo_local_time")
def test_iso_event_time_without_offset_does_not_depend_on_the_host_time_zone(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    assert run(engine, shop_event(ts="2024-01-01T00:00:00"))["event_time"] == 1_704_067_200_000


def test_record_metadata_and_source_pass_through(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP, revision=4)
    source = {"topic": "raw-shop", "partition": 2, "start_offset": 41, "end_offset": 42}
    out = run(engine, shop_event(), source=source, now_ms=NOW + 7)
    assert out["source"] == source
    assert out["pipeline"] == "shop" and out["pipeline_revision"] == 4
    assert out["feature_time"] == NOW + 7
    assert out["event_id"] == "e-1" and out["key"] == "c-9"
    assert run(engine, shop_event())["source"] is None


def test_output_is_a_valid_feature_vector_that_round_trips_through_avro(tmp_path: Path) -> None:
    engine = engine_from(tmp_path, SHOP)
    source = {"topic": "raw-shop", "partition": 0, "start_offset": 5, "end_offset": 6}
    out = run(engine, shop_event(ts="2024-01-01T00:00:00Z", note="hi"), source=source)
    assert FeatureVector.model_validate(out).to_avro() == out
    codec = codec_for("FeatureVector")
    assert codec.decode(codec.encode(out)) == out


def plausible_event(definition: dict[str, Any]) -> dict[str, Any]:
    """One valid raw event for any pipeline definition: a value of the right type for every field."""
    sample = {"FLOAT": 1.5, "INT": 3, "BOOL": True, "STRING": "x"}
    event: dict[str, Any] = {f["name"]: sample[f["type"]] for f in definition["fields"]}
    event[definition["event_id_field"]] = "evt-1"
    if definition["label"]["source"] == "INLINE":
        event[definition["label"]["field"]] = 1.5 if definition["task"] == "REGRESSION" else True
    return event


def test_there_are_example_pipelines() -> None:
    assert {p.stem for p in EXAMPLES} >= {"agrawal", "phishing", "trump"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_pipeline_transforms_a_plausible_event(path: Path) -> None:
    definition = to_definition(load_file(path), raw_topic=f"raw-{path.stem}").to_avro()
    engine = FeatureEngine(definition)
    out = run(engine, plausible_event(definition))
    assert out["pipeline"] == path.stem and out["event_id"] == "evt-1"
    assert {f["name"] for f in definition["fields"]} <= set(out["features"])
    assert {s["output"] for s in definition["feature_steps"] if s["output"]} <= set(out["features"])
    assert out["label"] is not None
    FeatureVector.model_validate(out)
    assert codec_for("FeatureVector").decode(codec_for("FeatureVector").encode(out)) == out


def test_agrawal_example_features_are_exact() -> None:
    engine = FeatureEngine(to_definition(load_file(REPO / "pipelines/agrawal.yaml"), raw_topic="r").to_avro())
    base = {"commission": 0, "age": 40, "elevel": 1, "car": 2, "hvalue": 99, "hyears": 10, "label": 1}
    first = run(engine, {**base, "event_id": "1", "zipcode": 5, "salary": 50_000, "loan": 100_000})
    second = run(engine, {**base, "event_id": "2", "zipcode": 5, "salary": 70_000, "loan": 0})
    other = run(engine, {**base, "event_id": "3", "zipcode": 6, "salary": 10_000, "loan": 0})
    assert first["key"] == "5"
    assert first["features"]["loan_per_salary"] == 2.0
    assert first["features"]["income"] == 50_000.0
    assert first["features"]["log_hvalue"] == math.log1p(99.0)
    assert second["features"]["zipcode_mean_salary_100"] == 60_000.0
    assert second["features"]["zipcode_count_100"] == 2.0
    assert other["features"]["zipcode_mean_salary_100"] == 10_000.0
    assert other["features"]["zipcode_count_100"] == 1.0


def test_trump_example_uses_the_optional_default_and_a_float_label() -> None:
    engine = FeatureEngine(to_definition(load_file(REPO / "pipelines/trump.yaml"), raw_topic="r").to_avro())
    event = {"event_id": "d1", "ordinal_date": 736389, "gallup": 43.5, "ipsos": 46.0}
    event |= {"morning_consult": 48.0, "rasmussen": 44.0, "label": "43.75"}
    out = run(engine, event)
    assert out["features"]["you_gov"] == 0.0
    assert out["features"]["gallup_minus_ipsos"] == -2.5
    assert out["label"] == 43.75


def _agrawal_vector() -> tuple[FeatureEngine, dict[str, Any]]:
    engine = FeatureEngine(to_definition(load_file(REPO / "pipelines" / "agrawal.yaml"), "p.raw").to_avro())
    fields = {
        "event_id": "e1", "salary": 50_000.0, "commission": 0.0, "age": 40, "elevel": 2, "car": 3,
        "zipcode": 7, "hvalue": 90_000.0, "hyears": 10, "loan": 10_000.0, "label": 1,
    }  # fmt: skip
    return engine, engine.transform({"fields": fields, "event_time": None}, timestamp_ms=KAFKA_TS, now_ms=NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"salary": math.nan}, "not a finite number"),
        ({"salary": math.inf}, "not a finite number"),
        ({"salary": -1e101}, "not a finite number"),
        ({"salary": 5}, "must be float, got int"),
        ({"salary": True}, "must be float, got bool"),
        ({"salary": "5"}, "must be float, got str"),
        ({"nope": 1.0}, "unknown feature 'nope'"),
    ],
)
def test_a_vector_read_from_a_topic_is_checked_value_by_value(change: dict[str, Any], reason: str) -> None:
    engine, fv = _agrawal_vector()
    engine.check_vector(fv)
    with pytest.raises(ValidationError, match=reason):
        engine.check_vector({**fv, "features": {**fv["features"], **change}})


def test_a_label_found_valid_once_is_remembered_by_type_and_value_only() -> None:
    engine, fv = _agrawal_vector()  # a BINARY task: labels are bools or 0/1
    for label in (True, 1, 0, False, True, 1):
        engine.check_vector({**fv, "label": label})
    for label in (2, 1.5, "yes", "x" * 10):  # 1 and True were valid; 2 (an int too) and text are not
        with pytest.raises(ValidationError, match="label"):
            engine.check_vector({**fv, "label": label})


@pytest.mark.parametrize("op", ["sum", "product", "difference", "ratio"])
def test_two_input_steps_compute_what_the_general_step_computes(op: str) -> None:
    """The two-input fast path against the general definition: fsum/prod over the inputs, a missing or
    non-numeric input leaves the output missing, a result beyond ±MAX_MAGNITUDE (or NaN) is refused."""
    from streams.features import MAX_MAGNITUDE, _build_step

    values: list[object] = [0.0, -0.0, 1.5, -2.25, 0.1, 0.2, 1e100, -1e100, 1e-300, 7.0, "text", None]
    step = _build_step(op, "out", ["a", "b"], {"on_zero": 9.0})
    for a in values:
        for b in values:
            record = {k: v for k, v in (("a", a), ("b", b)) if v is not None}
            if not isinstance(a, float) or not isinstance(b, float):
                want: object = "missing"
            else:
                value = {
                    "sum": lambda x, y: math.fsum([x, y]),
                    "product": lambda x, y: math.prod([x, y]),
                    "difference": lambda x, y: x - y,
                    "ratio": lambda x, y: x / y if y != 0 else 9.0,
                }[op](a, b)
                want = value if math.isfinite(value) and abs(value) <= MAX_MAGNITUDE else "refused"
            try:
                step(record, None, None)  # type: ignore[arg-type]
                got = record.get("out", "missing")
            except ValidationError:
                got = "refused"
            assert got == want, (op, a, b, got, want)


@pytest.mark.parametrize("kind", ["float", "int", "bool", "string"])
def test_transform_coerces_each_value_as_coerce_value_does(tmp_path: Path, kind: str) -> None:
    """The engine takes plain floats and ints inline and leaves the rest to coerce_value: same value, same
    refusals, for values at and beyond every edge."""
    from streams.features import MAX_MAGNITUDE, coerce_value

    engine = engine_from(tmp_path, one_field(kind))
    edge = MAX_MAGNITUDE
    values: list[Any] = [0, -0.0, 1, 2.5, -3, 1.0, True, False, "7", " 2.5 ", "yes", "x"]
    values += [edge, -edge, edge * 10, -edge * 10, 10**101, float("nan"), float("inf"), 2**63, 2.0**60]
    for value in values:
        try:
            want: Any = coerce_value("v", kind.upper(), value)
        except ValidationError:
            want = "refused"
        try:
            got: Any = run(engine, {"event_id": "e1", "v": value})["features"]["v"]
        except ValidationError:
            got = "refused"
        assert got == want and type(got) is type(want), (kind, value, got, want)
