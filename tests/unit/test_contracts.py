"""Typed per-pipeline contracts (streamml.contracts) and the registry's pure parts (framing, reasons)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from streamml.codec import codec_for, decode_raw, use_registry
from streamml.contracts import ORIGINAL_NAME, avro_name, contracts_of, export, feature_names
from streamml.errors import DecodeError
from streamml.pipelines import load_file, to_definition
from streamml.registry import FramedEncoder, Registry, frame, is_framed, subject
from streamml.registry import _with_field_names as with_field_names
from streamml.settings import Settings
from streams.features import FeatureEngine

REPO = Path(__file__).resolve().parents[2]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


def definition(name: str = "agrawal") -> dict[str, Any]:
    return to_definition(load_file(REPO / "pipelines" / f"{name}.yaml"), f"p.{name}.raw").to_avro()


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_pipeline_gets_valid_deterministic_contracts(path: Path) -> None:
    d = to_definition(load_file(path), "p.raw").to_avro()
    one, two = contracts_of(d), contracts_of(d)
    assert one.raw.text() == two.raw.text() and one.features.text() == two.features.text()
    ns = f"dev.streamml.pipelines.{d['name']}"
    assert one.raw.fullname == f"{ns}.RawEvent" and one.features.fullname == f"{ns}.FeatureVector"
    for contract in (one.raw, one.features):  # documented everywhere, parseable by another library
        fastavro.parse_schema(json.loads(contract.text()))
        assert all(f.get("doc") for f in contract.schema["fields"])


def test_a_feature_vector_of_the_engine_round_trips_through_the_typed_schema() -> None:
    d = definition()
    contract = contracts_of(d).features
    engine = FeatureEngine(d)
    raw = {
        "fields": {
            "event_id": "e1", "salary": 50_000.0, "commission": 0.0, "age": 40, "elevel": 2, "car": 3,
            "zipcode": 7, "hvalue": 90_000.0, "hyears": 10, "loan": 10_000.0, "label": 1,
        },
        "event_time": None,
    }  # fmt: skip
    fv = engine.transform(raw, timestamp_ms=5, now_ms=6, source={"topic": "t", "partition": 0,
                          "start_offset": 3, "end_offset": 4})  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, contract.parsed, fv)  # features the vector lacks are null
    back = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), contract.parsed, None)
    assert {k: v for k, v in back["features"].items() if v is not None} == fv["features"]
    assert back["label"] == 1 and back["event_time"] == 5 and back["source"]["start_offset"] == 3
    assert list(back["features"]) == list(contracts_of(d).feature_names)


def test_names_that_are_not_avro_names_are_changed_and_kept_as_a_property() -> None:
    d = definition("phishing")
    d["fields"] = [
        {"name": "2nd-field", "type": "FLOAT", "required": True, "default": None},
        {"name": "2nd_field", "type": "STRING", "required": False, "default": None},
        {"name": "ok", "type": "INT", "required": False, "default": 3},
    ]
    d["feature_steps"] = []
    c = contracts_of(d)
    fields = {f["name"]: f for f in c.features.schema["fields"][4]["type"]["fields"]}
    assert list(fields) == ["_2nd_field", "_2nd_field_2", "ok"]
    assert fields["_2nd_field"][ORIGINAL_NAME] == "2nd-field" and ORIGINAL_NAME not in fields["ok"]
    assert fields["_2nd_field_2"]["type"] == ["null", "string"]
    raw = {f["name"]: f for f in c.raw.schema["fields"]}
    assert raw["_2nd_field"]["type"] == "double"  # required: no null, no default
    assert raw["ok"]["type"] == ["long", "null"] and raw["ok"]["default"] == 3
    assert c.raw.renamed == {"_2nd_field": "2nd-field", "_2nd_field_2": "2nd_field"}
    assert avro_name("a b") == "a_b" and avro_name("") == "_" and avro_name("x1") == "x1"


def test_dropped_inputs_are_not_model_inputs_and_steps_are_documented() -> None:
    d = definition("trump")
    d["feature_steps"] = [
        *d["feature_steps"],
        {"op": "drop", "output": None, "inputs": ["ipsos"], "params": {}},
    ]
    names = feature_names(d)
    assert "ipsos" not in names and "gallup_minus_ipsos" in names
    docs = {f["name"]: f["doc"] for f in contracts_of(d).features.schema["fields"][4]["type"]["fields"]}
    assert docs["gallup_minus_ipsos"] == "Gallup minus ipsos (step difference)."
    rolling = {
        f["name"]: f["doc"] for f in contracts_of(definition()).features.schema["fields"][4]["type"]["fields"]
    }
    assert "over the last 100 events of the same zipcode" in rolling["zipcode_mean_salary_100"]


def test_a_revision_is_a_new_schema_version_and_export_writes_avsc_files(tmp_path: Path) -> None:
    d = definition()
    nxt = {**d, "revision": d["revision"] + 1}
    assert contracts_of(d).features.text() != contracts_of(nxt).features.text()
    paths = export(d, tmp_path)
    assert [p.name for p in paths] == ["agrawal-raw.avsc", "agrawal-features.avsc"]
    assert json.loads(paths[1].read_text()) == contracts_of(d).features.schema


def test_confluent_framing_and_raw_events_without_a_registry() -> None:
    framed = frame(7, b"\x02")
    assert framed == b"\x00\x00\x00\x00\x07\x02" and is_framed(framed) and subject("t") == "t-value"
    assert not is_framed(b"\x00\x00\x00\x00\x07") and not is_framed(b'{"a": 1}')
    with pytest.raises(DecodeError, match="no schema registry is configured"):
        decode_raw(framed)


def test_the_registrys_field_paths_get_the_field_names() -> None:
    schema = contracts_of(definition()).raw.schema
    reason = "reader type: STRING not compatible with writer type: DOUBLE at /fields/1/type"
    assert with_field_names(reason, schema).endswith("at /fields/1/type (field salary)")
    assert with_field_names("at /fields/99/type", schema) == "at /fields/99/type"  # unknown: as it was


def test_typed_vectors_round_trip_to_the_generic_shape_with_the_definitions_names() -> None:
    d = definition("phishing")
    d["fields"] = [*d["fields"], {"name": "odd name", "type": "STRING", "required": False, "default": None}]
    contract = contracts_of(d).features
    registry = Registry(Settings(schema_registry_url="http://127.0.0.1:1", _env_file=None))  # type: ignore[call-arg]
    registry.remember(5, contract.schema, contract.parsed)  # as `register` leaves it (no registry call)
    fv = {
        "event_id": "e1", "key": None, "pipeline": d["name"], "pipeline_revision": 1,
        "features": {"https": 1.0, "odd name": "x"}, "label": True, "event_time": 5, "feature_time": 6,
        "source": None,
    }  # fmt: skip
    data = FramedEncoder(contract, 5).encode(fv)
    assert data[:5] == b"\x00\x00\x00\x00\x05"
    assert registry.decode_features(data) == fv  # absent features stay absent, names as defined
    use_registry(registry)
    try:
        assert codec_for("FeatureVector").decode(data) == fv  # wherever services decode vectors
    finally:
        use_registry(None)
    raw = contracts_of(d).raw
    registry.remember(6, raw.schema, raw.parsed)  # a framed record of another schema is refused, not misread
    event = {
        f["name"]: (1.0 if f["type"] == "double" else 1 if f["type"] == "long" else None)
        for f in raw.schema["fields"]
    }
    with pytest.raises(DecodeError, match="not a StreamML feature vector"):
        registry.decode_features(FramedEncoder(raw, 6).encode({**event, "event_id": 7}))
