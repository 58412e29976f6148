"""The five measurements of `make bench`, each on its own deployment (topic prefix) of the shared broker.

Service throughputs come from stamps the services write themselves (prediction_time, created_at), so the
benchmark process only reads results back after the run and never competes with the service for CPU
while it is being measured (the machine has 2 cores).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import pickle
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from river import metrics as river_metrics

from bench import latency_consumer, stats
from bench.profile import Spy
from bench.workload import (
    MODEL,
    PIPELINE,
    TIME_FIELD,
    CpuMeter,
    DeliveryFailed,
    Deployment,
    DrainMeter,
    produce_all,
)
from streamml import estimators
from streamml.codec import codec_for
from streamml.errors import StreamMLError
from streamml.kafka import ensure_topics, make_consumer, make_producer
from streamml.registry import Registry, is_framed
from streamml.runtime import read_to_end
from streamml.topics import TopicSpec

log = logging.getLogger(__name__)

Keyed = tuple[bytes | None, bytes]


@dataclass
class Measured:
    """One measurement's headline value and the details printed in the table."""

    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    profiles: list[Path] = field(default_factory=list)


@contextmanager
def maybe_spy(profile_dir: Path | None, name: str, pid: int | None) -> Iterator[Spy | None]:
    """py-spy recording a service process while it is measured (only when --profile-dir is given)."""
    if profile_dir is None or pid is None:
        yield None
        return
    spy = Spy.start(pid, profile_dir / f"{name}.speedscope.json")
    try:
        yield spy
    finally:
        spy.stop()


# -- pass-through: the data path without a model --------------------------------------------------------
def passthrough(
    dep: Deployment, records: Sequence[Keyed], max_batch: int, commit_interval_s: float
) -> Measured:
    """Consume → decode → encode → produce FeatureVectors in one process, batched like `BatchLoop`.

    A short untimed run first warms the broker (a fresh JVM is still compiling) and the client.
    """
    dep.create_topics()
    out = TopicSpec(
        f"{dep.prefix}.{PIPELINE}.passthrough", "passthrough", "FeatureVector", "avro", "event id",
        "make bench: pass-through copy of the features", 1, 1,
    )  # fmt: skip
    ensure_topics(dep.settings, [out])
    produce_all(make_producer(dep.settings, **{"linger.ms": 20}), dep.features_topic, records)
    n = len(records)
    _copy(dep, out.name, "warmup", min(n, 20_000), max_batch, commit_interval_s)
    cpu_main, cpu_all = time.thread_time(), time.process_time()
    batches, finished = _copy(dep, out.name, "timed", n, max_batch, commit_interval_s)
    cpu = ((time.thread_time() - cpu_main) * 1e6 / n, (time.process_time() - cpu_all) * 1e6 / n)
    return Measured(
        stats.rate_from_batches(batches),
        {
            "events": n,
            "batches": len(batches),
            "wall_eps": n / (finished - batches[0][0]),
            "cpu_us_per_event": cpu,
        },
    )


