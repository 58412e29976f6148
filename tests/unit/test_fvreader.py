"""The FeatureVector reader (streamml.fvreader) gives what fastavro gives: the same record for every vector
a writer of the contract produces; on a body it does not expect it raises, and the codec then gives what
fastavro gives (the record, or a DecodeError)."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamml import fvreader
from streamml.codec import HEADER_LEN, codec_for
from streamml.errors import DecodeError
from streamml.schemas import get_schema
from tests.unit.fuzz_strategies import records_of

PARSED = get_schema("FeatureVector").parsed


def _fastavro(body: bytes) -> Any:
    try:
        return fastavro.schemaless_reader(io.BytesIO(body), PARSED, None)
    except Exception as exc:
        return type(exc)


def _same_values(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and -0.0 told from 0.0 (both readers must give the same bits)."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same_values(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _check(body: bytes) -> None:
    """What the codec returns for the body is what fastavro returns, or a DecodeError where fastavro fails."""
    want = _fastavro(body)
    codec = codec_for("FeatureVector")
    try:
        got = codec.decode(codec.header + body)
    except DecodeError:
        assert not isinstance(want, dict), (body, want)
        return
    assert isinstance(want, dict) and _same_values(got, want), (body, got, want)


def test_the_reader_follows_the_current_contract() -> None:
    """Changing schemas/feature_vector.avsc needs this reader changed too (else it is switched off)."""
    assert fvreader.matches(get_schema("FeatureVector").raw)
    assert not fvreader.matches(get_schema("Prediction").raw)
    assert codec_for("FeatureVector")._fast is fvreader.read and codec_for("DriftAlert")._fast is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records_of("FeatureVector"))
def test_every_vector_reads_as_fastavro_reads_it(record: dict[str, Any]) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED, record)
    body = buf.getvalue()
    if _has_huge_long(record):  # |n| >= 2**62 takes 10 bytes: left to fastavro (wraps at 64 bits)
        with pytest.raises(fvreader.Malformed):
            fvreader.read(body)
    else:
        assert _same_values(fvreader.read(body), _fastavro(body))  # read by ours, not handed to fastavro
    _check(body)


def _has_huge_long(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_huge_long(v) for v in value.values())
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**62) <= value < 2**62


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records_of("FeatureVector"), data=st.data())
def test_damaged_bodies_are_refused_or_read_as_fastavro_reads_them(
    record: dict[str, Any], data: st.DataObject
) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED, record)
    body = bytearray(buf.getvalue())
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = data.draw(st.integers(0, len(body)))
    if how == "truncate":
        body = body[:at]
    elif how == "flip" and body:
        i = min(at, len(body) - 1)
        body[i] = data.draw(st.integers(0, 255))
    else:
        body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    _check(bytes(body))


def test_maps_in_blocks_with_their_byte_size_read_like_one_block() -> None:
    """Other Avro writers may split a map into blocks, a negative count followed by the block's size."""
    record = codec_for("FeatureVector").decode(codec_for("FeatureVector").encode(_vector()))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED, record)
    body = buf.getvalue()
    # rebuild the body with the features as two blocks: [-1, size, a] [-1, size, b] [0]
    prefix, _ = _up_to_features(body)
    entries = _entries(record["features"])
    blocks = b"".join(_zigzag(-1) + _zigzag(len(e)) + e for e in entries) + _zigzag(0)
    rebuilt = prefix + blocks + _after_map(body)
    assert _fastavro(rebuilt) == record
    assert fvreader.read(rebuilt) == record


def test_the_codec_decodes_through_the_reader_and_still_words_refusals() -> None:
    codec = codec_for("FeatureVector")
    data = codec.encode(_vector())
    assert codec.decode(data) == _fastavro(data[HEADER_LEN:])
    with pytest.raises(DecodeError, match="corrupt FeatureVector record"):
        codec.decode(data[: HEADER_LEN + 3])


