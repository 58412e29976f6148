"""Poisoned control topics on the real broker: the CLI reads around bad records, and repairs them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner, Result

from streamml import cli, pipelines
from streamml.codec import codec_for
from streamml.errors import ValidationError
from streamml.kafka import ensure_topics, make_admin
from streamml.runtime import read_to_end
from streamml.settings import Settings, get_settings
from streamml.topics import Catalogue

AGRAWAL = Path(__file__).resolve().parents[2] / "pipelines" / "agrawal.yaml"
BAD_NAME = "BAD NAME!/.."


@pytest.fixture
def isolated(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings with a topic prefix of this test only, also given to the CLI through STREAMML_ variables."""
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("STREAMML_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    monkeypatch.setenv("STREAMML_TOPIC_PREFIX", settings.topic_prefix)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args))


def warnings(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]


def test_bad_pipeline_records_are_read_around_and_removed_by_key(isolated: Settings) -> None:
    catalogue = Catalogue(isolated)
    ensure_topics(isolated, catalogue.global_topics())
    topic = catalogue.pipelines().name
    bad = pipelines.to_definition(pipelines.load_file(AGRAWAL), "elsewhere.raw").to_avro()
    producer = Producer({"bootstrap.servers": isolated.bootstrap_servers})  # anyone who may write the topic
    producer.produce(topic, b"\x00\xde\xad\xbe\xef garbage", b"garbage")
    producer.produce(
        topic, codec_for("PipelineDefinition").encode({**bad, "name": BAD_NAME}), BAD_NAME.encode()
    )
    assert producer.flush(30) == 0

    applied = invoke("pipeline", "apply", str(AGRAWAL))
    assert applied.exit_code == 0, applied.output
    assert "pipeline agrawal revision 1 applied" in applied.stdout
    assert len(warnings(applied)) == 2

    listed = invoke("pipeline", "list")
    assert listed.exit_code == 0, listed.output
    assert "agrawal" in listed.stdout and BAD_NAME not in listed.stdout
    assert [w.split(" (")[0] for w in warnings(listed)] == [
        f"warning: skipped {topic}[0]@0",
        f"warning: skipped {topic}[0]@1",
    ]
    assert f"`streamml pipeline delete --key '{BAD_NAME}'` removes it" in warnings(listed)[1]

    removed = invoke("pipeline", "delete", "--key", BAD_NAME)
    assert removed.exit_code == 0, removed.output
    assert [m.value() for m in read_to_end(isolated, topic) if m.key() == BAD_NAME.encode()][-1] is None
    assert len(warnings(invoke("pipeline", "list"))) == 1
    assert invoke("pipeline", "delete", "--key", "garbage").exit_code == 0
    listed = invoke("pipeline", "list")
    assert listed.exit_code == 0 and warnings(listed) == [] and "agrawal" in listed.stdout

    # A version that does not exist is refused, and nothing reaches the promotions topic.
    refused = invoke("model", "promote", "agrawal", "1")
    assert isinstance(refused.exception, ValidationError)
    assert "no version 1" in str(refused.exception) and "nothing was promoted" in str(refused.exception)
    assert read_to_end(isolated, catalogue.promotions().name) == []

    # Nothing here created a topic beyond the catalogue's (the bad name made none, neither did reading).
    existing = {
        t for t in make_admin(isolated).list_topics(timeout=10).topics if t.startswith(isolated.topic_prefix)
    }
    declared = {s.name for s in catalogue.global_topics() + catalogue.pipeline_topics("agrawal")}
    assert existing == declared
