"""Codec behaviour at the edges: wrong type, corruption, raw JSON validation, cross-language header."""

from __future__ import annotations

import io
import json

import fastavro
import pytest

from streamml.codec import HEADER_LEN, codec_for, decode_any, decode_raw
from streamml.errors import DecodeError, SchemaError
from streamml.schemas import get_schema

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
