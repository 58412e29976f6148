"""Hypothesis strategies for hostile records, fed to services without a broker (fakes: fakes.py).

Used by test_fuzz_one_fate.py. Every record a service reads comes from someone else: these strategies
produce what a careless or hostile producer can send (random bytes, JSON of any shape, numbers beyond
every range, huge strings, Avro of the wrong schema or cut short) mixed with valid records of a pipeline.
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from streamml import limits
from streamml.codec import HEADER_LEN, codec_for
from streamml.schemas import get_schema
from tests.unit.fakes import KAFKA_TS

# -- hostile scalars and text -------------------------------------------------------------------------------
HUGE_INT_TEXT = "1" + "0" * 400  # > 10^309: beyond every float; json.loads makes it an int
TOO_MANY_DIGITS = "9" * 5_000  # > 4,300 digits: json.loads refuses to convert it
BIG_STRING = "x" * 900_000  # more than a raw event may be
NUMBER_TOKENS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", HUGE_INT_TEXT, "-" + HUGE_INT_TEXT)

hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            "BAD NAME!/..",
            "../../etc/passwd",
            "/tmp/x",
            "os.system",
            "builtins.eval",
            "sklearn.utils.Bunch",
            "{not json",
            "NaN",
            "1e999",
            "\x00",
            "é" * 300,
            "z" * (limits.MAX_EVENT_ID_CHARS + 1),
            "w" * (limits.MAX_STRING_CHARS + 1),
        ]
    ),
)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
any_floats = st.floats(allow_nan=True, allow_infinity=True)
int64 = st.integers(-(2**63), 2**63 - 1)


# -- values of any Avro schema ------------------------------------------------------------------------------
def avro_values(
    schema: Any, named: dict[str, Any] | None = None, text: st.SearchStrategy[str] = hostile_text
) -> st.SearchStrategy[Any]:
    """Values that fit an Avro schema (its JSON form), with hostile strings and numbers where it allows."""
    named = {} if named is None else named
    if isinstance(schema, str):
        primitive = {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.one_of(int64, st.sampled_from([0, -1, 2**63 - 1, -(2**63)])),
            "float": st.floats(width=32),
            "double": any_floats,
            "bytes": st.binary(max_size=40),
            "string": text,
        }
        if schema in primitive:
            return primitive[schema]
        return st.deferred(lambda: named[schema] if schema in named else named[schema.rsplit(".", 1)[-1]])
    if isinstance(schema, list):
        return st.one_of(*(avro_values(branch, named, text) for branch in schema))
    kind = schema["type"]
    if kind == "record":
        strategy = st.fixed_dictionaries(
            {f["name"]: avro_values(f["type"], named, text) for f in schema["fields"]}
        )
        for name in {schema["name"], f"{schema.get('namespace', 'dev.streamml')}.{schema['name']}"}:
            named[name] = strategy
        return strategy
    if kind == "enum":
        strategy = st.sampled_from(schema["symbols"])
        named[schema["name"]] = strategy
        return strategy
    if kind == "array":
        return st.lists(avro_values(schema["items"], named, text), max_size=3)
    if kind == "map":
        return st.dictionaries(text, avro_values(schema["values"], named, text), max_size=3)
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    return avro_values(kind, named, text)  # {"type": "long", "logicalType": ...}


@functools.cache
def records_of(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Records of one StreamML schema with random (often hostile) field values."""
    return avro_values(get_schema(name).raw)


@functools.cache
def encoded(name: str) -> st.SearchStrategy[bytes]:
    return records_of(name).map(codec_for(name).encode)


SCHEMAS = (
    "RawEvent",
    "FeatureVector",
    "Label",
    "Prediction",
    "PipelineDefinition",
    "ModelVersion",
    "Promotion",
    "DriftAlert",
    "DeadLetter",
    "TrainingRequest",
    "Evaluation",
)


