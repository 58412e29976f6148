"""Reading and writing the control topics (pipelines, model versions, promotions) for the CLI.

Control topics are read around bad records: a record that does not decode, or decodes into something no
service would act on, comes back as a `SkippedRecord` (where it is and why) instead of failing the read,
so one poisoned record never locks users out of listing, promoting, rolling back or repairing.
"""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streamml.codec import codec_for
from streamml.errors import StreamMLError, ValidationError
from streamml.kafka import make_producer
from streamml.pipelines import validate_definition
from streamml.registry import Registry, framed_encoders
from streamml.runtime import read_to_end
from streamml.settings import Settings
from streamml.topics import PIPELINE_NAME, Catalogue

log = logging.getLogger(__name__)
Record = dict[str, Any]
Validator = Callable[[Record], None]
REASON_CHARS = 300


class Msg(Protocol):
    """What the reader needs of a confluent-kafka Message (unit tests pass plain fakes)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class SkippedRecord:
    """A control record read around: where it is, its key (a tombstone with it removes it) and why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    reason: str
    name: str | None = None  # the pipeline the record names, when it decoded

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def key_text(key: bytes) -> str | None:
    """A record key as text, when it is printable UTF-8 (otherwise a user can only give it in hex)."""
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _check_name(value: Any) -> None:
    if not isinstance(value, str) or not PIPELINE_NAME.match(value):
        raise ValidationError(f"invalid pipeline name {str(value)[:80]!r}")


def check_pipeline_field(record: Record) -> None:
    """ModelVersion and Promotion records must name a valid pipeline."""
    _check_name(record["pipeline"])


def _read_one(msg: Msg, value: bytes, schema: str, validate: Validator | None) -> Record | SkippedRecord:
    record: Record | None = None
    try:
        record = codec_for(schema).decode(value)
        if validate is not None:
            validate(record)
        return record
    # Anything a record makes the decoder or a validator raise is that record's fault: reading around it
    # must not depend on every validator raising only StreamMLError.
    except Exception as exc:
        reason = str(exc) if isinstance(exc, StreamMLError) else f"{type(exc).__name__}: {exc}"
        if len(reason) > REASON_CHARS:
            reason = reason[:REASON_CHARS] + "…"
        claimed = None if record is None else record.get("name", record.get("pipeline"))
        return SkippedRecord(
            msg.topic() or "", msg.partition() or 0, msg.offset() or 0, msg.key(), reason,
            claimed if isinstance(claimed, str) else None,
        )  # fmt: skip


def read_around(
    messages: Iterable[Msg], schema: str, validate: Validator | None = None
) -> tuple[list[tuple[bytes | None, Record]], list[SkippedRecord]]:
    """([(key, record)], skipped records) of a compacted control topic, in (partition, offset) order.

    A valid record or a tombstone replaces every earlier record with its key, as compaction will; a bad
    record replaces nothing, so what was valid before it stays in force (the services skip it too).
    """
    latest: dict[tuple[int, bytes], tuple[int, Record]] = {}
    unkeyed: list[tuple[int, int, Record]] = []
    bad: dict[tuple[int, bytes | None], list[SkippedRecord]] = {}
    for msg in messages:
        partition, offset, key, value = msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value()
        if value is None:
            if key is not None:
                latest.pop((partition, key), None)
                bad.pop((partition, key), None)
            continue
        item = _read_one(msg, value, schema, validate)
        if isinstance(item, SkippedRecord):
            bad.setdefault((partition, key), []).append(item)
        elif key is None:
            unkeyed.append((partition, offset, item))
        else:
            latest[(partition, key)] = (offset, item)
            bad.pop((partition, key), None)
    good = [(p, o, k, r) for (p, k), (o, r) in latest.items()] + [(p, o, None, r) for p, o, r in unkeyed]
    good.sort(key=lambda e: (e[0], e[1]))
    skipped = sorted((s for group in bad.values() for s in group), key=lambda s: (s.partition, s.offset))
    return [(k, r) for _p, _o, k, r in good], skipped


def _records(
    settings: Settings, topic: str, schema: str, validate: Validator | None = None
) -> tuple[list[tuple[bytes | None, Record]], list[SkippedRecord]]:
    return read_around(read_to_end(settings, topic), schema, validate)


@dataclass
class PipelineState:
    """The pipelines topic as the services see it: the latest valid revision of each pipeline, and the
    bad records read around."""

    current: dict[str, Record] = field(default_factory=dict)  # deleted ones included, marked
    keys: dict[str, bytes | None] = field(default_factory=dict)  # the record key of each current revision
    skipped: list[SkippedRecord] = field(default_factory=list)


def read_pipelines(settings: Settings) -> PipelineState:
    catalogue = Catalogue(settings)
    records, skipped = _records(  # the services validate definitions by the same function
        settings,
        catalogue.pipelines().name,
        "PipelineDefinition",
        lambda r: validate_definition(r, catalogue),
    )
    state = PipelineState(skipped=skipped)
    for key, rec in records:
        state.current[rec["name"]] = rec
        state.keys[rec["name"]] = key
    return state


def current_pipelines(settings: Settings) -> dict[str, dict[str, Any]]:
    """The latest revision of every pipeline (deleted ones included, marked); bad records are logged."""
    state = read_pipelines(settings)
    for s in state.skipped:
        log.warning("skipped %s: %s", s.where, s.reason)
    return state.current


