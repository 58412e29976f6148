"""Schema evolution check: can readers of the new schema read old data, and readers of the old read new?"""

from __future__ import annotations

import io
from typing import Any

import fastavro
from fastavro.utils import generate_many


def _roundtrip(writer: Any, reader: Any, records: list[Any]) -> None:
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        fastavro.schemaless_reader(buf, writer, reader)


def incompatibilities(old: dict[str, Any], new: dict[str, Any], samples: int = 50) -> list[str]:
    """Why `new` is not backward and forward compatible with `old` (empty list = compatible).

    Backward: data written with `old` is readable with `new`. Forward: data written with `new` is readable
    with `old`. Checked by resolving generated sample records through fastavro's schema resolution.
    """
    old_p = fastavro.parse_schema(old, named_schemas={})
    new_p = fastavro.parse_schema(new, named_schemas={})
    problems = []
    for direction, writer, reader in (("backward", old_p, new_p), ("forward", new_p, old_p)):
        try:
            _roundtrip(writer, reader, list(generate_many(writer, samples)))
        except Exception as exc:  # fastavro raises SchemaResolutionError and friends
            problems.append(f"{direction}: {type(exc).__name__}: {exc}")
    return problems
