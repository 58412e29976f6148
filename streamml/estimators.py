"""Builds River and scikit-learn estimators from a text spec, only from an allowlist of module prefixes.

A spec is dotted class names joined by '|', e.g.
'preprocessing.StandardScaler | linear_model.LogisticRegression' (River is implied without a prefix).
Parameters are keyed by step class name; a parameter value may be
a nested estimator written as {"class": "optim.SGD", "params": {"lr": 0.05}}. Nothing else is imported or
executed, so a pipeline definition read from a topic cannot run arbitrary code.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamml.errors import ValidationError

ALLOWED_PREFIXES = ("river.", "sklearn.")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


@dataclass(frozen=True)
class Step:
    path: str  # fully qualified, e.g. river.linear_model.LogisticRegression
    short: str  # as written in the spec, e.g. linear_model.LogisticRegression


def parse_spec(spec: str) -> list[Step]:
    steps = []
    for part in (p.strip() for p in spec.split("|")):
        if not part or not set(part) <= _NAME_CHARS or ".." in part or part.startswith("."):
            raise ValidationError(f"invalid estimator step {part!r} in {spec!r}: use dotted class names")
        path = part if part.startswith(ALLOWED_PREFIXES) else f"river.{part}"
        steps.append(Step(path=path, short=part))
    if not steps:
        raise ValidationError("empty estimator spec")
    libraries = {s.path.split(".", 1)[0] for s in steps}
    if len(libraries) > 1:
        raise ValidationError(f"estimator spec {spec!r} mixes River and scikit-learn steps")
    return steps


def resolve_class(path: str) -> type:
    """Import a class by dotted path; refuse anything outside the allowlist or not an estimator."""
    if not path.startswith(ALLOWED_PREFIXES):
        raise ValidationError(
            f"{path!r} is not allowed: estimators come only from {', '.join(ALLOWED_PREFIXES)}"
        )
    module_name, _, class_name = path.rpartition(".")
    if not class_name[:1].isupper():
        raise ValidationError(f"{path!r} does not name a class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"unknown estimator module {module_name!r}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValidationError(f"{path!r} is not a class in {module_name}")
    if not _is_estimator_class(cls):
        raise ValidationError(f"{path!r} is not a River or scikit-learn estimator")
    return cls


def _is_estimator_class(cls: type) -> bool:
    if cls.__module__.startswith("river."):
        from river import base as river_base

        return issubclass(cls, river_base.Base)
    if cls.__module__.startswith("sklearn."):
        from sklearn.base import BaseEstimator

        return issubclass(cls, BaseEstimator)
    return False


def _materialize(value: Any) -> Any:
    if isinstance(value, Mapping) and set(value) <= {"class", "params"} and "class" in value:
        path = str(value["class"])
        if not path.startswith(ALLOWED_PREFIXES):
            path = f"river.{path}"
        cls = resolve_class(path)
        return _instantiate(cls, value.get("params") or {})
    if isinstance(value, list):
        return [_materialize(v) for v in value]
    return value


def _instantiate(cls: type, params: Mapping[str, Any]) -> Any:
    kwargs = {str(k): _materialize(v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as exc:  # what estimators raise for bad parameter values
        raise ValidationError(f"bad parameters for {cls.__module__}.{cls.__qualname__}: {exc}") from exc


def decode_params(params: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The Avro form keeps each step's parameters as a JSON string; this turns them back into dicts."""
    out = {}
    for step, text in params.items():
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"parameters of {step!r} are not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValidationError(f"parameters of {step!r} must be an object, got {type(value).__name__}")
        out[step] = value
    return out


def encode_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {step: json.dumps(dict(p), sort_keys=True) for step, p in params.items()}


def build(spec: str, params: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """A fresh estimator: a River pipeline (steps composed with '|') or a scikit-learn Pipeline."""
    steps = parse_spec(spec)
    params = dict(params or {})
    unknown = set(params) - {s.short for s in steps} - {s.path for s in steps}
    if unknown:
        raise ValidationError(f"parameters given for steps not in the spec: {sorted(unknown)}")
    built = []
    for step in steps:
        cls = resolve_class(step.path)
        built.append(_instantiate(cls, params.get(step.short) or params.get(step.path) or {}))
    if steps[0].path.startswith("sklearn."):
        if len(built) == 1:
            return built[0]
        from sklearn.pipeline import make_pipeline

        return make_pipeline(*built)
    model = built[0]
    for nxt in built[1:]:
        model = model | nxt
    return model


def library_of(spec: str) -> str:
    return "sklearn" if parse_spec(spec)[0].path.startswith("sklearn.") else "river"
