"""Shared pieces of the service composition roots: logging, settings, control-topic state, dead letters."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
import mode
from confluent_kafka import KafkaError, Message

from streamml import limits
from streamml.codec import (
    codec_for,
    encoder_for,
    frame_topics,
    is_framed_topic,
    registry_in_use,
    use_registry,
)
from streamml.errors import (
    BrokerUnavailableError,
    DecodeError,
    DependencyUnavailableError,
    StreamMLError,
    ValidationError,
)
from streamml.follow import ControlTail, start_offsets
from streamml.kafka import check_broker, ensure_topics, kafka_error, make_producer
from streamml.metrics import CONTROL_SKIPPED, DEAD_LETTERED, ERRORS
from streamml.pipelines import validate_definition
from streamml.registry import Registry, framed_encoders
from streamml.runtime import Output, end_offsets, is_retriable, read_to_end
from streamml.settings import Settings
from streamml.stalls import LoopWatch, stack_of
from streamml.topics import PIPELINE_NAME, Catalogue

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def prepare(settings: Settings, service: str) -> Catalogue:
    """Fail fast without a broker; make sure the global topics the service uses exist before anything
    subscribes (only those: on a secured cluster its principal may see no others)."""
    check_broker(settings)
    catalogue = Catalogue(settings)
    ensure_topics(settings, catalogue.used_by(catalogue.global_topics(), service))
    registry = Registry.from_settings(settings)
    use_registry(registry)  # framed records (typed feature vectors, ...) decode wherever they are read
    if registry is not None:  # the global topics this service writes: Confluent-framed, any SerDe reads them
        registry.wait_ready(settings.schema_registry_wait_s)
        frame_topics(framed_encoders(registry, framed_topics(catalogue, service)))
    return catalogue


def framed_topics(catalogue: Catalogue, writer: str) -> list[tuple[str, str]]:
    """(topic, record type) of the global topics `writer` writes that are framed when a registry is in use:
    every one but the internal state topics (monitor and controller snapshots, read only by their writer)."""
    internal = {catalogue.monitor_state().name, catalogue.controller_state().name}
    return [
        (spec.name, spec.schema)
        for spec in catalogue.global_topics()
        if writer in spec.writers and spec.name not in internal
    ]


def frame_dead_letters(catalogue: Catalogue, pipeline: str) -> None:
    """With a registry in use, the pipeline's dead-letter topic is written Confluent-framed under its own
    subject, as the global topics are: registered once per process and pipeline, when the service loads
    the pipeline (a registry it cannot reach leaves that topic single-object, logged)."""
    registry = registry_in_use()
    topic = catalogue.dead_letter(pipeline).name
    if isinstance(registry, Registry) and not is_framed_topic(topic):
        frame_topics(framed_encoders(registry, [(topic, "DeadLetter")]))


def dead_letter(
    catalogue: Catalogue, service: str, pipeline: str | None, msg: Message, exc: BaseException
) -> Output:
    """A DeadLetter record with the original bytes and the reason, on the dead-letter topic of the
    pipeline whose topic the record came from (never one named by the record's content, which may not
    exist), or on the global dead-letter topic. What it echoes is capped so it always fits a message.
    """
    reason = type(exc).__name__
    source = catalogue.resolve(msg.topic() or "")
    owner = source_pipeline(catalogue, msg.topic() or "") if source is not None else None
    if owner is None and pipeline is not None and PIPELINE_NAME.match(pipeline) and source is None:
        owner = pipeline  # a topic outside the catalogue (a user-named raw topic) of a known pipeline
    DEAD_LETTERED.labels(service, owner or "", reason).inc()
    key = msg.key() if isinstance(msg.key(), bytes) else None
    value = msg.value() if isinstance(msg.value(), bytes) else None
    key, _ = limits.clip_bytes(key, limits.DEAD_LETTER_KEY_BYTES)
    value, cut = limits.clip_bytes(value, limits.DEAD_LETTER_VALUE_BYTES)
    error = limits.clip(str(exc) or reason)
    if cut:
        error += (
            f" (original value truncated: {cut} of {cut + limits.DEAD_LETTER_VALUE_BYTES} bytes left out)"
        )
    record = {
        "source_topic": limits.clip(msg.topic() or "", 300),
        "source_partition": msg.partition() or 0,
        "source_offset": msg.offset() or 0,
        "original_key": key,
        "original_value": value,
        "error_type": reason,
        "error": error,
        "service": service,
        "pipeline": owner,
        "failed_at": now_ms(),
    }
    topic = catalogue.dead_letter(owner).name if owner else catalogue.dead_letters().name
    out_key = f"{record['source_topic']}/{record['source_partition']}/{record['source_offset']}".encode()
    return Output(topic, out_key, encoder_for(topic, "DeadLetter").encode(record))


def source_pipeline(catalogue: Catalogue, topic: str) -> str | None:
    """The pipeline a per-pipeline topic of the catalogue belongs to (None for other topics)."""
    spec = catalogue.resolve(topic)
    if spec is None or spec.role not in Catalogue.PIPELINE_ROLES:
        return None
    return topic[len(catalogue.prefix) + 1 : -(len(spec.role) + 1)]


def check_declared_model(definitions: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    """A decision about a model its pipeline does not declare is refused (skipped with a CONTROL alert):
    acting on it would, e.g., make services believe another model serves and stop AUTO promotion."""
    models = (definitions.get(record["pipeline"]) or {}).get("models")
    if models is not None and record["model_name"] not in {m["name"] for m in models}:
        raise ValidationError(
            f"{record['action']} names model {limits.clip(record['model_name'], 80)!r}, "
            f"not declared by pipeline {record['pipeline']}"
        )


Apply = Callable[[dict[str, Any] | None, Any], None]
Validate = Callable[[dict[str, Any]], None]

# A control record whose application failed with "not now" (a broker or the registry away) waits and is
# tried again, first after WAIT_FIRST_S, the pause doubling up to WAIT_MAX_S; after WAIT_GIVE_UP_S it is
# skipped like an invalid one. Later records of its partition wait behind it, so they apply in order.
WAIT_FIRST_S = 2.0
WAIT_MAX_S = 30.0
WAIT_GIVE_UP_S = 600.0
WAITING_MAX = 10_000  # per partition; more than that waiting are skipped (each with its alert)
_NOT_NOW = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT}


def not_now(exc: BaseException) -> bool:
    """A failure that says "not now" (a broker or the registry unreachable), not "this record is wrong"."""
    if isinstance(exc, BrokerUnavailableError | DependencyUnavailableError):
        return True
    err = kafka_error(exc)
    return err is not None and not err.fatal() and (is_retriable(err) or err.code() in _NOT_NOW)


@dataclass
class _Waiting:
    """Control records of one partition taken but not applied yet, oldest first."""

    records: deque[tuple[str, int, bytes | None, Apply, Any]]  # schema, offset, value, apply, message
    since: float  # when the first of them first failed
    next_try: float
    pause: float = WAIT_FIRST_S


def check_record_pipeline(record: dict[str, Any]) -> None:
    """Control records name a pipeline: it must be a valid name (it becomes part of topic names)."""
    name = record.get("pipeline", record.get("name"))
    if not isinstance(name, str) or not PIPELINE_NAME.match(name):
        raise ValidationError(f"invalid pipeline name {limits.clip(repr(name), 80)}")


@dataclass
class ControlFollower:
    """Applies control-topic records once each: first all existing ones (bootstrap), then new ones.

    The bootstrap reads each topic to its end before the data path starts ("load the live state before
    consuming"); `follow` then reads on from there. Control topics are broadcast: every instance reads
    every partition itself, by assignment (`streamml.follow.ControlTail`), never through a consumer group
    shared with its siblings, which would hand each new record to one instance only. Records already
    applied are skipped by offset, so a replay changes nothing.

    Every record has one fate: applied, or skipped with a logged reason, the `streamml_control_skipped_total`
    metric and a DriftAlert of kind CONTROL. A record whose application fails with "not now" (a broker away
    past the topic check's deadline, the registry unreachable) is neither: it waits, with the later records
    of its partition behind it, and is tried again with a growing pause (`retry_waiting`), skipped only
    after WAIT_GIVE_UP_S. A record is validated in full before it is applied (so a bad
    revision never replaces a good one), and nothing it raises escapes: a poison record on a compacted
    topic would otherwise stop the service at every start.
    """

    settings: Settings
    service: str = ""
    applied: dict[tuple[str, int], int] = field(default_factory=dict)
    validators: dict[str, Validate] = field(default_factory=dict)
    skipped: int = 0
    _alerts: Any = None
    _handlers: dict[str, tuple[str, Apply]] = field(default_factory=dict, repr=False)
    _tail: ControlTail | None = field(default=None, repr=False)
    _waiting: dict[tuple[str, int], _Waiting] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        catalogue = Catalogue(self.settings)
        self.validators.setdefault("PipelineDefinition", lambda r: validate_definition(r, catalogue))

    def bootstrap(self, topic: str, schema: str, apply: Apply) -> int:
        msgs = read_to_end(self.settings, topic)
        for msg in msgs:
            self._apply(topic, schema, msg.partition() or 0, msg.offset() or 0, msg.value(), apply, msg)
        return len(msgs)

    def skip_history(self, topic: str) -> None:
        """Treat everything already on `topic` as applied: only records produced from now on act."""
        for msg_partition, high in end_offsets(self.settings, topic).items():
            self.applied[(topic, msg_partition)] = high

    def follow(self, app: faust.App, topic: str, schema: str, apply: Apply) -> None:
        """Apply the new records of `topic` as they come, from where the bootstrap stopped.

        Every partition is read by this instance itself (assigned, read_committed, never committed), in a
        task on the app's event loop; the consumer closes when the app stops.
        """
        if topic in self._handlers:
            raise ValueError(f"{topic} is followed already")
        self._handlers[topic] = (schema, apply)
        if self._tail is None:
            self._tail = ControlTail(
                self.settings,
                self.service or self.settings.client_id,
                self._deliver,
                lambda t, parts: start_offsets(self.applied, t, parts),
            )
            tail = self._tail

            async def follow_control_topics() -> None:
                retries = asyncio.ensure_future(self._retry_waiting_forever())
                try:
                    await tail.run()
                finally:
                    retries.cancel()

            app.task(follow_control_topics)
        self._tail.add(topic)

    def _deliver(self, msg: Message) -> None:
        topic = msg.topic() or ""
        handler = self._handlers.get(topic)
        if handler is not None:
            schema, apply = handler
            self._apply(topic, schema, msg.partition() or 0, msg.offset() or 0, msg.value(), apply, msg)

    def position(self, topic: str) -> dict[int, int]:
        """Per partition of a followed topic, the offset up to which every record has been applied."""
        return {} if self._tail is None else self._tail.position(topic)

    async def caught_up(self, topic: str, timeout_s: float) -> bool:
        """Wait until every record written to a followed `topic` before the call has been applied
        (False if that takes longer than `timeout_s`). For a single writer that has just taken a role."""
        if self._tail is None:
            raise ValueError(f"{topic} is not followed")
        deadline = time.monotonic() + timeout_s
        if not await self._tail.caught_up(topic, timeout_s):
            return False
        while any(t == topic for t, _p in self._waiting):  # read, but some records still wait
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _retry_waiting_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.retry_waiting()

    def waiting(self) -> int:
        """Control records read but not applied yet (their application said "not now")."""
        return sum(len(w.records) for w in self._waiting.values())

    def retry_waiting(self, now: float | None = None) -> int:
        """Try the waiting records of each partition whose pause is over, in order, until one says "not
        now" again; returns how many were applied or skipped."""
        now = time.monotonic() if now is None else now
        done = 0
        for key in [k for k, w in self._waiting.items() if w.next_try <= now]:
            topic, partition = key
            w = self._waiting[key]
            while w.records:
                schema, offset, value, apply, msg = w.records[0]
                exc = self._attempt(topic, schema, value, apply, msg)
                if exc is not None and not_now(exc) and now - w.since < WAIT_GIVE_UP_S:
                    w.pause = min(WAIT_MAX_S, w.pause * 2)
                    w.next_try = now + w.pause
                    break
                w.records.popleft()
                done += 1
                if exc is not None:
                    self.skip(topic, partition, offset, exc, self._decoded(schema, value))
            if not w.records:
                del self._waiting[key]
                log.info("%s[%d]: the control records that waited are applied", topic, partition)
        return done

    def _apply(
        self,
        topic: str,
        schema: str,
        partition: int,
        offset: int,
        value: bytes | None,
        apply: Apply,
        msg: Any,
    ) -> None:
        if offset < self.applied.get((topic, partition), 0):
            return
        self.applied[(topic, partition)] = offset + 1
        key = (topic, partition)
        held = self._waiting.get(key)
        if held is not None:  # an earlier record of this partition waits: this one waits behind it
            if len(held.records) >= WAITING_MAX:
                self.skip(topic, partition, offset, BrokerUnavailableError("too many records waiting"), None)
            else:
                held.records.append((schema, offset, value, apply, msg))
            return
        exc = self._attempt(topic, schema, value, apply, msg)
        if exc is None:
            return
        if not_now(exc):
            now = time.monotonic()
            self._waiting[key] = _Waiting(
                deque([(schema, offset, value, apply, msg)]), now, now + WAIT_FIRST_S
            )
            log.warning(
                "%s[%d]@%d waits (tried again in %.0f s): %s", topic, partition, offset, WAIT_FIRST_S, exc
            )
            return
        self.skip(topic, partition, offset, exc, self._decoded(schema, value))

    def _attempt(
        self, topic: str, schema: str, value: bytes | None, apply: Apply, msg: Any
    ) -> BaseException | None:
        """Validate and apply one record; what it raised, or None once applied."""
        try:
            if value is None:
                apply(None, msg)  # a tombstone: services ignore or forget what it keys
                return None
            if not isinstance(value, bytes) or len(value) > limits.MAX_CONTROL_BYTES:
                raise DecodeError("record too large for a control topic")
            record = codec_for(schema).decode(value)
            if schema in _PIPELINE_NAMED:
                check_record_pipeline(record)
            validate = self.validators.get(schema)
            if validate is not None:
                validate(record)
            apply(record, msg)
        except Exception as exc:  # the record boundary: whatever it raises is the record's fate
            return exc
        return None

    @staticmethod
    def _decoded(schema: str, value: bytes | None) -> dict[str, Any] | None:
        """The record, if it decodes (the CONTROL alert names its pipeline and model)."""
        if not isinstance(value, bytes) or len(value) > limits.MAX_CONTROL_BYTES:
            return None
        try:
            record: dict[str, Any] = codec_for(schema).decode(value)
        except Exception:
            return None
        return record

    def skip(
        self, topic: str, partition: int, offset: int, exc: BaseException, record: dict[str, Any] | None
    ) -> None:
        """Log, count and alert one control record that cannot be applied."""
        self.skipped += 1
        reason = type(exc).__name__
        CONTROL_SKIPPED.labels(self.service or self.settings.client_id, topic, reason).inc()
        message = limits.clip(f"{self.service or 'service'} skipped {topic}[{partition}]@{offset}: {exc}")
        log.error("%s", message, exc_info=not isinstance(exc, StreamMLError))
        pipeline, model_name, model_version = "", "", 0
        if record is not None:
            name = record.get("pipeline", record.get("name"))
            if isinstance(name, str) and PIPELINE_NAME.match(name):
                pipeline = name
            if isinstance(record.get("model_name"), str) and isinstance(record.get("version"), int):
                model_name, model_version = limits.clip(record["model_name"], 100), record["version"]
        alert = {
            "alert_id": f"control-{topic}-{partition}-{offset}-{self.service}",
            "pipeline": pipeline,
            "model_name": model_name,
            "model_version": model_version,
            "kind": "CONTROL",
            "detector": f"control:{self.service}",
            "feature": None,
            "statistic": None,
            "threshold": None,
            "window": [
                {"topic": topic, "partition": partition, "start_offset": offset, "end_offset": offset + 1}
            ],
            "severity": "CRITICAL",
            "message": message,
            "detected_at": now_ms(),
        }
        alerts_topic = Catalogue(self.settings).drift_alerts().name
        if topic == alerts_topic:
            return  # a bad alert is not answered with another alert (no loops between services)
        try:
            if self._alerts is None:
                self._alerts = make_producer(self.settings, **{"linger.ms": 0})
            self._alerts.produce(
                alerts_topic,
                encoder_for(alerts_topic, "DriftAlert").encode(alert),
                pipeline.encode(),
            )
            self._alerts.poll(0)
        except Exception:  # the alert is best effort: the log line and the metric are the record
            ERRORS.labels(self.service or self.settings.client_id, "control_alert").inc()
            log.exception("could not publish the CONTROL alert for %s[%d]@%d", topic, partition, offset)

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
        if self._alerts is not None:
            self._alerts.flush(5)


# Control records whose `pipeline` (or `name`) field becomes part of topic names.
_PIPELINE_NAMED = {
    "PipelineDefinition",
    "ModelVersion",
    "Promotion",
    "TrainingRequest",
    "TrainingResult",
    "Evaluation",
}


def run_service(service: str, compose: Callable[[Settings], tuple[faust.App, list[Any]]]) -> None:
    """Entry point of every service: settings, logging, composition, metrics endpoint, then the worker.

    A configuration or broker problem found while composing exits with status 2 and one clear line.
    SIGTERM or SIGINT before the worker runs (while composing reads the control topics: nothing is
    consumed or committed yet) exits at once with status 0; the worker then handles them itself.
    """
    from streamml import metrics
    from streamml.settings import get_settings

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_worker)
    settings = get_settings()
    setup_logging(settings)
    try:
        app, services = compose(settings)
    except StreamMLError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc
    metrics.serve(settings.metrics_host, settings.metrics_port)
    settle_garbage_collector()
    run_worker(app, *services, loglevel=settings.log_level, service=service)


# Allocations between collections of the youngest generation (CPython's default: 700). The data paths
# allocate a few objects per event and free them at once; collecting every 700 allocations walked the young
# objects thousands of times a second.
GC_GEN0_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Once composed: what start-up built (Faust, River, scikit-learn, schemas) lives as long as the process,
    so it is moved out of the collector's reach (`gc.freeze`: full collections no longer walk it), and the
    youngest generation is collected less often. Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


# SIGTERM to exit: the data loops' final commit (runtime.STOP_TIMEOUT_S), then Faust's own shutdown. If a
# stop still hangs (a broker that does not answer), the process exits at this deadline with status 1:
# whatever was not committed by then is processed again after the restart (at-least-once).
STOP_DEADLINE_S = 9.0
BUFFER_DRAIN_S = 2.0  # what the data loops left in Faust's producer buffer (table writes) gets this long


class _Worker(faust.Worker):
    """A Faust worker whose stop is bounded: data loops first, then the app, then a deadline."""

    def __init__(self, app: faust.App, *services: Any, service: str, **kwargs: Any) -> None:
        self._data_loops = [s for s in services if isinstance(s, mode.Service)]
        self._watchdog: threading.Timer | None = None
        self._loop_watch = LoopWatch(service)
        super().__init__(app, *services, **kwargs)

    async def on_start(self) -> None:
        self._loop_watch.start()  # from the start: a stall while restoring or fencing is reported too
        await super().on_start()

    def _on_sigterm(self) -> None:
        self._arm_watchdog("SIGTERM")
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._arm_watchdog("SIGINT")
        super()._on_sigint()

    def _arm_watchdog(self, signal_name: str) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Timer(STOP_DEADLINE_S, _stop_overdue, args=(signal_name,))
            self._watchdog.daemon = True
            self._watchdog.start()

    async def on_stop(self) -> None:
        # The data loops commit first, while the app (tables, the Faust producer) still runs: the features
        # service writes its windows to a Faust table from its data loop. Faust stops its children last first,
        # which would leave the data loop running on until the app had stopped.
        for loop in self._data_loops:
            try:
                await loop.stop()
            except Exception:  # the app must stop too: log and go on
                log.exception("stopping %s failed", loop)
        await self._drain_producer_buffer()
        await super().on_stop()

    async def _drain_producer_buffer(self) -> None:
        """Let Faust send what is left in its producer buffer (the features service's table changelog
        writes) before the app stops: Faust closes its producer before that buffer, and a buffer still
        holding records then fails the stop (status 1) and loses them. Its flush gives up after 0.1 s."""
        buffer = getattr(getattr(self.app, "_producer", None), "buffer", None)
        deadline = time.monotonic() + BUFFER_DRAIN_S
        while buffer is not None and buffer.size and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if buffer is not None and buffer.size:
            log.warning("stopping with %d records in Faust's producer buffer", buffer.size)


def _stop_overdue(signal_name: str) -> None:
    log.error(
        "still stopping %.0f s after %s (threads: %s); exiting now: what was not committed is processed "
        "again after the restart. The main thread is in:\n%s",
        STOP_DEADLINE_S,
        signal_name,
        ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread()),
        stack_of(threading.main_thread().ident),
    )
    _exit_now(1)


def _exit_before_worker(signum: int, _frame: Any) -> None:
    log.info("%s while starting: exiting", signal.Signals(signum).name)
    raise SystemExit(0)


def run_worker(app: faust.App, *services: Any, service: str, loglevel: str = "INFO") -> None:
    """Run the Faust worker until SIGTERM/SIGINT; the stop commits and finishes within 10 s.

    Once the worker has stopped, every client has flushed and closed, so the process leaves without the
    interpreter's teardown (collecting every module of River, scikit-learn and Faust: 2-3 s measured on
    two busy cores) and without waiting for threads still busy (a model fit in the trainer's executor:
    its request was not committed and is answered after the restart).
    """
    worker = _Worker(
        app, *services, service=service, loglevel=loglevel.lower(), quiet=True, redirect_stdouts=False
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    else:  # pragma: no cover - execute_from_commandline always exits
        code = 0
    busy = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    log.info("stopped; exiting with status %d%s", code, f" (not waiting for {busy})" if busy else "")
    _exit_now(code)


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
