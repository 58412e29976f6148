"""The Avro contracts: documented, self-contained, round-trip through the codec, agree with the records; their
earlier versions are kept in schemas/history/ and resolve to the current shape."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.utils import generate_many

from streamml.codec import codec_for
from streamml.codegen import TARGET, generate
from streamml.compat import incompatibilities
from streamml.records import RECORD_TYPES
from streamml.schemas import HISTORY, SCHEMA_DIR, all_schemas, schema_history

SCHEMA_NAMES = sorted(all_schemas())
REPO = SCHEMA_DIR.parent
HISTORY_DIR = SCHEMA_DIR / HISTORY
HISTORY_FILES = sorted(p.name for p in HISTORY_DIR.glob("*.avsc"))


def _walk_records(node: object):  # every record type declared in a schema, nested ones too
    if isinstance(node, dict):
        if node.get("type") == "record":
            yield node
        for value in node.values():
            yield from _walk_records(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_records(value)


def test_expected_record_types_exist() -> None:
    expected = {
        "RawEvent", "FeatureVector", "Label", "Prediction", "ModelVersion", "Promotion",
        "TrainingRequest", "DriftAlert", "DeadLetter", "PipelineDefinition",
    }  # fmt: skip
    assert expected <= set(SCHEMA_NAMES)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_record_and_field_is_documented(name: str) -> None:
    for record in _walk_records(all_schemas()[name].raw):
        assert record.get("doc"), f"{name}: record {record['name']} has no doc"
        for field in record["fields"]:
            assert field.get("doc"), f"{name}: field {record['name']}.{field['name']} has no doc"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_each_schema_file_parses_alone(name: str) -> None:
    """Consumers in other languages load one .avsc with a standard Avro library: no cross-file refs."""
    raw = json.loads(all_schemas()[name].path.read_text())
    fastavro.parse_schema(raw, named_schemas={})


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_random_records_roundtrip_through_codec_and_pydantic(name: str) -> None:
    codec = codec_for(name)
    model = RECORD_TYPES[name]
    for record in generate_many(all_schemas()[name].parsed, 20):
        data = codec.encode(record)
        assert data[:2] == b"\xc3\x01"
        decoded = codec.decode(data)
        assert decoded == record
        # the generated pydantic model accepts every record the schema accepts, and dumps it unchanged
        assert model.model_validate(decoded).to_avro() == decoded


def test_generated_records_module_is_up_to_date() -> None:
    assert TARGET.read_text() == generate(), "schemas changed: run `make codegen` and commit records.py"


def test_compat_checker_accepts_added_defaulted_field_and_rejects_breaking_changes() -> None:
    old = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"}]}
    added_default = {**old, "fields": [*old["fields"], {"name": "b", "type": "string", "default": ""}]}
    added_required = {**old, "fields": [*old["fields"], {"name": "b", "type": "string"}]}
    retyped = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "string"}]}
    assert incompatibilities(old, added_default) == []
    assert any(p.startswith("backward") for p in incompatibilities(old, added_required))
    assert len(incompatibilities(old, retyped)) == 2


def _previous_version(path: Path) -> str | None:
    """The schema as of the last commit before its current content (None if it has no history)."""
    rel = path.relative_to(REPO).as_posix()

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)

    if git("rev-parse", "--git-dir").returncode != 0:
        return None
    head = git("show", f"HEAD:{rel}")
    if head.returncode == 0 and head.stdout != path.read_text():
        return head.stdout  # uncommitted change: compare with the committed version
    commits = git("log", "--format=%H", "-n", "2", "--", rel).stdout.split()
    if len(commits) < 2:
        return None
    return git("show", f"{commits[1]}:{rel}").stdout


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_compatible_with_its_previous_committed_version(name: str) -> None:
    path = all_schemas()[name].path
    previous = _previous_version(path)
    if previous is None:
        pytest.skip(f"{path.name} has no earlier committed version in this clone")
    problems = incompatibilities(json.loads(previous), json.loads(path.read_text()))
    assert not problems, f"{path.name} is not backward/forward compatible: {problems}"


def test_current_schemas_and_records_ignore_the_history_folder() -> None:
    """Only the top-level files are contracts (codegen and every test iterate them, not history/)."""
    assert HISTORY_FILES, "schemas/history/ is empty"
    assert {s.path.parent for s in all_schemas().values()} == {SCHEMA_DIR}
    assert set(RECORD_TYPES) >= set(SCHEMA_NAMES)
    assert len(SCHEMA_NAMES) == len(list(SCHEMA_DIR.glob("*.avsc")))


@pytest.mark.parametrize("file", HISTORY_FILES)
def test_history_file_is_an_earlier_version_of_a_current_schema(file: str) -> None:
    path = HISTORY_DIR / file
    raw = json.loads(path.read_text())
    fastavro.parse_schema(raw, named_schemas={})  # parses alone, like the current files
    assert raw["name"] in SCHEMA_NAMES, f"{file}: record {raw['name']} has no current schema"
    current = all_schemas()[raw["name"]]
    (earlier,) = [s for s in schema_history().values() if s.path == path]
    # the name carries the fingerprint: a history file is never edited (its records would stop decoding)
    assert file == f"{current.path.stem}-{earlier.fingerprint.hex()}.avsc", f"{file} was renamed or edited"
    assert earlier.fingerprint != current.fingerprint
    problems = [p for p in incompatibilities(raw, current.raw) if p.startswith("backward")]
    assert not problems, f"records written with {file} cannot be read as {current.path.name}: {problems}"


@pytest.mark.parametrize("file", HISTORY_FILES)
def test_records_of_an_earlier_version_decode_to_the_current_shape(file: str) -> None:
    (earlier,) = [s for s in schema_history().values() if s.path.name == file]
    codec = codec_for(earlier.name)
    for record in generate_many(earlier.parsed, 20):
        body = io.BytesIO()
        fastavro.schemaless_writer(body, earlier.parsed, record)
        decoded = codec.decode(b"\xc3\x01" + earlier.fingerprint + body.getvalue())
        assert RECORD_TYPES[earlier.name].model_validate(decoded).to_avro() == decoded
        assert codec.decode(codec.encode(decoded)) == decoded


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_previous_committed_version_is_kept_in_history(name: str) -> None:
    """Records written with the version before a change stay on the topics: its schema must stay readable."""
    path = all_schemas()[name].path
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    previous = _previous_version(path)
    if previous is None:
        pytest.skip(f"{path.name} has no earlier committed version in this clone")
    previous_fp = fingerprint(
        to_parsing_canonical_form(fastavro.parse_schema(json.loads(previous), named_schemas={})),
        "CRC-64-AVRO",
    )
    known = {all_schemas()[name].fingerprint.hex()} | {fp.hex() for fp in schema_history()}
    assert previous_fp in known, (
        f"the committed version {previous_fp} of {path.name} is not in schemas/{HISTORY}/: run "
        f"`python -m streamml.schemas history` and commit the file it adds with the schema change"
    )
