"""Pipeline files: YAML/JSON → validated PipelineFile → PipelineDefinition record."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from streamml.codec import codec_for
from streamml.errors import ValidationError
from streamml.pipelines import load_file, online_model, to_definition
from streamml.records import PipelineDefinition

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "pipelines").glob("*.yaml"))

FULL = """
name: loans-2
description: test pipeline
raw_topic: my-raw
event_id_field: id
key_field: customer
event_time_field: ts
fields:
  amount: float
  n: int
  member: {type: bool, required: false, default: false}
  city: {type: string, required: false, default: unknown}
label: {source: topic, ttl_seconds: 120}
task: multiclass
features:
  - {op: rolling_mean, output: mean_amount, inputs: [amount], window: 50}
  - {op: ratio, output: per_n, inputs: [amount, n], on_zero: -1.5}
models:
  - name: fast
    estimator: preprocessing.StandardScaler | linear_model.LogisticRegression
    params:
      linear_model.LogisticRegression: {l2: 0.01}
  - name: batch
    kind: batch
    estimator: sklearn.ensemble.RandomForestClassifier
    params:
      sklearn.ensemble.RandomForestClassifier: {n_estimators: 10, random_state: 0}
  - name: second
    estimator: tree.HoeffdingTreeClassifier
promotion: manual
snapshot_every_events: 10
snapshot_every_seconds: 2.5
"""

MINIMAL = """
name: tiny
fields: {x: float}
task: regression
models:
  - {estimator: linear_model.LinearRegression}
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_full_file_becomes_a_definition(tmp_path: Path) -> None:
    definition = to_definition(load_file(write(tmp_path, FULL)), raw_topic="default-raw", revision=3)
    assert isinstance(definition, PipelineDefinition)
    d = definition.to_avro()
    assert (d["name"], d["revision"], d["description"], d["raw_topic"]) == (
        "loans-2",
        3,
        "test pipeline",
        "my-raw",
    )
    assert (d["event_id_field"], d["key_field"], d["event_time_field"]) == ("id", "customer", "ts")
    assert d["fields"] == [
        {"name": "amount", "type": "FLOAT", "required": True, "default": None},
        {"name": "n", "type": "INT", "required": True, "default": None},
        {"name": "member", "type": "BOOL", "required": False, "default": False},
        {"name": "city", "type": "STRING", "required": False, "default": "unknown"},
    ]
    assert d["label"] == {"source": "TOPIC", "field": None, "ttl_seconds": 120.0}
    assert d["task"] == "MULTICLASS"
    assert d["feature_steps"] == [
        {"op": "rolling_mean", "output": "mean_amount", "inputs": ["amount"], "params": {"window": "50"}},
        {"op": "ratio", "output": "per_n", "inputs": ["amount", "n"], "params": {"on_zero": "-1.5"}},
    ]
    assert d["models"] == [
        {
            "name": "fast",
            "kind": "ONLINE",
            "estimator_spec": "preprocessing.StandardScaler | linear_model.LogisticRegression",
            "params": {"linear_model.LogisticRegression": '{"l2": 0.01}'},
        },
        {
            "name": "batch",
            "kind": "BATCH",
            "estimator_spec": "sklearn.ensemble.RandomForestClassifier",
            "params": {"sklearn.ensemble.RandomForestClassifier": '{"n_estimators": 10, "random_state": 0}'},
        },
        {"name": "second", "kind": "ONLINE", "estimator_spec": "tree.HoeffdingTreeClassifier", "params": {}},
    ]
    assert (d["promotion_mode"], d["snapshot_every_events"], d["snapshot_every_seconds"]) == (
        "MANUAL",
        10,
        2.5,
    )
    assert d["deleted"] is False and d["updated_at"] > 1_700_000_000_000
    assert online_model(d)["name"] == "fast"
    codec = codec_for("PipelineDefinition")
    assert codec.decode(codec.encode(d)) == d


def test_defaults_of_a_minimal_file(tmp_path: Path) -> None:
    d = to_definition(load_file(write(tmp_path, MINIMAL)), raw_topic="raw-tiny").to_avro()
    assert d["raw_topic"] == "raw-tiny" and d["revision"] == 1
    assert (d["event_id_field"], d["key_field"], d["event_time_field"]) == ("event_id", None, None)
    assert d["label"] == {"source": "NONE", "field": None, "ttl_seconds": 3600.0}
    assert d["models"] == [
        {"name": "online", "kind": "ONLINE", "estimator_spec": "linear_model.LinearRegression", "params": {}}
    ]
    assert (d["promotion_mode"], d["snapshot_every_events"], d["snapshot_every_seconds"]) == (
        "AUTO",
        1000,
        60.0,
    )
    assert d["feature_steps"] == []


