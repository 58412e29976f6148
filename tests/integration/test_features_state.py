"""Per-key rolling features on a real broker while partitions move between two features data loops.

Raw events are produced without keys, round-robin over the raw partitions (as a user would). Every rolling
value must equal a single-process reference that applies the events of each key in the order of their
repartition partition: that is the order guaranteed per key (a key's events from several raw partitions
interleave as the hop read them; events of one key from one raw partition keep their raw order).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Message, Producer, TopicPartition

from services.features.app import Features
from streamml.codec import codec_for, decode_raw
from streamml.kafka import make_consumer
from streamml.pipelines import load_file, to_definition
from streamml.runtime import BatchLoop, Output, read_to_end
from streamml.service import dead_letter
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.features import FeatureEngine

PIPELINE = "roll"
PARTITIONS = 4
KEYS = [f"z{i}" for i in range(10)]
ROLLING = ("mean5", "sum5", "count5")
PIPELINE_YAML = """
name: roll
event_id_field: id
key_field: zip
fields:
  x: float
task: regression
features:
  - {op: rolling_mean, output: mean5, inputs: [x], window: 5}
  - {op: rolling_sum, output: sum5, inputs: [x], window: 5}
  - {op: rolling_count, output: count5, inputs: [x], window: 5}
models:
  - {estimator: linear_model.LinearRegression}
"""


class Recorded(Features):
    """The features service, noting which repartition partitions it processed."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        super().__init__(settings, catalogue)
        self.served: set[int] = set()
        self.restores = 0

    def handle(self, msgs: list[Message]) -> list[Output]:
        hop = self.catalogue.repartition(PIPELINE).name
        self.served.update(m.partition() or 0 for m in msgs if m.topic() == hop)
        return super().handle(msgs)

    def on_assign(self, partitions: Any) -> Any:
        self.restores += sum(1 for tp in partitions if tp.topic in self.stores)
        return super().on_assign(partitions)


