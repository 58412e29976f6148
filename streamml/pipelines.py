"""Pipeline definitions: a YAML/JSON file → a validated PipelineDefinition record on the pipelines topic."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streamml import estimators, limits
from streamml.errors import ValidationError
from streamml.records import PipelineDefinition
from streamml.topics import PIPELINE_NAME, Catalogue

FieldTypeName = Literal["float", "int", "bool", "string"]


class FieldFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: FieldTypeName
    required: bool = True
    default: bool | int | float | str | None = None


class LabelFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["inline", "topic", "none"] = "inline"
    field: str | None = None
    ttl_seconds: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _inline_needs_field(self) -> LabelFile:
        if self.source == "inline" and not self.field:
            raise ValueError("label.source 'inline' needs label.field (the raw field holding the label)")
        return self


class StepFile(BaseModel):
    """One feature step; keys other than op/output/inputs are the step's parameters."""

    model_config = ConfigDict(extra="allow")
    op: str
    output: str | None = None
    inputs: list[str] = Field(default_factory=list)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "online"
    kind: Literal["online", "batch"] = "online"
    estimator: str
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)


class MonitoringFile(BaseModel):
    """`monitoring:` section: drift detectors and windows (see schemas/pipeline_definition.avsc)."""

    model_config = ConfigDict(extra="forbid")
    concept_detector: Literal["ADWIN", "PageHinkley", "DDM"] = "ADWIN"
    concept_params: dict[str, Any] = Field(default_factory=dict)
    concept_min_rise: float = Field(0.05, ge=0)
    data_window: int = Field(1000, ge=50)
    data_threshold: float = Field(1e-4, gt=0, lt=1)
    cooldown_events: int = Field(2000, ge=0)
    metrics_window: int = Field(1000, ge=10)


class PolicyFile(BaseModel):
    """`policy:` section: what the controller does on drift and how it judges challengers."""

    model_config = ConfigDict(extra="forbid")
    retrain_on_drift: bool = True
    retrain_window_events: int = Field(3000, ge=10)
    reset_online_on_drift: bool = False
    challenger_margin: float = Field(0.01, ge=0)
    challenger_min_labels: int = Field(500, ge=1)
    challenger_max_labels: int = Field(5000, ge=1)


