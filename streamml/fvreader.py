"""A reader made for one schema: the Avro body of the generic FeatureVector, the record every vector reader
(predictor, learner, monitor) decodes once per event.

fastavro's compiled reader interprets the parsed schema for every datum: for the generic vector (a
`map<union<double, string>>` of the features and four unions) that is ~20 µs per agrawal vector, three
times what River needs to learn it. This reader knows the layout, so it reads the same bytes with a few
slices and one `struct` call per value. It gives exactly what fastavro gives for every body fastavro
reads (property-tested against it); on anything it does not expect — a malformed body, a union branch out
of range, a string that is not UTF-8 — it raises, and the caller lets fastavro decide (and word the error).

It is used only while the contract is the one it was written for: `matches` compares the schema's parsing
canonical form with the one below, and a test fails when `schemas/feature_vector.avsc` changes without it.
"""

from __future__ import annotations

import struct
from typing import Any

from fastavro.schema import to_parsing_canonical_form

# The parsing canonical form of schemas/feature_vector.avsc this reader follows.
CANONICAL = (
    '{"name":"dev.streamml.FeatureVector","type":"record","fields":['
    '{"name":"event_id","type":"string"},'
    '{"name":"key","type":["null","string"]},'
    '{"name":"pipeline","type":"string"},'
    '{"name":"pipeline_revision","type":"long"},'
    '{"name":"features","type":{"type":"map","values":["double","string"]}},'
    '{"name":"label","type":["null","boolean","long","double","string"]},'
    '{"name":"event_time","type":"long"},'
    '{"name":"feature_time","type":"long"},'
    '{"name":"source","type":["null",{"name":"dev.streamml.OffsetRange","type":"record","fields":['
    '{"name":"topic","type":"string"},'
    '{"name":"partition","type":"int"},'
    '{"name":"start_offset","type":"long"},'
    '{"name":"end_offset","type":"long"}]}]}]}'
)

_DOUBLE = struct.Struct("<d").unpack_from


def matches(schema: Any) -> bool:
    """Whether `schema` (JSON form) is the contract this reader was written for."""
    try:
        return bool(to_parsing_canonical_form(schema) == CANONICAL)
    except Exception:  # not a schema fastavro can put in canonical form: not ours
        return False


