"""What the benchmark feeds the services: an Agrawal pipeline, its events, feature vectors, signed versions.

One `Deployment` per measurement: its own topic prefix (so measurements never see each other's records),
its topics, control records published like the CLI does, and the services started with `streamml.stack`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from pydantic import SecretStr
from river.datasets import synth

from streamml.codec import codec_for
from streamml.kafka import ensure_topics, make_consumer, make_producer
from streamml.pipelines import PipelineFile, to_definition
from streamml.settings import Settings
from streamml.stack import Stack
from streamml.topics import Catalogue
from streams.features import FeatureEngine
from streams.learner import OnlineLearner

log = logging.getLogger(__name__)

PIPELINE = "bench"
MODEL = "online"
ESTIMATOR = "linear_model.LogisticRegression"
AGRAWAL_FIELDS = {
    "salary": "float",
    "commission": "float",
    "age": "int",
    "elevel": "int",
    "car": "int",
    "zipcode": "int",
    "hvalue": "float",
    "hyears": "int",
    "loan": "float",
}
# The derived features of pipelines/agrawal.yaml: 9 raw + 5 derived = 14 features per vector.
FEATURE_STEPS: list[dict[str, Any]] = [
    {"op": "ratio", "output": "loan_per_salary", "inputs": ["loan", "salary"]},
    {"op": "sum", "output": "income", "inputs": ["salary", "commission"]},
    {"op": "log1p", "output": "log_hvalue", "inputs": ["hvalue"]},
    {"op": "rolling_mean", "output": "zipcode_mean_salary_100", "inputs": ["salary"], "window": 100},
    {"op": "rolling_count", "output": "zipcode_count_100", "inputs": ["salary"], "window": 100},
]
TIME_FIELD = "ts"  # raw events carry their produce time here; the pipeline takes it as event time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """CPU time (user + system) of a process (all threads), or of one thread; None if it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)


@dataclass
class DrainMeter:
    """CPU per event of a service while it drains a backlog, robust to other load on the machine.

    Wall-clock events/s fall when other processes take the CPU; CPU seconds per event do not. The main
    thread (tid = pid) runs the event loop, so its CPU per event bounds one worker's throughput.
    """

    pid: int
    scale: int = 1  # events per counted record (e.g. one model version per N learned events)
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # (events, main cpu, all cpu)

    def poll(self, count: int) -> None:
        main, total = cpu_seconds(self.pid, self.pid), cpu_seconds(self.pid)
        if main is not None and total is not None:
            self.samples.append((count * self.scale, main, total))

    def per_event_us(self) -> tuple[float, float] | None:
        """(main-thread, whole-process) CPU µs per event between the first and last progress seen."""
        moving = [s for s in self.samples if s[0] > 0]
        if len(moving) < 2 or moving[-1][0] <= moving[0][0]:
            return None
        (n0, m0, t0), (n1, m1, t1) = moving[0], moving[-1]
        return (m1 - m0) * 1e6 / (n1 - n0), (t1 - t0) * 1e6 / (n1 - n0)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine in ticks, from /proc/stat: busy/total is its load."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


@dataclass
class CpuMeter:
    """CPU used by named processes (and the whole machine) between `start` and `stop`."""

    pids: dict[str, int]
    wall: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)  # name -> cores (CPU seconds per second)
    machine: float = 0.0  # fraction of all cores busy, everything on the machine included

    def start(self) -> None:
        self.before = {n: c for n, pid in self.pids.items() if (c := cpu_seconds(pid)) is not None}
        self._machine = machine_busy()
        self.wall = time.monotonic()

    def stop(self) -> None:
        elapsed = max(time.monotonic() - self.wall, 1e-9)
        for name, pid in self.pids.items():
            now = cpu_seconds(pid)
            if now is not None and name in self.before:
                self.used[name] = (now - self.before[name]) / elapsed
        busy, total = machine_busy()
        self.machine = (busy - self._machine[0]) / max(total - self._machine[1], 1.0)


def pipeline_definition(
    raw_topic: str, *, estimator: str = ESTIMATOR, snapshot_every_events: int = 10_000
) -> dict[str, Any]:
    """The PipelineDefinition record of the benchmark pipeline (validated like `streamml pipeline apply`)."""
    spec = PipelineFile.model_validate(
        {
            "name": PIPELINE,
            "description": "make bench: Agrawal loan applications, labels inline",
            "event_id_field": "event_id",
            "key_field": "zipcode",
            "event_time_field": TIME_FIELD,
            "fields": AGRAWAL_FIELDS,
            "label": {"source": "inline", "field": "label"},
            "task": "binary",
            "features": FEATURE_STEPS,
            "models": [{"name": MODEL, "kind": "online", "estimator": estimator}],
            "promotion": "manual",
            "snapshot_every_events": snapshot_every_events,
            "snapshot_every_seconds": 3600.0,  # only event-count snapshots during a run
        }
    )
    return to_definition(spec, raw_topic).to_avro()


