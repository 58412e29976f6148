"""Codec behaviour at the edges: wrong type, corruption, raw JSON validation, cross-language header, records
written with earlier schema versions."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import fastavro
import pytest

from streamml.codec import HEADER_LEN, MAGIC, codec_for, decode_any, decode_raw
from streamml.errors import DecodeError, SchemaError
from streamml.records import RECORD_TYPES
from streamml.schemas import AvroSchema, get_schema, schema_by_fingerprint, schema_history

PREDICTION = {
    "event_id": "e-1", "key": "k", "pipeline": "p", "model_name": "m", "model_version": 7,
    "prediction": True, "score": 0.8, "probabilities": {"True": 0.8, "False": 0.2}, "shadow": False,
    "event_time": 1_700_000_000_000, "feature_time": 1_700_000_000_001, "prediction_time": 1_700_000_000_002,
    "source": None,
}  # fmt: skip


def test_header_is_avro_single_object_encoding_with_crc64_fingerprint() -> None:
    data = codec_for("Prediction").encode(PREDICTION)
    schema = get_schema("Prediction")
    assert data[:2] == b"\xc3\x01"
    assert data[2:HEADER_LEN] == schema.fingerprint
    # a plain Avro reader given only the .avsc file decodes the body (what a consumer in any language does)
    plain = fastavro.parse_schema(json.loads(schema.path.read_text()), named_schemas={})
    body = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), plain, None)
    assert body["event_id"] == "e-1" and body["model_version"] == 7


def test_known_fingerprint_of_null_schema_matches_avro_spec() -> None:
    # The Avro spec's test vector: CRC-64-AVRO("null") = 7195948357588979594, written little-endian.
    from fastavro.schema import fingerprint

    assert bytes.fromhex(fingerprint('"null"', "CRC-64-AVRO")) == (7195948357588979594).to_bytes(8, "little")


def test_decode_any_names_the_record_type() -> None:
    assert decode_any(codec_for("Prediction").encode(PREDICTION)) == ("Prediction", PREDICTION)


def test_decoding_the_wrong_type_is_a_clear_error() -> None:
    data = codec_for("Prediction").encode(PREDICTION)
    with pytest.raises(DecodeError, match="expected a Label record, got Prediction"):
        codec_for("Label").decode(data)


def test_truncated_record_is_a_decode_error() -> None:
    data = codec_for("Prediction").encode(PREDICTION)
    with pytest.raises(DecodeError, match="corrupt Prediction"):
        codec_for("Prediction").decode(data[:-10])


def test_record_that_does_not_fit_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="Prediction"):
        codec_for("Prediction").encode({**PREDICTION, "model_version": "seven"})


def test_raw_json_object_is_accepted() -> None:
    assert decode_raw(b'{"id": "a", "x": 1.5, "ok": true, "n": null}') == {
        "fields": {"id": "a", "x": 1.5, "ok": True, "n": None},
        "event_time": None,
    }


def test_raw_avro_event_is_accepted() -> None:
    event = {"fields": {"id": "a", "x": 2}, "event_time": 5}
    assert decode_raw(codec_for("RawEvent").encode(event)) == event


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'{"a": {"b": 1}}', "field 'a' is an object"),
        (b'{"a": [1]}', "field 'a' is an array"),
        (b'{"a": NaN}', "not a finite number"),
        (b"\xff\xfe\x00", "neither Avro"),
        (None, "null value"),
    ],
)
def test_malformed_raw_events_get_a_reason(payload: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_raw(payload)


# Records written with an earlier version of their schema (schemas/history/): resolved to the current shape.

PIPELINE = {
    "name": "fraud", "revision": 3, "description": "", "raw_topic": "raw.fraud", "event_id_field": "id",
    "key_field": "customer", "event_time_field": None,
    "fields": [{"name": "amount", "type": "FLOAT", "required": True, "default": None}],
    "label": {"source": "INLINE", "field": "is_fraud", "ttl_seconds": 60.0}, "task": "BINARY",
    "feature_steps": [],
    "models": [
        {"name": "m", "kind": "ONLINE", "params": {},
         "estimator_spec": "river.linear_model.LogisticRegression"},
    ],
    "promotion_mode": "AUTO", "snapshot_every_events": 1000, "snapshot_every_seconds": 60.0, "deleted": False,
    "updated_at": 1_700_000_000_000,
}  # fmt: skip
ALERT = {
    "alert_id": "a-1", "pipeline": "p", "model_name": "m", "model_version": 3, "kind": "CONCEPT",
    "detector": "river.drift.ADWIN", "feature": None, "statistic": None, "threshold": None,
    "window": [{"topic": "t", "partition": 0, "start_offset": 5, "end_offset": 9}], "severity": "WARNING",
    "message": "", "detected_at": 1_700_000_000_000,
}  # fmt: skip


def _earlier(name: str, lacking: Callable[[str], bool]) -> list[AvroSchema]:
    """The earlier versions of `name` in the history whose schema text satisfies `lacking`."""
    found = [s for s in schema_history().values() if s.name == name and lacking(s.path.read_text())]
    assert found, f"no earlier {name} in schemas/history/"
    return found


def _encode_with(schema: AvroSchema, record: dict[str, object]) -> bytes:
    """What a service built before the schema change wrote."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema.parsed, record)
    return MAGIC + schema.fingerprint + body.getvalue()


