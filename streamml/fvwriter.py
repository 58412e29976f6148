"""Writers made for the two records written once per event: the generic FeatureVector (features service) and
the Prediction (predictor). The counterpart of streamml.fvreader.

fastavro's writer interprets the parsed schema for every datum and searches each union for a branch that
fits (~20 µs for an agrawal vector, ~12 µs for a prediction). These know the layout. They take only values
of the exact Python types the contract's fields are written from (str, float, int that is not a bool,
bool, None, dict of str) and return None for anything else, so that fastavro decides: it writes the record
or refuses it with its reason. For every record they take, the bytes are fastavro's (property-tested).
Each is used only while its contract is the one it was written for (`matches`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from fastavro.schema import to_parsing_canonical_form

from streamml.fvreader import CANONICAL as FEATURE_VECTOR

PREDICTION = (
    '{"name":"dev.streamml.Prediction","type":"record","fields":['
    '{"name":"event_id","type":"string"},'
    '{"name":"key","type":["null","string"]},'
    '{"name":"pipeline","type":"string"},'
    '{"name":"model_name","type":"string"},'
    '{"name":"model_version","type":"long"},'
    '{"name":"prediction","type":["null","boolean","long","double","string"]},'
    '{"name":"score","type":["null","double"]},'
    '{"name":"probabilities","type":{"type":"map","values":"double"}},'
    '{"name":"shadow","type":"boolean"},'
    '{"name":"event_time","type":"long"},'
    '{"name":"feature_time","type":"long"},'
    '{"name":"prediction_time","type":"long"},'
    '{"name":"source","type":["null",{"name":"dev.streamml.OffsetRange","type":"record","fields":['
    '{"name":"topic","type":"string"},'
    '{"name":"partition","type":"int"},'
    '{"name":"start_offset","type":"long"},'
    '{"name":"end_offset","type":"long"}]}]}]}'
)

_DOUBLE = struct.Struct("<d").pack
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_SMALL = {n: bytes([(n << 1) ^ (n >> 63)]) for n in range(-64, 64)}  # one-byte varints


class Unfit(ValueError):
    """A value this writer does not take (fastavro then writes or refuses the record)."""


# Varints written recently: a batch's prediction time, a features batch's feature time and the event times
# of one millisecond repeat from record to record. Bounded: emptied when full.
_VARINTS: dict[int, bytes] = dict(_SMALL)
_VARINTS_MAX = 8192


def _long(n: Any) -> bytes:
    if type(n) is not int:  # first: True and 1.0 would find 1's bytes
        raise Unfit("not an int")
    got = _VARINTS.get(n)
    if got is not None:
        return got
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise Unfit("out of the long range")
    if len(_VARINTS) >= _VARINTS_MAX:
        _VARINTS.clear()
        _VARINTS.update(_SMALL)
    got = _VARINTS[n] = _varint(((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF)
    return got


def _varint(z: int) -> bytes:
    """The base-128 bytes of a zig-zagged long `z` >= 128, unrolled up to 6 bytes (a millisecond time)."""
    if z < 0x4000:
        return bytes((z & 0x7F | 0x80, z >> 7))
    if z < 0x200000:
        return bytes((z & 0x7F | 0x80, z >> 7 & 0x7F | 0x80, z >> 14))
    if z < 0x10000000:
        return bytes((z & 0x7F | 0x80, z >> 7 & 0x7F | 0x80, z >> 14 & 0x7F | 0x80, z >> 21))
    if z < 0x800000000:
        return bytes(
            (z & 0x7F | 0x80, z >> 7 & 0x7F | 0x80, z >> 14 & 0x7F | 0x80, z >> 21 & 0x7F | 0x80, z >> 28)
        )
    if z < 0x40000000000:
        return bytes(
            (z & 0x7F | 0x80, z >> 7 & 0x7F | 0x80, z >> 14 & 0x7F | 0x80, z >> 21 & 0x7F | 0x80,
             z >> 28 & 0x7F | 0x80, z >> 35)
        )  # fmt: skip
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _int(n: Any) -> bytes:
    if type(n) is not int or not _INT_MIN <= n <= _INT_MAX:
        raise Unfit("not an int")
    return _long(n)


# Strings written recently that repeat from record to record (pipeline, model and topic names, keys). An
# event id is unique: it is written without the cache.
_STRINGS: dict[str, bytes] = {}
_STRINGS_MAX = 4096


def _string(s: Any) -> bytes:
    if type(s) is not str:
        raise Unfit("not a str")
    b = s.encode()  # a lone surrogate raises UnicodeEncodeError: fastavro then decides
    return _long(len(b)) + b


def _name(s: Any) -> bytes:
    """A string that repeats (see _STRINGS)."""
    if type(s) is not str:  # first: a str subclass must not find a str's bytes
        raise Unfit("not a str")
    got = _STRINGS.get(s)
    if got is None:
        if len(_STRINGS) >= _STRINGS_MAX:
            _STRINGS.clear()
        got = _STRINGS[s] = _string(s)
    return got


def _double(x: Any) -> bytes:
    if type(x) is not float:
        raise Unfit("not a float")
    return _DOUBLE(x)


def _source(src: Any) -> bytes:
    if src is None:
        return b"\x00"
    if type(src) is not dict:
        raise Unfit("not a dict")
    return (
        b"\x02"
        + _name(src["topic"])
        + _int(src["partition"])
        + _long(src["start_offset"])
        + _long(src["end_offset"])
    )


def _scalar_union(value: Any) -> bytes:
    """["null", "boolean", "long", "double", "string"] as fastavro picks the branch: by the value's type."""
    if value is None:
        return b"\x00"
    t = type(value)
    if t is bool:
        return b"\x02\x01" if value else b"\x02\x00"
    if t is int:
        return b"\x04" + _long(value)
    if t is float:
        return b"\x06" + _DOUBLE(value)
    if t is str:
        return b"\x08" + _string(value)
    raise Unfit("not a scalar")


