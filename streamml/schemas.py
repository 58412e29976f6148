"""The single loader of the Avro contracts in `schemas/`: one `.avsc` file per record type.

`schemas/history/` keeps every earlier committed version of each contract, so records written before a
(compatible) schema change still decode. Before committing a schema change, run
`python -m streamml.schemas history`: it copies each committed version that is not the current one there.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from streamml.errors import SchemaError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
# Subfolder of the schema folder holding earlier versions, as <file stem>-<fingerprint hex>.avsc.
HISTORY = "history"
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


def strip_logical_types(node: Any) -> Any:
    """Drop logicalType annotations so timestamps decode as int milliseconds.

    Why: fastavro turns timestamp-millis into datetime objects, which is slower on hot paths and not what the
    services compute with. The canonical form (and so the fingerprint) ignores logicalType, so readers in
    other languages still see the annotated schema.
    """
    if isinstance(node, dict):
        return {k: strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [strip_logical_types(v) for v in node]
    return node


def _load(path: Path, text: str | None = None) -> AvroSchema:
    """Parse the schema file at `path`, or `text` (a version of it from git) if given."""
    try:
        raw = json.loads(path.read_text() if text is None else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaError(f"cannot read Avro schema {path}: {exc}") from exc
    try:
        parsed = fastavro.parse_schema(strip_logical_types(copy.deepcopy(raw)), named_schemas={})
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
def schema_history(schema_dir: Path = SCHEMA_DIR) -> dict[bytes, AvroSchema]:
    """Earlier versions of the contracts by fingerprint: writer schemas of records still on the topics.

    Why a folder of files rather than a registry: the services stay free of another server, and a reader
    in another language can resolve an old record with the same `.avsc` files.
    """
    current = all_schemas(schema_dir)
    earlier: dict[bytes, AvroSchema] = {}
    for path in sorted((schema_dir / HISTORY).glob("*.avsc")):
        schema = _load(path)
        if schema.name not in current:
            raise SchemaError(
                f"{path} holds an earlier version of {schema.name}, which has no schema in {schema_dir} "
                "any more: delete the file or restore the schema"
            )
        if schema.fingerprint != current[schema.name].fingerprint:
            earlier[schema.fingerprint] = schema
    return earlier


@cache
def schema_by_fingerprint() -> dict[bytes, AvroSchema]:
    """Every writer schema a record may carry, earlier versions included; `.name` is its record type."""
    return {**schema_history(), **{s.fingerprint: s for s in all_schemas().values()}}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise SchemaError(f"cannot run git (needed to read committed schema versions): {exc}") from exc


def committed_versions(path: Path) -> list[str]:
    """The text of every committed version of a schema file (newest first), following renames.

    Walks the history of HEAD, so on a branch it also finds versions that have not reached main yet (harmless:
    one more known writer).
    """
    top = _git(path.parent, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise SchemaError(f"{path.parent} is not in a git checkout: {top.stderr.strip()}")
    repo = Path(top.stdout.strip()).resolve()
    rel = path.resolve().relative_to(repo).as_posix()
    log = _git(repo, "log", "--follow", "--format=commit %H", "--name-only", "HEAD", "--", rel)
    if log.returncode != 0:  # e.g. a repository without commits yet
        return []
    versions: list[str] = []
    commit = ""
    for line in log.stdout.splitlines():
        if line.startswith("commit "):
            commit = line.removeprefix("commit ")
        elif line and commit:
            shown = _git(repo, "show", f"{commit}:{line}")
            if shown.returncode == 0:  # not a deletion
                versions.append(shown.stdout)
            commit = ""
    return versions


def archive_history(schema_dir: Path = SCHEMA_DIR) -> list[Path]:
    """Copy every committed version of each schema that is neither current nor archived to `history/`.

    Versions are told apart by fingerprint (canonical form), so edits to docs or formatting add nothing. A
    committed version that does not parse is skipped: no service could have written records with it.
    Returns the files written.
    """
    current = {s.fingerprint for s in all_schemas(schema_dir).values()}
    history_dir = schema_dir / HISTORY
    known = {_load(p).fingerprint for p in history_dir.glob("*.avsc")} | current
    written: list[Path] = []
    for path in sorted(schema_dir.glob("*.avsc")):
        for text in committed_versions(path):
            try:
                fp = _load(path, text).fingerprint
            except SchemaError:
                continue
            if fp not in known:
                target = history_dir / f"{path.stem}-{fp.hex()}.avsc"
                history_dir.mkdir(exist_ok=True)
                target.write_text(text)
                known.add(fp)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamml.schemas", description="Avro schema tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "history",
        help=f"copy every committed version of each schema that is not current to schemas/{HISTORY}/ "
        "(run before committing a schema change, then commit the new files with it)",
    )
    parser.parse_args(argv)
    try:
        written = archive_history()
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"added {path.relative_to(SCHEMA_DIR.parent)}")
    if not written:
        print(f"schemas/{HISTORY}/ already holds every earlier committed version")
    return 0


if __name__ == "__main__":
    sys.exit(main())