def _produce(settings: Settings, topic: str, key: bytes, value: bytes | None) -> None:
    producer = make_producer(settings)
    errors: list[str] = []
    producer.produce(topic, value, key, on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
    if producer.flush(30) or errors:
        raise StreamMLError(f"could not publish to {topic}: {errors or 'timed out'}")


def publish(settings: Settings, topic: str, schema: str, key: str, record: dict[str, Any]) -> None:
    """Publish one control record; with a schema registry configured, in the Confluent wire format under
    the topic's subject, as the services write theirs (single-object if the registry cannot take it)."""
    registry = Registry.from_settings(settings)
    framed = framed_encoders(registry, [(topic, schema)]).get(topic) if registry is not None else None
    _produce(settings, topic, key.encode(), (framed or codec_for(schema)).encode(record))


def tombstone(settings: Settings, topic: str, key: bytes) -> None:
    """Publish a tombstone: compaction removes every record with this key (services ignore it)."""
    _produce(settings, topic, key, None)


@dataclass
class ModelHistory:
    """Versions of one pipeline's models and the promotion decisions about them, oldest first.

    A PROMOTE or ROLLBACK naming a version that does not exist is not live: the predictor could never
    serve it, and counting it would make AUTO promotion wait forever behind a model that is not there.
    `versions` None means the versions were not read (`streamml status` reads decisions only): then every
    decision counts.
    """

    versions: list[dict[str, Any]] | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)

    def _exists(self, decision: dict[str, Any]) -> bool:
        if self.versions is None:
            return True
        return any(
            (v["model_name"], v["version"]) == (decision["model_name"], decision["version"])
            for v in self.versions
        )

    def _live_decisions(self) -> list[dict[str, Any]]:
        return [d for d in self.decisions if d["action"] in ("PROMOTE", "ROLLBACK") and self._exists(d)]

    def ignored(self) -> list[dict[str, Any]]:
        """PROMOTE/ROLLBACK decisions that name a version that does not exist (never live)."""
        return [d for d in self.decisions if d["action"] in ("PROMOTE", "ROLLBACK") and not self._exists(d)]

    def live(self) -> dict[str, Any] | None:
        """The last PROMOTE/ROLLBACK decision of an existing version: what the predictor serves."""
        promotions = self._live_decisions()
        return promotions[-1] if promotions else None

    def live_stack(self) -> list[dict[str, Any]]:
        """Live versions as a stack: PROMOTE pushes, ROLLBACK pops back to the one before."""
        stack: list[dict[str, Any]] = []
        for d in self._live_decisions():
            if d["action"] == "PROMOTE":
                if d["actor"] == "auto" and stack and stack[-1]["model_name"] != d["model_name"]:
                    continue  # as the predictor does: AUTO never overrides another model put live
                if not stack or (stack[-1]["model_name"], stack[-1]["version"]) != (
                    d["model_name"],
                    d["version"],
                ):
                    stack.append(d)
            else:  # ROLLBACK
                if stack:
                    stack.pop()
                if not stack or (stack[-1]["model_name"], stack[-1]["version"]) != (
                    d["model_name"],
                    d["version"],
                ):
                    stack.append(d)
        return stack

    def previous_live(self) -> dict[str, Any] | None:
        """The version live before the current one (what `model rollback` restores)."""
        stack = self.live_stack()
        return stack[-2] if len(stack) >= 2 else None


def model_history(settings: Settings, pipeline: str) -> ModelHistory:
    """One pipeline's versions and decisions; bad records of either topic end up in `skipped`."""
    cat = Catalogue(settings)
    # Decisions first: a decision is published after the version it names, so every version a decision
    # read here names is already on the versions topic when that is read next.
    decisions, bad_decisions = _records(settings, cat.promotions().name, "Promotion", check_pipeline_field)
    versions, bad_versions = _records(
        settings, cat.model_versions().name, "ModelVersion", check_pipeline_field
    )
    history = ModelHistory(
        versions=[r for _k, r in versions if r["pipeline"] == pipeline],
        decisions=sorted(
            (r for _k, r in decisions if r["pipeline"] == pipeline), key=lambda d: d["decided_at"]
        ),
        skipped=bad_versions + bad_decisions,
    )
    return history


def decide(
    settings: Settings, pipeline: str, model_name: str, version: int, action: str, reason: str,
    previous: int | None, metrics: dict[str, float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    decided = int(time.time() * 1000)
    record = {
        "pipeline": pipeline,
        "model_name": model_name,
        "action": action,
        "version": version,
        "previous_version": previous,
        "actor": getpass.getuser(),
        "reason": reason,
        "metrics": metrics or {},
        "decided_at": decided,
    }
    publish(
        settings,
        Catalogue(settings).promotions().name,
        "Promotion",
        f"{pipeline}/{model_name}/{decided}",
        record,
    )
    return record


def find_version(history: ModelHistory, version: int, model_name: str | None) -> dict[str, Any]:
    """The version a user names; refuses versions and models that do not exist (nothing is published)."""
    versions = history.versions or []
    matches = [
        v
        for v in versions
        if v["version"] == version and (model_name is None or v["model_name"] == model_name)
    ]
    if not matches:
        models = sorted({v["model_name"] for v in versions})
        if model_name is not None and model_name not in models:
            known = f"its models are {', '.join(models)}" if models else "it has no model versions yet"
            raise ValidationError(f"no model {model_name!r} in this pipeline: {known}")
        of = f" of model {model_name!r}" if model_name is not None else ""
        raise ValidationError(f"no version {version}{of} (see `streamml model list`)")
    if len(matches) > 1:
        raise ValidationError(f"version {version} exists for several models: pass --model")
    return matches[-1]
