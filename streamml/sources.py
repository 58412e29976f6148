"""Event sources for ``streamml produce``: JSONL/CSV files, River datasets and built-in generators.

Everything here is broker-free: a source is an iterator of flat JSON-scalar dicts, ready to serialize.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import inspect
import itertools
import json
import logging
import math
import numbers
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeAlias
from urllib.parse import parse_qsl

from streamml.errors import ValidationError

__all__ = ["JsonScalar", "SourceEvent", "describe_sources", "open_source"]

logger = logging.getLogger(__name__)

JsonScalar: TypeAlias = bool | int | float | str | None

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
RIVER_PREFIX = "river:"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_KINDS = ("classification", "regression")
DRIFT_PREFIX = "drift:"
DRIFT_KINDS = ("agrawal",)

# Only these River modules may be named in a spec, so a spec can never import arbitrary code.
_RIVER_MODULES = ("river.datasets", "river.datasets.synth")

# Digits-only cells with a leading zero ("007", "01234") are identifiers, not numbers: keep them strings.
_INT_RE = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
_FLOAT_RE = re.compile(r"[+-]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)")

# The synthetic generators' concept is fixed (not drawn from the user's seed) so streams produced with
# different seeds share one ground truth: a model trained on seed 1 can be evaluated on seed 2.
_SYNTH_N_FEATURES = 10
_SYNTH_COLORS = ("red", "green", "blue", "yellow")
_SYNTH_RULE_SEED = 20_240_607


@dataclass(frozen=True)
class SourceEvent:
    """One raw event; ``line`` lets error messages and dead letters point back into the input file."""

    line: int | None
    value: dict[str, JsonScalar]


def describe_sources() -> str:
    """Help text for ``--help``; kept import-free so the CLI starts fast."""
    return (
        "SOURCE is one of:\n"
        "  PATH.jsonl | PATH.ndjson   one flat JSON object per line (blank lines skipped)\n"
        "  PATH.csv                   header row required; numbers, true/false and empty cells converted\n"
        "  river:NAME[?k=v&k=v]       a River dataset, e.g. river:Phishing, river:TrumpApproval,\n"
        "                             river:synth.Agrawal?classification_function=0&seed=42\n"
        "  synthetic:classification   built-in generator: f0..f9, color and a boolean label\n"
        "  synthetic:regression       built-in generator: f0..f9, color and a numeric label\n"
        "  drift:agrawal[?k=v&k=v]    Agrawal loans whose labelling rule changes mid-stream; parameters\n"
        "                             position=20000 width=1000 before=0 after=4 seed (functions 0-9)\n"
        "Infinite generators (synthetic:*, drift:* and most river:synth.*) need --limit."
    )


def open_source(
    spec: str,
    *,
    limit: int | None = None,
    seed: int = 42,
    label_field: str = "label",
    id_field: str = "event_id",
) -> Iterator[SourceEvent]:
    """Open the source named by ``spec`` and yield at most ``limit`` events.

    The spec, the limit and the file's existence are checked here, before the first event, so the CLI
    fails fast; errors inside the data (a bad line) surface while iterating, with their line number.
    ``seed`` drives ``synthetic:`` generators and is the default for every ``seed``/``seed_*``
    parameter of a River generator that the spec does not set, so runs are reproducible by default.
    """
    if limit is not None and limit < 0:
        raise ValidationError(f"limit must be zero or positive, got {limit}")
    if not label_field or not id_field:
        raise ValidationError("label_field and id_field must be non-empty")
    if label_field == id_field:
        raise ValidationError(f"label_field and id_field must differ (both are {label_field!r})")

    events: Iterator[SourceEvent]
    if spec.startswith(RIVER_PREFIX):
        events = _open_river(spec[len(RIVER_PREFIX) :], limit, seed, label_field, id_field)
    elif spec.startswith(SYNTHETIC_PREFIX):
        events = _open_synthetic(spec[len(SYNTHETIC_PREFIX) :], limit, seed, label_field, id_field)
    elif spec.startswith(DRIFT_PREFIX):
        events = _open_drift(spec[len(DRIFT_PREFIX) :], limit, seed, label_field, id_field)
    elif spec.lower().endswith(JSONL_SUFFIXES):
        events = _iter_jsonl(_existing_file(spec), spec)
    elif spec.lower().endswith(CSV_SUFFIXES):
        events = _iter_csv(_existing_file(spec), spec)
    else:
        raise ValidationError(f"unrecognised source {spec!r}.\n{describe_sources()}")
    logger.debug("opened source %s (limit=%s)", spec, limit)
    return events if limit is None else itertools.islice(events, limit)


# --- files -------------------------------------------------------------------------------------------


def _existing_file(spec: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise ValidationError(f"{spec}: file not found")
    if not path.is_file():
        raise ValidationError(f"{spec}: not a regular file")
    return path


def _json_type_name(value: object) -> str:
    """Name a parsed JSON value the way a user would, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN/Infinity, but they are not JSON and other consumers would choke on them.
    raise ValueError(f"{name} is not valid JSON")