def _copy(
    dep: Deployment, out: str, run: str, n: int, max_batch: int, commit_interval_s: float
) -> tuple[list[tuple[float, int]], float]:
    """The first n features records copied to `out` by a new consumer group: (batch stamps, end time)."""
    consumer = make_consumer(
        dep.settings, f"{dep.prefix}-cli-passthrough-{run}",
        **{"enable.auto.offset.store": False, "isolation.level": "read_committed"},
    )  # fmt: skip
    producer = make_producer(dep.settings, **{"linger.ms": 2})
    codec = codec_for("FeatureVector")
    decode, encode = codec.decode, codec.encode
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    def commit() -> None:
        if producer.flush(30) or errors:
            raise DeliveryFailed(f"pass-through outputs not delivered: {errors[:3]}")
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()],
                        asynchronous=False)  # fmt: skip

    consumer.subscribe([dep.features_topic])
    batches: list[tuple[float, int]] = []
    positions: dict[tuple[str, int], int] = {}
    done = 0
    last_commit = time.monotonic()
    deadline = time.monotonic() + 180
    try:
        while done < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pass-through: {done} of {n} records after 180 s")
            msgs = consumer.consume(min(max_batch, n - done), 0)
            if not msgs:
                time.sleep(0.002)
                continue
            batches.append((time.perf_counter(), len(msgs)))
            produce = producer.produce
            for msg in msgs:
                if msg.error() is not None:
                    continue
                value = encode(decode(msg.value() or b""))
                try:
                    produce(out, value, msg.key(), on_delivery=on_delivery)
                except BufferError:
                    producer.flush(10)
                    produce(out, value, msg.key(), on_delivery=on_delivery)
                positions[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
                done += 1
            producer.poll(0)
            if time.monotonic() - last_commit >= commit_interval_s:
                commit()
                last_commit = time.monotonic()
        commit()
        return batches, time.perf_counter()
    finally:
        consumer.close()


# -- predictor: the real service draining pre-produced features -----------------------------------------
def _predictions(dep: Deployment) -> list[tuple[dict[str, Any], int]]:
    """Every Prediction record of the deployment with its Kafka CreateTime (ms)."""
    codec = codec_for("Prediction")
    registry = Registry.from_settings(dep.settings)  # (a typed deployment's predictions are framed)

    def decode(data: bytes) -> dict[str, Any]:
        if registry is not None and is_framed(data):
            return registry.decode_as(data, codec.schema.parsed)
        return codec.decode(data)

    return [
        (decode(m.value() or b""), m.timestamp()[1])
        for m in read_to_end(dep.settings, dep.predictions_topic, 120)
    ]


def predictor_service(
    dep: Deployment,
    definition: dict[str, Any],
    records: Sequence[Keyed],
    version: dict[str, Any],
    profile_dir: Path | None,
) -> Measured:
    """The predictor service (1 worker) drains N feature vectors once its model is promoted."""
    dep.create_topics()
    dep.publish_pipeline(definition)
    produce_all(dep.producer_as("features", **{"linger.ms": 20}), dep.features_topic, records)
    dep.publish_version(version)
    n = len(records)
    with dep.services("predictor") as stack:
        svc = stack.services["predictor"]
        with maybe_spy(profile_dir, "predictor", svc.pid) as spy:
            promoted = dep.promote(int(version["version"]), None)
            meter = DrainMeter(svc.pid or 0)
            dep.wait_count(dep.predictions_topic, n, 240, stack, meter.poll)
        profiles = [spy.path] if spy and spy.path else []
    rows = _predictions(dep)
    stamps = [r["prediction_time"] for r, _ in rows]
    created = sorted(ts for _, ts in rows)
    eps = stats.rate_from_batches([(t / 1000, c) for t, c in stats.group_stamps(stamps)])
    return Measured(
        eps,
        {
            "events": len(rows),
            "batches": len(set(stamps)),
            "create_time_eps": (len(created) - 1) / ((created[-1] - created[0]) / 1000),
            "promotion_to_first_prediction_ms": min(stamps) - promoted,
            "cpu_us_per_event": meter.per_event_us(),
            "versions": sorted({r["model_version"] for r, _ in rows}),
        },
        profiles,
    )


# -- features: the real service draining pre-produced raw events (context for the e2e latency) ---------
def features_service(
    dep: Deployment, definition: dict[str, Any], events: Sequence[dict[str, Any]]
) -> Measured:
    """The features service drains N raw JSON events; rate from the feature_time stamps it writes."""
    dep.create_topics()
    dep.publish_pipeline(definition)
    stamp = int(time.time() * 1000)
    raw = [(str(e["zipcode"]).encode(), json.dumps({**e, TIME_FIELD: stamp}).encode()) for e in events]
    produce_all(make_producer(dep.settings, **{"linger.ms": 20}), dep.raw_topic, raw)
    with dep.services("features") as stack:
        meter = DrainMeter(stack.services["features"].pid or 0)
        dep.wait_count(dep.features_topic, len(raw), 240, stack, meter.poll)
    codec = codec_for("FeatureVector")
    stamps = [
        codec.decode(m.value() or b"")["feature_time"]
        for m in read_to_end(dep.settings, dep.features_topic, 120)
    ]
    eps = stats.rate_from_batches([(t / 1000, c) for t, c in stats.group_stamps(stamps)])
    return Measured(eps, {"events": len(stamps), "cpu_us_per_event": meter.per_event_us()})


# -- end-to-end latency: raw JSON → features → predictor → consumer -------------------------------------
class Pacer:
    """Produces at a fixed rate from the caller's thread (no burst catch-up beyond 10 ms of events)."""

    def __init__(self, producer: Producer, rate: float) -> None:
        self.producer = producer
        self.rate = rate
        self.sent = 0
        self.max_lag = max(10, int(rate * 0.01))  # at most 10 ms worth of events sent late in a burst

    def run(
        self, seconds: float, send: Callable[[int], None], until: Callable[[], bool] | None = None
    ) -> float:
        """send(i) `rate` times a second for `seconds` (or until `until()`); returns the achieved rate."""
        start = time.monotonic()
        sent = 0
        next_check = start
        while True:
            now = time.monotonic()
            elapsed = now - start
            if elapsed >= seconds:
                break
            if until is not None and now >= next_check:
                next_check = now + 0.25
                if until():
                    break
            due = min(int(elapsed * self.rate) + 1, int(seconds * self.rate))
            if due - sent > self.max_lag:  # fell behind (GIL, GC): skip ahead rather than burst
                sent = due - self.max_lag
            while sent < due:
                send(self.sent)
                self.sent += 1
                sent += 1
            self.producer.poll(0)
            time.sleep(0.001)
        return sent / max(time.monotonic() - start, 1e-9)


def e2e_latency(
    dep: Deployment,
    definition: dict[str, Any],
    events: Sequence[dict[str, Any]],
    version: dict[str, Any],
    rate: float,
    duration_s: float,
    warmup_s: float,
    profile_dir: Path | None,
    broker_pids: Sequence[int] = (),
    services: Sequence[str] = ("features", "predictor"),
) -> Measured:
    """Raw events at `rate`/s for `duration_s` through the features and predictor services (or all of
    `services`: the capacity measure runs the six).

    Also meters the CPU each process uses meanwhile: the 2-core machine must fit all of them.
    """
    dep.create_topics()
    dep.publish_pipeline(definition)
    dep.publish_version(version)
    dep.promote(int(version["version"]), None)
    expected = int(rate * duration_s)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    probe = ctx.Process(
        target=latency_consumer.run,
        args=(dep.consumer_config("latency"), dep.predictions_topic, expected, child),
        daemon=True,
    )
    # linger.ms=1: the latency includes the client's batching wait, as an application's would.
    producer = make_producer(dep.settings, **{"linger.ms": 1})
    raw_topic = dep.raw_topic
    # Each event is serialised once up front, without its id and time, so the load generator spends
    # little CPU per event (it shares the 2 cores with the services it measures).
    bodies = [
        (str(e["zipcode"]).encode(), json.dumps({k: v for k, v in e.items() if k != "event_id"})[1:].encode())
        for e in events
    ]
    cycle = itertools.cycle(bodies)

    def send(event_id: str | None) -> None:
        """One raw JSON event; event time = produce time; measured events carry it in their id too."""
        key, body = next(cycle)
        sent_ns = time.time_ns()
        eid = event_id or latency_consumer.event_id(pacer.sent, sent_ns)
        value = f'{{"event_id": "{eid}", "{TIME_FIELD}": {sent_ns // 1_000_000}, '.encode() + body
        try:
            producer.produce(raw_topic, value, key)
        except BufferError:
            producer.poll(0.01)
            producer.produce(raw_topic, value, key)

    pacer = Pacer(producer, rate)
    with dep.services(*services) as stack:
        probe.start()
        try:
            if not parent.poll(60) or parent.recv() != "ready":
                raise TimeoutError("latency probe did not start")
            # Until the first prediction comes back both services have joined their groups.
            warm = Pacer(producer, 50)
            warm.run(120, lambda i: send(f"w-{i}"), until=lambda: dep.topic_count(dep.predictions_topic) > 0)
            if dep.topic_count(dep.predictions_topic) == 0:
                raise TimeoutError(f"no prediction within 120 s: {stack.tail('features')}")
            pacer.run(warmup_s, lambda i: send(f"w-s{i}"))
            pacer.sent = 0
            features, predictor = stack.services["features"], stack.services["predictor"]
            pids = {"features": features.pid, "predictor": predictor.pid, "load generator": os.getpid(),
                    "latency probe": probe.pid}  # fmt: skip
            pids.update({f"broker {i + 1}": pid for i, pid in enumerate(broker_pids)})
            meter = CpuMeter({k: v for k, v in pids.items() if v is not None})
            meter.start()
            with (
                maybe_spy(profile_dir, "e2e-features", features.pid) as spy_f,
                maybe_spy(profile_dir, "e2e-predictor", predictor.pid) as spy_p,
            ):
                achieved = pacer.run(duration_s, lambda _i: send(None))
                meter.stop()
                producer.flush(30)
            profiles = [p.path for p in (spy_f, spy_p) if p is not None and p.path is not None]
            if not parent.poll(15):
                parent.send("stop")
                if not parent.poll(15):
                    raise TimeoutError("latency probe did not report")
            samples: list[latency_consumer.Sample] = parent.recv()
        finally:
            probe.join(5)
            if probe.is_alive():
                probe.terminate()
                probe.join(5)
    if not samples:
        raise StreamMLError("no measured prediction arrived")
    s = stats.summarize([sample[1] / 1000 for sample in samples])
    trend = stats.windowed_p50([(sample[0] / 1e9, sample[1] / 1000) for sample in samples], 2.0)
    half = min(sample[0] for sample in samples) + duration_s * 1e9 / 2
    late = stats.summarize([sample[1] / 1000 for sample in samples if sample[0] >= half] or [float("nan")])
    stage_names = (
        "produce → features batch",
        "features batch → predictor batch",
        "predictor batch → consumer",
    )
    by_stage = {
        name: stats.summarize([float(sample[2 + i]) for sample in samples])
        for i, name in enumerate(stage_names)
    }
    return Measured(
        s.p50,
        {
            "p99": s.p99,
            "p90": s.p90,
            "max": s.max,
            "mean": s.mean,
            "sent": pacer.sent,
            "received": s.count,
            "achieved_rate": achieved,
            "p50_by_2s": [round(v) for _, v in trend],
            "late_p50": late.p50,
            "late_p99": late.p99,
            "stages": {name: (st.p50, st.p99) for name, st in by_stage.items()},
            "cpu_cores": meter.used,
            "machine_busy": meter.machine,
        },
        profiles,
    )


# -- model swap latency -----------------------------------------------------------------------------------
# Capacity: raw rates tried in turn (events/s) until the system falls behind, and what falling behind is.
CAPACITY_RATES = (1_000, 1_500, 2_000, 3_000, 4_000, 6_000, 8_000, 10_000)
CAPACITY_SERVICES = ("features", "predictor", "learner", "monitor", "controller", "trainer")
CAPACITY_LAG_MS = 2_000.0


@dataclass(frozen=True)
class CapacityStep:
    rate: float
    achieved: float
    sent: int
    received: int
    last_p50_ms: float  # latency of the events sent in the last 2 s (their median)
    late_p99_ms: float  # p99 over the second half, for context (transient pauses show here)

    @property
    def keeps_up(self) -> bool:
        """Every measured event predicted, the last ones within CAPACITY_LAG_MS of being sent, and the load
        generator able to offer the rate (on 2 shared cores it may not be)."""
        return (
            self.received >= self.sent
            and self.last_p50_ms <= CAPACITY_LAG_MS
            and self.achieved >= 0.95 * self.rate
        )


def capacity(run_at: Callable[[float], Measured], rates: Sequence[float] = CAPACITY_RATES) -> Measured:
    """The highest raw rate (of `rates`, tried upwards) the whole system keeps up with, the issue's "keeps
    the last prediction within 2 s of the last event": `run_at(rate)` runs
    the six services on a fresh deployment at that rate (an e2e_latency measure). Stops at the first rate
    it does not keep up with; the value is the achieved rate of the last one it did (0 if none)."""
    steps: list[CapacityStep] = []
    for rate in rates:
        try:
            d = run_at(rate).details
        except Exception:  # e.g. no measured prediction at all: that rate is not kept up with
            log.exception("capacity: the run at %s events/s failed", f"{rate:,.0f}")
            d = {}
        late, trend = d.get("late_p99"), d.get("p50_by_2s") or [float("inf")]
        step = CapacityStep(
            rate, float(d.get("achieved_rate") or 0.0), int(d.get("sent") or 0), int(d.get("received") or 0),
            float(trend[-1]), float("inf") if late is None or math.isnan(late) else float(late),
        )  # fmt: skip
        steps.append(step)
        log.info("capacity: %s/s offered, %s/s achieved, %d/%d predicted, last 2 s p50 %.0f ms, last-half "
                 "p99 %.0f ms: %s", f"{rate:,.0f}", f"{step.achieved:,.0f}", step.received, step.sent,
                 step.last_p50_ms, step.late_p99_ms,
                 "keeps up" if step.keeps_up else "falls behind")  # fmt: skip
        if not step.keeps_up:
            break
    kept = [s.achieved for s in steps if s.keeps_up]
    return Measured(max(kept, default=0.0), {"steps": [s.__dict__ for s in steps]})


def swap_latency(
    dep: Deployment,
    definition: dict[str, Any],
    records: Sequence[Keyed],
    versions: Sequence[dict[str, Any]],
    rate: float,
    interval_s: float,
) -> Measured:
    """Promote versions 2..K one after another while features flow; promotion produced → first use."""
    dep.create_topics()
    dep.publish_pipeline(definition)
    for v in versions:
        dep.publish_version(v)
    dep.promote(int(versions[0]["version"]), None)
    producer = make_producer(dep.settings, **{"linger.ms": 1})
    cycle = itertools.cycle(records)
    topic = dep.features_topic

    def send(_i: int) -> None:
        key, value = next(cycle)
        try:
            producer.produce(topic, value, key)
        except BufferError:
            producer.poll(0.01)
            producer.produce(topic, value, key)

    pacer = Pacer(producer, rate)
    promoted_at: dict[int, float] = {}
    with dep.services("predictor") as stack:
        pacer.run(120, send, until=lambda: dep.topic_count(dep.predictions_topic) > 0)
        if dep.topic_count(dep.predictions_topic) == 0:
            raise TimeoutError(f"no prediction within 120 s: {stack.tail('predictor')}")
        pacer.run(1.0, send)
        previous = int(versions[0]["version"])
        for v in versions[1:]:
            number = int(v["version"])
            promoted_at[number] = dep.promote(number, previous)
            previous = number
            pacer.run(interval_s, send)
        pacer.run(1.0, send)
        producer.flush(30)
        time.sleep(1.0)
    rows = _predictions(dep)
    first = stats.first_stamp_by((r["model_version"], r["prediction_time"]) for r, _ in rows)
    latencies = stats.swap_latencies(promoted_at, first)
    seen = [v for v in latencies.values() if v is not None]
    if not seen:
        raise StreamMLError("no promoted version ever predicted")
    s = stats.summarize(seen)
    return Measured(
        s.p50,
        {
            "p99": s.p99,
            "max": s.max,
            "promotions": len(promoted_at),
            "swapped": len(seen),
            "latencies_ms": latencies,
            "events": len(rows),
        },
    )


# -- learner ---------------------------------------------------------------------------------------------
def learner_service(
    dep: Deployment,
    definition: dict[str, Any],
    records: Sequence[Keyed],
    every: int,
    profile_dir: Path | None,
) -> Measured:
    """The learner service over N labelled vectors; rate between its first and last snapshot."""
    dep.create_topics()
    dep.publish_pipeline(definition)
    produce_all(make_producer(dep.settings, **{"linger.ms": 20}), dep.features_topic, records)
    n = len(records)
    with dep.services("learner") as stack:
        svc = stack.services["learner"]
        with maybe_spy(profile_dir, "learner", svc.pid) as spy:
            meter = DrainMeter(svc.pid or 0)
            _follow_learning(dep, n, stack, meter.poll)
        profiles = [spy.path] if spy and spy.path else []
    codec = codec_for("ModelVersion")
    versions = [codec.decode(m.value() or b"") for m in read_to_end(dep.settings, dep.versions_topic)]
    points = [(int(v["events_seen"]), v["created_at"] / 1000) for v in versions if v["model_name"] == MODEL]
    eps = stats.rate_between(points)
    last = max(versions, key=lambda v: int(v["events_seen"]))
    return Measured(
        eps,
        {
            "versions": len(versions),
            "events_seen": int(last["events_seen"]),
            "accuracy": last["metrics"].get("accuracy"),
            "cpu_us_per_event": meter.per_event_us(),
        },
        profiles,
    )


def _follow_learning(dep: Deployment, n: int, stack: Any, on_progress: Callable[[int], None]) -> None:
    """Until the learner has published a version with all n events learned, reporting its progress (the
    events_seen of each new version) to `on_progress`. Counted from the records: with exactly-once each
    version's transaction adds a commit marker, so the topic's offsets count every version twice."""
    codec = codec_for("ModelVersion")
    consumer = make_consumer(
        dep.settings, f"{dep.prefix}-cli-bench-versions",
        **{"auto.offset.reset": "earliest", "enable.auto.commit": False, "isolation.level": "read_committed"},
    )  # fmt: skip
    consumer.subscribe([dep.versions_topic])
    seen, deadline = 0, time.monotonic() + 240
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dep.versions_topic}: {seen:,} of {n:,} events learned after 240 s")
            for name, svc in stack.services.items():
                if not svc.alive():
                    raise RuntimeError(f"{name} died: {stack.tail(name)}")
            for msg in consumer.consume(100, 0.25):
                if msg.error() is None and msg.value():
                    version = codec.decode(msg.value() or b"")
                    if version["model_name"] == MODEL:
                        seen = max(seen, int(version["events_seen"]))
            on_progress(seen)
    finally:
        consumer.close()


