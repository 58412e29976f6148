"""A Schema Registry client for StreamML's contracts (Confluent's REST API; Apicurio's ccompat API too).

Built on confluent-kafka's `SchemaRegistryClient`. Subjects follow Confluent's default TopicNameStrategy,
`<topic>-value`, with BACKWARD compatibility set on each subject StreamML registers. Records in the
Confluent wire format are a 0 byte, the schema id (4 bytes, big-endian), then the Avro binary body; the
body is read with fastavro (the writer schema fetched by id once, then cached), never through the SerDe
classes on a hot path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.schema import to_parsing_canonical_form

from streamml import limits, typedfv, unions
from streamml.contracts import ORIGINAL_NAME, Contract, generic_contract
from streamml.errors import DecodeError, DependencyUnavailableError, SchemaError, StreamMLError
from streamml.schemas import strip_logical_types
from streamml.settings import Settings
from streamml.typedfv import TypedVectors

log = logging.getLogger(__name__)

FRAME_MAGIC = 0
FRAME_HEADER_LEN = 5
COMPATIBILITY = "BACKWARD"
_ID_CACHE = 1024  # writer schemas (or "unknown id") kept per process, least recently used dropped
_ID = struct.Struct(">I")


class RegistryError(StreamMLError):
    pass


class RegistryUnavailableError(RegistryError, DependencyUnavailableError):
    """The registry cannot be reached or answers with a server error (retriable)."""


def is_framed(data: bytes) -> bool:
    """Confluent wire format: a 0 byte and a 4-byte schema id before the body."""
    return len(data) > FRAME_HEADER_LEN and data[0] == FRAME_MAGIC


def frame(schema_id: int, body: bytes) -> bytes:
    return bytes([FRAME_MAGIC]) + _ID.pack(schema_id) + body


def subject(topic: str) -> str:
    return f"{topic}-value"


@dataclass(frozen=True)
class Writer:
    """A writer schema read from the registry: fastavro's parsed form, and (for a pipeline's feature
    vectors) the features whose Avro names differ from the definition's: Avro name → definition name."""

    parsed: Any
    renamed: dict[str, str]
    fast: TypedVectors | None = None  # a pipeline's typed FeatureVector: its own reader (streamml.typedfv)
    canonical: str | None = None  # the schema's parsing canonical form


@dataclass(frozen=True)
class Incompatible:
    subject: str
    reason: str


def _avro(contract: Contract) -> Schema:
    return Schema(contract.text(), "AVRO")