def _iter_jsonl(path: Path, name: str) -> Iterator[SourceEvent]:
    try:
        # Binary mode splits on "\n" only, so line numbers match what editors show.
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                yield from _parse_jsonl_line(raw, lineno, name)
    except OSError as exc:
        raise ValidationError(f"{name}: cannot read file ({exc.strerror or exc})") from exc


def _parse_jsonl_line(raw: bytes, lineno: int, name: str) -> Iterator[SourceEvent]:
    where = f"{name} line {lineno}"
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        return
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    except ValueError as exc:
        raise ValidationError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValidationError(f"{where}: not a JSON object (got {_json_type_name(obj)})")
    for key, value in obj.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(f"{where}: field {key!r} is a number too large for a float")
        if isinstance(value, dict | list):
            raise ValidationError(
                f"{where}: field {key!r} holds a nested {'object' if isinstance(value, dict) else 'list'};"
                " only flat values (null, boolean, number, string) are allowed"
            )
    yield SourceEvent(line=lineno, value=obj)


def _convert_csv_cell(cell: str) -> JsonScalar:
    """Type a CSV cell: CSV has no types, so take the obvious reading and leave the rest as text."""
    text = cell.strip()
    if not text:
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return cell


def _iter_csv(path: Path, name: str) -> Iterator[SourceEvent]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            yield from _iter_csv_rows(handle, name)
    except OSError as exc:
        raise ValidationError(f"{name}: cannot read file ({exc.strerror or exc})") from exc