class Malformed(ValueError):
    """The body is not what this reader expects (fastavro then reads it, or says why it cannot)."""


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint (Avro int and long) of up to 9 bytes (|value| < 2**62) at `pos`: (value, position
    after it). Unrolled up to 6 bytes (a millisecond time), then a loop."""
    b = data[pos]  # IndexError past the end
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    n = b & 0x7F
    b = data[pos + 1]
    if b < 0x80:
        n |= b << 7
        return (n >> 1) ^ -(n & 1), pos + 2
    n |= (b & 0x7F) << 7
    b = data[pos + 2]
    if b < 0x80:
        n |= b << 14
        return (n >> 1) ^ -(n & 1), pos + 3
    n |= (b & 0x7F) << 14
    b = data[pos + 3]
    if b < 0x80:
        n |= b << 21
        return (n >> 1) ^ -(n & 1), pos + 4
    n |= (b & 0x7F) << 21
    b = data[pos + 4]
    if b < 0x80:
        n |= b << 28
        return (n >> 1) ^ -(n & 1), pos + 5
    n |= (b & 0x7F) << 28
    b = data[pos + 5]
    if b < 0x80:
        n |= b << 35
        return (n >> 1) ^ -(n & 1), pos + 6
    n |= (b & 0x7F) << 35
    pos += 5
    shift = 42
    while True:
        pos += 1
        b = data[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos + 1
        shift += 7
        if shift > 56:  # a 10th byte: past 63 bits fastavro wraps around at 64; let it read those
            raise Malformed("varint longer than 9 bytes")


def _string(data: bytes, pos: int) -> tuple[str, int]:
    b = data[pos]
    if b < 0x80:  # the usual short string: its length in one byte
        size, pos = (b >> 1) ^ -(b & 1), pos + 1
    else:
        size, pos = _long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise Malformed("string length out of range")
    return data[pos:end].decode(), end


class _Layout:
    """The bytes of a map of doubles whose keys were seen before: per entry the key's length, the key and
    the union branch (its `prefix`, compared as they are), then the 8 bytes of the value."""

    def __init__(self, prefixes: tuple[bytes, ...], names: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.names = names
        codec = struct.Struct("<" + "".join(f"{len(p)}sd" for p in prefixes))
        self.unpack = codec.unpack_from
        self.size = codec.size


# Layouts by entry count, the most recent first: a few per count (pipelines with as many features), a few
# counts (a reader sees a few pipelines). Vectors whose keys vary never match and are read entry by entry.
_LAYOUTS: dict[int, list[_Layout]] = {}
LAYOUTS_PER_COUNT = 4
LAYOUT_COUNTS = 64


def _learn(prefixes: list[bytes], names: list[str]) -> None:
    if len(_LAYOUTS) >= LAYOUT_COUNTS and len(prefixes) not in _LAYOUTS:
        _LAYOUTS.clear()
    kept = _LAYOUTS.setdefault(len(prefixes), [])
    kept.insert(0, _Layout(tuple(prefixes), tuple(names)))
    del kept[LAYOUTS_PER_COUNT:]


def _map_blocks(data: bytes, pos: int, count: int) -> tuple[dict[str, Any], int, int]:
    """The map's entries from a block count on, entry by entry: (entries, 0, position after the map).
    A map of one block of doubles is learnt as a layout for the next vectors."""
    features: dict[str, Any] = {}
    blocks = 0
    prefixes: list[bytes] = []
    names: list[str] = []
    while count:
        blocks += 1
        if count < 0:  # a block with its size in bytes
            count = -count
            _size, pos = _long(data, pos)
        for _ in range(count):
            start = pos
            name, pos = _string(data, pos)
            branch = data[pos]
            if branch == 0:
                if pos + 9 > len(data):
                    raise Malformed("truncated double")
                features[name] = _DOUBLE(data, pos + 1)[0]
                prefixes.append(data[start : pos + 1])
                names.append(name)
                pos += 9
            elif branch == 2:
                features[name], pos = _string(data, pos + 1)
            else:
                raise Malformed("feature: union branch out of range")
        count, pos = _long(data, pos)
    if blocks == 1 and len(prefixes) == len(features) == len(names) and prefixes:
        _learn(prefixes, names)
    return features, count, pos


def read(data: bytes, pos: int = 0) -> dict[str, Any]:
    """The FeatureVector record whose Avro body starts at `pos` of `data`; raises on anything unexpected."""
    event_id, pos = _string(data, pos)
    key, pos = key_union(data, pos)
    pipeline, pos = _string(data, pos)
    revision, pos = _long(data, pos)
    features: dict[str, Any] | None = None
    count, pos = _long(data, pos)
    if count > 0:  # one block, as fastavro and most writers write a map: try the layouts seen before
        for layout in _LAYOUTS.get(count, ()):
            if pos + layout.size <= len(data):
                values = layout.unpack(data, pos)
                if values[0::2] == layout.prefixes:
                    features = dict(zip(layout.names, values[1::2], strict=True))
                    pos += layout.size
                    count, pos = _long(data, pos)
                    break
    if features is None:
        features, count, pos = _map_blocks(data, pos, count)
    if count:  # more blocks after the one matched
        more, count, pos = _map_blocks(data, pos, count)
        features.update(more)
    label, pos = scalar_union(data, pos, "label")
    event_time, pos = _long(data, pos)
    feature_time, pos = _long(data, pos)
    source, pos = source_union(data, pos)
    return vector(event_id, key, pipeline, revision, features, label, event_time, feature_time, source)


def vector(
    event_id: str,
    key: str | None,
    pipeline: str,
    revision: int,
    features: dict[str, Any],
    label: Any,
    event_time: int,
    feature_time: int,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    """A FeatureVector record, as fastavro gives it (the generic and the typed readers' result)."""
    return {
        "event_id": event_id,
        "key": key,
        "pipeline": pipeline,
        "pipeline_revision": revision,
        "features": features,
        "label": label,
        "event_time": event_time,
        "feature_time": feature_time,
        "source": source,
    }


def scalar_union(data: bytes, pos: int, what: str) -> tuple[Any, int]:
    """A ["null", "boolean", "long", "double", "string"] union (a vector's label, a prediction)."""
    branch = data[pos]
    pos += 1
    if branch == 0:
        return None, pos
    if branch == 2:
        return data[pos] != 0, pos + 1  # fastavro reads a boolean byte as `!= 0` too
    if branch == 4:
        return _long(data, pos)
    if branch == 6:
        if pos + 8 > len(data):
            raise Malformed("truncated double")
        return _DOUBLE(data, pos)[0], pos + 8
    if branch == 8:
        return _string(data, pos)
    raise Malformed(f"{what}: union branch out of range")


def key_union(data: bytes, pos: int) -> tuple[str | None, int]:
    """A ["null", "string"] union (the entity key of vectors and predictions)."""
    branch = data[pos]
    if branch == 0:
        return None, pos + 1
    if branch == 2:
        return _string(data, pos + 1)
    raise Malformed("key: union branch out of range")


def source_union(data: bytes, pos: int) -> tuple[dict[str, Any] | None, int]:
    """A ["null", OffsetRange] union (where the raw event was read)."""
    branch = data[pos]
    pos += 1
    if branch == 0:
        return None, pos
    if branch != 2:
        raise Malformed("source: union branch out of range")
    topic, pos = _string(data, pos)
    partition, pos = _long(data, pos)
    start, pos = _long(data, pos)
    end, pos = _long(data, pos)
    return {"topic": topic, "partition": partition, "start_offset": start, "end_offset": end}, pos
