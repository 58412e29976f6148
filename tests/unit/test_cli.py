"""CLI behaviour that needs no broker: help, usage errors, fail-fast without a broker, and the control
commands working around bad records on control topics (topics faked as message lists)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastavro.utils import generate_one
from typer.testing import CliRunner, Result

from streamml import cli, control, pipelines
from streamml.codec import codec_for
from streamml.errors import ValidationError
from streamml.schemas import get_schema
from streamml.settings import Settings
from tests.unit.fakes import FakeMessage

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from streamml.cli import main; main()", *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


def test_help_lists_the_commands() -> None:
    out = _run("--help").stdout
    for command in ("topics", "produce", "tail"):
        assert command in out


def test_without_broker_the_cli_says_what_to_run() -> None:
    done = _run(
        "topics", "list", env={"STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:1", "STREAMML_BROKER_TIMEOUT_S": "1"}
    )
    assert done.returncode == 2
    assert "make kafka-up" in done.stderr
    assert "Traceback" not in done.stderr


def test_produce_needs_a_target() -> None:
    done = _run("produce", "synthetic:classification", "--limit", "1")
    assert done.returncode == 2
    assert "exactly one of --topic or --pipeline" in done.stderr


def test_unknown_source_is_explained() -> None:
    done = _run("produce", "nowhere:thing", "--topic", "t", env={"STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert done.returncode == 2
    assert "nowhere:thing" in done.stderr and "Traceback" not in done.stderr


# --- control commands around bad records (no broker: the topics are lists of fake messages) -----------


class FakeTopics:
    """Topics as lists of messages: the control module reads them and its publishes append to them."""

    def __init__(self) -> None:
        self.topics: dict[str, list[FakeMessage]] = {}
        self.published: list[tuple[str, bytes, bytes | None]] = []

    def add(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        msgs = self.topics.setdefault(topic, [])
        msgs.append(FakeMessage(topic, value, len(msgs), key=key))

    def read_to_end(self, _settings: Settings, topic: str) -> list[FakeMessage]:
        return list(self.topics.get(topic, []))

    def produce(self, _settings: Settings, topic: str, key: bytes, value: bytes | None) -> None:
        self.published.append((topic, key, value))
        self.add(topic, key, value)


PIPELINES, VERSIONS, PROMOTIONS = "t.pipelines", "t.model-versions", "t.promotions"
AGRAWAL = ROOT / "pipelines" / "agrawal.yaml"
runner = CliRunner()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTopics:
    topics = FakeTopics()
    monkeypatch.setattr(cli, "_settings", lambda: Settings(topic_prefix="t"))
    monkeypatch.setattr(cli, "check_broker", lambda _settings: None)
    monkeypatch.setattr(cli, "ensure_topics", lambda _settings, _specs: [])
    monkeypatch.setattr(control, "read_to_end", topics.read_to_end)
    monkeypatch.setattr(control, "_produce", topics.produce)
    return topics


@pytest.fixture(scope="module")
def agrawal() -> dict[str, Any]:
    return pipelines.to_definition(pipelines.load_file(AGRAWAL), "t.agrawal.raw").to_avro()


def definition(record: dict[str, Any]) -> bytes:
    return codec_for("PipelineDefinition").encode(record)


@pytest.fixture
def poisoned(fake: FakeTopics, agrawal: dict[str, Any]) -> FakeTopics:
    """The pipelines topic with agrawal, garbage bytes, a bad name and a key that is not text."""
    fake.add(PIPELINES, b"agrawal", definition(agrawal))
    fake.add(PIPELINES, b"garbage", b"\x00\x01 not a record")
    fake.add(PIPELINES, b"BAD NAME!/..", definition({**agrawal, "name": "BAD NAME!/.."}))
    fake.add(PIPELINES, b"\xff\xfe", b"\xc3\x01")
    return fake


def invoke(*args: str) -> Result:
    return runner.invoke(cli.app, list(args))


def test_pipeline_list_warns_per_bad_record_with_the_command_that_removes_it(poisoned: FakeTopics) -> None:
    done = invoke("pipeline", "list")
    assert done.exit_code == 0, done.output
    assert "agrawal" in done.stdout and "BAD NAME" not in done.stdout
    warnings = done.stderr.splitlines()
    assert len(warnings) == 3, done.stderr
    assert warnings[0].startswith("warning: skipped t.pipelines[0]@1 (key 'garbage'): not Avro")
    assert warnings[0].endswith("`streamml pipeline delete --key garbage` removes it")
    assert "t.pipelines[0]@2 (key 'BAD NAME!/..'): invalid pipeline name" in warnings[1]
    assert "`streamml pipeline delete --key 'BAD NAME!/..'` removes it" in warnings[1]
    assert "`streamml pipeline delete --key-hex fffe` removes it" in warnings[2]


def test_pipeline_show_and_apply_still_work(poisoned: FakeTopics) -> None:
    shown = invoke("pipeline", "show", "agrawal")
    assert shown.exit_code == 0 and '"name": "agrawal"' in shown.stdout
    bad = invoke("pipeline", "show", "BAD NAME!/..")
    assert isinstance(bad.exception, ValidationError)
    assert "has no valid record" in str(bad.exception)

    applied = invoke("pipeline", "apply", str(AGRAWAL))
    assert applied.exit_code == 0, applied.output
    assert "revision 2 applied" in applied.stdout and applied.stderr.count("warning: skipped") == 3
    [(topic, key, value)] = poisoned.published
    assert (topic, key) == (PIPELINES, b"agrawal")
    assert value is not None and codec_for("PipelineDefinition").decode(value)["revision"] == 2


def test_pipeline_delete_removes_bad_records_by_key_or_by_their_name(poisoned: FakeTopics) -> None:
    done = invoke("pipeline", "delete", "--key", "garbage")
    assert done.exit_code == 0, done.output
    assert "removed t.pipelines[0]@1" in done.stdout
    done = invoke("pipeline", "delete", "BAD NAME!/..")  # by the (invalid) name the record claims
    assert done.exit_code == 0, done.output
    done = invoke("pipeline", "delete", "--key-hex", "fffe")
    assert done.exit_code == 0, done.output
    # Tombstones: the same keys with no value, which compaction turns into "no record at all".
    assert poisoned.published == [
        (PIPELINES, b"garbage", None),
        (PIPELINES, b"BAD NAME!/..", None),
        (PIPELINES, b"\xff\xfe", None),
    ]
    listed = invoke("pipeline", "list")
    assert listed.exit_code == 0 and listed.stderr == "" and "agrawal" in listed.stdout


def test_pipeline_delete_refuses_to_tombstone_an_active_pipeline_or_a_missing_key(
    poisoned: FakeTopics,
) -> None:
    done = invoke("pipeline", "delete", "--key", "agrawal")
    assert isinstance(done.exception, ValidationError)
    assert "holds the active pipeline agrawal: `streamml pipeline delete agrawal` stops it" in str(
        done.exception
    )
    missing = invoke("pipeline", "delete", "--key", "nothing-here")
    assert isinstance(missing.exception, ValidationError) and "no record with --key nothing-here" in str(
        missing.exception
    )
    for args in ((), ("agrawal", "--key", "x"), ("--key-hex", "zz")):
        assert isinstance(invoke("pipeline", "delete", *args).exception, ValidationError), args
    assert poisoned.published == []

    # by name, an active pipeline is still marked deleted (services stop it), not tombstoned
    done = invoke("pipeline", "delete", "agrawal")
    assert done.exit_code == 0, done.output
    [(_topic, key, value)] = poisoned.published
    assert key == b"agrawal" and value is not None
    assert codec_for("PipelineDefinition").decode(value)["deleted"] is True


def model_version(v: int, model_name: str = "online") -> bytes:
    record = generate_one(get_schema("ModelVersion").parsed)
    record.update(pipeline="agrawal", model_name=model_name, version=v, metrics={}, parent_version=None)
    return codec_for("ModelVersion").encode(record)


def promotion(v: int, action: str = "PROMOTE", model_name: str = "online", actor: str = "auto") -> bytes:
    record = {
        "pipeline": "agrawal", "model_name": model_name, "action": action, "version": v,
        "previous_version": None, "actor": actor, "reason": "", "metrics": {}, "decided_at": v,
    }  # fmt: skip
    return codec_for("Promotion").encode(record)


@pytest.fixture
def models(fake: FakeTopics) -> FakeTopics:
    """Versions 1-3 of agrawal's online model, 1 and 2 promoted, and garbage on both topics."""
    for v in (1, 2, 3):
        fake.add(VERSIONS, f"agrawal/online/{v}".encode(), model_version(v))
    fake.add(VERSIONS, b"junk", b"junk")
    fake.add(PROMOTIONS, b"agrawal/online/1", promotion(1))
    fake.add(PROMOTIONS, b"junk", b"\xc3\x01 junk")
    fake.add(PROMOTIONS, b"agrawal/online/2", promotion(2))
    return fake


