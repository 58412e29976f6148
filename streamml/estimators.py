"""Builds River and scikit-learn estimators from a text spec and JSON parameters: the one place the CLI,
the services and the trainer build them.

Specs and parameters come from files, topics and training requests that anyone upstream may write, and the
libraries treat some parameters as capabilities (scikit-learn's `memory` writes a joblib cache it later
unpickles; `func` is called). So a spec names only allowlisted estimator classes, and parameters are data,
never files, callables or modules, all checked before any constructor runs.

A spec is dotted class names joined by '|', e.g.
'preprocessing.StandardScaler | linear_model.LogisticRegression' (River is implied without a prefix).
Parameters are keyed by step class name; a nested estimator is written as
{"class": "optim.SGD", "params": {"lr": 0.05}}.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from streamml.errors import ValidationError

ALLOWED_PREFIXES = ("river.", "sklearn.")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")

# -- what a parameter value may be ------------------------------------------------------------------------
# Bounds on one build (all steps): checking stays cheap however hostile the input, and no honest estimator
# needs more (the repo's pipelines use 2 levels, a handful of nodes and short strings).
MAX_DEPTH = 8  # containers and nested estimators inside a step's parameters
MAX_STRING = 1_000  # characters in one string value
MAX_ITEMS = 1_000  # items in one list or object
MAX_NODES = 10_000  # values of all kinds, across every step
MAX_PARAMS = 64  # parameters of one estimator
MAX_PARAMS_TEXT = 100_000  # characters of one step's JSON parameters (the Avro form)
# Parallel jobs per estimator: services and the trainer share small machines; -1 (all cores) is refused.
# Sizes such as n_estimators or max_iter are not capped here: the trainer bounds what a model may cost
# (grid size, artifact size), and an estimator that is merely big grants nothing.
MAX_N_JOBS = 2

# Parameter names that grant a capability on every class that has them: scikit-learn and River read
# them as files or directories, call them, import them or evaluate them. Checked before any constructor.
# Not listed, on purpose: `warm_start` (a bool that reuses the same instance's previous fit; every build
# is a fresh instance, nothing is loaded), `verbose` (log output only), `random_state`/`seed` (numbers).
_FILE_PARAMS = (
    "cache", "cache_dir", "cachedir", "location", "path", "file", "filename", "filepath", "directory",
    "dir", "folder", "data_home",
)  # fmt: skip
_CALLABLE_PARAMS = ("func", "inverse_func", "function", "fn", "callback", "callbacks")
CAPABILITY_PARAMS: Mapping[str, str] = MappingProxyType(
    {
        "memory": "names a file or directory (a joblib cache whose pickles are loaded back)",
        **dict.fromkeys(_FILE_PARAMS, "names a file or directory"),
        "input": "makes text vectorizers open the files or file names they are given as data",
        **dict.fromkeys(_CALLABLE_PARAMS, "takes a callable"),
        "module": "names a module to import",
        "pre_dispatch": "is an expression that joblib evaluates",
        "importance_getter": "is an attribute path evaluated on the fitted estimator",
    }
)

# Whole modules that are no estimators a definition may name (checked before they are imported).
REFUSED_MODULES: Mapping[str, str] = MappingProxyType(
    {
        "sklearn.utils": "helpers and test doubles, some of which call functions given as parameters",
        "sklearn.datasets": "dataset loaders, which download and write files",
        "sklearn.experimental": "switches that change scikit-learn when imported",
        "sklearn.externals": "vendored third-party code",
        "river.datasets": "dataset loaders, which download and write files",
        "river.stream": "readers of files, databases and other streams",
        "river.utils": "helpers that wrap arbitrary objects",
        "river.checks": "River's estimator test suite",
    }
)
# Module path parts that are never public estimator modules: private modules (their classes have a public
# name; private ones include test doubles) and test modules, which may do anything when imported.
_REFUSED_PART_PREFIXES = ("_", "test_", "tests", "conftest")

# Estimator classes (and their subclasses) whose whole purpose is to call a function they are given.
REFUSED_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "sklearn.preprocessing.FunctionTransformer": "calls the function it is given",
        "river.compose.FuncTransformer": "calls the function it is given",
        "river.compose.TargetTransformRegressor": "calls the functions it is given",
    }
)

_DATA_ONLY = "estimator parameters are data, never files, callables or modules"
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


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
    """Import a class by dotted path; refuse anything outside the allowlist, not an estimator, or a class
    (or module) that exists to run code or touch files."""
    if not path.startswith(ALLOWED_PREFIXES):
        raise ValidationError(
            f"{path!r} is not allowed: estimators come only from {', '.join(ALLOWED_PREFIXES)}"
        )
    module_name, _, class_name = path.rpartition(".")
    if not class_name[:1].isupper():
        raise ValidationError(f"{path!r} does not name a class")
    _check_module(path, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"unknown estimator module {module_name!r}") from exc
    except Exception as exc:  # a module that fails on import is not one we can build from
        raise ValidationError(f"estimator module {module_name!r} cannot be imported: {exc}") from exc
    try:
        cls = getattr(module, class_name, None)
    except Exception as exc:  # e.g. scikit-learn's experimental classes raise ImportError until enabled
        raise ValidationError(f"{path!r} cannot be used: {exc}") from exc
    if not isinstance(cls, type):
        raise ValidationError(f"{path!r} is not a class in {module_name}")
    if not _is_estimator_class(cls):
        raise ValidationError(f"{path!r} is not a River or scikit-learn estimator")
    for refused, reason in REFUSED_CLASSES.items():
        other = _refused_class(refused) if refused.split(".", 1)[0] == path.split(".", 1)[0] else None
        if other is not None and issubclass(cls, other):
            raise ValidationError(f"{path!r} is refused: {refused} {reason}, and {_DATA_ONLY}")
    return cls


def _check_module(path: str, module_name: str) -> None:
    parts = module_name.split(".")[1:]
    bad = next((p for p in parts if p.startswith(_REFUSED_PART_PREFIXES)), None)
    if bad is not None:
        raise ValidationError(
            f"{path!r} is refused: {bad!r} is a private or test module; name the class by its public "
            "path (e.g. 'sklearn.linear_model.LogisticRegression')"
        )
    for prefix, reason in REFUSED_MODULES.items():
        if module_name == prefix or module_name.startswith(prefix + "."):
            raise ValidationError(
                f"{path!r} is refused: {prefix} holds {reason}, not estimators a pipeline may name"
            )


@functools.cache
def _refused_class(path: str) -> type | None:
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:  # not in this library version: nothing to refuse
        return None
    return cls if isinstance(cls, type) else None


def _is_estimator_class(cls: type) -> bool:
    if cls.__module__.startswith("river."):
        from river import base as river_base

        return issubclass(cls, river_base.Base)
    if cls.__module__.startswith("sklearn."):
        from sklearn.base import BaseEstimator

        return issubclass(cls, BaseEstimator)
    return False


# -- checking parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kind:
    """What a class's constructor expects for one parameter, as far as it says."""

    string_default: bool  # its default is a string: string values are the parameter's own vocabulary
    takes_callable: bool  # it accepts a function (default, annotation or scikit-learn's constraints)
    takes_names: bool  # ...or a name from the library's own list (e.g. kernel='rbf')