def _vector() -> dict[str, Any]:
    return {
        "event_id": "e1",
        "key": "z9",
        "pipeline": "agrawal",
        "pipeline_revision": 3,
        "features": {"salary": 1.5e5, "car": "red", "zipcode_mean_salary_100": -0.0},
        "label": True,
        "event_time": 1_700_000_000_000,
        "feature_time": -5,
        "source": {
            "topic": "p.agrawal.raw",
            "partition": 2,
            "start_offset": 1 << 40,
            "end_offset": (1 << 40) + 1,
        },
    }


def _zigzag(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        if z < 0x80:
            out.append(z)
            return bytes(out)
        out.append((z & 0x7F) | 0x80)
        z >>= 7


def _entries(features: dict[str, Any]) -> list[bytes]:
    out = []
    for name, value in features.items():
        key = _zigzag(len(name.encode())) + name.encode()
        if isinstance(value, float):
            out.append(key + _zigzag(0) + struct.pack("<d", value))
        else:
            out.append(key + _zigzag(1) + _zigzag(len(value.encode())) + value.encode())
    return out


def _up_to_features(body: bytes) -> tuple[bytes, int]:
    """The body's bytes before the features map (event_id, key, pipeline, revision), and where it starts."""
    pos = 0
    _, pos = fvreader._string(body, pos)
    pos = pos + 1 if body[pos] == 0 else fvreader._string(body, pos + 1)[1]
    _, pos = fvreader._string(body, pos)
    _, pos = fvreader._long(body, pos)
    return body[:pos], pos


def _after_map(body: bytes) -> bytes:
    """The body's bytes after the features map (written by fastavro as one block)."""
    _, pos = _up_to_features(body)
    count, pos = fvreader._long(body, pos)
    for _ in range(count):
        _, pos = fvreader._string(body, pos)
        pos = pos + 9 if body[pos] == 0 else fvreader._string(body, pos + 1)[1]
    end, pos = fvreader._long(body, pos)
    assert end == 0
    return body[pos:]


def test_a_layout_learnt_from_one_vector_reads_the_next_and_never_another() -> None:
    """The second vector with the same keys is read through the learnt layout (one struct call); a vector
    with as many keys but another one, or a value of another branch, is read entry by entry."""
    fvreader._LAYOUTS.clear()

    def body(features: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, PARSED, {**_vector(), "features": features})
        return buf.getvalue()

    first = body({"x": 1.0, "y": 2.0})
    assert fvreader.read(first)["features"] == {"x": 1.0, "y": 2.0}
    (layout,) = fvreader._LAYOUTS[2]
    assert layout.names == ("x", "y")
    for features in (
        {"x": -0.0, "y": math.inf},
        {"x": 1.0, "z": 2.0},
        {"x": 1.0, "y": "two"},
        {"y": 1.0, "x": 2.0},
    ):
        data = body(features)
        assert _same_values(fvreader.read(data), _fastavro(data))
    nan = fvreader.read(body({"x": math.nan, "y": 0.0}))["features"]
    assert math.isnan(nan["x"]) and list(nan) == ["x", "y"]
    assert [lay.names for lay in fvreader._LAYOUTS[2]] == [("y", "x"), ("x", "z"), ("x", "y")]


def test_longs_are_read_as_fastavro_reads_them_at_every_width() -> None:
    """The unrolled widths (up to 6 bytes) and the loop after them, both signs, each boundary; a varint of
    10 bytes is left to fastavro."""
    edges = [s * ((1 << k) + d) for k in range(62) for d in (-1, 0, 1) for s in (1, -1)]
    for v in edges:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, {"type": "long"}, v)  # type: ignore[arg-type]
        body = out.getvalue()
        assert fvreader._long(body + b"\x05", 0) == (v, len(body)), v
    with pytest.raises(fvreader.Malformed):
        fvreader._long(b"\xff" * 9 + b"\x01", 0)
    with pytest.raises(IndexError):
        fvreader._long(b"\xff" * 7, 0)  # truncated