def _no_raw_keyed(text: str) -> bool:
    return '"raw_keyed"' not in text


def test_pipeline_written_before_raw_keyed_decodes_with_raw_keyed_false() -> None:
    for schema in _earlier("PipelineDefinition", _no_raw_keyed):
        record = {k: v for k, v in PIPELINE.items() if k in {f["name"] for f in schema.raw["fields"]}}
        decoded = codec_for("PipelineDefinition").decode(_encode_with(schema, record))
        assert decoded["raw_keyed"] is False
        assert {k: decoded[k] for k in record} == record
        # the current shape, nested defaults included (the oldest version lacks `monitoring` and `policy`)
        assert decoded["policy"]["retrain_on_drift"] is True
        assert decoded["monitoring"]["data_window"] == 1000
        assert RECORD_TYPES["PipelineDefinition"].model_validate(decoded).to_avro() == decoded
        assert decode_any(_encode_with(schema, record)) == ("PipelineDefinition", decoded)


def test_alert_written_before_the_control_kind_decodes() -> None:
    (schema,) = _earlier("DriftAlert", lambda text: '"CONTROL"' not in text)
    assert codec_for("DriftAlert").decode(_encode_with(schema, ALERT)) == {**ALERT, "event_time": None}


def test_alert_written_before_its_event_time_decodes_without_one() -> None:
    """The controller then passes no event_time_from: the trainer learns the whole slice, as before."""
    for schema in _earlier("DriftAlert", lambda text: '"event_time"' not in text):
        assert codec_for("DriftAlert").decode(_encode_with(schema, ALERT)) == {**ALERT, "event_time": None}


def test_unknown_fingerprint_is_still_refused() -> None:
    data = codec_for("PipelineDefinition").encode({**PIPELINE, "raw_keyed": True})
    forged = MAGIC + b"\x01" * 8 + data[HEADER_LEN:]
    with pytest.raises(DecodeError, match="expected a PipelineDefinition record, got unknown schema 0101"):
        codec_for("PipelineDefinition").decode(forged)
    with pytest.raises(DecodeError, match="unknown schema fingerprint 0101010101010101"):
        decode_any(forged)


def test_earlier_version_of_another_type_is_still_the_wrong_type() -> None:
    (schema,) = _earlier("DriftAlert", lambda text: '"CONTROL"' not in text)
    with pytest.raises(DecodeError, match="expected a Label record, got DriftAlert"):
        codec_for("Label").decode(_encode_with(schema, ALERT))
    assert schema_by_fingerprint()[schema.fingerprint].name == "DriftAlert"


def test_truncated_record_of_an_earlier_version_is_a_decode_error() -> None:
    schema = _earlier("PipelineDefinition", _no_raw_keyed)[0]
    record = {k: v for k, v in PIPELINE.items() if k in {f["name"] for f in schema.raw["fields"]}}
    with pytest.raises(DecodeError, match="corrupt PipelineDefinition record \\(written with earlier schema"):
        codec_for("PipelineDefinition").decode(_encode_with(schema, record)[:-10])