def river_inprocess(vectors: Sequence[dict[str, Any]], estimator: str) -> Measured:
    """The same pipeline in one Python loop, no Kafka: predict_proba_one, Accuracy.update, learn_one."""
    model = estimators.build(estimator)
    accuracy = river_metrics.Accuracy()  # type: ignore[no-untyped-call]
    started, cpu = time.perf_counter(), time.thread_time()
    for fv in vectors:
        x, y = fv["features"], fv["label"]
        proba = model.predict_proba_one(x)
        y_pred = max(proba, key=proba.__getitem__) if proba else None
        accuracy.update(y, y_pred)
        model.learn_one(x, y)
    elapsed = time.perf_counter() - started
    cpu_us = (time.thread_time() - cpu) * 1e6 / len(vectors)
    value = float(accuracy.get())  # type: ignore[no-untyped-call]
    return Measured(len(vectors) / elapsed, {"accuracy": value, "cpu_us_per_event": (cpu_us, cpu_us)})


# -- Quix Streams: the same two stages written with the library a Python team would otherwise pick -------
QUIX_SCRIPT = Path(__file__).with_name("quix_stages.py")


def quix_stage(
    dep: Deployment,
    stage: str,
    records: Sequence[tuple[bytes | None, bytes]],
    quix_python: Path,
    model: Any = None,
    avro_schema: dict[str, Any] | None = None,
    expected: dict[str, dict[str, float]] | None = None,
) -> Measured:
    """One Quix Streams stage (`bench/quix_stages.py`, in its own virtual environment) drains N records
    (JSON, or Avro of `avro_schema`) from a topic of its own; rate from the processing stamps it writes, CPU
    per event of its main thread. With `expected` (features by event id), its outputs are checked."""
    if not quix_python.exists():
        raise FileNotFoundError(f"{quix_python} is missing: `make quix-venv` builds it")
    about = "make bench: input and output of a Quix Streams stage"
    topics = [
        TopicSpec(f"{dep.prefix}.quix.{name}", name, "FeatureVector", "json-or-avro", "event id", about, 1, 1)
        for name in ("in", "out")
    ]
    ensure_topics(dep.settings, topics)
    source, sink = (t.name for t in topics)
    produce_all(make_producer(dep.settings, **{"linger.ms": 20}), source, records)
    dep.workdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(quix_python), str(QUIX_SCRIPT), stage, "--bootstrap", dep.bootstrap, "--input", source,
           "--output", sink, "--group", f"{dep.prefix}-quix-{stage}",
           "--state-dir", str(dep.workdir / "quix-state"),
           # our data loops' batching, so the two differ in the library, not in the client's settings
           "--linger-ms", str(dep.settings.linger_ms), "--fetch-min-bytes", str(dep.settings.fetch_min_bytes),
           "--fetch-max-wait-ms", str(dep.settings.fetch_max_wait_ms)]  # fmt: skip
    if model is not None:
        model_file = dep.workdir / "model.pkl"
        model_file.write_bytes(pickle.dumps(model))  # our own model, for our own subprocess
        cmd += ["--model", str(model_file)]
    if avro_schema is not None:
        schema_file = dep.workdir / "schema.avsc"
        schema_file.write_text(json.dumps(avro_schema))
        cmd += ["--avro-schema", str(schema_file)]
    log_path = dep.workdir / f"quix-{stage}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        meter = DrainMeter(proc.pid)

        def poll(count: int) -> None:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the Quix {stage} stage exited with {proc.returncode}: {tail}")
            meter.poll(count)

        dep.wait_count(sink, len(records), 240, None, poll)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    stamp = "feature_time" if stage == "features" else "prediction_time"
    outputs = [json.loads(m.value() or b"{}") for m in read_to_end(dep.settings, sink, 120)]
    stamps = [o[stamp] for o in outputs]
    eps = stats.rate_from_batches([(t / 1000, c) for t, c in stats.group_stamps(stamps)])
    details: dict[str, Any] = {"events": len(stamps), "cpu_us_per_event": meter.per_event_us()}
    if expected is not None:  # the same features as ours, or the comparison is void
        details["mismatches"] = sum(
            1
            for o in outputs
            if any(
                not math.isclose(o["features"][k], v, rel_tol=1e-9)
                for k, v in expected[o["event_id"]].items()
            )
        )
    return Measured(eps, details)
