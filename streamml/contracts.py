"""Typed per-pipeline contracts: Avro schemas generated from a pipeline definition.

The generic `.avsc` files in `schemas/` are the contracts of control topics and predictions. A pipeline's
data topics get schemas of their own, generated here from its definition, so that tools that map records
to columns (Kafka Connect sinks, ksqlDB, Flink, any Confluent SerDe) see one typed, documented field per
input and per model feature:

- `<namespace>.RawEvent`: what a producer writes to the raw topic — the declared fields with their types
  (required ones without a default), the event id, and the key, label and event-time fields when the
  definition names them. A producer's own schema is resolved against it (Avro schema resolution), so a
  writer may leave out optional fields or add fields of its own.
- `<namespace>.FeatureVector`: what the features service writes — the event's id, key and times, its
  lineage (`source`), its typed label, and a nested `Features` record with one nullable field per model
  input (a feature a step could not compute is null).

`<namespace>` is `dev.streamml.pipelines.<pipeline>` (dashes become underscores). Field names that are
not valid Avro names are changed to valid ones; the original name is kept in the field's
`streamml.name` property. Generation is deterministic: the same definition gives the same schemas, and a
revision gives a new schema version (its number is in the record's doc).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro

from streamml.errors import SchemaError
from streamml.schemas import NAMESPACE, get_schema, strip_logical_types

BASE_NAMESPACE = "dev.streamml.pipelines"
ORIGINAL_NAME = "streamml.name"  # field property: the name in the pipeline definition, when it differs
_AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_]")

_FIELD_TYPES = {"FLOAT": "double", "INT": "long", "BOOL": "boolean", "STRING": "string"}
_LABEL_TYPES = {
    # what coerce_label produces per task (BINARY keeps a bool, or the int 0/1 it was given)
    "BINARY": ["null", "boolean", "long"],
    "MULTICLASS": ["null", "string"],
    "REGRESSION": ["null", "double"],
}
# what a producer may write for the label field (resolved against the raw contract)
_RAW_LABEL_TYPES = {
    "BINARY": ["null", "boolean", "long", "string"],
    "MULTICLASS": ["null", "string", "long"],
    "REGRESSION": ["null", "double"],
}
_TIME = {"type": "long", "logicalType": "timestamp-millis"}
_OFFSET_RANGE = {
    "type": "record",
    "name": "OffsetRange",
    "doc": "A contiguous slice of one Kafka partition.",
    "fields": [
        {"name": "topic", "type": "string", "doc": "Topic name."},
        {"name": "partition", "type": "int", "doc": "Partition number."},
        {"name": "start_offset", "type": "long", "doc": "First offset of the slice (inclusive)."},
        {"name": "end_offset", "type": "long", "doc": "Offset after the last record (exclusive)."},
    ],
}
_STEP_DOC = {
    "sum": "sum of {inputs}",
    "product": "product of {inputs}",
    "difference": "{first} minus {second}",
    "ratio": "{first} divided by {second}",
    "log1p": "sign-preserving log(1 + |{first}|)",
    "rolling_mean": "mean of {first} over the last {window} events{per_key}",
    "rolling_sum": "sum of {first} over the last {window} events{per_key}",
    "rolling_count": "number of events with {first} among the last {window}{per_key}",
}


def avro_name(name: str) -> str:
    """`name` as a valid Avro name: other characters become '_', a leading digit gets a '_' before it."""
    if _AVRO_NAME.match(name):
        return name
    fixed = _NOT_NAME_CHAR.sub("_", name) or "_"
    return fixed if not fixed[0].isdigit() else f"_{fixed}"


def namespace(pipeline: str) -> str:
    return f"{BASE_NAMESPACE}.{avro_name(pipeline)}"


@dataclass(frozen=True)
class Contract:
    """One generated schema: its JSON form, fastavro's parsed form (logical types kept out, as for the
    `.avsc` contracts: times stay int milliseconds) and the definition's names of renamed fields."""

    schema: dict[str, Any]
    parsed: Any
    renamed: dict[str, str] = field(default_factory=dict)  # Avro field name → definition name

    @property
    def fullname(self) -> str:
        return f"{self.schema['namespace']}.{self.schema['name']}"

    def text(self) -> str:
        """The schema as a registry or an `.avsc` file holds it (stable key order, no extra spaces)."""
        return json.dumps(self.schema, separators=(",", ":"))