class PipelineFile(BaseModel):
    """The user-facing pipeline format (what `streamml pipeline apply FILE` reads)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    raw_topic: str | None = None
    event_id_field: str = "event_id"
    key_field: str | None = None
    # The raw topic is already keyed by key_field (one key, one raw partition): no repartition hop.
    raw_keyed: bool = False
    event_time_field: str | None = None
    fields: dict[str, FieldTypeName | FieldFile]
    label: LabelFile = Field(default_factory=lambda: LabelFile(source="none"))
    task: Literal["binary", "multiclass", "regression"]
    features: list[StepFile] = Field(default_factory=list)
    models: list[ModelFile]
    promotion: Literal["auto", "manual"] = "auto"
    snapshot_every_events: int = Field(1000, ge=1)
    snapshot_every_seconds: float = Field(60.0, gt=0)
    monitoring: MonitoringFile = Field(default_factory=MonitoringFile)
    policy: PolicyFile = Field(default_factory=PolicyFile)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError("use 1-63 lower-case letters, digits and dashes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PipelineFile:
        if self.label.field and self.label.field in self.fields:
            raise ValueError(f"label field {self.label.field!r} must not also be an input field")
        if self.raw_keyed and not self.key_field:
            raise ValueError("raw_keyed: true needs a key_field (the field the raw topic is keyed by)")
        if not any(m.kind == "online" for m in self.models):
            raise ValueError("a pipeline needs at least one online (River) model")
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError("model names must be unique")
        return self


def _field_specs(fields: dict[str, FieldTypeName | FieldFile]) -> list[dict[str, Any]]:
    out = []
    for name, spec in fields.items():
        f = FieldFile(type=spec) if isinstance(spec, str) else spec
        out.append({"name": name, "type": f.type.upper(), "required": f.required, "default": f.default})
    return out


def to_definition(spec: PipelineFile, raw_topic: str, revision: int = 1) -> PipelineDefinition:
    """The Avro record of a pipeline file; estimators and feature steps are validated on the way."""
    from streams.features import FeatureEngine  # the engine knows the step ops and checks their inputs

    for model in spec.models:
        kind_ok = estimators.library_of(model.estimator) == ("river" if model.kind == "online" else "sklearn")
        if not kind_ok:
            raise ValidationError(
                f"model {model.name!r}: {'an online' if model.kind == 'online' else 'a batch'} model needs a "
                f"{'River' if model.kind == 'online' else 'scikit-learn'} estimator, got {model.estimator!r}"
            )
        estimators.build(model.estimator, model.params)  # fails on unknown classes or bad parameters
    definition = PipelineDefinition(
        name=spec.name,
        revision=revision,
        description=spec.description,
        raw_topic=spec.raw_topic or raw_topic,
        event_id_field=spec.event_id_field,
        key_field=spec.key_field,
        raw_keyed=spec.raw_keyed,
        event_time_field=spec.event_time_field,
        fields=_field_specs(spec.fields),  # type: ignore[arg-type]
        label={
            "source": spec.label.source.upper(),
            "field": spec.label.field,
            "ttl_seconds": spec.label.ttl_seconds,
        },  # type: ignore[arg-type]
        task=spec.task.upper(),  # type: ignore[arg-type]
        feature_steps=[  # type: ignore[arg-type]
            {
                "op": s.op,
                "output": s.output,
                "inputs": s.inputs,
                "params": {k: json.dumps(v) for k, v in s.params().items()},
            }
            for s in spec.features
        ],
        models=[  # type: ignore[arg-type]
            {
                "name": m.name,
                "kind": m.kind.upper(),
                "estimator_spec": m.estimator,
                "params": estimators.encode_params(m.params),
            }
            for m in spec.models
        ],
        promotion_mode=spec.promotion.upper(),  # type: ignore[arg-type]
        snapshot_every_events=spec.snapshot_every_events,
        snapshot_every_seconds=spec.snapshot_every_seconds,
        monitoring={  # type: ignore[arg-type]
            **spec.monitoring.model_dump(),
            "concept_params": {k: json.dumps(v) for k, v in spec.monitoring.concept_params.items()},
        },
        policy=spec.policy.model_dump(),  # type: ignore[arg-type]
        deleted=False,
        updated_at=int(time.time() * 1000),
    )
    FeatureEngine(definition.to_avro())  # unknown ops, missing inputs, bad parameters fail here
    return definition


MAX_FILE_BYTES = 1024 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: they add nothing a pipeline needs, and nested aliases expand
    exponentially ("billion laughs") before any check could run."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.YAMLError(f"YAML aliases are not allowed in pipeline files ({event.start_mark})")
        return super().compose_node(parent, index)


def load_file(path: Path) -> PipelineFile:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValidationError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a pipeline definition")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read pipeline file {path}: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_NoAliasLoader)
    except (ValueError, RecursionError, yaml.YAMLError) as exc:
        raise ValidationError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    try:
        return PipelineFile.model_validate(data)
    except Exception as exc:  # pydantic's ValidationError lists every problem with its location
        raise ValidationError(f"{path}: invalid pipeline definition:\n{exc}") from exc


_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
_FIELD_TYPES = {"FLOAT", "INT", "BOOL", "STRING"}


def _finite_everywhere(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{where} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_everywhere(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_everywhere(v, f"{where}[{i}]")


def validate_definition(record: dict[str, Any], catalogue: Catalogue | None = None) -> None:
    """Raise ValidationError unless a decoded PipelineDefinition can be applied by every service.

    The CLI validates the file it applies, but anyone who can write to the pipelines topic can publish a
    record: services and the CLI run this on every record they read, so an invalid one is skipped (the
    previous revision stays in effect) instead of stopping whoever applies it.
    """
    from streams.features import FeatureEngine, coerce_value  # the engine knows the step ops and types

    name = record["name"]
    if not isinstance(name, str) or not PIPELINE_NAME.match(name):
        raise ValidationError(f"invalid pipeline name {name!r}: use 1-63 lower-case letters, digits, dashes")
    if record["deleted"]:
        return
    _finite_everywhere(record, "definition")
    raw_topic = record["raw_topic"]
    if not _TOPIC_NAME.match(raw_topic) or raw_topic.startswith("__"):
        raise ValidationError(f"raw_topic {raw_topic[:100]!r} is not a usable Kafka topic name")
    if catalogue is not None:
        spec = catalogue.resolve(raw_topic)
        if spec is not None and (spec.role != "raw" or spec.name != catalogue.raw(name).name):
            raise ValidationError(f"raw_topic {raw_topic!r} is StreamML's {spec.role} topic, not a raw topic")
    names = [f["name"] for f in record["fields"]]
    if not names or len(names) != len(set(names)) or len(names) > limits.MAX_RAW_FIELDS:
        raise ValidationError("fields must be 1..1000 unique names")
    for f in record["fields"]:
        if not f["name"] or len(f["name"]) > limits.MAX_FIELD_NAME_CHARS or f["type"] not in _FIELD_TYPES:
            raise ValidationError(f"invalid field {f['name'][:100]!r} of type {f['type']}")
    if not record["event_id_field"]:
        raise ValidationError("event_id_field must not be empty")
    if not record["label"]["ttl_seconds"] > 0:
        raise ValidationError("label.ttl_seconds must be > 0")
    if record["label"]["source"] == "INLINE" and not record["label"]["field"]:
        raise ValidationError("label source INLINE needs a label field")
    if record["task"] not in ("BINARY", "MULTICLASS", "REGRESSION"):
        raise ValidationError(f"unknown task {record['task']!r}")
    if record["snapshot_every_events"] < 1 or not record["snapshot_every_seconds"] > 0:
        raise ValidationError("snapshot_every_events must be >= 1 and snapshot_every_seconds > 0")
    FeatureEngine(record)  # unknown ops, missing inputs, bad or non-JSON step parameters
    for f in record["fields"]:
        if f["default"] is not None:
            coerce_value(f["name"], f["type"], f["default"])
    models = record["models"]
    if not any(m["kind"] == "ONLINE" for m in models):
        raise ValidationError("a pipeline needs at least one online (River) model")
    if len({m["name"] for m in models}) != len(models):
        raise ValidationError("model names must be unique")
    for m in models:
        library = estimators.library_of(m["estimator_spec"])
        if library != ("river" if m["kind"] == "ONLINE" else "sklearn"):
            raise ValidationError(
                f"model {m['name']!r}: {m['kind'].lower()} model with a {library} estimator"
            )
        estimators.build(m["estimator_spec"], estimators.decode_params(m["params"]))
    monitoring = dict(record["monitoring"])
    try:
        monitoring["concept_params"] = {k: json.loads(v) for k, v in monitoring["concept_params"].items()}
        MonitoringFile.model_validate(monitoring)
        PolicyFile.model_validate(record["policy"])
    except (ValueError, RecursionError) as exc:  # pydantic's and json's errors are ValueErrors
        raise ValidationError(f"invalid monitoring or policy section: {limits.clip(str(exc), 300)}") from exc


def online_model(definition: dict[str, Any]) -> dict[str, Any]:
    """The served online model of a pipeline: the first ONLINE model."""
    return next(m for m in definition["models"] if m["kind"] == "ONLINE")