_UNKNOWN = _Kind(string_default=False, takes_callable=False, takes_names=False)


@functools.cache
def _kinds(cls: type) -> dict[str, _Kind]:
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    constraints = getattr(cls, "_parameter_constraints", None)  # scikit-learn's declared types
    out = {}
    for name, p in parameters.items():
        declared = constraints.get(name) if isinstance(constraints, dict) else None
        declared = [getattr(c, "constraint", c) for c in declared] if isinstance(declared, list) else []
        default_is_function = (
            inspect.isfunction(p.default)
            or inspect.isbuiltin(p.default)
            or inspect.ismethod(p.default)
            or isinstance(p.default, functools.partial)
            or type(p.default).__name__ == "ufunc"
        )
        takes_callable = (
            default_is_function
            or "callable" in str(p.annotation).lower()
            or any(c is callable for c in declared)
        )
        takes_names = any(c is str or type(c).__name__ == "StrOptions" for c in declared)
        out[name] = _Kind(isinstance(p.default, str), takes_callable, takes_names)
    return out


class _Checker:
    """One walk over the parameters of a whole spec, with one node budget."""

    def __init__(self) -> None:
        self.nodes = 0

    def params(self, cls: type, where: str, params: Any, depth: int) -> None:
        if not isinstance(params, Mapping):
            raise ValidationError(
                f"parameters of {where} must be an object of name: value, got {type(params).__name__}"
            )
        if len(params) > MAX_PARAMS:
            raise ValidationError(f"{where} is given {len(params)} parameters; at most {MAX_PARAMS}")
        kinds = _kinds(cls)
        for name, value in params.items():
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise ValidationError(f"{where} has an invalid parameter name {str(name)[:80]!r}")
            reason = CAPABILITY_PARAMS.get(name)
            if reason is not None and value is not None:  # null, the default everywhere, grants nothing
                raise ValidationError(f"parameter {name!r} of {where} {reason}: {_DATA_ONLY}")
            if name == "n_jobs":
                _check_n_jobs(where, value)
            self.value(value, where, name, kinds.get(name, _UNKNOWN), depth + 1)

    def value(self, value: Any, where: str, name: str, kind: _Kind, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValidationError(f"the parameters have more than {MAX_NODES} values in all")
        if depth > MAX_DEPTH:
            raise ValidationError(
                f"parameter {name!r} of {where} is nested more than {MAX_DEPTH} levels deep"
            )
        if value is None or isinstance(value, bool | int):
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValidationError(f"parameter {name!r} of {where} is {value}: numbers must be finite")
            return
        if isinstance(value, str):
            self.string(value, where, name, kind)
            return
        if isinstance(value, list):
            if len(value) > MAX_ITEMS:
                raise ValidationError(
                    f"parameter {name!r} of {where} is a list of {len(value)} items; at most {MAX_ITEMS}"
                )
            for item in value:
                self.value(item, where, name, kind, depth + 1)
            return
        if isinstance(value, Mapping) and "class" in value:
            self.nested(value, where, name, kind, depth)
            return
        if isinstance(value, Mapping):
            # An object of scalars, e.g. scikit-learn's class_weight or River's Renamer mapping.
            if len(value) > MAX_ITEMS:
                raise ValidationError(
                    f"parameter {name!r} of {where} has {len(value)} entries; at most {MAX_ITEMS}"
                )
            for key, item in value.items():
                if not isinstance(key, str) or len(key) > MAX_STRING:
                    raise ValidationError(
                        f"parameter {name!r} of {where} has a key that is not a short string"
                    )
                if isinstance(item, list | Mapping):
                    raise ValidationError(
                        f"parameter {name!r} of {where} is an object whose values are not all scalars: an "
                        'object is either {"class": ..., "params": {...}} or maps names to scalars'
                    )
                self.value(item, where, name, kind, depth + 1)
            return
        raise ValidationError(
            f"parameter {name!r} of {where} is a {type(value).__name__}: a value is a JSON scalar, a list, "
            'an object of scalars or a nested estimator {"class": ..., "params": {...}}'
        )

    def string(self, value: str, where: str, name: str, kind: _Kind) -> None:
        if len(value) > MAX_STRING:
            raise ValidationError(
                f"parameter {name!r} of {where} is a string of {len(value)} characters; at most {MAX_STRING}"
            )
        if kind.takes_callable and not kind.takes_names:
            raise ValidationError(f"parameter {name!r} of {where} takes a callable: {_DATA_ONLY}")
        if kind.string_default and not kind.takes_callable:
            return  # the parameter's own vocabulary (e.g. a regular expression for token_pattern)
        if _looks_like_path(value):
            raise ValidationError(
                f"parameter {name!r} of {where} names a file or directory ({value[:80]!r}): {_DATA_ONLY}"
            )
        if _DOTTED_NAME.fullmatch(value):
            raise ValidationError(
                f"parameter {name!r} of {where} names a module or callable ({value[:80]!r}): {_DATA_ONLY}; "
                'a nested estimator is written {"class": ..., "params": {...}}'
            )

    def nested(self, value: Mapping[str, Any], where: str, name: str, kind: _Kind, depth: int) -> None:
        if not set(value) <= {"class", "params"}:
            extra = sorted(str(k) for k in set(value) - {"class", "params"})
            raise ValidationError(
                f"parameter {name!r} of {where} is a nested estimator with unknown keys {extra}: "
                'write {"class": ..., "params": {...}}'
            )
        if kind.takes_callable:
            raise ValidationError(
                f"parameter {name!r} of {where} takes a callable, so an estimator given there would be "
                f"called: {_DATA_ONLY}"
            )
        path = _nested_path(value["class"], where, name)
        self.params(resolve_class(path), path, value.get("params") or {}, depth)


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or "\\" in value
        or "\x00" in value
        or value.startswith(("~", "."))
        or (len(value) >= 2 and value[1] == ":" and value[0].isalpha())  # C:...
    )