class Registry:
    """One registry, as configured in Settings (URL, basic auth, CA bundle)."""

    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        if not settings.schema_registry_url:
            raise RegistryError("no schema registry configured (STREAMML_SCHEMA_REGISTRY_URL)")
        conf: dict[str, Any] = {"url": settings.schema_registry_url, "timeout": timeout_s}
        if settings.schema_registry_basic_auth is not None:
            conf["basic.auth.user.info"] = settings.schema_registry_basic_auth.get_secret_value()
        if settings.schema_registry_ca_location:
            conf["ssl.ca.location"] = settings.schema_registry_ca_location
        self.url = settings.schema_registry_url
        self._conf = conf
        self._client = SchemaRegistryClient(conf)
        self._writers: OrderedDict[int, Writer | None] = OrderedDict()  # by schema id; None: unknown id

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry | None:
        return cls(settings) if settings.schema_registry_url else None

    # -- contracts ---------------------------------------------------------------------------------------
    def incompatible(self, contracts: dict[str, Contract]) -> list[Incompatible]:
        """The subjects (by topic) whose latest version cannot read records of the new contract, with the
        registry's reason. Nothing is registered."""
        found = []
        for topic, contract in contracts.items():
            name = subject(topic)
            try:
                ok = self._client.test_compatibility(name, _avro(contract))
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:  # a new subject: nothing to be compatible with
                    continue
                raise RegistryError(f"registry {self.url}: checking {name}: {_message(exc)}") from exc
            if not ok:
                found.append(Incompatible(name, self._reason(name, contract)))
        return found

    def _reason(self, name: str, contract: Contract) -> str:
        return _with_field_names(self._refusal(name, contract), contract.schema)

    def _refusal(self, name: str, contract: Contract) -> str:
        """The registry's own words on why a schema is refused: a registration it answers 409 to (the
        compatibility check answers only yes or no). A registration that succeeds after all (the subject
        changed meanwhile) is reported as such."""
        try:
            self._client.register_schema(name, _avro(contract))
        except SchemaRegistryError as exc:
            return limits.clip(_message(exc), 500)
        return "incompatible when checked, registered when retried (the subject changed meanwhile)"

    def register(self, topic: str, contract: Contract) -> int:
        """Register `contract` under `<topic>-value` (BACKWARD compatibility); its schema id."""
        name = subject(topic)
        try:
            self._client.set_compatibility(name, COMPATIBILITY)
            schema_id = int(self._client.register_schema(name, _avro(contract)))
        except SchemaRegistryError as exc:
            if exc.http_status_code >= 500 or exc.http_status_code < 0:  # (negative: no HTTP answer)
                raise RegistryUnavailableError(
                    f"registry {self.url}: registering {name}: {_message(exc)}"
                ) from exc
            raise RegistryError(f"registry {self.url}: registering {name}: {_message(exc)}") from exc
        except Exception as exc:  # httpx transport errors: the registry is away
            raise RegistryUnavailableError(
                f"registry {self.url} unreachable: registering {name}: {limits.clip(str(exc), 200)}"
            ) from exc
        self.remember(schema_id, contract.schema, contract.parsed)
        return schema_id

    def wait_ready(self, timeout_s: float, pause_s: float = 1.0) -> bool:
        """Wait up to `timeout_s` for the registry to answer (any HTTP answer but a 5xx: a 401 is an answer,
        and registration then says why); False if it did not. Services call it at start, so a registry
        started alongside them (compose, a pod restarted with them) is in use from their first record."""
        deadline = time.monotonic() + timeout_s
        probe = SchemaRegistryClient({**self._conf, "max.retries": 0})  # this loop is the retrying
        while True:
            try:
                probe.get_subjects()
                return True
            except SchemaRegistryError as exc:
                if 0 <= exc.http_status_code < 500:
                    return True
                reason = _message(exc)
            except Exception as exc:  # httpx transport errors: nothing listens (yet)
                reason = limits.clip(str(exc), 200)
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("registry %s did not answer in %.0f s: %s", self.url, timeout_s, reason)
                return False
            log.info("waiting for the registry %s (%.0f s left): %s", self.url, left, reason)
            time.sleep(min(pause_s, left))

    def subjects(self) -> list[str]:
        try:
            return list(self._client.get_subjects())
        except SchemaRegistryError as exc:
            raise RegistryError(f"registry {self.url}: listing subjects: {_message(exc)}") from exc

    # -- reading framed records ------------------------------------------------------------------------
    def writer(self, schema_id: int) -> Writer:
        """A writer schema by id (cached, also when the registry does not know it)."""
        if schema_id in self._writers:
            self._writers.move_to_end(schema_id)
            writer = self._writers[schema_id]
        else:
            writer = self._fetch(schema_id)
            self._cache(schema_id, writer)
        if writer is None:
            raise DecodeError(f"schema id {schema_id} is not in the schema registry")
        return writer

    def _fetch(self, schema_id: int) -> Writer | None:
        try:
            registered = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return None
            if exc.http_status_code >= 500 or exc.http_status_code < 0:  # (negative: no HTTP answer)
                raise RegistryUnavailableError(
                    f"schema id {schema_id}: registry {self.url} answered {_message(exc)}"
                ) from exc
            raise DecodeError(f"schema id {schema_id}: registry {self.url} answered {_message(exc)}") from exc
        except Exception as exc:  # httpx transport errors: the registry is away (a retriable failure)
            raise RegistryUnavailableError(
                f"schema id {schema_id}: registry {self.url} unreachable: {limits.clip(str(exc), 200)}"
            ) from exc
        if registered.schema_type not in (None, "AVRO"):
            raise DecodeError(f"schema id {schema_id} is {registered.schema_type}, not Avro")
        try:
            schema = json.loads(registered.schema_str or "null")
            return _writer(fastavro.parse_schema(strip_logical_types(schema)), schema)
        except Exception as exc:  # a schema fastavro cannot use (e.g. references it was not given)
            raise DecodeError(f"schema id {schema_id} cannot be used: {limits.clip(str(exc), 200)}") from exc

    def prefetch(self, values: Iterable[bytes | None]) -> None:
        """Fetch the writer schemas of the framed records among `values` that are not cached yet, before
        any of them is handled: RegistryUnavailableError if the registry cannot answer now (the caller
        reads the records again later). An id the registry does not know is cached as such: that record
        alone is dead-lettered when decoded."""
        writers = self._writers
        header = FRAME_HEADER_LEN
        ids = {_ID.unpack_from(v, 1)[0] for v in values if v and v[0] == FRAME_MAGIC and len(v) > header}
        for schema_id in ids:
            if schema_id not in writers:
                with contextlib.suppress(DecodeError):
                    self.writer(schema_id)

    def remember(self, schema_id: int, schema: dict[str, Any], parsed: Any) -> None:
        """Cache a schema this process registered (or knows) under its id: no registry call to read it."""
        self._cache(schema_id, _writer(parsed, schema))

    def _cache(self, schema_id: int, writer: Writer | None) -> None:
        self._writers[schema_id] = writer
        while len(self._writers) > _ID_CACHE:
            self._writers.popitem(last=False)

    def decode(self, data: bytes) -> dict[str, Any]:
        """A Confluent-framed record, read with its writer schema."""
        return self._read(data)[1]

    def decode_as(
        self,
        data: bytes,
        reader: Any,
        fast: tuple[str | None, Callable[[bytes, int], dict[str, Any]] | None] = (None, None),
    ) -> dict[str, Any]:
        """A Confluent-framed record resolved to `reader` (fastavro's parsed form of one of our contracts):
        fields the writer lacks take their defaults, as Avro schema resolution says. `fast`: the reader's
        parsing canonical form and a reader made for it (`codec.FAST_READERS`), used when the writer schema
        is that same contract (nothing to resolve)."""
        writer, body, schema_id = self._body(data)
        canonical, read = fast
        if read is not None and canonical is not None and writer.canonical == canonical:
            try:
                return read(data, FRAME_HEADER_LEN)
            except Exception:  # not what it expects: fastavro reads it, or says why it cannot
                pass
        try:
            record = fastavro.schemaless_reader(io.BytesIO(body), writer.parsed, reader)
        except Exception as exc:  # a corrupt body, or a writer schema that does not resolve to ours
            raise DecodeError(
                f"record of schema id {schema_id} cannot be read as ours: {limits.clip(str(exc), 300)}"
            ) from exc
        if not isinstance(record, dict):
            raise DecodeError(f"schema id {schema_id} is not a record schema")
        return record

    def decode_features(self, data: bytes) -> dict[str, Any]:
        """A typed FeatureVector (Confluent-framed, a pipeline's generated contract) in the shape of the
        generic one: `features` holds the values present, under the definition's names."""
        fast = self.writer(_ID.unpack_from(data, 1)[0]).fast if is_framed(data) else None
        if fast is not None:
            try:
                return fast.read(data, FRAME_HEADER_LEN)
            except Exception:  # not what it expects: fastavro reads it, or says why it cannot
                pass
        writer, record = self._read(data)
        features = record.get("features")
        if not (
            isinstance(features, dict)
            and isinstance(record.get("event_id"), str)
            and isinstance(record.get("pipeline"), str)
            and isinstance(record.get("event_time"), int)
            and isinstance(record.get("feature_time"), int)
        ):
            raise DecodeError("a framed record that is not a StreamML feature vector")
        renamed = writer.renamed
        record["features"] = {renamed.get(k, k): v for k, v in features.items() if v is not None}
        record.setdefault("key", None)
        record.setdefault("label", None)
        record.setdefault("source", None)
        record.setdefault("pipeline_revision", 0)
        return record

    def _body(self, data: bytes) -> tuple[Writer, bytes, int]:
        if not is_framed(data):
            raise DecodeError("not in the Confluent wire format (0 byte + schema id)")
        (schema_id,) = _ID.unpack_from(data, 1)
        return self.writer(schema_id), data[FRAME_HEADER_LEN:], schema_id

    def _read(self, data: bytes) -> tuple[Writer, dict[str, Any]]:
        writer, body, schema_id = self._body(data)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(body), writer.parsed, None)
        except Exception as exc:  # a corrupt or truncated body
            raise DecodeError(
                f"record of schema id {schema_id} cannot be read: {limits.clip(str(exc), 300)}"
            ) from exc
        if not isinstance(record, dict):
            raise DecodeError(f"schema id {schema_id} is not a record schema")
        return writer, record