def agrawal_events(n: int, seed: int = 42) -> list[dict[str, Any]]:
    """n raw events (flat JSON-able dicts) with an event id and an inline boolean label."""
    events = []
    for i, (x, y) in enumerate(itertools.islice(synth.Agrawal(seed=seed), n)):
        event: dict[str, Any] = {k: (float(v) if isinstance(v, float) else int(v)) for k, v in x.items()}
        event["event_id"] = f"e{i}"
        event["label"] = bool(y)
        events.append(event)
    return events


def feature_vectors(definition: dict[str, Any], events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the features service would emit for these events (same engine, same record shape)."""
    engine = FeatureEngine(definition)
    stamp = now_ms()
    out = []
    for offset, event in enumerate(events):
        source = {"topic": definition["raw_topic"], "partition": 0, "start_offset": offset,
                  "end_offset": offset + 1}  # fmt: skip
        out.append(engine.transform({"fields": event, "event_time": None}, timestamp_ms=stamp,
                                    now_ms=stamp, source=source))  # fmt: skip
    return out


def signed_versions(
    key: bytes, vectors: Sequence[dict[str, Any]], count: int, every: int, estimator: str = ESTIMATOR
) -> list[dict[str, Any]]:
    """`count` successive ModelVersion records of one lineage, each after `every` more learned events."""
    learner = OnlineLearner(
        pipeline=PIPELINE, model_name=MODEL, estimator_spec=estimator, params={}, regression=False,
        signing_key=key,
    )  # fmt: skip
    versions = []
    stream = itertools.cycle(vectors)
    for _ in range(count):
        for fv in itertools.islice(stream, every):
            learner.learn(fv["features"], fv["label"])
        versions.append(learner.snapshot(now_ms()))
    return versions


def promotion(version: int, previous: int | None, decided_at: int) -> dict[str, Any]:
    return {
        "pipeline": PIPELINE,
        "model_name": MODEL,
        "action": "PROMOTE",
        "version": version,
        "previous_version": previous,
        "actor": "bench",
        "reason": "make bench",
        "metrics": {},
        "decided_at": decided_at,
    }


class DeliveryFailed(RuntimeError):
    """The benchmark could not write its own input records."""


def produce_all(producer: Producer, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Write records as fast as the client takes them; raises unless every one is acknowledged."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    n = 0
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 5000 == 0:
            producer.poll(0)
    if producer.flush(60) or errors:
        raise DeliveryFailed(f"could not write {topic}: {errors[:3] or 'flush timed out'}")
    return n


@dataclass
class Deployment:
    """One isolated StreamML deployment on the shared broker: own prefix, topics, key and services."""

    bootstrap: str
    prefix: str
    signing_key: str
    workdir: Path
    pipeline: str = PIPELINE  # the pipeline whose data topics it creates and reads
    # STREAMML_* settings of the bench and its services beyond the defaults: a secured cluster's (the bench
    # acts as the `cli` principal; `users_dir` holds every service's password file, each service runs as
    # its own principal), a registry's URL, the data loops' batching.
    settings_env: dict[str, str] = field(default_factory=dict)
    users_dir: Path | None = None

    def __post_init__(self) -> None:
        overrides = {k.removeprefix("STREAMML_").lower(): v for k, v in self.settings_env.items()}
        self.settings = Settings(
            **{
                **overrides,
                "bootstrap_servers": self.bootstrap,
                "topic_prefix": self.prefix,
                "default_partitions": 1,
                "signing_key": self.signing_key,
                "data_dir": str(self.workdir / "data"),
            },
            _env_file=None,
        )
        self.catalogue = Catalogue(self.settings)
        self.key = self.signing_key.encode()
        self._control = make_producer(self.settings, **{"linger.ms": 0})
        self._producers: dict[str, Producer] = {}  # per principal, for records only a service may write
        self._counter: Consumer | None = None

    # -- topics and control records ---------------------------------------------------------------
    @property
    def raw_topic(self) -> str:
        return self.catalogue.raw(self.pipeline).name

    @property
    def features_topic(self) -> str:
        return self.catalogue.features(self.pipeline).name

    @property
    def predictions_topic(self) -> str:
        return self.catalogue.predictions(self.pipeline).name

    @property
    def versions_topic(self) -> str:
        return self.catalogue.model_versions().name

    def create_topics(self) -> None:
        ensure_topics(
            self.settings, self.catalogue.global_topics() + self.catalogue.pipeline_topics(self.pipeline)
        )

    def settings_as(self, who: str) -> Settings:
        """The settings of a service's principal on a secured cluster (the bench injects what only that
        service may write: features for the predictor, versions as the trainer); else the bench's own."""
        if self.users_dir is None:
            return self.settings
        user = f"{self.prefix}-{who}"
        password = (self.users_dir / f"{user}.password").read_text().strip()
        return self.settings.model_copy(update={"sasl_username": user, "sasl_password": SecretStr(password)})

    def producer_as(self, who: str, **conf: Any) -> Producer:
        if self.users_dir is None:
            return make_producer(self.settings, **conf)
        return make_producer(self.settings_as(who), **conf)

    def publish(
        self, topic: str, schema: str, key: str, record: dict[str, Any], as_who: str | None = None
    ) -> int:
        """Produce one control record and wait for its ack; returns the ms stamp taken just before produce."""
        value = codec_for(schema).encode(record)
        errors: list[str] = []
        stamp = now_ms()
        producer = self._control
        if as_who is not None and self.users_dir is not None:
            if as_who not in self._producers:
                self._producers[as_who] = self.producer_as(as_who, **{"linger.ms": 0})
            producer = self._producers[as_who]
        producer.produce(
            topic, value, key.encode(), on_delivery=lambda e, _m: errors.append(str(e)) if e else None
        )
        if producer.flush(30) or errors:
            raise DeliveryFailed(f"could not publish to {topic}: {errors or 'timed out'}")
        return stamp

    def publish_pipeline(self, definition: dict[str, Any]) -> None:
        self.publish(self.catalogue.pipelines().name, "PipelineDefinition", definition["name"], definition)

    def publish_version(self, record: dict[str, Any]) -> None:
        key = f"{PIPELINE}/{MODEL}/{record['version']}"
        self.publish(self.versions_topic, "ModelVersion", key, record, as_who="trainer")

    def promote(self, version: int, previous: int | None) -> int:
        """Publish a PROMOTE record; returns its produce time (ms since epoch)."""
        decided = now_ms()
        return self.publish(
            self.catalogue.promotions().name, "Promotion", f"{PIPELINE}/{MODEL}/{decided}",
            promotion(version, previous, decided),
        )  # fmt: skip

    # -- reading back -------------------------------------------------------------------------------
    def topic_count(self, topic: str) -> int:
        """Records in a topic (sum of high - low watermarks): cheap, so it does not load the services."""
        if self._counter is None:  # one client for all polls: a new one per poll costs real CPU
            self._counter = make_consumer(self.settings, f"{self.prefix}-cli-bench-count")
        meta = self._counter.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            low, high = self._counter.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total

    def wait_count(
        self,
        topic: str,
        n: int,
        timeout_s: float,
        stack: Stack | None = None,
        on_poll: Callable[[int], None] | None = None,
    ) -> float:
        """Until `topic` holds n records (monotonic time returned); fails fast if a service died."""
        deadline = time.monotonic() + timeout_s
        have = 0
        while time.monotonic() < deadline:
            have = self.topic_count(topic)
            if on_poll is not None:
                on_poll(have)
            if have >= n:
                return time.monotonic()
            if stack is not None:
                for name, svc in stack.services.items():
                    if not svc.alive():
                        raise RuntimeError(f"{name} died: {stack.tail(name)}")
            time.sleep(0.25)
        raise TimeoutError(f"{topic}: {have} of {n} records after {timeout_s:.0f} s")

    # -- services -------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {
            **self.settings_env,
            "STREAMML_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMML_TOPIC_PREFIX": self.prefix,
            "STREAMML_DEFAULT_PARTITIONS": "1",
            "STREAMML_SIGNING_KEY": self.signing_key,
            "STREAMML_DATA_DIR": str(self.workdir / "data"),
            "STREAMML_LOG_LEVEL": "INFO",
        }

    @contextmanager
    def services(self, *names: str) -> Iterator[Stack]:
        """The named services running (ready), stopped on exit even on error."""
        stack = Stack.create(self.env(), self.workdir / "logs", users_dir=self.users_dir)
        try:
            for name in names:
                stack.start(name)
            for name in names:
                stack.wait_ready(name, timeout_s=120)
            yield stack
        finally:
            stack.stop_all()

    def consumer_config(self, purpose: str) -> dict[str, Any]:
        """A plain confluent-kafka consumer's settings (for a helper process): this deployment's security,
        a group of the user's own (`<prefix>-cli-...`, the only groups its principal may use)."""
        return {**self.settings.kafka_config(), "group.id": f"{self.prefix}-cli-{purpose}-{time.time_ns()}"}

    def close(self) -> None:
        self._control.flush(10)
        for producer in self._producers.values():
            producer.flush(10)
        if self._counter is not None:
            self._counter.close()
            self._counter = None