def _nested_path(written: Any, where: str, name: str) -> str:
    if not isinstance(written, str) or len(written) > MAX_STRING:
        raise ValidationError(f"parameter {name!r} of {where}: a nested estimator's 'class' must be a name")
    if len(parse_spec(written)) != 1:  # one dotted class name, same characters as a step
        raise ValidationError(f"parameter {name!r} of {where}: a nested estimator's 'class' is one class")
    return written if written.startswith(ALLOWED_PREFIXES) else f"river.{written}"


def _check_n_jobs(where: str, value: Any) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_N_JOBS):
        return
    raise ValidationError(
        f"parameter 'n_jobs' of {where} is {value!r}: use 1 to {MAX_N_JOBS} parallel jobs (or null); "
        "-1 (all cores) and larger values are refused on shared machines"
    )


def _checked(
    spec: str, params: Mapping[str, Mapping[str, Any]] | None
) -> list[tuple[Step, type, Mapping[str, Any]]]:
    steps = parse_spec(spec)
    params = dict(params or {})
    unknown = set(params) - {s.short for s in steps} - {s.path for s in steps}
    if unknown:
        raise ValidationError(f"parameters given for steps not in the spec: {sorted(unknown)}")
    checker = _Checker()
    out = []
    for step in steps:
        cls = resolve_class(step.path)
        step_params = params.get(step.short) or params.get(step.path) or {}
        checker.params(cls, step.path, step_params, depth=0)
        out.append((step, cls, step_params))
    return out


