"""The single loader of the Avro contracts in `schemas/`: one `.avsc` file per record type."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from streamml.errors import SchemaError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
NAMESPACE = "dev.streamml"


@dataclass(frozen=True)
class AvroSchema:
    """One contract: its file, its JSON form, a parsed form for fastavro and its fingerprint."""

    name: str  # record name without namespace, e.g. "Prediction"
    path: Path
    raw: dict[str, Any]
    parsed: Any  # fastavro's parsed schema, logical types stripped (times stay int ms)
    fingerprint: bytes  # 8-byte CRC-64-AVRO of the parsing canonical form, little-endian

    @property
    def fullname(self) -> str:
        return f"{self.raw.get('namespace', NAMESPACE)}.{self.name}"


def _strip_logical_types(node: Any) -> Any:
    """Drop logicalType annotations so timestamps decode as int milliseconds.

    Why: fastavro turns timestamp-millis into datetime objects, which is slower on hot paths and not what the
    services compute with. The canonical form (and so the fingerprint) ignores logicalType, so readers in
    other languages still see the annotated schema.
    """
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


def _load(path: Path) -> AvroSchema:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaError(f"cannot read Avro schema {path}: {exc}") from exc
    try:
        parsed = fastavro.parse_schema(_strip_logical_types(copy.deepcopy(raw)), named_schemas={})
        canonical = to_parsing_canonical_form(fastavro.parse_schema(raw, named_schemas={}))
    except Exception as exc:  # fastavro raises several exception types for bad schemas
        raise SchemaError(f"invalid Avro schema {path}: {exc}") from exc
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    return AvroSchema(name=raw["name"], path=path, raw=raw, parsed=parsed, fingerprint=fp)


@cache
def all_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, AvroSchema]:
    """Every contract by record name."""
    if not schema_dir.is_dir():
        raise SchemaError(f"schema folder {schema_dir} not found (run from a StreamML checkout)")
    schemas = [_load(p) for p in sorted(schema_dir.glob("*.avsc"))]
    by_name = {s.name: s for s in schemas}
    if len(by_name) != len(schemas):
        raise SchemaError(f"two schema files in {schema_dir} declare the same record name")
    return by_name


def get_schema(name: str) -> AvroSchema:
    """The contract for a record name such as 'Prediction'."""
    schemas = all_schemas()
    try:
        return schemas[name]
    except KeyError:
        raise SchemaError(f"no schema named {name!r}; known: {', '.join(sorted(schemas))}") from None


@cache
def schema_by_fingerprint() -> dict[bytes, AvroSchema]:
    return {s.fingerprint: s for s in all_schemas().values()}