class _Keys:
    """Map keys as written, each followed by a fixed branch byte, and for a set of keys seen before all its
    entries packed in one struct call (keys, then 8-byte doubles)."""

    def __init__(self, branch: bytes) -> None:
        self.branch = branch
        self.prefix: dict[str, bytes] = {}
        self.layouts: dict[tuple[str, ...], tuple[Callable[..., bytes], list[bytes]]] = {}

    def key(self, name: Any) -> bytes:
        got = self.prefix.get(name)
        if got is None:
            if len(self.prefix) >= 4096:
                self.prefix.clear()
            got = self.prefix[name] = _string(name) + self.branch
        return got

    def doubles(self, values: dict[Any, Any]) -> bytes:
        """A map of doubles (count, entries, end), or Unfit."""
        if not values:
            return b"\x00"
        names = tuple(values)
        layout = self.layouts.get(names)
        if layout is None:
            if len(self.layouts) >= 64:
                self.layouts.clear()
            prefixes = [self.key(n) for n in names]
            codec = struct.Struct("<" + "".join(f"{len(p)}sd" for p in prefixes))
            layout = self.layouts[names] = (codec.pack, prefixes)
        pack, prefixes = layout
        xs = tuple(values.values())
        for x in xs:
            if type(x) is not float:
                raise Unfit("not a float")
        args: list[Any] = [None] * (2 * len(xs))
        args[0::2] = prefixes
        args[1::2] = xs
        return _long(len(xs)) + pack(*args) + b"\x00"


_FEATURE_KEYS = _Keys(b"\x00")  # features: map<["double", "string"]>, the double branch
_PROBABILITY_KEYS = _Keys(b"")  # probabilities: map<double>


def _features(values: Any) -> bytes:
    if type(values) is not dict:
        raise Unfit("not a dict")
    try:
        return _FEATURE_KEYS.doubles(values)
    except Unfit:  # some values are strings: entry by entry
        pass
    if not values:
        return b"\x00"
    parts = [_long(len(values))]
    for name, value in values.items():
        t = type(value)
        if t is float:
            parts.append(_FEATURE_KEYS.key(name))
            parts.append(_DOUBLE(value))
        elif t is str:
            parts.append(_string(name) + b"\x02" + _string(value))
        else:
            raise Unfit("not a float or str")
    parts.append(b"\x00")
    return b"".join(parts)


def _key(key: Any) -> bytes:
    return b"\x00" if key is None else b"\x02" + _name(key)


def feature_vector(r: dict[str, Any]) -> bytes | None:
    """The Avro body of a FeatureVector, or None if fastavro must write (or refuse) it."""
    try:
        return b"".join(
            (
                _string(r["event_id"]),
                _key(r["key"]),
                _name(r["pipeline"]),
                _long(r["pipeline_revision"]),
                _features(r["features"]),
                _scalar_union(r["label"]),
                _long(r["event_time"]),
                _long(r["feature_time"]),
                _source(r["source"]),
            )
        )
    except (Unfit, KeyError, TypeError, UnicodeEncodeError):
        return None


def prediction(r: dict[str, Any]) -> bytes | None:
    """The Avro body of a Prediction, or None if fastavro must write (or refuse) it."""
    try:
        score = r["score"]
        shadow = r["shadow"]
        if type(shadow) is not bool or type(r["probabilities"]) is not dict:
            raise Unfit("shadow or probabilities")
        return b"".join(
            (
                _string(r["event_id"]),
                _key(r["key"]),
                _name(r["pipeline"]),
                _name(r["model_name"]),
                _long(r["model_version"]),
                _scalar_union(r["prediction"]),
                b"\x00" if score is None else b"\x02" + _double(score),
                _PROBABILITY_KEYS.doubles(r["probabilities"]),
                b"\x01" if shadow else b"\x00",
                _long(r["event_time"]),
                _long(r["feature_time"]),
                _long(r["prediction_time"]),
                _source(r["source"]),
            )
        )
    except (Unfit, KeyError, TypeError, UnicodeEncodeError):
        return None


WRITERS: dict[str, tuple[str, Callable[[dict[str, Any]], bytes | None]]] = {
    "FeatureVector": (FEATURE_VECTOR, feature_vector),
    "Prediction": (PREDICTION, prediction),
}


def writer_for(name: str, schema: Any) -> Callable[[dict[str, Any]], bytes | None] | None:
    """The writer of contract `name` if `schema` (JSON form) is the one it was written for."""
    known = WRITERS.get(name)
    if known is None:
        return None
    try:
        canonical = to_parsing_canonical_form(schema)
    except Exception:  # not a schema fastavro can put in canonical form: not ours
        return None
    return known[1] if canonical == known[0] else None