def check_params(spec: str, params: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Every check of `build` without constructing anything: raises ValidationError saying what to change."""
    _checked(spec, params)


# -- building ---------------------------------------------------------------------------------------------
def _materialize(value: Any) -> Any:
    """Only after the checks: nested estimators become instances, everything else is passed as is."""
    if isinstance(value, Mapping) and "class" in value:
        path = str(value["class"])
        if not path.startswith(ALLOWED_PREFIXES):
            path = f"river.{path}"
        return _instantiate(resolve_class(path), value.get("params") or {})
    if isinstance(value, list):
        return [_materialize(v) for v in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _instantiate(cls: type, params: Mapping[str, Any]) -> Any:
    kwargs = {str(k): _materialize(v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except ValidationError:
        raise
    except Exception as exc:  # constructors raise anything for bad values; none may escape as a crash
        raise ValidationError(
            f"bad parameters for {cls.__module__}.{cls.__qualname__}: {type(exc).__name__}: {exc}"
        ) from exc


def decode_params(params: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The Avro form keeps each step's parameters as a JSON string; this turns them back into dicts."""
    out = {}
    for step, text in params.items():
        if len(text) > MAX_PARAMS_TEXT:
            raise ValidationError(
                f"parameters of {step!r} are {len(text)} characters of JSON; at most {MAX_PARAMS_TEXT}"
            )
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:  # also too deep, or an integer of too many digits
            raise ValidationError(f"parameters of {step!r} are not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValidationError(f"parameters of {step!r} must be an object, got {type(value).__name__}")
        out[step] = value
    return out


def encode_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {step: json.dumps(dict(p), sort_keys=True) for step, p in params.items()}


def build(spec: str, params: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """A fresh estimator: a River pipeline (steps composed with '|') or a scikit-learn Pipeline.

    Every parameter of every step is checked before the first constructor runs."""
    checked = _checked(spec, params)
    built = [_instantiate(cls, step_params) for _step, cls, step_params in checked]
    try:
        if checked[0][0].path.startswith("sklearn."):
            if len(built) == 1:
                return built[0]
            from sklearn.pipeline import make_pipeline

            return make_pipeline(*built)
        model = built[0]
        for nxt in built[1:]:
            model = model | nxt
        return model
    except Exception as exc:  # steps that cannot be composed (e.g. a classifier before a transformer)
        raise ValidationError(
            f"the steps of {spec!r} cannot be composed: {type(exc).__name__}: {exc}"
        ) from exc


def library_of(spec: str) -> str:
    return "sklearn" if parse_spec(spec)[0].path.startswith("sklearn.") else "river"