def _iter_csv_rows(handle: Iterator[str], name: str) -> Iterator[SourceEvent]:
    reader = csv.reader(handle)
    header: list[str] | None = None
    consumed = 0  # physical lines read so far; a row starts on the line after the previous row ended
    while True:
        start = consumed + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValidationError(f"{name} line {reader.line_num}: malformed CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise ValidationError(f"{name} near line {start}: not valid UTF-8 ({exc.reason})") from exc
        consumed = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if header is None:
            header = [column.strip() for column in row]
            _check_header(header, name, start)
            continue
        if len(row) != len(header):
            raise ValidationError(
                f"{name} line {start}: expected {len(header)} columns (as in the header) but got {len(row)}"
            )
        value = {column: _convert_csv_cell(cell) for column, cell in zip(header, row, strict=True)}
        yield SourceEvent(line=start, value=value)
    if header is None:
        raise ValidationError(f"{name}: empty file; a header row naming the columns is required")


def _check_header(header: list[str], name: str, lineno: int) -> None:
    if any(not column for column in header):
        raise ValidationError(f"{name} line {lineno}: header has an empty column name")
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise ValidationError(f"{name} line {lineno}: header repeats column {column!r}")
        seen.add(column)


# --- River ---------------------------------------------------------------------------------------------


def _river_catalogue() -> dict[str, type[Any]]:
    """Dataset classes a spec may name, keyed as written after ``river:``; River is imported lazily."""
    try:
        from river import datasets
        from river.datasets import base, synth
    except ImportError as exc:  # pragma: no cover - river is a declared dependency
        raise ValidationError("river: sources need the 'river' package, which is not installed") from exc
    catalogue: dict[str, type[Any]] = {}
    for prefix, module in (("", datasets), ("synth.", synth)):
        for attr in module.__all__:
            obj = getattr(module, attr, None)
            if isinstance(obj, type) and issubclass(obj, base.Dataset):
                catalogue[prefix + attr] = obj
    return catalogue


def _parse_param(text: str) -> JsonScalar:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    return text


def _parse_query(query: str, where: str) -> dict[str, JsonScalar]:
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ValidationError(f"{where}: parameters must be written key=value&key=value ({exc})") from exc
    params: dict[str, JsonScalar] = {}
    for key, text in pairs:
        if key in params:
            raise ValidationError(f"{where}: parameter {key!r} given twice")
        params[key] = _parse_param(text)
    return params


def _open_river(
    rest: str, limit: int | None, seed: int, label_field: str, id_field: str
) -> Iterator[SourceEvent]:
    from river.datasets import base

    name, _, query = rest.partition("?")
    where = f"{RIVER_PREFIX}{name}"
    catalogue = _river_catalogue()
    cls = catalogue.get(name)
    if cls is None:
        generators = sorted(n for n in catalogue if n.startswith("synth."))
        remote = sorted(n for n, c in catalogue.items() if issubclass(c, base.RemoteDataset))
        bundled = sorted(set(catalogue) - set(generators) - set(remote))
        raise ValidationError(
            f"{where}: unknown River dataset. Only classes from {' and '.join(_RIVER_MODULES)} are"
            f" allowed.\n  bundled: {', '.join(bundled)}\n  generators: {', '.join(generators)}"
            f"\n  need a download first: {', '.join(remote)}"
        )
    params = _parse_query(query, where)
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValidationError(
            f"{where}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}"
        )
    for param in accepted:
        if (param == "seed" or param.startswith("seed_")) and param not in params:
            params[param] = seed
    try:
        dataset = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{where}: invalid parameters {params} ({exc})") from exc

    if isinstance(dataset, base.RemoteDataset) and not dataset.is_downloaded:
        raise ValidationError(
            f"{where} is not bundled with River and needs a download ({dataset.size:,} bytes from"
            f" {dataset.url}). Download it once with:\n"
            f'  python -c "from river import datasets; datasets.{name}().download()"'
        )
    if isinstance(dataset, base.SyntheticDataset) and dataset.n_samples is None and limit is None:
        raise ValidationError(f"{where} is an infinite generator; give --limit to say how many events")
    return _iter_river(dataset, name, label_field, id_field)


def _iter_river(
    dataset: Any, name: str, label_field: str, id_field: str, *, where: str | None = None
) -> Iterator[SourceEvent]:
    """Yield River samples as events; ``name`` prefixes generated ids, ``where`` names the source."""
    where = where or f"{RIVER_PREFIX}{name}"
    for n, (x, y) in enumerate(dataset):
        features = _flatten(x, f"{where} sample {n}")
        value: dict[str, JsonScalar] = {} if id_field in features else {id_field: f"{name}-{n}"}
        value.update(features)
        # Multi-output targets (e.g. Yeast) become one field per output, named label.<output>.
        labels = (
            {f"{label_field}.{k}": v for k, v in _flatten(y, f"{where} sample {n} label").items()}
            if isinstance(y, Mapping)
            else {label_field: _to_json_scalar(y, f"{where} sample {n} label")}
        )
        clash = sorted(set(labels) & set(value))
        if clash:
            raise ValidationError(
                f"{where}: feature {clash[0]!r} has the same name as the label; choose another label field"
            )
        value.update(labels)
        yield SourceEvent(line=None, value=value)


def _flatten(mapping: Mapping[Any, Any], where: str) -> dict[str, JsonScalar]:
    out: dict[str, JsonScalar] = {}
    for key, raw in mapping.items():
        name = str(key)
        if name in out:
            raise ValidationError(f"{where}: two features are both named {name!r} once keys become strings")
        out[name] = _to_json_scalar(raw, f"{where} feature {name!r}")
    return out


def _to_json_scalar(value: object, where: str) -> JsonScalar:
    """Reduce numpy scalars, datetimes, decimals etc. to plain JSON values.

    NaN and infinities become None: JSON has no spelling for them, and "missing" is what they mean in
    the datasets we stream.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if type(value).__module__ == "numpy":
        item: Callable[[], object] | None = getattr(value, "item", None)
        if item is not None:
            return _to_json_scalar(item(), where)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real | decimal.Decimal):
        return _to_json_scalar(float(value), where)
    raise ValidationError(f"{where}: cannot represent a {type(value).__name__} value as a JSON scalar")


# --- built-in generators -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LinearRule:
    weights: tuple[float, ...]
    color_effect: Mapping[str, float]

    @classmethod
    def fixed(cls) -> _LinearRule:
        rng = random.Random(_SYNTH_RULE_SEED)
        weights = tuple(rng.uniform(-1.0, 1.0) for _ in range(_SYNTH_N_FEATURES))
        return cls(weights, {color: rng.uniform(-1.0, 1.0) for color in _SYNTH_COLORS})


def _open_synthetic(
    rest: str, limit: int | None, seed: int, label_field: str, id_field: str
) -> Iterator[SourceEvent]:
    where = f"{SYNTHETIC_PREFIX}{rest}"
    if rest not in SYNTHETIC_KINDS:
        raise ValidationError(f"{where}: unknown generator; available: {', '.join(SYNTHETIC_KINDS)}")
    features = {f"f{i}" for i in range(_SYNTH_N_FEATURES)} | {"color"}
    for field in (label_field, id_field):
        if field in features:
            raise ValidationError(f"{where}: {field!r} is a feature name of this generator; choose another")
    if limit is None:
        raise ValidationError(f"{where} is an infinite generator; give --limit to say how many events")
    return _iter_synthetic(rest, seed, label_field, id_field)


def _iter_synthetic(kind: str, seed: int, label_field: str, id_field: str) -> Iterator[SourceEvent]:
    rule = _LinearRule.fixed()
    rng = random.Random(seed)
    for n in itertools.count():
        xs = [rng.gauss(0.0, 1.0) for _ in range(_SYNTH_N_FEATURES)]
        color = rng.choice(_SYNTH_COLORS)
        score = sum(w * x for w, x in zip(rule.weights, xs, strict=True)) + rule.color_effect[color]
        value: dict[str, JsonScalar] = {id_field: f"synthetic-{kind}-{n}"}
        value.update({f"f{i}": x for i, x in enumerate(xs)})
        value["color"] = color
        if kind == "classification":
            # A little noise so the classes overlap, as real data does; the rule stays learnable.
            value[label_field] = score + rng.gauss(0.0, 0.3) > 0.0
        else:
            value[label_field] = 10.0 * score + rng.gauss(0.0, 1.0)
        yield SourceEvent(line=None, value=value)


# --- concept drift ---------------------------------------------------------------------------------------

# River's ConceptDriftStream computes exp(-4 * (t - position) / width) from t = 1, and math.exp overflows
# above ~709.78: reject such parameters up front rather than crash on the first event.
_MAX_DRIFT_EXPONENT = 709
_AGRAWAL_FUNCTIONS = range(10)
_DRIFT_DEFAULTS: dict[str, int] = {"position": 20_000, "width": 1_000, "before": 0, "after": 4}
_AGRAWAL_FEATURES = frozenset(
    ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan")
)


def _int_param(params: Mapping[str, JsonScalar], key: str, where: str, minimum: int | None) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{where}: {key} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValidationError(f"{where}: {key} must be at least {minimum}, got {value}")
    return value


def _open_drift(
    rest: str, limit: int | None, seed: int, label_field: str, id_field: str
) -> Iterator[SourceEvent]:
    """Agrawal loans whose labelling function switches from ``before`` to ``after`` around ``position``.

    The switch is River's sigmoid blend: event t comes from the new concept with probability
    1 / (1 + exp(-4 (t - position) / width)), so ``width`` events around ``position`` are mixed.
    """
    kind, _, query = rest.partition("?")
    where = f"{DRIFT_PREFIX}{kind}"
    if kind not in DRIFT_KINDS:
        raise ValidationError(f"{where}: unknown drift stream; available: {', '.join(DRIFT_KINDS)}")
    given = _parse_query(query, where)
    accepted = [*_DRIFT_DEFAULTS, "seed"]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValidationError(
            f"{where}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    params: dict[str, JsonScalar] = {**_DRIFT_DEFAULTS, "seed": seed, **given}
    position = _int_param(params, "position", where, 0)
    width = _int_param(params, "width", where, 1)
    before = _int_param(params, "before", where, 0)
    after = _int_param(params, "after", where, 0)
    drift_seed = _int_param(params, "seed", where, None)
    for key, function in (("before", before), ("after", after)):
        if function not in _AGRAWAL_FUNCTIONS:
            raise ValidationError(
                f"{where}: {key}={function} is not an Agrawal classification function (0-9)"
            )
    if before == after:
        raise ValidationError(
            f"{where}: before and after are both {before}, so nothing would drift; use river:synth.Agrawal"
        )
    if 4 * position / width > _MAX_DRIFT_EXPONENT:
        min_width = math.ceil(4 * position / _MAX_DRIFT_EXPONENT)
        raise ValidationError(
            f"{where}: width={width} is too narrow for position={position}: River's drift sigmoid"
            f" overflows when 4*position/width > {_MAX_DRIFT_EXPONENT}; use width>={min_width}"
            " (or an earlier position)"
        )
    if limit is None:
        raise ValidationError(f"{where} is an infinite generator; give --limit to say how many events")
    for field in (label_field, id_field):
        if field in _AGRAWAL_FEATURES:
            raise ValidationError(f"{where}: {field!r} is a feature name of this generator; choose another")

    from river.datasets import synth

    dataset = synth.ConceptDriftStream(
        stream=synth.Agrawal(classification_function=before, seed=drift_seed),
        # A different seed, so the new concept is applied to fresh applicants, not a replay of the old ones.
        drift_stream=synth.Agrawal(classification_function=after, seed=drift_seed + 1),
        position=position,
        width=width,
        seed=drift_seed,
    )
    return _iter_river(dataset, f"{kind}-drift", label_field, id_field, where=where)