@dataclass(frozen=True)
class PipelineContracts:
    pipeline: str
    revision: int
    raw: Contract
    features: Contract
    feature_names: tuple[str, ...]  # model inputs in schema order, as the definition names them


def _unique_names(names: list[str]) -> dict[str, str]:
    """Definition name → Avro name, distinct even where two names map to the same Avro name."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        candidate = base = avro_name(name)
        n = 2
        while candidate in taken:
            candidate, n = f"{base}_{n}", n + 1
        taken.add(candidate)
        out[name] = candidate
    return out


_NO_DEFAULT = object()


def _meta(name: str, type_: Any, doc: str, default: Any = _NO_DEFAULT) -> dict[str, Any]:
    f: dict[str, Any] = {"name": name, "type": type_, "doc": doc}
    if default is not _NO_DEFAULT:
        f["default"] = default
    return f


def _field(name: str, avro: str, type_: Any, doc: str, **extra: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"name": avro, "type": type_, "doc": doc, **extra}
    if avro != name:
        f[ORIGINAL_NAME] = name
    return f


def feature_names(definition: Mapping[str, Any]) -> list[str]:
    """The model inputs a vector of this definition can hold, in order: declared fields, then each step's
    output; a `drop` step removes its inputs (until a later step writes them again)."""
    names = [f["name"] for f in definition["fields"]]
    for step in definition["feature_steps"]:
        if step["op"] == "drop":
            names = [n for n in names if n not in step["inputs"]]
        elif step["output"] and step["output"] not in names:
            names.append(step["output"])
    return names


def _feature_docs(definition: Mapping[str, Any]) -> dict[str, str]:
    docs = {
        f["name"]: f"Raw field {f['name']!r} ({f['type'].lower()}{', required' if f['required'] else ''})."
        for f in definition["fields"]
    }
    key = definition.get("key_field")
    for step in definition["feature_steps"]:
        out, inputs = step["output"], list(step["inputs"])
        template = _STEP_DOC.get(step["op"])
        if not out or template is None:
            continue
        params = step.get("params") or {}
        window = params.get("window", "10")
        docs[out] = (
            template.format(
                inputs=", ".join(inputs),
                first=inputs[0] if inputs else "",
                second=inputs[1] if len(inputs) > 1 else "",
                window=window,
                per_key=f" of the same {key}" if key else "",
            ).capitalize()
            + f" (step {step['op']})."
        )
    return docs


def _parse(schema: dict[str, Any]) -> Any:
    try:
        return fastavro.parse_schema(strip_logical_types(schema), named_schemas={})
    except Exception as exc:  # fastavro raises several exception types for bad schemas
        raise SchemaError(f"generated schema {schema.get('name')} is invalid: {exc}") from exc


def raw_contract(definition: Mapping[str, Any]) -> Contract:
    """The typed raw-event schema of a pipeline definition (see the module doc)."""
    name, revision = definition["name"], definition["revision"]
    declared = {f["name"]: f for f in definition["fields"]}
    id_field, key_field = definition["event_id_field"], definition.get("key_field")
    label = definition["label"]
    label_field = label["field"] if label["source"] == "INLINE" else None
    time_field = definition.get("event_time_field")
    extra = [n for n in (id_field, key_field, label_field, time_field) if n and n not in declared]
    avro = _unique_names([*declared, *extra])
    fields: list[dict[str, Any]] = []
    if id_field not in declared:
        fields.append(
            _field(id_field, avro[id_field], ["string", "long"], "Event id, unique within the pipeline.")
        )
    for fname, f in declared.items():
        type_ = _FIELD_TYPES[f["type"]]
        doc = f"Declared field ({f['type'].lower()})."
        if fname == id_field:
            doc = "Event id, unique within the pipeline."
        if f["required"]:
            fields.append(_field(fname, avro[fname], type_, doc + " Required."))
        else:
            default = f["default"]
            if default is None:
                fields.append(_field(fname, avro[fname], ["null", type_], doc, default=None))
            else:
                value = _typed_default(f["type"], default)
                fields.append(_field(fname, avro[fname], [type_, "null"], doc, default=value))
    if key_field and key_field not in declared:
        fields.append(
            _field(key_field, avro[key_field], ["null", "string", "long"], "Entity key.", default=None)
        )
    if label_field and label_field not in declared:
        fields.append(
            _field(
                label_field,
                avro[label_field],
                _RAW_LABEL_TYPES[definition["task"]],
                f"Inline label ({definition['task'].lower()} task); null when not known yet.",
                default=None,
            )
        )
    if time_field and time_field not in declared:
        fields.append(
            _field(
                time_field,
                avro[time_field],
                ["null", _TIME, "string"],
                "When the event happened: epoch milliseconds or ISO-8601 text; null: the record's timestamp.",
                default=None,
            )
        )
    description = definition.get("description") or ""
    schema = {
        "type": "record",
        "name": "RawEvent",
        "namespace": namespace(name),
        "doc": f"A raw event of pipeline {name} (revision {revision}). {description}".strip(),
        "fields": fields,
    }
    return Contract(schema, _parse(schema), {a: n for n, a in avro.items() if a != n})


def _typed_default(kind: str, value: Any) -> Any:
    if kind == "STRING":
        return str(value)
    if kind == "BOOL":
        return bool(value) if not isinstance(value, str) else value.strip().lower() in ("true", "1", "yes")
    if kind == "INT":
        return int(float(value))
    return float(value)


def features_contract(definition: Mapping[str, Any]) -> Contract:
    """The typed feature-vector schema of a pipeline definition (see the module doc)."""
    name, revision = definition["name"], definition["revision"]
    kinds = {f["name"]: f["type"] for f in definition["fields"]}
    names = feature_names(definition)
    avro = _unique_names(names)
    docs = _feature_docs(definition)
    features = {
        "type": "record",
        "name": "Features",
        "doc": f"The model inputs of pipeline {name} (revision {revision}); null: not computed for it.",
        "fields": [
            _field(
                n,
                avro[n],
                ["null", "string" if kinds.get(n) == "STRING" else "double"],
                docs.get(n, "Model input."),
                default=None,
            )
            for n in names
        ],
    }
    schema = {
        "type": "record",
        "name": "FeatureVector",
        "namespace": namespace(name),
        "doc": f"The feature vector of one raw event of pipeline {name} (revision {revision}).",
        "fields": [
            _meta("event_id", "string", "Id of the raw event; the join key for labels and predictions."),
            _meta("key", ["null", "string"], "Entity key of the event; null without a key field.", None),
            _meta("pipeline", "string", "Pipeline name."),
            _meta("pipeline_revision", "long", "Revision of the pipeline definition applied."),
            _meta("features", features, "Model inputs, one typed field each."),
            _meta("label", _LABEL_TYPES[definition["task"]], "Inline label, if the event carried one.", None),
            _meta("event_time", _TIME, "When the raw event happened."),
            _meta("feature_time", _TIME, "When the features were computed."),
            _meta(
                "source", ["null", _OFFSET_RANGE], "Where the raw event was read (end = offset + 1).", None
            ),
        ],
    }
    return Contract(schema, _parse(schema), {a: n for n, a in avro.items() if a != n})


def contracts_of(definition: Mapping[str, Any]) -> PipelineContracts:
    return PipelineContracts(
        definition["name"],
        definition["revision"],
        raw_contract(definition),
        features_contract(definition),
        tuple(feature_names(definition)),
    )


def generic_contract(record_name: str) -> Contract:
    """One of the generic `.avsc` contracts (e.g. "Prediction") as a registry holds it: predictions are
    registered under their topics' subjects with this schema, not a generated one."""
    schema = get_schema(record_name)
    return Contract({"namespace": NAMESPACE, **schema.raw}, schema.parsed)


def export(definition: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the pipeline's generated schemas as `.avsc` files (`<pipeline>-raw.avsc`,
    `<pipeline>-features.avsc`) into `out_dir`; returns their paths."""
    c = contracts_of(definition)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, contract in (("raw", c.raw), ("features", c.features)):
        path = out_dir / f"{c.pipeline}-{kind}.avsc"
        path.write_text(json.dumps(contract.schema, indent=2) + "\n")
        paths.append(path)
    return paths
