"""The Avro contracts: documented, self-contained, round-trip through the codec, agree with the records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import fastavro
import pytest
from fastavro.utils import generate_many

from streamml.codec import codec_for
from streamml.codegen import TARGET, generate
from streamml.compat import incompatibilities
from streamml.records import RECORD_TYPES
from streamml.schemas import SCHEMA_DIR, all_schemas

SCHEMA_NAMES = sorted(all_schemas())
REPO = SCHEMA_DIR.parent


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