def _writer(parsed: Any, schema: Any) -> Writer:
    renamed = _renamed_features(schema)
    try:
        canonical: str | None = str(to_parsing_canonical_form(schema))
    except Exception:  # not a schema fastavro can put in canonical form
        canonical = None
    return Writer(parsed, renamed, typedfv.for_schema(schema, renamed), canonical)


def _renamed_features(schema: Any) -> dict[str, str]:
    """Avro name → definition name of the nested `features` record's renamed fields (none elsewhere)."""
    if not isinstance(schema, dict):
        return {}
    for f in schema.get("fields") or []:
        if isinstance(f, dict) and f.get("name") == "features" and isinstance(f.get("type"), dict):
            return {
                str(g["name"]): str(g[ORIGINAL_NAME])
                for g in f["type"].get("fields") or []
                if isinstance(g, dict) and isinstance(g.get(ORIGINAL_NAME), str) and "name" in g
            }
    return {}


class FramedEncoder:
    """Writes one contract's records in the Confluent wire format under a registered schema id."""

    def __init__(self, contract: Contract, schema_id: int) -> None:
        self.contract = contract
        self.schema_id = schema_id
        self._header = frame(schema_id, b"")
        self._parsed = contract.parsed
        # definition name → Avro name of the features that were renamed (usually none)
        self._rename = {orig: avro for avro, orig in _renamed_features(contract.schema).items()}
        self._hint = unions.hinter(self._parsed)  # union branches named up front (see streamml.unions)
        # a pipeline's typed FeatureVector has a writer of its own (streamml.typedfv); other contracts: None
        self._fast = typedfv.for_schema(contract.schema, _renamed_features(contract.schema))

    def encode(self, record: dict[str, Any]) -> bytes:
        if self._fast is not None:
            body = self._fast.write(record)
            if body is not None:
                return self._header + body
        if self._rename:
            renamed = {self._rename.get(k, k): v for k, v in record["features"].items()}
            record = {**record, "features": renamed}
        if self._hint is not None:
            record = self._hint(record)
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self._parsed, record)
        except Exception as exc:  # fastavro raises ValueError/TypeError/KeyError on records that don't fit
            raise SchemaError(f"record does not fit {self.contract.fullname}: {exc}") from exc
        return buf.getvalue()


