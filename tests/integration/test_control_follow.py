"""Control topics are broadcast on the real broker: every instance of a service applies every new record,
and a follower knows when it has applied everything written before a given moment."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from streamml import pipelines
from streamml.codec import codec_for
from streamml.kafka import ensure_topics
from streamml.service import ControlFollower
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.trainer import owner_partition

AGRAWAL = Path(__file__).resolve().parents[2] / "pipelines" / "agrawal.yaml"


class TaskApp:
    """Stands in for the Faust app: collects the tasks `follow` registers, run here on one event loop."""

    def __init__(self) -> None:
        self.tasks: list[Any] = []

    def task(self, fun: Any) -> Any:
        self.tasks.append(fun)
        return fun


def definition(name: str, catalogue: Catalogue, description: str) -> dict[str, Any]:
    spec = pipelines.load_file(AGRAWAL)
    spec = pipelines.PipelineFile.model_validate(
        {**spec.model_dump(), "name": name, "description": description}
    )
    return pipelines.to_definition(spec, catalogue.raw(name).name).to_avro()


def test_two_instances_of_a_service_both_apply_a_new_pipeline_record(kafka_bootstrap: str) -> None:
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}", _env_file=None
    )
    catalogue = Catalogue(settings)
    ensure_topics(settings, catalogue.global_topics())
    topic = catalogue.pipelines().name
    name = "agrawal"
    ensure_topics(settings, catalogue.pipeline_topics(name))
    codec = codec_for("PipelineDefinition")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    producer.produce(topic, codec.encode(definition(name, catalogue, "before start")), name.encode())
    assert producer.flush(10) == 0

    applied: dict[str, list[tuple[str, float]]] = {"a": [], "b": []}
    followers = {}
    app = TaskApp()
    for instance in applied:
        follower = ControlFollower(settings, "predictor")  # the same service: formerly one Faust group

        def on_pipeline(record: dict[str, Any] | None, _msg: Any, instance: str = instance) -> None:
            if record is not None:
                applied[instance].append((record["description"], time.monotonic()))

        follower.bootstrap(topic, "PipelineDefinition", on_pipeline)
        follower.follow(app, topic, "PipelineDefinition", on_pipeline)  # type: ignore[arg-type]
        followers[instance] = follower
    assert [d for d, _ in applied["a"]] == [d for d, _ in applied["b"]] == ["before start"]

    latencies: list[float] = []

    async def scenario() -> None:
        tasks = [asyncio.create_task(t()) for t in app.tasks]
        try:
            for f in followers.values():  # both caught up with what the bootstrap read
                assert await f.caught_up(topic, timeout_s=30)
            for i in range(20):
                description = f"revision {i}"
                sent = time.monotonic()
                producer.produce(topic, codec.encode(definition(name, catalogue, description)), name.encode())
                producer.poll(0)
                while not all(any(d == description for d, _ in applied[x]) for x in applied):
                    assert time.monotonic() - sent < 10, f"{description} not applied by both: {applied}"
                    await asyncio.sleep(0.001)
                for x in applied:
                    latencies.append(next(t for d, t in applied[x] if d == description) - sent)
                await asyncio.sleep(0.05)
            assert producer.flush(10) == 0
            for f in followers.values():  # "have I applied everything up to now?" after a burst
                assert await f.caught_up(topic, timeout_s=10)
                assert f.position(topic) == {0: 21}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    for x in applied:  # every record once, in order, on both instances
        assert [d for d, _ in applied[x]] == ["before start"] + [f"revision {i}" for i in range(20)]
    for f in followers.values():
        assert f._tail is not None and f._tail._consumer is None  # closed when its task stopped
    ordered = sorted(latencies)
    print(
        f"follow latency (produce -> applied, {len(ordered)} applies): median "
        f"{statistics.median(ordered) * 1000:.1f} ms, p95 {ordered[int(len(ordered) * 0.95)] * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms"
    )
    assert statistics.median(ordered) < 1.0


def test_requests_keyed_by_pipeline_land_on_their_owners_partition(kafka_bootstrap: str) -> None:
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}", default_partitions=3,
        _env_file=None,
    )  # fmt: skip
    topic = Catalogue(settings).training_requests()
    assert topic.partitions == 3
    ensure_topics(settings, [topic])
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})  # a default client
    landed: dict[str, int] = {}
    names = ["agrawal", "phishing", "trump", "a", "b-2", "c" * 63]

    def delivered(err: Any, msg: Any) -> None:
        assert err is None
        landed[msg.key().decode()] = msg.partition()

    for name in names:
        producer.produce(topic.name, b"x", name.encode(), on_delivery=delivered)
    assert producer.flush(10) == 0
    assert landed == {name: owner_partition(name, 3) for name in names}