def test_json_files_are_read_too(tmp_path: Path) -> None:
    spec = {
        "name": "tiny-json",
        "fields": {"x": "float"},
        "task": "binary",
        "models": [{"estimator": "linear_model.LogisticRegression"}],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(spec))
    assert to_definition(load_file(path), raw_topic="r").name == "tiny-json"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"cannot read pipeline file"):
        load_file(tmp_path / "missing.yaml")


def test_invalid_yaml_and_json(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"not valid YAML"):
        load_file(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ValidationError, match=r"not valid JSON"):
        load_file(write(tmp_path, "{'name': 1}", name="p.json"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("name: tiny", "name: Tiny_Name"), r"lower-case letters, digits and dashes"),
        (("name: tiny", "name: -tiny"), r"lower-case letters"),
        (("fields: {x: float}", "fields: {x: decimal}"), r"fields\.x"),
        (("task: regression", "task: ranking"), r"task"),
        (("task: regression", "task: regression\ncolour: blue"), r"colour"),
        (("task: regression", "task: regression\nlabel: {source: inline}"), r"needs label\.field"),
        (("task: regression", "task: regression\nlabel: {source: inline, field: x}"),
         r"must not also be an input"),
        (("task: regression", "task: regression\nlabel: {source: topic, ttl_seconds: 0}"), r"ttl_seconds"),
        (("task: regression", "task: regression\nsnapshot_every_events: 0"), r"snapshot_every_events"),
        (("task: regression", "task: regression\npromotion: sometimes"), r"promotion"),
        (("{estimator: linear_model.LinearRegression}", "{kind: batch, estimator: sklearn.svm.SVR}"),
         r"at least one online \(River\) model"),
        (("- {estimator: linear_model.LinearRegression}",
          "- {estimator: linear_model.LinearRegression}\n  - {estimator: tree.HoeffdingTreeRegressor}"),
         r"model names must be unique"),
    ],
)  # fmt: skip
def test_invalid_files_are_rejected_with_the_problem(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    text = textwrap.dedent(MINIMAL)
    assert old in text
    with pytest.raises(ValidationError, match=message):
        load_file(write(tmp_path, text.replace(old, new)))


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ("- {estimator: sklearn.linear_model.LinearRegression}",
         r"model 'online': an online model needs a River estimator"),
        ("- {estimator: linear_model.LinearRegression}\n"
         "  - {name: b, kind: batch, estimator: tree.HoeffdingTreeRegressor}",
         r"model 'b': an? batch model needs a scikit-learn estimator, got 'tree\.HoeffdingTreeRegressor'"),
        ("- {estimator: os.system}", r"does not name a class"),
        ("- {estimator: linear_model.LinearRegression, params: {linear_model.LinearRegression: {bogus: 1}}}",
         r"bad parameters"),
        ("- {estimator: linear_model.LinearRegression, params: {tree.X: {}}}", r"steps not in the spec"),
    ],
)  # fmt: skip
def test_models_are_validated_when_the_definition_is_built(tmp_path: Path, models: str, message: str) -> None:
    text = textwrap.dedent(MINIMAL).replace("- {estimator: linear_model.LinearRegression}", models)
    spec = load_file(write(tmp_path, text))
    with pytest.raises(ValidationError, match=message):
        to_definition(spec, raw_topic="r")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_pipeline_loads_and_encodes(path: Path) -> None:
    definition = to_definition(load_file(path), raw_topic=f"raw-{path.stem}").to_avro()
    assert definition["name"] == path.stem
    assert online_model(definition)["kind"] == "ONLINE"
    codec = codec_for("PipelineDefinition")
    assert codec.decode(codec.encode(definition)) == definition


def test_billion_laughs_yaml_is_refused_at_once(tmp_path: Path) -> None:
    import time

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.process_time()
    with pytest.raises(ValidationError, match="aliases are not allowed"):
        load_file(path)
    assert time.process_time() - started < 1.0


def test_python_tags_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "tag.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValidationError, match="not valid YAML"):
        load_file(path)