@st.composite
def truncated(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> bytes:
    """A valid single-object encoding cut short (always keeping less than the whole body)."""
    whole = draw(data)
    return whole[: draw(st.integers(0, len(whole) - 1))]


@functools.cache
def any_avro(exclude: tuple[str, ...] = ()) -> st.SearchStrategy[bytes]:
    """Valid single-object encodings of StreamML records other than `exclude`."""
    return st.one_of(*(encoded(name) for name in SCHEMAS if name not in exclude))


def corrupt_header(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A valid encoding with random bytes in place of its fingerprint."""
    return st.tuples(data, st.binary(min_size=8, max_size=8)).map(
        lambda t: t[0][:2] + t[1] + t[0][HEADER_LEN:]
    )


# -- raw bytes of any shape ---------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), finite_floats, st.text(max_size=10))
json_shapes = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)

DEEP = [
    b"[" * 10_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"event_id": "d", "salary": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
]
WEIRD_JSON = [
    b"",
    b"null",
    b"[]",
    b"{}",
    b'"just a string"',
    b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
    b"\xff\xfe{\x00}\x00",  # UTF-16
    b'{"event_id": "a", "event_id": "b"}',
    b"{" + b'"k":1,' * 2_000 + b'"event_id": "many"}',  # more fields than a raw event may have
    b'{"' + b"n" * 300 + b'": 1, "event_id": "long-name"}',
    b'{"event_id": "' + BIG_STRING.encode() + b'"}',
    b'{"event_id": "big", "note": "' + b"v" * 300_000 + b'"}',
    b'{"event_id": ' + TOO_MANY_DIGITS.encode() + b"}",
    b'{"event_id": ' + HUGE_INT_TEXT.encode() + b"}",
    *(b'{"event_id": "t", "salary": ' + token.encode() + b"}" for token in NUMBER_TOKENS),
    b"\xc3\x01",  # the Avro magic alone
    b"\xc3\x01" + b"\x00" * 8,  # magic and an unknown fingerprint, no body
]

raw_noise = st.one_of(
    st.binary(max_size=200),
    json_shapes.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(DEEP + WEIRD_JSON),
    any_avro(exclude=("RawEvent",)),
    corrupt_header(encoded("RawEvent")),
    truncated(encoded("RawEvent")),
    encoded("RawEvent"),  # right schema, random fields: usually refused, sometimes not
)


# -- events of one pipeline ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """Bytes on a topic and the fate they must have.

    fate: "valid" (processed: a feature vector, learned, a prediction, applied), "invalid" (dead-lettered
    or skipped), "any" (either, as long as it has exactly one fate), "tombstone" (a null control record).
    """

    value: bytes | None
    fate: str
    why: str = ""


def _text_number(value: float) -> st.SearchStrategy[Any]:
    return st.sampled_from([value, str(value), f" {value} "])


@functools.cache
def valid_value(kind: str, tiny: bool = True) -> st.SearchStrategy[Any]:
    """A value a field of `kind` accepts; `tiny`: floats may be subnormal (1e-320 divides to infinity)."""
    if kind == "FLOAT":
        floats = st.floats(-1e6, 1e6)
        if not tiny:  # built, not filtered: hypothesis often draws tiny floats, a filter would give up
            floats = st.one_of(st.just(0.0), st.floats(1e-6, 1e6), st.floats(-1e6, -1e-6))
        number = st.one_of(floats, st.integers(-(10**6), 10**6))
        return st.one_of(number, number.flatmap(_text_number))
    if kind == "INT":
        number = st.integers(-(10**6), 10**6)
        return st.one_of(number, number.map(float), number.map(str))
    if kind == "BOOL":
        return st.sampled_from([True, False, 0, 1, "true", "False", "yes", "n", " 1 "])
    return st.one_of(st.text(string.ascii_letters + string.digits + " -_", max_size=15), st.integers(-99, 99))


@functools.cache
def invalid_value(kind: str) -> st.SearchStrategy[Any]:
    """A value a field of `kind` refuses (each one for a reason of its own)."""
    nested = st.sampled_from([[1], {"a": 1}, [], {}])
    if kind in ("FLOAT", "INT"):
        bad = st.sampled_from(["abc", "", "1,5", "nan", "inf", "-Infinity", "1e999", "0x10", "12 apples"])
        if kind == "INT":
            bad = st.one_of(bad, st.sampled_from([0.5, -1.25, "2.5"]))
        return st.one_of(bad, nested)
    if kind == "BOOL":
        return st.one_of(st.sampled_from([2, -1, 0.5, "maybe", "", "truee"]), nested)
    return nested


@functools.cache
def valid_label(task: str) -> st.SearchStrategy[Any]:
    if task == "BINARY":
        return st.sampled_from([None, True, False, 0, 1, 0.0, 1.0, "true", "FALSE", " yes ", "0"])
    if task == "MULTICLASS":
        return st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-5, 5),
            st.sampled_from([1.0, 2.0]),
            st.text(string.ascii_lowercase, min_size=1, max_size=8),
        )
    return st.one_of(
        st.none(), st.floats(-1e6, 1e6), st.integers(-100, 100), st.sampled_from(["1.5", " -2 "])
    )


@functools.cache
def invalid_label(task: str) -> st.SearchStrategy[Any]:
    nested = st.sampled_from([[1], {"label": 1}, [[]], {}])
    if task == "BINARY":
        return st.one_of(st.sampled_from(["garbage", "", 3, -1, 0.5, 2.0, "maybe", "l" * 300]), nested)
    if task == "MULTICLASS":
        return st.one_of(st.sampled_from(["", 0.5, -1.25, "l" * (limits.MAX_LABEL_CHARS + 1)]), nested)
    return st.one_of(st.sampled_from(["garbage", "", "nan", "inf", "1e999"]), nested)


class PipelineEvents:
    """Valid and hostile raw events of one pipeline definition (a decoded PipelineDefinition)."""

    def __init__(
        self, definition: Mapping[str, Any], *, tiny: bool = True, key: Any = None, near_caps: bool = True
    ) -> None:
        """`tiny`: valid floats may be subnormal; `key`: every event has this entity key (else one of a
        few); `near_caps`: extreme events may hold numbers just under the services' bound."""
        self.definition = definition
        self.tiny = tiny
        self.key = key
        self.extreme_numbers = st.sampled_from(_EXTREME)
        if near_caps:
            self.extreme_numbers = st.one_of(self.extreme_numbers, st.sampled_from(_NEAR_CAPS))
        self.id_field: str = definition["event_id_field"]
        self.key_field: str | None = definition["key_field"]
        self.time_field: str | None = definition["event_time_field"]
        self.fields = [(f["name"], f["type"], f["required"]) for f in definition["fields"]]
        label = definition["label"]
        self.label_field: str | None = label["field"] if label["source"] == "INLINE" else None
        self.task: str = definition["task"]
        self.declared = {name for name, _, _ in self.fields}

        # Built once: hypothesis validates every new strategy object, which costs more than drawing from it.
        self._valid_fields = _valid_fields(self)
        self._valid = self._valid_fields.flatmap(
            lambda f: st.sampled_from(
                [Event(json.dumps(f).encode(), "valid", "json"), Event(_avro_raw(f), "valid", "avro")]
            )
        )
        self._invalid = _invalid(self)
        self._extreme = _extreme(self)
        self._surrogates = _surrogates(self)

    def valid_fields(self) -> st.SearchStrategy[dict[str, Any]]:
        return self._valid_fields

    def valid(self) -> st.SearchStrategy[Event]:
        return self._valid

    def invalid(self) -> st.SearchStrategy[Event]:
        """A valid event with one thing wrong."""
        return self._invalid

    def extreme(self) -> st.SearchStrategy[Event]:
        """Well-typed but extreme numbers: processed or dead-lettered, never a crash."""
        return self._extreme

    def surrogates(self) -> st.SearchStrategy[Event]:
        """Lone UTF-16 surrogates: valid JSON escapes, valid Python text, but not encodable as UTF-8."""
        return self._surrogates

    def noise(self) -> st.SearchStrategy[Event]:
        return _noise_events

    def events(self, *, surrogates: bool = True, extreme: bool = True) -> st.SearchStrategy[Event]:
        """Valid, invalid and random events mixed (strategies that hit known bugs can be left out)."""
        parts: list[st.SearchStrategy[Event]] = [self.valid(), self.valid(), self.invalid(), self.invalid()]
        parts.append(self.noise())
        parts.append(st.just(Event(None, "invalid", "null value")))
        if extreme:
            parts.append(self.extreme())
        if surrogates:
            parts.append(self.surrogates())
        return st.one_of(*parts)


_int64_json_scalars = st.one_of(st.none(), st.booleans(), int64, finite_floats, st.text(max_size=10))


@st.composite
def _valid_fields(draw: st.DrawFn, p: PipelineEvents) -> dict[str, Any]:
    event_id = st.one_of(st.text(string.ascii_letters, min_size=1, max_size=12), st.integers(0, 10**9))
    fields: dict[str, Any] = {p.id_field: draw(event_id)}
    for name, kind, required in p.fields:
        if required or draw(st.booleans()):
            fields[name] = draw(valid_value(kind, p.tiny))
    if p.key_field and p.key is not None:
        fields[p.key_field] = p.key
    elif p.key_field and p.key_field not in p.declared:  # a few keys only, so rolling windows are shared
        fields[p.key_field] = draw(st.sampled_from(["k1", "k1", "k2", 3, None]))
    elif p.key_field:
        kind = next(k for n, k, _ in p.fields if n == p.key_field)
        fields[p.key_field] = draw(
            st.sampled_from([1, 1, 2] if kind in ("INT", "FLOAT") else ["a", "a", "b"])
        )
    if p.time_field:
        fields[p.time_field] = draw(
            st.sampled_from([None, KAFKA_TS - 5, "2024-05-01T12:00:00", "2024-05-01T12:00:00+02:00"])
        )
    if p.label_field:
        label = draw(valid_label(p.task))
        if label is not None or draw(st.booleans()):
            fields[p.label_field] = label
    if draw(st.integers(0, 4)) == 0:
        fields["unrelated_extra"] = draw(_int64_json_scalars)
    return fields


@st.composite
def _invalid(draw: st.DrawFn, p: PipelineEvents) -> Event:
    fields = draw(p.valid_fields())
    numeric = [n for n, k, _ in p.fields if k in ("FLOAT", "INT")]
    how = draw(
        st.sampled_from(
            ["missing", "wrong type", "token", "id", "label", "too many fields", "long value", "long name"]
            + (["time"] if p.time_field else [])
            + (["key"] if p.key_field and p.key_field not in p.declared else [])
        )
    )
    required = [n for n, _, r in p.fields if r]
    if how == "missing" and required:
        del fields[draw(st.sampled_from(required))]
    elif how == "wrong type" or (how == "missing" and not required):
        name, kind, _ = draw(st.sampled_from(p.fields))
        fields[name] = draw(invalid_value(kind))
        how = f"wrong type for {name}"
    elif how == "token" and numeric:
        # NaN, Infinity and integers beyond every range, as raw JSON text
        name = draw(st.sampled_from(numeric))
        token = draw(st.sampled_from([*NUMBER_TOKENS, TOO_MANY_DIGITS]))
        fields[name] = "@@TOKEN@@"
        return Event(
            json.dumps(fields).replace('"@@TOKEN@@"', token).encode(), "invalid", f"{token[:10]} {name}"
        )
    elif how == "id":
        bad_ids: list[Any] = [
            "",
            3.5,
            True,
            False,
            None,
            [1],
            {"id": 1},
            "i" * (limits.MAX_EVENT_ID_CHARS + 1),
        ]
        fields[p.id_field] = draw(st.sampled_from(bad_ids))
        if fields[p.id_field] is None and draw(st.booleans()):
            del fields[p.id_field]
    elif how == "label" and p.label_field:
        fields[p.label_field] = draw(invalid_label(p.task))
    elif how == "too many fields":
        fields.update({f"extra{i}": i for i in range(limits.MAX_RAW_FIELDS + 1)})
    elif how == "long value":
        fields["unrelated_extra"] = "v" * (limits.MAX_STRING_CHARS + 1)
    elif how == "long name":
        fields["n" * (limits.MAX_FIELD_NAME_CHARS + 1)] = 1
    elif how == "time" and p.time_field:
        fields[p.time_field] = draw(st.sampled_from(["yesterday", "2024-13-45", -1, 1e20, True, 2**62]))
    elif how == "key" and p.key_field:
        fields[p.key_field] = "k" * (limits.MAX_EVENT_ID_CHARS + 1)
    else:  # a pipeline without numeric fields or label: a required field goes missing instead
        fields = {p.id_field: fields[p.id_field]} if required else {"no id": 1}
    return Event(json.dumps(fields).encode(), "invalid", how)


# Near every limit: the float range, subnormals, the int64 range ...
_EXTREME = [1e308, -1e308, 1.7976931348623157e308, 6e307, 5e-324, -5e-324, 1e-310, -0.0, 2**63 - 1]
# ... and just under the services' ±1e100 bound on numbers (two of them sum beyond it).
_NEAR_CAPS = [9e99, -9e99, 1e100]


@st.composite
def _extreme(draw: st.DrawFn, p: PipelineEvents) -> Event:
    fields = draw(p.valid_fields())
    numeric = [n for n, k, _ in p.fields if k == "FLOAT"]
    if numeric and draw(st.booleans()):  # one number everywhere: sums and ratios of it reach the limits too
        fields.update(dict.fromkeys(numeric, draw(p.extreme_numbers)))
    elif numeric:
        for name in draw(st.lists(st.sampled_from(numeric), min_size=1, max_size=3)):
            fields[name] = draw(p.extreme_numbers)
    return Event(json.dumps(fields).encode(), "any", "extreme numbers")


@st.composite
def _surrogates(draw: st.DrawFn, p: PipelineEvents) -> Event:
    fields = draw(p.valid_fields())
    strings = [p.id_field] + [n for n, k, _ in p.fields if k == "STRING"]
    if p.key_field and p.key_field not in p.declared:
        strings.append(p.key_field)
    if p.label_field and p.task == "MULTICLASS":
        strings.append(p.label_field)
    fields[draw(st.sampled_from(strings))] = draw(st.sampled_from(["\ud800", "a\udfffb", "\udc80" * 3]))
    return Event(json.dumps(fields).encode(), "invalid", "lone surrogate")


_noise_events = raw_noise.map(lambda b: Event(b, "any", "noise"))


def _avro_raw(fields: dict[str, Any]) -> bytes:
    return codec_for("RawEvent").encode({"fields": fields, "event_time": None})


# -- mutations of valid records ----------------------------------------------------------------------------
def _paths(
    value: Any, schema: Any, named: dict[str, Any], prefix: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Every path into a record with the schema of the value at it."""
    out = [(prefix, schema)]
    if isinstance(schema, list):  # a union: the branch that fits the value
        for branch in schema:
            resolved = named.get(branch, branch) if isinstance(branch, str) else branch
            if isinstance(resolved, dict) and resolved.get("type") == "record" and isinstance(value, dict):
                return _paths(value, resolved, named, prefix)
        return out
    if isinstance(schema, str):
        schema = named.get(schema, schema)
        if isinstance(schema, str):
            return out
    kind = schema["type"]
    if kind == "record":
        for name in {schema["name"], f"dev.streamml.{schema['name']}"}:
            named[name] = schema
        out = [(prefix, schema)]
        for f in schema["fields"]:
            out += _paths(value[f["name"]], f["type"], named, (*prefix, f["name"]))
    elif kind == "array":
        for i, item in enumerate(value):
            out += _paths(item, schema["items"], named, (*prefix, i))
    elif kind == "map":
        for k, item in value.items():
            out += _paths(item, schema["values"], named, (*prefix, k))
    elif kind == "enum":
        named[schema["name"]] = schema
    return out


def _set(record: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = list(record) if isinstance(record, list) else dict(record)
    copy[path[0]] = _set(record[path[0]], path[1:], value)
    return copy


def mutated(
    name: str, good: dict[str, Any], extra: Callable[[Any], st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    """`good` (a record of schema `name`) with 1-3 values replaced by random values of the right type,
    or by what `extra` gives for the schema at that place."""
    schema = get_schema(name).raw
    named: dict[str, Any] = {}
    _paths(good, schema, named)  # learns the named types
    strategies = named_strategies(named)
    cache: dict[int, st.SearchStrategy[Any]] = {}

    def values(at: Any) -> st.SearchStrategy[Any]:
        strategy = cache.get(id(at))
        if strategy is None:
            strategy = avro_values(at, dict(strategies))
            if extra is not None:
                strategy = st.one_of(strategy, extra(at))
            cache[id(at)] = strategy
        return strategy

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, Any]:
        record = good
        for _ in range(draw(st.integers(1, 3))):
            path, at = draw(st.sampled_from(_paths(record, schema, dict(named))[1:]))
            record = _set(record, path, draw(values(at)))
        return record

    return mutate()


def named_strategies(named: dict[str, Any]) -> dict[str, st.SearchStrategy[Any]]:
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for name, schema in named.items():
        strategies[name] = avro_values(schema, strategies)
    return strategies
