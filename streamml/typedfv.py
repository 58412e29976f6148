"""A reader and a writer made for the shape of every pipeline's typed FeatureVector (the contract
`streamml.contracts.features_contract` generates, Confluent-framed with a schema registry).

fastavro interprets the parsed schema for every datum and resolves a union per feature: ~10 µs to read and
~14 µs to write an agrawal vector (14 nullable doubles), more than the generic map costs with
`streamml.fvreader` / `streamml.fvwriter`. The layout of a typed vector is fixed by its schema: when every
feature is a present double, the features are one `struct` call of (branch byte, double) pairs.

`for_schema(schema)` builds the pair for a schema (JSON form) whose parsing canonical form has exactly that
shape — any pipeline, any features, any label union — and None for anything else (fastavro reads and
writes it, as before). Like fvreader and fvwriter, the reader raises on anything it does not expect and the
writer returns None for any value it does not take, so fastavro decides (and words the error); for every
record they take the bytes and the records are fastavro's (property-tested in tests/unit/test_typedfv.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from fastavro.schema import to_parsing_canonical_form

from streamml import fvwriter
from streamml.fvreader import Malformed, _long, _string, key_union, source_union, vector
from streamml.fvwriter import Unfit

_DOUBLE = struct.Struct("<d")
_META = [
    ("event_id", "string"),
    ("key", ["null", "string"]),
    ("pipeline", "string"),
    ("pipeline_revision", "long"),
]
_OFFSET_FIELDS = [
    {"name": "topic", "type": "string"},
    {"name": "partition", "type": "int"},
    {"name": "start_offset", "type": "long"},
    {"name": "end_offset", "type": "long"},
]
_LABEL_KINDS = ("boolean", "long", "double", "string")
_BRANCH = (b"\x02", b"\x04", b"\x06", b"\x08")  # zig-zagged union indexes 1..4


class TypedVectors:
    """Reads and writes one typed FeatureVector schema (see the module doc)."""

    def __init__(self, names: list[str], kinds: list[str], label: list[str], renamed: Mapping[str, str]):
        self.avro_names = tuple(names)
        self.names = tuple(renamed.get(n, n) for n in names)  # the definition's names, as records hold them
        self.kinds = tuple(kinds)  # "double" | "string" per feature, in schema order
        self.all_doubles = all(k == "double" for k in kinds)
        n = len(names)
        self._pairs = struct.Struct("<" + "Bd" * n)  # every feature present and a double
        self._present = (2,) * n
        self.label = tuple(label)  # the label union's branches after "null"
        self._label_branch = {kind: _BRANCH[i] for i, kind in enumerate(label)}

    # -- reading -------------------------------------------------------------------------------------
    def read(self, data: bytes, pos: int) -> dict[str, Any]:
        """The record whose Avro body starts at `pos`, in the shape `Registry.decode_features` returns
        (features by definition name, nulls left out); raises on anything unexpected."""
        event_id, pos = _string(data, pos)
        key, pos = key_union(data, pos)
        pipeline, pos = _string(data, pos)
        revision, pos = _long(data, pos)
        features: dict[str, Any] | None = None
        if self.all_doubles and pos + self._pairs.size <= len(data):
            values = self._pairs.unpack_from(data, pos)
            if values[0::2] == self._present:
                features = dict(zip(self.names, values[1::2], strict=True))
                pos += self._pairs.size
        if features is None:
            features, pos = self._features(data, pos)
        label: Any = None
        branch = data[pos]
        pos += 1
        if branch:
            if branch & 1 or branch > 2 * len(self.label):
                raise Malformed("label: union branch out of range")
            kind = self.label[(branch >> 1) - 1]
            if kind == "boolean":
                label = data[pos] != 0  # as fastavro reads a boolean byte
                pos += 1
            elif kind == "long":
                label, pos = _long(data, pos)
            elif kind == "double":
                if pos + 8 > len(data):
                    raise Malformed("truncated double")
                label = _DOUBLE.unpack_from(data, pos)[0]
                pos += 8
            else:
                label, pos = _string(data, pos)
        event_time, pos = _long(data, pos)
        feature_time, pos = _long(data, pos)
        source, pos = source_union(data, pos)
        if pos != len(data):
            raise Malformed("bytes after the record")
        return vector(event_id, key, pipeline, revision, features, label, event_time, feature_time, source)

    def _features(self, data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        """Field by field: some null, or some strings."""
        features: dict[str, Any] = {}
        for name, kind in zip(self.names, self.kinds, strict=True):
            branch = data[pos]
            if branch == 0:
                pos += 1
            elif branch != 2:
                raise Malformed(f"feature {name!r}: union branch out of range")
            elif kind == "double":
                if pos + 9 > len(data):
                    raise Malformed("truncated double")
                features[name] = _DOUBLE.unpack_from(data, pos + 1)[0]
                pos += 9
            else:
                features[name], pos = _string(data, pos + 1)
        return features, pos

    # -- writing -------------------------------------------------------------------------------------
    def write(self, r: Mapping[str, Any]) -> bytes | None:
        """The Avro body of a FeatureVector record (features by definition name; absent or None: null), or
        None if fastavro must write (or refuse) it."""
        try:
            features = r["features"]
            if type(features) is not dict:
                raise Unfit("not a dict")
            get = features.get
            values = [get(n) for n in self.names]
            if self.all_doubles and all(type(x) is float for x in values):
                args: list[Any] = [2] * (2 * len(values))
                args[1::2] = values
                body = self._pairs.pack(*args)
            else:
                body = b"".join(self._feature(kind, x) for kind, x in zip(self.kinds, values, strict=True))
            return b"".join(
                (
                    fvwriter._string(r["event_id"]),
                    fvwriter._key(r["key"]),
                    fvwriter._name(r["pipeline"]),
                    fvwriter._long(r["pipeline_revision"]),
                    body,
                    self._label(r["label"]),
                    fvwriter._long(r["event_time"]),
                    fvwriter._long(r["feature_time"]),
                    fvwriter._source(r["source"]),
                )
            )
        except (Unfit, KeyError, TypeError, UnicodeEncodeError):
            return None

    @staticmethod
    def _feature(kind: str, x: Any) -> bytes:
        if x is None:
            return b"\x00"
        if kind == "double":
            if type(x) is not float:
                raise Unfit("not a float")
            return b"\x02" + _DOUBLE.pack(x)
        return b"\x02" + fvwriter._string(x)

    def _label(self, value: Any) -> bytes:
        """The label union's branch by the value's type, as fastavro picks it."""
        if value is None:
            return b"\x00"
        t = type(value)
        kind = "boolean" if t is bool else "long" if t is int else "double" if t is float else "string"
        if t not in (bool, int, float, str) or kind not in self._label_branch:
            raise Unfit("label")
        branch = self._label_branch[kind]
        if kind == "boolean":
            return branch + (b"\x01" if value else b"\x00")
        if kind == "long":
            return branch + fvwriter._long(value)
        if kind == "double":
            return branch + _DOUBLE.pack(value)
        return branch + fvwriter._string(value)


def for_schema(schema: Any, renamed: Mapping[str, str] | None = None) -> TypedVectors | None:
    """A TypedVectors for `schema` (JSON form) if it has the typed FeatureVector's shape, else None.
    `renamed`: Avro name → definition name of the features whose names differ."""
    try:
        canonical = json.loads(to_parsing_canonical_form(schema))
    except Exception:  # not a schema fastavro can put in canonical form: not ours
        return None
    if not isinstance(canonical, dict) or canonical.get("type") != "record":
        return None
    fields = canonical.get("fields") or []
    if [f.get("name") for f in fields] != [
        *(n for n, _ in _META),
        "features",
        "label",
        "event_time",
        "feature_time",
        "source",
    ]:
        return None
    by_name = {f["name"]: f["type"] for f in fields}
    if any(by_name[n] != t for n, t in _META) or by_name["event_time"] != "long":
        return None
    if by_name["feature_time"] != "long":
        return None
    source = by_name["source"]
    if not (
        isinstance(source, list)
        and len(source) == 2
        and source[0] == "null"
        and isinstance(source[1], dict)
        and source[1].get("type") == "record"
        and source[1].get("fields") == _OFFSET_FIELDS
    ):
        return None
    label = by_name["label"]
    if not (
        isinstance(label, list)
        and label[:1] == ["null"]
        and all(k in _LABEL_KINDS for k in label[1:])
        and len(set(label)) == len(label)
    ):
        return None
    record = by_name["features"]
    if not (isinstance(record, dict) and record.get("type") == "record"):
        return None
    names, kinds = [], []
    for f in record.get("fields") or []:
        if f.get("type") not in (["null", "double"], ["null", "string"]):
            return None
        names.append(f["name"])
        kinds.append(f["type"][1])
    return TypedVectors(names, kinds, label[1:], renamed or {})
