"""Union branches named up front, so fastavro writes a record without searching for them.

fastavro writes a value of a union by trying the branches in order until one validates it: for a nested
record that means validating the whole record first, for `map<union>` every value. That search was about
a third of the cost of writing a Prediction (16 µs) or a FeatureVector (20 µs). fastavro also takes a value
as a `(branch name, value)` tuple and then writes that branch directly; `hinter(schema)` compiles, once
per schema, a function that wraps each union value whose Python type names exactly one branch. A value
whose type names no branch, or more than one (an int where the union has both `int` and `long`, a dict
where it has a record and a map), is left as it is and fastavro searches as before: the bytes written are
the same either way, and a record that does not fit is refused either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Record = dict[str, Any]
Hinter = Callable[[Record], Record]

# Avro type -> the Python type whose values fastavro writes as that branch (matched by exact type: a bool
# never names an int branch)
_PYTHON = {
    "boolean": bool, "int": int, "long": int, "float": float, "double": float, "string": str, "bytes": bytes,
}  # fmt: skip


def _type_name(branch: Any) -> str:
    """The name fastavro matches a tuple's first element against: a named type's full name, otherwise
    the type (`{"type": "long", "logicalType": ...}` is `long`)."""
    if isinstance(branch, str):
        return branch
    kind = branch.get("type")
    if kind in ("record", "enum", "fixed", "error"):
        return str(branch["name"])
    return str(kind)


def branch_hints(branches: list[Any]) -> dict[type, tuple[str, Any]]:
    """Python type -> (branch name, branch schema) for the types that name exactly one branch."""
    found: dict[type, list[tuple[str, Any]]] = {}
    for branch in branches:
        kind = branch if isinstance(branch, str) else branch.get("type")
        if kind == "null":
            continue
        if kind in ("record", "error", "map"):
            python: type | None = dict
        elif kind in ("enum",):
            python = str  # a symbol is a str too: makes str ambiguous with a string branch
        elif kind == "array":
            python = list
        elif kind == "fixed":
            python = bytes
        else:
            python = _PYTHON.get(str(kind))
        if python is not None:
            found.setdefault(python, []).append((_type_name(branch), branch))
    return {python: only[0] for python, only in found.items() if len(only) == 1}


def _scalar_names(schema: Any) -> dict[type, str] | None:
    """Python type -> branch name for a union whose hinted branches are all scalars (nothing to hint
    inside them), else None."""
    if not isinstance(schema, list):
        return None
    hints = branch_hints(schema)
    if any(python in (dict, list) for python in hints):
        return None
    return {python: name for python, (name, _) in hints.items()}


def _value_hinter(schema: Any) -> Callable[[Any], Any] | None:
    """A function that hints one value of `schema`, or None when nothing in it is a union."""
    if isinstance(schema, list):
        hints = branch_hints(schema)
        if not hints:
            return None
        inner = {python: _value_hinter(branch) for python, (_, branch) in hints.items()}
        named = {python: name for python, (name, _) in hints.items()}

        def union(value: Any) -> Any:
            name = named.get(type(value))
            if name is None:
                return value
            nested = inner[type(value)]
            return (name, value if nested is None else nested(value))

        return union
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind in ("record", "error"):
        return _record_hinter(schema)
    if kind == "map":
        values = _value_hinter(schema["values"])
        if values is None:
            return None
        scalar = _scalar_names(schema["values"])
        if scalar is not None:  # the hot case (a feature map): no call per value

            def scalar_map(value: Any) -> Any:
                if type(value) is not dict:
                    return value
                return {k: (n, v) if (n := scalar.get(type(v))) is not None else v for k, v in value.items()}

            return scalar_map

        def map_(value: Any) -> Any:
            if type(value) is not dict:
                return value
            return {k: values(v) for k, v in value.items()}

        return map_
    return None  # arrays of unions are left to fastavro (none of our contracts has one)


def _record_hinter(schema: dict[str, Any]) -> Hinter | None:
    scalars: list[tuple[str, dict[type, str]]] = []  # fields that are unions of scalars: no call per field
    others: list[tuple[str, Callable[[Any], Any]]] = []
    for f in schema["fields"]:
        names = _scalar_names(f["type"])
        if names:
            scalars.append((f["name"], names))
        elif names is None and (h := _value_hinter(f["type"])) is not None:
            others.append((f["name"], h))
    if not scalars and not others:
        return None

    def record(value: Record) -> Record:
        if type(value) is not dict:
            return value
        out = dict(value)  # the caller's record is never changed
        for name, names in scalars:
            v = value.get(name)
            if v is not None and (n := names.get(type(v))) is not None:
                out[name] = (n, v)
        for name, hint in others:
            v = value.get(name)
            if v is not None:
                out[name] = hint(v)
        return out

    return record


def hinter(parsed: dict[str, Any]) -> Hinter | None:
    """For a parsed record schema: the function that names the union branches of its records, or None
    when the schema has no union to name."""
    return _record_hinter(parsed)