def raw_events(start: int, n: int) -> list[bytes]:
    """Mostly valid events over a few keys; some without a key, some refused, some undecodable."""
    out: list[bytes] = []
    for i in range(start, start + n):
        if i % 97 == 0:
            out.append(b"{not json")  # dead-lettered by the hop
        elif i % 89 == 0:
            out.append(json.dumps({"id": f"e{i}", "zip": KEYS[i % len(KEYS)], "x": "NaN?"}).encode())
        elif i % 31 == 0:
            out.append(json.dumps({"id": f"e{i}", "x": float(i % 13)}).encode())  # no key
        else:
            key = KEYS[(i * 7) % len(KEYS)]
            out.append(json.dumps({"id": f"e{i}", "zip": key, "x": float(i % 17)}).encode())
    return out


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_rolling_features_match_a_per_key_reference_while_partitions_move(
    kafka_bootstrap: str, tmp_path: Path, guarantee: str
) -> None:
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        default_partitions=PARTITIONS,
        commit_interval_s=0.1,
        max_batch=200,
        processing_guarantee=guarantee,
    )  # type: ignore[call-arg]
    catalogue = Catalogue(settings)
    spec = tmp_path / "roll.yaml"
    spec.write_text(textwrap.dedent(PIPELINE_YAML))
    definition = to_definition(load_file(spec), catalogue.raw(PIPELINE).name).to_avro()
    raw_topic = catalogue.raw(PIPELINE).name
    produced = 0

    def produce(values: list[bytes]) -> None:
        nonlocal produced
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for value in values:
            producer.produce(raw_topic, value, None, partition=produced % PARTITIONS)
            produced += 1
        assert producer.flush(30) == 0

    # Records out so far (feature vectors + dead letters), committed ones only: with exactly_once, offsets
    # also count transaction markers.
    committed_only = {"isolation.level": "read_committed"}
    counter = make_consumer(settings, f"{settings.topic_prefix}-counter", **committed_only)
    seen = 0

    def done() -> int:
        nonlocal seen
        if not counter.assignment():
            outs = [catalogue.features(PIPELINE).name, catalogue.dead_letter(PIPELINE).name]
            counter.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in outs for p in range(PARTITIONS)])
        while batch := counter.consume(1000, 0.1):
            seen += sum(1 for m in batch if m.error() is None)
        return seen

    def data_loop(service: Recorded) -> BatchLoop:
        # one transactional.id per instance, as each replica has its own STREAMML_INSTANCE_ID
        instance = settings.model_copy(update={"instance_id": str(len(services))})
        return BatchLoop(
            instance,
            name="features",
            handler=service.handle,
            topics=service.topics,
            on_assign=service.on_assign,
            on_revoke=service.on_revoke,
            state=service.state_changes,
            dead_letter=lambda msg, exc: dead_letter(catalogue, "features", None, msg, exc),
        )

    async def wait_until(target: int, timeout_s: float = 90.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while done() < target:
            assert asyncio.get_running_loop().time() < deadline, f"{done()} of {target} records handled"
            await asyncio.sleep(0.3)

    async def wait_assigned(service: Recorded, timeout_s: float = 60.0) -> None:
        """Until the group gave `service` input partitions (and it restored them)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while service.restores == 0:
            assert asyncio.get_running_loop().time() < deadline, "no partitions assigned"
            await asyncio.sleep(0.1)

    services: list[Recorded] = []

    async def scenario() -> None:
        def new_service() -> Recorded:
            service = Recorded(settings, catalogue)
            service.on_pipeline(definition, None)  # creates the pipeline's topics
            services.append(service)
            return service

        first = data_loop(new_service())
        await first.start()
        await wait_assigned(services[0])
        produce(raw_events(0, 600))
        await wait_until(300, 60)
        second = data_loop(new_service())  # joins: partitions move from the first to the second
        await second.start()
        await wait_assigned(services[1])
        produce(raw_events(600, 900))
        await wait_until(900)
        await first.stop()  # mid-stream: the second takes every partition and restores the rest
        produce(raw_events(1500, 600))
        await wait_until(1700)
        third = data_loop(new_service())  # and some move back to a newcomer
        await third.start()
        await wait_assigned(services[2])
        produce(raw_events(2100, 900))
        await wait_until(produced)
        await second.stop()
        await third.stop()

    try:
        asyncio.run(scenario())
    finally:
        counter.close()

    # -- what came out ------------------------------------------------------------------------------------
    fv_codec = codec_for("FeatureVector")
    vectors = [fv_codec.decode(m.value()) for m in read_to_end(settings, catalogue.features(PIPELINE).name)]
    letters = [
        codec_for("DeadLetter").decode(m.value())
        for m in read_to_end(settings, catalogue.dead_letter(PIPELINE).name)
    ]
    assert produced == 3000 and len(vectors) + len(letters) == produced  # in = out + dead-lettered
    sources = Counter((v["source"]["partition"], v["source"]["start_offset"]) for v in vectors)
    sources.update((d["source_partition"], d["source_offset"]) for d in letters)
    assert all(d["source_topic"] == raw_topic for d in letters)
    assert all(v["source"]["topic"] == raw_topic for v in vectors)
    assert len(sources) == produced and set(sources.values()) == {1}  # one fate per raw record
    raw_by_source = {(m.partition(), m.offset()): m.value() for m in read_to_end(settings, raw_topic)}
    for v in vectors[:200]:
        raw = json.loads(raw_by_source[(v["source"]["partition"], v["source"]["start_offset"])])
        assert raw["id"] == v["event_id"]

    # Partitions really moved: some repartition partition was processed by two loops, restored each time.
    assert sum(len(s.served) for s in services) > PARTITIONS
    assert all(s.restores > 0 for s in services)

    # -- the reference: one engine, each key's events in the order of its repartition partition -----------
    reference = FeatureEngine(definition)
    expected: dict[str, dict[str, float | str]] = {}
    hop = read_to_end(settings, catalogue.repartition(PIPELINE).name)
    for p in range(PARTITIONS):
        for m in sorted((m for m in hop if m.partition() == p), key=lambda m: m.offset() or 0):
            try:
                fv = reference.transform(decode_raw(m.value()), timestamp_ms=0, now_ms=0)
            except Exception:  # refused here as in the service
                continue
            assert fv["event_id"] not in expected
            expected[fv["event_id"]] = fv["features"]
    assert len(expected) == len(vectors)
    for v in vectors:
        want = expected[v["event_id"]]
        got = {name: v["features"][name] for name in ROLLING}
        assert got == {name: want[name] for name in ROLLING}, (v["event_id"], v["key"])
    assert max(v["features"]["count5"] for v in vectors) == 5.0