def framed_encoders(registry: Registry, topics: Iterable[tuple[str, str]]) -> dict[str, FramedEncoder]:
    """For each (topic, generic record type): its contract registered under `<topic>-value` (BACKWARD) and an
    encoder writing the Confluent wire format with that id. A topic the registry refuses stays in the
    single-object encoding (every reader reads both), and so does every topic after one it could not be
    reached for (a service starts without waiting for it); both are logged."""
    encoders: dict[str, FramedEncoder] = {}
    for topic, record_name in topics:
        contract = generic_contract(record_name)
        try:
            encoders[topic] = FramedEncoder(contract, registry.register(topic, contract))
        except RegistryUnavailableError as exc:
            log.error("%s and the topics after it stay single-object encoded: %s", topic, exc)
            break
        except RegistryError as exc:
            log.error("%s stays single-object encoded: %s", topic, exc)
    return encoders


_PATH = re.compile(r"(/fields/\d+(?:/type(?:/fields/\d+|/\d+)?)*)")


def _with_field_names(reason: str, schema: dict[str, Any]) -> str:
    """Apicurio names a field by its place ('/fields/8/type'): the field's name goes after it."""

    def name_of(match: re.Match[str]) -> str:
        node: Any = schema
        names = []
        for part in match.group(1).strip("/").split("/"):
            if part == "type" and isinstance(node, dict):
                node = node.get("type")
            elif part == "fields" and isinstance(node, dict):
                node = node.get("fields")
            elif part.isdigit() and isinstance(node, list) and int(part) < len(node):
                node = node[int(part)]
                if isinstance(node, dict) and "name" in node and "type" in node:
                    names.append(str(node["name"]))
            else:
                break
        return f"{match.group(1)} (field {'.'.join(names)})" if names else match.group(1)

    return _PATH.sub(name_of, reason, count=4)


def _message(exc: SchemaRegistryError) -> str:
    return f"{exc.http_status_code} {exc.error_message}"
