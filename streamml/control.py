"""Reading and writing the control topics (pipelines, model versions, promotions) for the CLI."""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass, field
from typing import Any

from streamml.codec import codec_for
from streamml.errors import StreamMLError, ValidationError
from streamml.kafka import make_producer
from streamml.runtime import read_to_end
from streamml.settings import Settings
from streamml.topics import Catalogue


def _records(settings: Settings, topic: str, schema: str) -> list[dict[str, Any]]:
    codec = codec_for(schema)
    values = [m.value() for m in read_to_end(settings, topic)]
    return [codec.decode(v) for v in values if v is not None]


def current_pipelines(settings: Settings) -> dict[str, dict[str, Any]]:
    """The latest revision of every pipeline (deleted ones included, marked)."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in _records(settings, Catalogue(settings).pipelines().name, "PipelineDefinition"):
        latest[rec["name"]] = rec
    return latest


def publish(settings: Settings, topic: str, schema: str, key: str, record: dict[str, Any]) -> None:
    producer = make_producer(settings)
    errors: list[str] = []
    producer.produce(
        topic,
        codec_for(schema).encode(record),
        key.encode(),
        on_delivery=lambda err, _m: errors.append(str(err)) if err else None,
    )
    if producer.flush(30) or errors:
        raise StreamMLError(f"could not publish to {topic}: {errors or 'timed out'}")


@dataclass
class ModelHistory:
    """Versions of one pipeline's models and the promotion decisions about them, oldest first."""

    versions: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def live(self) -> dict[str, Any] | None:
        """The last PROMOTE/ROLLBACK decision: what the predictor serves."""
        promotions = [d for d in self.decisions if d["action"] in ("PROMOTE", "ROLLBACK")]
        return promotions[-1] if promotions else None

    def live_stack(self) -> list[dict[str, Any]]:
        """Live versions as a stack: PROMOTE pushes, ROLLBACK pops back to the one before."""
        stack: list[dict[str, Any]] = []
        for d in self.decisions:
            if d["action"] == "PROMOTE":
                if d["actor"] == "auto" and stack and stack[-1]["model_name"] != d["model_name"]:
                    continue  # as the predictor does: AUTO never overrides another model put live
                if not stack or (stack[-1]["model_name"], stack[-1]["version"]) != (
                    d["model_name"],
                    d["version"],
                ):
                    stack.append(d)
            elif d["action"] == "ROLLBACK":
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
    cat = Catalogue(settings)
    history = ModelHistory()
    history.versions = [
        r for r in _records(settings, cat.model_versions().name, "ModelVersion") if r["pipeline"] == pipeline
    ]
    history.decisions = [
        r for r in _records(settings, cat.promotions().name, "Promotion") if r["pipeline"] == pipeline
    ]
    history.decisions.sort(key=lambda d: d["decided_at"])
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
    matches = [
        v
        for v in history.versions
        if v["version"] == version and (model_name is None or v["model_name"] == model_name)
    ]
    if not matches:
        raise ValidationError(f"no version {version} (see `streamml model list`)")
    if len(matches) > 1:
        raise ValidationError(f"version {version} exists for several models: pass --model")
    return matches[-1]
