"""Where the time goes per event: phase timings of the hot paths in-process, and py-spy service profiles.

The in-process breakdown feeds the real handlers (`Predictor.handle`, `Learner.handle`) with messages read
from Kafka and times each phase on its own; the py-spy profile samples the real service process during
the measured drain and sorts every sample into a phase by its stack.
"""

from __future__ import annotations

import json
import linecache
import logging
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message

from bench.workload import PIPELINE, Deployment, promotion
from streamml.codec import codec_for
from streamml.kafka import make_consumer, make_producer
from streamml.settings import Settings

log = logging.getLogger(__name__)


# -- py-spy -----------------------------------------------------------------------------------------------
@dataclass
class Spy:
    """A `py-spy record` of one process (ours to stop: SIGINT makes py-spy write its file)."""

    proc: subprocess.Popen[bytes] | None
    path: Path | None

    @classmethod
    def start(cls, pid: int, path: Path, rate: int = 200) -> Spy:
        exe = shutil.which("py-spy")
        if exe is None:
            log.warning("py-spy is not installed (pip install py-spy): no profile of pid %d", pid)
            return cls(None, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "record", "--pid", str(pid), "--format", "speedscope", "-o", str(path),
               "--rate", str(rate), "--idle", "--nonblocking"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # py-spy attaches before the measured work starts
        return cls(proc, path)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        if self.path is None or not self.path.exists():
            log.warning("py-spy wrote no profile: %s", err.decode(errors="replace")[-500:])
            self.path = None


@dataclass(frozen=True)
class Frame:
    name: str
    file: str
    line: int


def _source(frame: Frame) -> str:
    return linecache.getline(frame.file, frame.line) if frame.line > 0 else ""


IDLE = "idle (waiting for records)"
IMPORTS = "imports (first model load)"
NOT_PER_EVENT = (IDLE, IMPORTS)


def is_idle(stack: Sequence[Frame]) -> bool:
    """A sample of the event loop waiting (select) rather than working."""
    return bool(stack) and stack[-1].file.endswith("selectors.py")


def classify(stack: Sequence[Frame]) -> str:
    """The phase of one sample (stack root first): the innermost frame that names a phase wins."""
    if is_idle(stack):
        return IDLE
    if any(f.file.startswith("<frozen importlib") for f in stack):
        return IMPORTS  # River/SciPy are imported when the first model is unpickled: once, not per event
    for frame in reversed(stack):
        f = frame.file
        name = frame.name.rsplit(".", 1)[-1]  # py-spy names methods Class.method
        if "/river/" in f:
            return "model (River)"
        if f.endswith("streamml/codec.py"):
            if name.startswith("decode"):
                return "decode (Avro/JSON)"
            if name.startswith("encode"):
                return "encode (Avro)"
        if "/json/" in f:
            return "decode (Avro/JSON)"
        if "prometheus_client" in f:
            return "metrics (Prometheus)"
        if f.endswith("streamml/artifacts.py") or f.endswith("/pickle.py"):
            return "snapshot (pickle, sign)"
        if f.endswith("streams/predictor.py"):
            return "prediction record"
        if f.endswith("streams/learner.py"):
            return "learner glue (metrics, offsets)"
        if f.endswith("streams/features.py"):
            return "feature steps"
        if name == "handle" and "/services/" in f:
            return "handler (other)"
        if f.endswith("streamml/runtime.py"):
            if name in ("_commit", "_report_lag"):
                return "commit (flush + offsets)"
            if name in ("_produce_all", "_on_delivery"):
                return "produce (librdkafka)"
            if name == "_run" and ".consume(" in _source(frame):
                return "consume (librdkafka)"
            if name in ("_run", "process", "_resubscribe", "_begin"):
                return "BatchLoop (other)"
        if "/faust/" in f or "/mode/" in f or "/aiokafka/" in f:
            return "faust (control topics, timers)"
    return "other (asyncio, GC, threads)"


@dataclass(frozen=True)
class Profile:
    """Samples of one thread, by phase and by innermost function (what to optimise first)."""

    samples: int
    seconds: float  # wall time the samples cover
    by_phase: dict[str, int]
    seconds_by_phase: dict[str, float]
    by_leaf: dict[str, int]

    @property
    def busy_samples(self) -> int:
        return sum(v for k, v in self.by_phase.items() if k not in NOT_PER_EVENT)


def read_speedscope(path: Path) -> Profile:
    """The main thread's samples of a py-spy speedscope file (the event loop runs every handler)."""
    data = json.loads(path.read_text())
    frames = [
        Frame(f["name"], f.get("file") or "", int(f.get("line") or 0)) for f in data["shared"]["frames"]
    ]
    profiles = data["profiles"]
    main = [p for p in profiles if "MainThread" in p.get("name", "")] or sorted(
        profiles, key=lambda p: len(p["samples"]), reverse=True
    )[:1]
    by_phase: Counter[str] = Counter()
    seconds: dict[str, float] = {}
    by_leaf: Counter[str] = Counter()
    total = 0
    for prof in main:
        weights = prof.get("weights") or [0.0] * len(prof["samples"])
        for sample, weight in zip(prof["samples"], weights, strict=True):
            stack = [frames[i] for i in sample]
            phase = classify(stack)
            by_phase[phase] += 1
            seconds[phase] = seconds.get(phase, 0.0) + float(weight)
            total += 1
            if stack and phase not in NOT_PER_EVENT:
                leaf = stack[-1]
                by_leaf[f"{leaf.name} ({Path(leaf.file).name}:{leaf.line})"] += 1
    return Profile(total, sum(seconds.values()), dict(by_phase), dict(seconds), dict(by_leaf))


def per_event_from_profile(profile: Profile, us_per_event: float) -> dict[str, float]:
    """Split a measured µs/event over the busy samples' phases (idle and import samples left out).

    Valid while the process was saturated (a drain): then its busy time per event is 1e6 / events/s.
    """
    busy = {k: v for k, v in profile.by_phase.items() if k not in NOT_PER_EVENT}
    n = sum(busy.values())
    if n == 0:
        return {}
    return {k: us_per_event * v / n for k, v in sorted(busy.items(), key=lambda kv: -kv[1])}


def per_event_absolute(profile: Profile, events: int) -> dict[str, float]:
    """Busy main-thread time per event by phase, for a process that was not saturated (e2e at a set rate)."""
    if events <= 0:
        return {}
    busy = {k: v for k, v in profile.seconds_by_phase.items() if k not in NOT_PER_EVENT}
    return {k: v * 1e6 / events for k, v in sorted(busy.items(), key=lambda kv: -kv[1])}


# -- in-process phase timings -------------------------------------------------------------------------------
ROUNDS = 3  # each phase timed once per round, rounds interleaved; the fastest round is the least disturbed
SAMPLE = 20_000  # records fed to the handlers: enough for stable per-event numbers, quick to repeat


def interleaved(phases: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """CPU µs per event of each phase (each call processes n events), min over interleaved rounds.

    Thread CPU time, not wall time: on a shared 2-core machine waiting for a CPU would swamp the phases;
    interleaving spreads what is left (caches, frequency) over all phases instead of skewing one.
    """
    best = dict.fromkeys(phases, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in phases.items():
            started = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - started)
    return {name: seconds / max(n, 1) * 1e6 for name, seconds in best.items()}


def each(fn: Callable[[Any], object], items: Sequence[Any]) -> Callable[[], None]:
    """A phase that applies fn to every item and drops the results, as a handler's loop does."""

    def run() -> None:
        for item in items:
            fn(item)

    return run


def consume_timed(settings: Settings, topic: str, n: int, max_batch: int) -> tuple[list[Message], float]:
    """The first n records of topic, consumed like `BatchLoop`; calling thread's CPU µs/event."""
    consumer = make_consumer(
        settings, f"{settings.topic_prefix}-breakdown-{time.monotonic_ns()}",
        **{"enable.auto.offset.store": False, "isolation.level": "read_committed"},
    )  # fmt: skip
    consumer.subscribe([topic])
    msgs: list[Message] = []
    started = 0.0
    deadline = time.monotonic() + 120
    try:
        while len(msgs) < n and time.monotonic() < deadline:
            batch = consumer.consume(max_batch, 0)
            if not batch:
                time.sleep(0.002)
                continue
            if not msgs:
                started = time.thread_time()
            msgs.extend(m for m in batch if m.error() is None)
        elapsed = time.thread_time() - started
    finally:
        consumer.close()
    if len(msgs) < n:
        raise TimeoutError(f"read {len(msgs)} of {n} records of {topic}")
    return msgs[:n], elapsed / len(msgs) * 1e6


def produce_timed(settings: Settings, topic: str, records: Sequence[tuple[bytes | None, bytes]],
                  max_batch: int) -> float:  # fmt: skip
    """Calling thread's CPU µs/event to produce like `BatchLoop` (callbacks, poll per batch, flush)."""
    producer = make_producer(settings, **{"linger.ms": 2})
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    started = time.thread_time()
    produce = producer.produce
    for i, (key, value) in enumerate(records):
        try:
            produce(topic, value, key, on_delivery=on_delivery)
        except BufferError:
            producer.flush(10)
            produce(topic, value, key, on_delivery=on_delivery)
        if i % max_batch == 0:
            producer.poll(0)
    producer.flush(30)
    return (time.thread_time() - started) / len(records) * 1e6


def batches(msgs: Sequence[Message], size: int) -> list[list[Message]]:
    return [list(msgs[i : i + size]) for i in range(0, len(msgs), size)]


def predictor_breakdown(
    dep: Deployment, definition: dict[str, Any], version: dict[str, Any], max_batch: int
) -> dict[str, float]:
    """µs/event of each phase of the predictor's data path, fed the deployment's feature records."""
    from services.predictor.app import Predictor  # imports Faust; only needed here
    from streams.predictor import predict_one, prediction_record

    n = min(SAMPLE, dep.topic_count(dep.features_topic))
    msgs, consume_us = consume_timed(dep.settings, dep.features_topic, n, max_batch)
    predictor = Predictor(dep.settings, dep.catalogue)
    predictor.on_pipeline(definition, None)
    predictor.on_version(version, None)
    predictor.on_promotion(promotion(int(version["version"]), None, 0), None)
    live = predictor.registry.live[PIPELINE]
    values = [m.value() or b"" for m in msgs]
    fdecode = codec_for("FeatureVector").decode
    pencode = codec_for("Prediction").encode
    fvs = [fdecode(v) for v in values]
    records = [prediction_record(live, fv, 0) for fv in fvs]
    chunks = batches(msgs, max_batch)
    t = interleaved(
        {
            "decode": each(fdecode, values),
            "predict": each(lambda fv: predict_one(live, fv["features"]), fvs),
            "record": each(lambda fv: prediction_record(live, fv, 0), fvs),
            "encode": each(pencode, records),
            "handler": each(predictor.handle, chunks),
        },
        n,
    )
    outputs = [(o.key, o.value or b"") for o in predictor.handle(chunks[0])]
    sample = (outputs * (n // max(len(outputs), 1) + 1))[:n]
    predictor.alerts.flush(1)
    return {
        "consume": consume_us,
        "decode": t["decode"],
        "predict (predict_proba_one)": t["predict"],
        "prediction record (dict, rest)": t["record"] - t["predict"],
        "encode": t["encode"],
        "handler other (metrics, Output, dead-letter try)": t["handler"]
        - t["decode"]
        - t["record"]
        - t["encode"],
        "produce": produce_timed(dep.settings, dep.predictions_topic, sample, max_batch),
        "_handler_total": t["handler"],
    }


def learner_breakdown(dep: Deployment, definition: dict[str, Any], max_batch: int) -> dict[str, float]:
    """µs/event of each phase of the learner's data path, fed the deployment's labelled vectors."""
    from river import metrics as river_metrics

    from services.learner.app import Learner
    from streamml import estimators
    from streams.learner import OnlineLearner

    n = min(SAMPLE, dep.topic_count(dep.features_topic))
    msgs, consume_us = consume_timed(dep.settings, dep.features_topic, n, max_batch)
    values = [m.value() or b"" for m in msgs]
    fdecode = codec_for("FeatureVector").decode
    fvs = [fdecode(v) for v in values]
    model_spec = definition["models"][0]["estimator_spec"]
    chunks = batches(msgs, max_batch)

    def river_loop() -> None:
        model = estimators.build(model_spec)
        accuracy = river_metrics.Accuracy()  # type: ignore[no-untyped-call]
        for fv in fvs:
            x, y = fv["features"], fv["label"]
            proba = model.predict_proba_one(x)
            accuracy.update(y, max(proba, key=proba.__getitem__) if proba else None)
            model.learn_one(x, y)

    def learner() -> OnlineLearner:
        return OnlineLearner(PIPELINE, "online", model_spec, {}, False, dep.key)

    def learn_loop() -> None:
        ol = learner()
        for fv in fvs:
            ol.learn(fv["features"], fv["label"])

    fresh = []
    for _ in range(ROUNDS):  # built up front: on_pipeline checks topics with the broker
        service = Learner(dep.settings, dep.catalogue, dep.key)
        service.on_pipeline(definition, None)
        fresh.append(service)

    def handle_all() -> None:
        service = fresh.pop()
        for c in chunks:
            service.handle(c)

    t = interleaved(
        {"decode": each(fdecode, values), "river": river_loop, "learn": learn_loop, "handler": handle_all}, n
    )
    trained = learner()
    for fv in fvs[:1000]:
        trained.learn(fv["features"], fv["label"])
    every = int(definition["snapshot_every_events"])
    snapshot_us = interleaved({"snapshot": lambda: trained.snapshot(0)}, 1)["snapshot"] / every
    return {
        "consume": consume_us,
        "decode": t["decode"],
        "River predict+Accuracy+learn (baseline)": t["river"],
        "OnlineLearner.learn extra (LogLoss, counters)": t["learn"] - t["river"],
        "snapshot (amortised)": snapshot_us,
        "handler other (offsets, lookups, join)": t["handler"] - t["decode"] - t["learn"] - snapshot_us,
        "_handler_total": t["handler"],
    }


def loop_rest(breakdown: dict[str, float], service_cpu_us: float | None) -> float | None:
    """CPU µs/event of the service's main thread not explained by consume + handler + produce."""
    if service_cpu_us is None:
        return None
    explained = breakdown["consume"] + breakdown["_handler_total"] + breakdown.get("produce", 0.0)
    return service_cpu_us - explained


def us_per_event(eps: float | None) -> float | None:
    return None if not eps else 1e6 / eps