def published_decisions(fake: FakeTopics) -> list[dict[str, Any]]:
    return [codec_for("Promotion").decode(v) for t, _k, v in fake.published if t == PROMOTIONS and v]


def test_model_commands_work_around_bad_records(models: FakeTopics) -> None:
    listed = invoke("model", "list", "agrawal")
    assert listed.exit_code == 0, listed.output
    assert listed.stderr.count("warning: skipped") == 2
    assert "ignored here and by the services" in listed.stderr

    assert invoke("model", "promote", "agrawal", "3").exit_code == 0
    assert invoke("model", "rollback", "agrawal").exit_code == 0
    assert [(d["action"], d["version"], d["previous_version"]) for d in published_decisions(models)] == [
        ("PROMOTE", 3, 2),
        ("ROLLBACK", 2, 3),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("9",), "agrawal: no version 9 (see `streamml model list`); nothing was promoted"),
        (("1", "--model", "ghost"), "agrawal: no model 'ghost' in this pipeline: its models are online"),
        (("4", "--model", "online"), "no version 4 of model 'online'"),
    ],
)
def test_model_promote_refuses_what_does_not_exist(
    models: FakeTopics, args: tuple[str, ...], message: str
) -> None:
    done = invoke("model", "promote", "agrawal", *args)
    assert isinstance(done.exception, ValidationError) and message in str(done.exception)
    assert models.published == []


def test_a_promote_of_a_missing_version_is_not_live_and_rollback_skips_it(models: FakeTopics) -> None:
    models.add(PROMOTIONS, b"agrawal/ghost/5", promotion(5, model_name="ghost", actor="mallory"))
    listed = invoke("model", "list", "agrawal")
    assert "PROMOTE of ghost v5 by mallory names a version that does not exist: not live" in listed.stderr
    assert invoke("model", "rollback", "agrawal").exit_code == 0
    assert [(d["version"], d["previous_version"]) for d in published_decisions(models)] == [(1, 2)]
    nothing = invoke("model", "rollback", "agrawal")  # only version 1 was ever live before 2
    assert isinstance(nothing.exception, ValidationError)
    assert "no earlier live version to roll back to" in str(nothing.exception)
    assert len(models.published) == 1


def test_main_prints_a_refusal_as_one_line_and_exits_2(
    models: FakeTopics, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["streamml", "model", "promote", "agrawal", "9"])
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no version 9" in err and "Traceback" not in err
