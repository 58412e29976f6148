"""Bytes on topics <-> records: Avro single-object encoding for internal topics, JSON or Avro for raw topics.

Single-object encoding (Avro spec): 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO fingerprint of the
writer schema, then the Avro binary body. Any Avro library can decode it with the `.avsc` file. A record
written with an earlier version of its schema (`schemas/history/`) is resolved to the current shape.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import orjson
from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from streamml import fvreader, fvwriter, limits, predreader, unions
from streamml.errors import DecodeError, SchemaError
from streamml.schemas import AvroSchema, get_schema, schema_by_fingerprint, schema_history

MAGIC = b"\xc3\x01"
# orjson reads an integer literal beyond the int64 range as a double; the standard library as the integer
# it is (which `check_fields` refuses). A double this large (|x| >= 2**63) sends the text to the standard
# library.
_ORJSON_EXACT = 2.0**63
HEADER_LEN = len(MAGIC) + 8
Record = dict[str, Any]


def is_avro(data: bytes) -> bool:
    return data[:2] == MAGIC and len(data) >= HEADER_LEN


class AvroCodec:
    """Encodes and decodes one record type; build once per type and reuse (it holds the parsed schema)."""

    def __init__(self, schema: AvroSchema | str) -> None:
        self.schema = get_schema(schema) if isinstance(schema, str) else schema
        self.header = MAGIC + self.schema.fingerprint
        self._parsed = self.schema.parsed
        self._hint = unions.hinter(self._parsed)  # union branches named up front (see streamml.unions)
        # Earlier versions of this record type, by fingerprint: records already on the topics (a compacted
        # topic keeps them for ever) or written by an instance not yet upgraded.
        self._earlier = {fp: s.parsed for fp, s in schema_history().items() if s.name == self.schema.name}
        # The generic FeatureVector and the Prediction have readers of their own (streamml.fvreader,
        # streamml.predreader), while they are the contracts those were written for.
        self.canonical = _canonical(self.schema.raw)
        self._fast = FAST_READERS.get(self.canonical or "")
        self._write = fvwriter.writer_for(self.schema.name, self.schema.raw)  # (FeatureVector, Prediction)

    def encode(self, record: Record) -> bytes:
        if self._write is not None:
            body = self._write(record)
            if body is not None:
                return self.header + body
        buf = io.BytesIO()
        buf.write(self.header)
        try:
            schemaless_writer(buf, self._parsed, record if self._hint is None else self._hint(record))
        except Exception as exc:  # fastavro raises ValueError/TypeError/KeyError on records that don't fit
            raise SchemaError(f"record does not fit schema {self.schema.name}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes) -> Record:
        if data[:2] != MAGIC:
            if data[:1] == b"\x00" and _registry is not None:  # Confluent-framed (a registry is in use)
                if self.schema.name == "FeatureVector":
                    return _registry.decode_features(data)  # a pipeline's typed contract
                # this contract, registered under its topic
                return _registry.decode_as(data, self._parsed, (self.canonical, self._fast))
            raise DecodeError(f"not Avro single-object encoded (expected {self.schema.name})")
        if data[2:HEADER_LEN] != self.schema.fingerprint:
            return self._decode_earlier(data)  # off the hot path: the current schema is checked first
        if self._fast is not None:
            try:
                return self._fast(data, HEADER_LEN)
            except Exception:  # not what it expects: fastavro reads it, or says why it cannot
                pass
        try:
            record = schemaless_reader(io.BytesIO(data[HEADER_LEN:]), self._parsed, None)
        except Exception as exc:  # truncated or corrupt bodies raise EOFError, ValueError, ...
            raise DecodeError(f"corrupt {self.schema.name} record: {exc}") from exc
        assert isinstance(record, dict)
        return record

    def _decode_earlier(self, data: bytes) -> Record:
        """Resolve a record written with an earlier version of the schema to the current shape.

        Avro schema resolution fills added fields with their defaults; the schema tests keep every change
        compatible, so it cannot fail on a well-formed record. fastavro fills an added record-typed field
        with its literal default (`"policy": {}`), not with its own fields' defaults, and the services
        read those nested fields; writing the record with the current schema and reading it back completes
        it (the writer takes each missing field's default).
        """
        fp = data[2:HEADER_LEN]
        writer = self._earlier.get(fp)
        if writer is None:
            other = schema_by_fingerprint().get(fp)
            got = other.name if other else f"unknown schema {fp.hex()}"
            raise DecodeError(f"expected a {self.schema.name} record, got {got}")
        try:
            record = schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, self._parsed)
            completed = io.BytesIO()
            schemaless_writer(completed, self._parsed, record)
            completed.seek(0)
            record = schemaless_reader(completed, self._parsed, None)
        except Exception as exc:  # as above, plus fastavro's SchemaResolutionError
            raise DecodeError(
                f"corrupt {self.schema.name} record (written with earlier schema {fp.hex()}): {exc}"
            ) from exc
        assert isinstance(record, dict)
        return record


# Readers made for one contract, by the parsing canonical form they were written for.
FAST_READERS: dict[str, Callable[[bytes, int], Record]] = {
    fvreader.CANONICAL: fvreader.read,
    fvwriter.PREDICTION: predreader.read,
}


def _canonical(schema: Any) -> str | None:
    try:
        return str(to_parsing_canonical_form(schema))
    except Exception:  # not a schema fastavro can put in canonical form
        return None


_codecs: dict[str, AvroCodec] = {}


def codec_for(name: str) -> AvroCodec:
    """A cached codec per record name."""
    codec = _codecs.get(name)
    if codec is None:
        codec = _codecs[name] = AvroCodec(name)
    return codec


def decode_any(data: bytes) -> tuple[str, Record]:
    """Decode a single-object encoded record of any StreamML schema, current or earlier version (resolved to
    the current shape); returns (record name, record)."""
    if not is_avro(data):
        raise DecodeError("not Avro single-object encoded")
    schema = schema_by_fingerprint().get(data[2:HEADER_LEN])
    if schema is None:
        raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
    return schema.name, codec_for(schema.name).decode(data)


def _check_scalar(name: str, value: Any) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -limits.MAX_INT - 1 <= value <= limits.MAX_INT:
            raise DecodeError(f"field {limits.clip(name, 100)!r}: integer out of the 64-bit range")
        return
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800"): not text any codec can write
                raise DecodeError(f"field {limits.clip(name, 100)!r}: not valid Unicode text") from exc
        if len(value) > limits.MAX_STRING_CHARS:
            raise DecodeError(
                f"field {limits.clip(name, 100)!r}: string of {len(value)} characters "
                f"(at most {limits.MAX_STRING_CHARS})"
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"field {limits.clip(name, 100)!r} is not a finite number")
        return
    kind = (
        "an object" if isinstance(value, dict) else "an array" if isinstance(value, list) else "not a scalar"
    )
    raise DecodeError(f"field {limits.clip(name, 100)!r} is {kind}; raw events hold scalar values only")


def check_fields(fields: dict[str, Any]) -> None:
    """Raise DecodeError unless `fields` is a bounded, flat mapping of names to scalars.

    Once per raw event and stage: exact floats and ints (most values) are checked inline, anything else by
    `_check_scalar`."""
    if len(fields) > limits.MAX_RAW_FIELDS:
        raise DecodeError(f"{len(fields)} fields in one event (at most {limits.MAX_RAW_FIELDS})")
    name_max, low, high, finite = (
        limits.MAX_FIELD_NAME_CHARS,
        -limits.MAX_INT - 1,
        limits.MAX_INT,
        math.isfinite,
    )
    for key, value in fields.items():
        if type(key) is not str or len(key) > name_max:
            raise DecodeError(f"field name longer than {limits.MAX_FIELD_NAME_CHARS} characters")
        t = type(value)
        if t is float:
            if finite(value):
                continue
        elif t is int and low <= value <= high:
            continue
        _check_scalar(key, value)  # (and the error of a float or int out of bounds)


class FramedReader(Protocol):
    """What reads Confluent-framed Avro (streamml.registry.Registry)."""

    def decode(self, data: bytes) -> Record: ...

    def decode_features(self, data: bytes) -> Record: ...

    def decode_as(
        self, data: bytes, reader: Any, fast: tuple[str | None, Callable[[bytes, int], Record] | None] = ...
    ) -> Record: ...

    def prefetch(self, values: Iterable[bytes | None]) -> None: ...


# The schema registry of this process, if configured (`use_registry`): records in the Confluent wire format
# are read through it wherever their contract is decoded (feature vectors written with a pipeline's typed
# contract; predictions written under their topic's subject).
_registry: FramedReader | None = None


def use_registry(registry: FramedReader | None) -> None:
    global _registry
    _registry = registry
    _framed.clear()  # (framing needs a registry: set again with `frame_topics`)


class Encoder(Protocol):
    def encode(self, record: Record) -> bytes: ...


# Topics this process writes in the Confluent wire format: with a registry in use, each topic's generic
# contract registered under its subject (`frame_topics`); every other topic is written single-object.
_framed: dict[str, Encoder] = {}


def frame_topics(encoders: Mapping[str, Encoder]) -> None:
    _framed.update(encoders)


def is_framed_topic(topic: str) -> bool:
    return topic in _framed


def encoder_for(topic: str, record_name: str) -> Encoder:
    """How a `record_name` record is written to `topic`: framed under the topic's registered schema id
    where `frame_topics` set that up, else in the single-object encoding."""
    return _framed.get(topic) or codec_for(record_name)


def registry_in_use() -> FramedReader | None:
    return _registry


def prefetch_writers(values: Iterable[bytes | None]) -> None:
    """With a registry in use: the writer schemas of the framed records among `values`, fetched now
    (DependencyUnavailableError while the registry cannot answer). Without one: nothing."""
    if _registry is not None:
        _registry.prefetch(values)


def decode_raw(data: bytes | None, registry: FramedReader | None = None) -> Record:
    """Read a raw event into the RawEvent shape: a flat JSON object of scalars, an Avro RawEvent
    (single-object encoding), or — with a schema registry — a flat Avro record in the Confluent wire
    format, written with any schema the registry holds (its fields become the event's fields).

    Sizes are bounded before parsing, and anything the parsers raise (deep nesting, huge integers) is a
    DecodeError: a raw event is data from anyone, so no input may escape as another exception.
    """
    if data is None:
        raise DecodeError("empty record (null value)")
    if len(data) > limits.MAX_RAW_BYTES:
        raise DecodeError(f"raw event of {len(data)} bytes (at most {limits.MAX_RAW_BYTES})")
    if is_avro(data):
        record = codec_for("RawEvent").decode(data)
        check_fields(record["fields"])
        return record
    if data[:1] == b"\x00":  # Confluent wire format (JSON never starts with a 0 byte)
        if registry is None:
            raise DecodeError(
                "Confluent-framed Avro (0 byte + schema id) but no schema registry is configured "
                "(STREAMML_SCHEMA_REGISTRY_URL)"
            )
        fields = registry.decode(data)
        check_fields(fields)
        return {"fields": fields, "event_time": None}
    obj = _json_object(data)
    if not isinstance(obj, dict):
        raise DecodeError(f"a raw event must be a JSON object, got {type(obj).__name__}")
    check_fields(obj)
    return {"fields": obj, "event_time": None}


def _json_object(data: bytes) -> Any:
    """JSON text as the standard library reads it, in a seventh of its time: orjson (0.6 vs 4 µs for an
    agrawal event) for what it reads exactly as `json.loads` does; anything else — text orjson refuses
    (NaN, Infinity, lone surrogates, a byte-order mark, UTF-16, deep nesting, invalid JSON) or an integer
    beyond int64 it would turn into a double — is read again by `json.loads`, whose result or error is
    the answer, as before."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _stdlib_json(data)
    if type(obj) is dict:
        for value in obj.values():
            if type(value) is float and not -_ORJSON_EXACT < value < _ORJSON_EXACT:
                return _stdlib_json(data)
    return obj


def _stdlib_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise DecodeError("neither Avro (no 0xC3 0x01 header) nor UTF-8 JSON") from exc
    except json.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except (ValueError, RecursionError) as exc:  # integers over 4300 digits, nesting deeper than the stack
        raise DecodeError(f"JSON the parser refused: {limits.clip(str(exc), 200)}") from exc
