"""The foundation against the real broker: topic catalogue, contracts on the wire, CLI produce → tail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from fastavro.utils import generate_many

from streamml.codec import codec_for, decode_raw
from streamml.errors import DecodeError, TopicMismatchError
from streamml.kafka import ensure_topics, make_producer
from streamml.schemas import all_schemas
from streamml.settings import Settings
from streamml.topics import Catalogue, TopicSpec


@pytest.fixture
def isolated(kafka_bootstrap: str) -> Settings:
    """Settings whose topic prefix is unique to this test, so every catalogue topic is fresh."""
    return Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")


def _consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Message]:
    """Read `expected` records with a plain confluent-kafka consumer (no StreamML code)."""
    conf = {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"}
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out.append(msg)
    finally:
        consumer.close()
    return out


def test_topics_create_is_idempotent_and_verifies(isolated: Settings) -> None:
    cat = Catalogue(isolated)
    specs = cat.global_topics() + cat.pipeline_topics("demo")
    first = ensure_topics(isolated, specs)
    assert all(st.created for st in first)
    second = ensure_topics(isolated, specs)
    assert not any(st.created for st in second)
    admin = AdminClient({"bootstrap.servers": isolated.bootstrap_servers})
    md = admin.list_topics(timeout=10).topics
    assert len(md[cat.features("demo").name].partitions) == isolated.default_partitions
    assert len(md[cat.model_versions().name].partitions) == 1


def test_mismatching_existing_topic_is_a_clear_error(isolated: Settings) -> None:
    cat = Catalogue(isolated)
    spec = cat.model_versions()  # declared compacted with 1 partition
    admin = AdminClient({"bootstrap.servers": isolated.bootstrap_servers})
    futures = admin.create_topics([NewTopic(spec.name, num_partitions=2, replication_factor=1)])
    futures[spec.name].result()
    with pytest.raises(TopicMismatchError) as info:
        ensure_topics(isolated, [spec])
    message = str(info.value)
    assert "2 partitions, declared 1" in message
    assert "cleanup.policy=delete, declared compact" in message


@pytest.mark.parametrize("name", sorted(all_schemas()))
def test_every_schema_roundtrips_through_the_broker(isolated: Settings, name: str) -> None:
    topic = f"{isolated.topic_prefix}.roundtrip.{name}"
    # brokers never create topics on their own (auto.create.topics.enable=false)
    ensure_topics(isolated, [TopicSpec(topic, "roundtrip", name, "avro", "", "schema round trip", 1, 1)])
    codec = codec_for(name)
    records = list(generate_many(all_schemas()[name].parsed, 25))
    producer = make_producer(isolated)
    for i, record in enumerate(records):
        producer.produce(topic, codec.encode(record), key=str(i).encode())
    assert producer.flush(30) == 0
    got = _consume_all(isolated.bootstrap_servers, topic, len(records))
    assert [codec.decode(m.value()) for m in sorted(got, key=lambda m: int(m.key()))] == records


def test_json_raw_event_from_a_plain_producer_is_read_and_validated(isolated: Settings) -> None:
    topic = Catalogue(isolated).raw("plain").name
    ensure_topics(isolated, [Catalogue(isolated).raw("plain")])
    plain = Producer({"bootstrap.servers": isolated.bootstrap_servers})  # any client, no StreamML code
    plain.produce(topic, json.dumps({"event_id": "e1", "amount": 12.5, "country": "PT", "fraud": False}))
    plain.produce(topic, b'{"event_id": "e2", "nested": {"x": 1}}')
    plain.flush(10)
    consumer = Consumer(
        {
            "bootstrap.servers": isolated.bootstrap_servers,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    msgs = []
    import time

    deadline = time.monotonic() + 30
    while len(msgs) < 2 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            msgs.append(msg)
    consumer.close()
    by_id = {json.loads(m.value())["event_id"]: m for m in msgs}
    assert decode_raw(by_id["e1"].value())["fields"] == {
        "event_id": "e1", "amount": 12.5, "country": "PT", "fraud": False,
    }  # fmt: skip
    with pytest.raises(DecodeError, match="field 'nested' is an object"):
        decode_raw(by_id["e2"].value())


def _cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STREAMML_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "STREAMML_TOPIC_PREFIX": settings.topic_prefix,
    }
    cmd = [sys.executable, "-c", "from streamml.cli import main; main()", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_cli_produce_then_tail_roundtrip(isolated: Settings, tmp_path: Path) -> None:
    _cli(isolated, "topics", "create", "--pipeline", "cli")
    listing = _cli(isolated, "topics", "list", "--pipeline", "cli").stdout
    assert f"{isolated.topic_prefix}.cli.predictions" in listing
    data = tmp_path / "events.jsonl"
    rows = [{"event_id": f"e{i}", "x": i * 0.5, "label": i % 2 == 0} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    produced = _cli(isolated, "produce", str(data), "--pipeline", "cli", "--rate", "400", "--no-progress")
    assert "produced 40 events" in produced.stderr
    topic = f"{isolated.topic_prefix}.cli.raw"
    out = _cli(isolated, "tail", topic, "--json").stdout.splitlines()
    values = sorted((json.loads(line)["value"] for line in out), key=lambda v: int(v["event_id"][1:]))
    assert values == rows

    # Avro raw events decode too, and tail names the record type
    _cli(isolated, "produce", "river:Phishing", "--pipeline", "cli", "--format", "avro", "--limit", "5",
         "--no-progress")  # fmt: skip
    out = [json.loads(line) for line in _cli(isolated, "tail", topic, "--json").stdout.splitlines()]
    assert len(out) == 45
    assert sum(1 for o in out if o["type"] == "RawEvent") == 5


def test_cli_produce_reports_the_bad_line_and_keeps_what_came_before(
    isolated: Settings, tmp_path: Path
) -> None:
    _cli(isolated, "topics", "create", "--pipeline", "bad")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"event_id": "a"}\n{"event_id": "b"}\n{oops\n{"event_id": "d"}\n')
    done = _cli(isolated, "produce", str(data), "--pipeline", "bad", "--no-progress", check=False)
    assert done.returncode == 2
    assert "line 3" in done.stderr and "2 events before it were produced" in done.stderr
    out = _cli(isolated, "tail", f"{isolated.topic_prefix}.bad.raw", "--json").stdout.splitlines()
    assert sorted(json.loads(line)["value"]["event_id"] for line in out) == ["a", "b"]


def test_training_requests_grow_to_the_declared_partitions_on_upgrade(isolated: Settings) -> None:
    """A deployment from before partitioned training requests (1 partition) starts after an upgrade:
    partitions are added to that topic (its readers re-route by key); other topics must still match."""
    cat = Catalogue(isolated)
    admin = AdminClient({"bootstrap.servers": isolated.bootstrap_servers})
    old = TopicSpec(**{**cat.training_requests().__dict__, "partitions": 1})
    ensure_topics(isolated, [old])
    ensure_topics(isolated, [cat.training_requests()])
    md = admin.list_topics(timeout=10).topics
    assert len(md[cat.training_requests().name].partitions) == isolated.default_partitions
    shrunk = TopicSpec(**{**cat.features("demo").__dict__, "partitions": 1})
    ensure_topics(isolated, [shrunk])
    with pytest.raises(TopicMismatchError, match="partitions"):
        ensure_topics(isolated, [cat.features("demo")])
