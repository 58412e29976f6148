"""Raw JSON is read by orjson where it reads exactly as the standard library does, by `json.loads` elsewhere:
for any text, `decode_raw` answers as it did with the standard library alone (same record or same error)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamml import limits
from streamml.codec import check_fields, decode_raw
from streamml.errors import DecodeError


def reference(data: bytes) -> Any:
    """decode_raw's answer for JSON text, written with the standard library only."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return "error"
    if not isinstance(obj, dict):
        return "error"
    try:
        check_fields(obj)
    except DecodeError:
        return "error"
    return {"fields": obj, "event_time": None}


def answer(data: bytes) -> Any:
    try:
        return decode_raw(data)
    except DecodeError:
        return "error"


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN never reaching here and -0.0 told apart from 0.0 (both parsers keep the sign)."""
    if a == "error" or b == "error":
        return a == b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and all(
        type(x) is type(y) for x, y in zip(a["fields"].values(), b["fields"].values(), strict=True)
    )


NUMBERS = [
    "0", "-0", "-0.0", "1e308", "1e309", "-1e309", "1.7976931348623157e308", "5e-324", "0.1", "1E2",
    str(2**63 - 1), str(2**63), str(-(2**63)), str(-(2**63) - 1), str(2**64 - 1), str(2**64), str(-(2**64)),
    "1" * 25, "-" + "1" * 25, "9" * 5000, "9223372036854775808.0", "-9223372036854775809.5",
    "NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1", "0x10",
]  # fmt: skip
TEXTS = [
    '"\\ud800"', '"\\udc00\\ud800"', '"\\ud83d\\ude00"', '"é"', '"\\u0000"', '"' + "x" * 5000 + '"', "true",
    "null", "[]", "{}", '{"a": 1}',
]  # fmt: skip


@pytest.mark.parametrize("token", NUMBERS + TEXTS)
def test_every_token_reads_as_the_standard_library_reads_it(token: str) -> None:
    data = ('{"event_id": "e", "x": ' + token + "}").encode()
    assert same(answer(data), reference(data)), token


@pytest.mark.parametrize(
    "data",
    [
        b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte-order mark: the standard library skips it
        '{"a": 1}'.encode("utf-16"),  # UTF-16 with a BOM: the standard library detects it
        '{"a": 1}'.encode("utf-32-le"),
        b'{"a": 1, "a": 2}',  # duplicate names: the last wins in both
        b'{"a": 1} ',
        b' {"a": 1}',
        b'{"a": 1}\x00',
        b"\xff\xfe\x00",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' + b"[" * 2_000 + b"]" * 2_000 + b"}",
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8 (invalid UTF-8)
    ],
)
def test_odd_texts_read_as_the_standard_library_reads_them(data: bytes) -> None:
    assert same(answer(data), reference(data))


def test_an_integer_beyond_int64_is_refused_not_rounded() -> None:
    with pytest.raises(DecodeError, match="64-bit"):
        decode_raw(b'{"x": 18446744073709551616}')
    with pytest.raises(DecodeError, match="64-bit"):
        decode_raw(b'{"x": -9223372036854775809}')
    assert decode_raw(b'{"x": 9223372036854775807}')["fields"]["x"] == limits.MAX_INT
    big = decode_raw(b'{"x": 1e300}')["fields"]["x"]
    assert type(big) is float and big == 1e300  # a double literal stays a double


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), st.text(max_size=8),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.one_of(scalars, st.lists(scalars, max_size=2)), max_size=6))
def test_any_object_reads_as_the_standard_library_reads_it(obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()  # (infinities are written as Infinity: the standard library's text)
    assert same(answer(data), reference(data))
    if all(not isinstance(v, float) or math.isfinite(v) for v in obj.values()) and answer(data) != "error":
        assert answer(data)["fields"] == obj
