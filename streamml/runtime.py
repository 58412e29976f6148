"""What every StreamML service runs on: a Faust app, and a batched Kafka data path inside it.

Faust owns the process: lifecycle, agents on the low-volume control topics (pipelines, model versions,
promotions), tables, timers and web views. The high-volume data path is a `BatchLoop`, a Faust (mode)
service that drains a confluent-kafka consumer in batches on the same event loop, so per-event cost is
our logic plus librdkafka, not Faust's per-message plumbing (measured ~10x faster, see README).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import faust
import mode
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamml import limits
from streamml.codec import prefetch_writers
from streamml.errors import DependencyUnavailableError, StreamMLError
from streamml.kafka import data_fetch, kafka_error, make_consumer, make_producer
from streamml.metrics import BATCH_SECONDS, CONSUMER_LAG, ERRORS, EVENTS_IN, SKIPPED
from streamml.settings import Settings
from streamml.topics import MODEL_MAX_BYTES

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Output:
    """One record to produce. `partition` pins it (a changelog record goes to its state's partition);
    `pipeline` names the pipeline it belongs to where a service routes outputs per pipeline (its writer);
    `headers` travel with the record (a repartitioned event names its source record in one).

    Created once per output record on every data path, so not frozen: a frozen dataclass sets each field
    through object.__setattr__, 1.8 µs per record against 0.4 µs (measured, Python 3.11). Treat it as
    immutable all the same (`dataclasses.replace` for a changed copy)."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    pipeline: str | None = None
    headers: list[tuple[str, bytes]] | None = None


def faust_credentials(settings: Settings) -> Any:
    """The Faust (aiokafka) side of the Kafka security settings, as confluent-kafka reads them in
    `Settings.kafka_config`: TLS with the CA and client certificate, SASL with the mechanism and user."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ssl_ca_location)
        if settings.ssl_certificate_location:
            context.load_cert_chain(settings.ssl_certificate_location, settings.ssl_key_location)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return faust.SASLCredentials(
        username=settings.sasl_username,
        password=password,
        mechanism=settings.sasl_mechanism or "PLAIN",
        ssl_context=context,
    )


def faust_app(service: str, settings: Settings, *, app_id: str | None = None, web: bool = False) -> faust.App:
    """A Faust app configured from settings; web views bind to the configured (loopback) address."""
    brokers = ";".join(f"kafka://{s}" for s in settings.bootstrap_servers.split(","))
    datadir = Path(settings.data_dir) / service
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id or f"{settings.topic_prefix}-{service}",
        broker=brokers,
        store="memory://",
        broker_credentials=faust_credentials(settings),
        datadir=str(datadir),
        consumer_auto_offset_reset="earliest",
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        web_enabled=web,
        web_host=settings.http_host,
        web_port=settings.http_port,
        web_bind=settings.http_host,
        producer_acks=-1,
        producer_max_request_size=64 * 1024 * 1024,
        # A crashed member is noticed in seconds, not a minute, so a restarted service resumes quickly.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        # On stop, commit what the agents finished and cancel the rest instead of waiting for every event in
        # flight (a training request takes minutes): control followers apply each record synchronously, and
        # a request whose offset is not committed is read again and answered once (see services.trainer).
        stream_wait_empty=False,
    )


def watermarks(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> dict[int, tuple[int, int]] | None:
    """(low, high) offsets per partition: what is still stored and where it ends. None if no such topic."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None:
        return None
    deadline = time.monotonic() + timeout_s
    return {p: watermark_offsets(consumer, TopicPartition(topic, p), deadline) for p in meta.partitions}


def watermark_offsets(consumer: Consumer, tp: TopicPartition, deadline: float) -> tuple[int, int]:
    """(low, high) of one partition; retriable errors (a topic created a moment ago has no leader yet) are
    asked again until `deadline`."""
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=max(1.0, deadline - time.monotonic()))
            return int(low), int(high)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or not is_retriable(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_to_end(settings: Settings, topic: str, timeout_s: float = 30.0) -> list[Message]:
    """Every record currently in a topic (all partitions, oldest first per partition)."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}-reader-{time.monotonic_ns()}")
    try:
        marks = watermarks(consumer, topic)
        if marks is None:
            raise StreamMLError(f"topic {topic} does not exist: run `streamml topics create`")
        ends = {p: high for p, (low, high) in marks.items() if high > low}
        parts = [TopicPartition(topic, p, marks[p][0]) for p in ends]
        out: list[Message] = []
        if not parts:
            return out
        consumer.assign(parts)
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise StreamMLError(f"timed out reading {topic} to its end")
            for msg in consumer.consume(1000, 0.2):
                if not msg.error():
                    out.append(msg)
            # The position, not the last record, says when a partition is done: transaction markers
            # occupy offsets but are never delivered.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return out
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """High watermark of each partition of a topic (empty if the topic does not exist)."""
    consumer = make_consumer(settings, f"{settings.topic_prefix}-watermarks")
    try:
        return {p: high for p, (_low, high) in (watermarks(consumer, topic) or {}).items()}
    finally:
        consumer.close()


Handler = Callable[[list[Message]], Iterable[Output]]

# Delivery errors no retry or restart can fix: the output is dropped with a log line and a metric, instead
# of failing the commit (a restart would process the same record, fail the same way, and never progress).
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.RECORD_LIST_TOO_LARGE,
}


# Broker errors that pass: a leader moving, a broker restarting, a request or a delivery timing out. An
# output that fails with one is kept and produced again (librdkafka's `retriable()` flag is not set on every
# such error, e.g. a delivery that timed out while the broker was away).
RETRIABLE = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,  # a new leader's high watermark not caught up yet
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._WAIT_COORD,
        KafkaError._QUEUE_FULL,
    }
)
# Offset commits that fail because the group moved on (a rebalance, or this member timed out): nothing was
# committed, the records are processed again by whoever owns them next. Never fatal.
_GROUP_MOVED = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError._NO_OFFSET,
        KafkaError._STATE,
    }
)


def is_permanent(err: KafkaError) -> bool:
    """The broker refuses this output for good (too large, unknown topic): retrying cannot deliver it."""
    return err.code() in _PERMANENT


def is_retriable(err: KafkaError) -> bool:
    """The same request may succeed later: keep the output and produce it again (never fatal)."""
    if err.fatal() or err.code() in _PERMANENT:
        return False
    return bool(err.retriable()) or err.code() in RETRIABLE


def commit_can_wait(err: KafkaError) -> bool:
    """An offset commit that failed this way is tried again later (or by the partition's next owner)."""
    return is_retriable(err) or err.code() in _GROUP_MOVED


def produce(producer: Producer, out: Output, on_delivery: Callable[[Any, Any], None] | None = None) -> None:
    """Produce one Output (to its pinned partition, if it has one)."""
    extra: dict[str, Any] = {}
    if out.partition is not None:
        extra["partition"] = out.partition
    if out.headers:
        extra["headers"] = out.headers
    producer.produce(out.topic, out.value, out.key, on_delivery=on_delivery, **extra)


@dataclass(eq=False)  # compared by identity: two deliveries of equal outputs are two deliveries
class Delivery:
    """One output of an Outbox: done once acknowledged or refused (`error` says why it was refused)."""

    output: Output
    done: bool = False
    error: KafkaError | None = None


class Outbox:
    """Delivery of outputs produced outside a data loop (decisions, model versions, training results).

    An output that fails with a retriable broker error (a leader moving, a broker restarting) is kept and
    produced again by the next `pump`, never raised; one the broker refuses for good is dropped with a log
    line and `streamml_errors_total{kind="output_refused"}`. Not thread-safe: one thread uses it.
    """

    def __init__(self, producer: Producer, service: str) -> None:
        self.producer = producer
        self.service = service
        self._retry: list[Delivery] = []

    def send(self, output: Output) -> Delivery:
        delivery = Delivery(output)
        self._produce(delivery)
        return delivery

    def pump(self, timeout_s: float) -> int:
        """Produce again what failed with a retriable error and wait up to `timeout_s` for deliveries;
        returns how many outputs are not acknowledged yet."""
        retry, self._retry = self._retry, []
        for delivery in retry:
            self._produce(delivery)
        return int(self.producer.flush(timeout_s)) + len(self._retry)

    def deliver(self, output: Output, timeout_s: float) -> None:
        """Send and wait (blocking: for worker threads) until the broker acknowledges the output; raises
        StreamMLError if it refuses it, or if it is not acknowledged within `timeout_s`."""
        delivery = self.send(output)
        deadline = time.monotonic() + timeout_s
        while not delivery.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamMLError(
                    f"{output.topic}: not acknowledged by the broker within {timeout_s:.0f} s"
                )
            if delivery in self._retry:
                time.sleep(min(0.2, remaining))  # a retriable failure: a moment before producing it again
            self.pump(min(1.0, max(0.0, deadline - time.monotonic())))
        if delivery.error is not None:
            raise StreamMLError(f"{output.topic}: the broker refused the record: {delivery.error}")

    def _produce(self, delivery: Delivery) -> None:
        out = delivery.output

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            self._settle(delivery, err)

        try:
            produce(self.producer, out, on_delivery)
        except BufferError:  # local queue full: produced again by the next pump
            self._retry.append(delivery)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None:
                raise
            self._settle(delivery, err)

    def _settle(self, delivery: Delivery, err: KafkaError | None) -> None:
        if err is None:
            delivery.done = True
        elif is_retriable(err):
            ERRORS.labels(self.service, "delivery_retry").inc()
            log.warning("%s: delivery to %s failed (%s); retrying", self.service, delivery.output.topic, err)
            self._retry.append(delivery)
        else:
            delivery.done, delivery.error = True, err
            ERRORS.labels(self.service, "output_refused").inc()
            log.error("%s: an output to %s was refused: %s", self.service, delivery.output.topic, err)


# The largest model-version record (key + value) a service publishes: what the model-versions topic takes
# (MODEL_MAX_BYTES, less room for the batch around the record) and what every control follower reads.
MODEL_VERSION_MAX_BYTES = min(MODEL_MAX_BYTES - 64 * 1024, limits.MAX_CONTROL_BYTES)

# A stopping data loop waits at most this long for its outputs and its final commit; with Faust's own
# shutdown after it, a service stops within 10 s of SIGTERM (streamml.service.run_worker bounds the rest).
STOP_TIMEOUT_S = 4.0
# The librdkafka timeout of a commit's calls (deliveries, adding offsets to a transaction, committing it).
COMMIT_WAIT_S = 1.0
# How long the data loop's periodic commit (and each retry of a held one) waits on the event loop. What is
# not done by then (outputs unacknowledged, offsets not yet added to the transaction, a commit still under
# way) holds the commit and new input back and is resumed at the next turn: the event loop keeps answering
# signals, Faust's agents and the group while the broker is slow (in a rebalance it can take seconds).
LOOP_WAIT_S = 0.1
# A held commit is tried again at once after an attempt that waited, after this pause if it returned at once.
HOLD_RETRY_S = 0.02
# How long a rebalance waits for the outputs and the commit of the partitions it takes away.
REVOKE_WAIT_S = 5.0
# The loop holding the event loop longer than this is logged: signals (SIGTERM) wait for it.
SLOW_STEP_S = 2.0
# A step (one batch: handle, produce, commit) should hold the event loop about this long at most: a slower
# step halves the next batch (down to MIN_BATCH), a quick one doubles it back up to `max_batch`. Normal
# batches take milliseconds; on starved cores this keeps signals and Faust's agents answered within ~1 s.
STEP_TARGET_S = 0.5
MIN_BATCH = 50
# A data loop's sleeps after polls that found nothing (see IdleWait).
IDLE_WAIT_MIN_S = 0.001
IDLE_WAIT_MAX_S = 0.02
# Exactly-once: a transaction whose outputs are not acknowledged for this long (a broker away longer than
# the transaction timeout: the broker aborts it) is aborted here and the loop goes back to its last
# committed input, as Kafka Streams does with a task whose transaction failed.
HOLD_LIMIT_S = 20.0
# Exactly-once: a send_offsets_to_transaction call that has not returned for this long is taken as wedged
# (see BatchLoop._offsets_added) and the producer is replaced. A healthy call returns within its own
# timeout (about 1 s) or raises, whatever the brokers do: 10 s is ten times that.
TXN_CALL_WEDGED_S = 10.0
# Exactly-once: how long one attempt to abort a given-up transaction waits for the broker (then retried).
ABORT_WAIT_S = 5.0
# Exactly-once: a data loop's transactional id is its instance's own, so a fence is almost always the broker
# timing out a transaction that could not commit in time (a broker away longer than transaction.timeout.ms:
# librdkafka reports PRODUCER_FENCED or INVALID_PRODUCER_EPOCH as fatal; Kafka Streams takes it as a task
# migration). The producer is replaced and the loop goes back to its committed input. Fenced more than
# FENCES_TOLERATED times within FENCE_WINDOW_S, another process runs with this instance id: that is raised.
FENCES_TOLERATED = 3
FENCE_WINDOW_S = 300.0
# A replaced producer is kept this long (its wedged calls may still return), then let go (`_retire`).
RETIRE_AFTER_S = 60.0
# Exactly-once: how long a new transactional producer may wait in all for its coordinator (init_transactions
# is asked again while the broker answers with a retriable error, e.g. the coordinator moving).
INIT_WAIT_S = 90.0
# How long an assignment with state to restore waits in all for the group's stable committed offsets of its
# partitions (each attempt at most 10 s): the previous owner's last transaction must end first.
COMMITTED_WAIT_S = 60.0
# Consumer-group session of data loops, writer slots and trainer requests: how long a crashed member keeps
# its partitions (measured in `make chaos`: the take-over of a killed features instance took ~10 s plus the
# catch-up at 10 s). 6 s is the broker's default group.min.session.timeout.ms.
SESSION_TIMEOUT_MS = 6_000
# How often data loops heartbeat: a rebalance (a sibling stopping or joining) reaches a member with its next
# heartbeat, so every member waits up to this long before it gives up and takes partitions (measured in
# `make chaos --schedule sigterm`: with 1 s the survivor took ~0.5 s to notice a sibling's stop).
HEARTBEAT_MS = 250
# A data loop's consumer that has subscribed but whose group coordinator has not seen it join (no member id)
# after this long is replaced by a new one. Seen once in `make chaos`: a predictor restarted next to a busy
# sibling subscribed and never sent its JoinGroup (the broker logged no join), so it stayed out of the group
# and its sibling's SIGTERM left every partition unread until that sibling came back (45-59 s). A join
# normally takes milliseconds; the coordinator answers a join at once with a member id even while it waits
# for the other members to rejoin, so this never replaces a consumer in a slow rebalance.
JOIN_WAIT_S = 15.0
# Records that wait for a dependency (a writer schema while the registry is away) are read again after
# this long, doubling up to DEPENDENCY_WAIT_MAX_S while it lasts.
DEPENDENCY_WAIT_S = 0.5
DEPENDENCY_WAIT_MAX_S = 5.0
# Aligned topics: how long a partition with records left to read may hold back the others (as Kafka
# Streams' max.task.idle.ms) before the rest goes on without its records.
ALIGN_IDLE_S = 1.0
# A rewind (exactly-once, after an abort) waits this long per attempt for the stable committed offsets;
# `_run` tries again (reading nothing meanwhile) until the broker answers.
REWIND_WAIT_S = 2.0
# seek() errors of a partition that is not being fetched yet (see `_rewind`).
NOT_FETCHING = (KafkaError._STATE, KafkaError._OUTDATED)


# Fatal transactional errors that mean another producer with this transactional id (or the coordinator,
# timing out this one's transaction) bumped its epoch; and those that mean this one may not use the id.
_FENCED = frozenset({KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FENCED})
_DENIED = frozenset(
    {KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED}
)


def in_daemon_thread(name: str, fn: Callable[[], Any]) -> Future[Any]:
    """Run `fn` on a new daemon thread (one that may never return must not hold the process at exit)."""
    future: Future[Any] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _record_time(msg: Message) -> int:
    return int(msg.timestamp()[1])


def interleave(msgs: list[Message]) -> list[Message]:
    """The batch in round-robin order over its partitions, each partition's records in order.

    The consumer hands out records in runs per partition. Where partitions hold different keys (after a
    repartition by key) runs would make the outputs' order clustered by key, and so every downstream
    window over "the last N events" (drift detection); round-robin keeps the order per partition (and per
    key) and mixes the rest, as arrival order did before the repartition."""
    runs: dict[tuple[str | None, int | None], list[Message]] = {}
    for msg in msgs:
        runs.setdefault((msg.topic(), msg.partition()), []).append(msg)
    if len(runs) < 2:
        return msgs
    out: list[Message] = []
    longest = max(len(run) for run in runs.values())
    for i in range(longest):
        out.extend(run[i] for run in runs.values() if i < len(run))
    return out


def first_offsets(msgs: Iterable[Message]) -> dict[tuple[str, int], int]:
    """The first offset of each partition among `msgs` (records without an error): where to go back to
    for reading them again."""
    first: dict[tuple[str, int], int] = {}
    for msg in msgs:
        if msg.error() is None:
            tp, offset = (msg.topic() or "", msg.partition() or 0), msg.offset() or 0
            first[tp] = min(first.get(tp, offset), offset)
    return first


class IdleWait:
    """How long a data loop sleeps after a poll that found nothing: from IDLE_WAIT_MIN_S, doubling while
    nothing comes, up to IDLE_WAIT_MAX_S; back to none as soon as records come. A loop polls without
    blocking (the event loop must stay free), so a fixed short sleep kept every idle loop busy: a features
    service with one pipeline and no input used 9% of a core at 2 ms, 3% at this cap. The cap is the most
    a first record after a quiet spell waits beyond its fetch; under load every poll finds records."""

    def __init__(self) -> None:
        self.next_s = 0.0

    def after(self, n: int) -> float:
        """The sleep after a poll that returned `n` records (0 when it returned any)."""
        if n:
            self.next_s = 0.0
        else:
            self.next_s = min(IDLE_WAIT_MAX_S, max(IDLE_WAIT_MIN_S, self.next_s * 2))
        return self.next_s


class BatchSizer:
    """How many records a data loop's next step takes, so that a step holds the event loop about
    STEP_TARGET_S at most: a slow step that took (at least half) a full batch sets the next one in
    proportion (at most half as many), a quick full one doubles it, between MIN_BATCH and `most`."""

    def __init__(self, most: int, start: int | None = None) -> None:
        self.most = most
        self.least = min(MIN_BATCH, most)
        self.limit = most if start is None else max(self.least, min(most, start))

    def step(self, name: str, n: int, held: float) -> None:
        if held > SLOW_STEP_S:
            log.warning("%s: one step (%d records) held the event loop for %.1f s", name, n, held)
        if held > STEP_TARGET_S and n >= self.limit // 2:
            in_proportion = int(n * STEP_TARGET_S / held)
            self.limit = max(self.least, min(self.limit // 2, in_proportion))
        elif held < STEP_TARGET_S / 4 and n >= self.limit:
            self.limit = min(self.most, self.limit * 2)


class BatchLoop(mode.Service):
    """Consume → handle a batch → produce → commit, on the Faust event loop.

    at_least_once: outputs are delivered before offsets are committed, every `commit_interval_s`; after a
    crash the uncommitted tail is processed again (duplicates possible, no loss). An output that fails
    with a retriable broker error (a leader moving, a broker away) is produced again; until every output is
    acknowledged no offset is committed and no new input is read, and the event loop stays free meanwhile.
    exactly_once: outputs and offsets are committed in one Kafka transaction per interval; consumers
    reading with isolation.level=read_committed see every output once.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        handler: Handler,
        topics: Callable[[], set[str]],
        on_assign: Callable[[list[TopicPartition]], list[TopicPartition]] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
        on_idle: Callable[[], Iterable[Output]] | None = None,
        state: Callable[[], Iterable[Output]] | None = None,
        ready: asyncio.Event | None = None,
        dead_letter: Callable[[Message, BaseException], Output] | None = None,
        producer_config: dict[str, Any] | None = None,
        aligned: Callable[[str], bool] | None = None,
        order_time: Callable[[Message], int] | None = None,
        catch_up: Callable[[], Awaitable[bool]] | None = None,
        cooperative: bool = False,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        # The group's rebalance protocol. Cooperative (KIP-429, cooperative-sticky; Kafka Streams' default
        # since 2.4): a member joining or leaving moves only the partitions that must move, and the others
        # are read on meanwhile. Eager (range): every member gives up every partition and gets a new
        # assignment, balanced per topic. Loops reading two topics of unequal cost (the features service's
        # raw topic and repartition topic) stay eager: the sticky assignor balances partition counts over
        # all topics, and could leave one instance every raw partition and the other every window.
        self._cooperative = cooperative
        # Awaited before the loop joins its group, and after every assignment before the new partitions are
        # read (they stay paused): what their previous owner knew must be known here first. The predictor
        # applies every promotion and version written so far, so a new owner never serves an older version
        # than its predecessor did. False (slower than the caller's own timeout) is logged and counted,
        # and the loop goes on anyway.
        self._catch_up = catch_up
        self._gated: dict[tuple[str, int], int] = {}  # paused partition -> the assignment that paused it
        self._assignments = 0
        self._gate_tasks: set[asyncio.Future[None]] = set()
        # Topics whose partitions are read in timestamp order across partitions (see `_take_aligned`).
        self._aligned = aligned
        # The time aligned records are ordered by: the record's timestamp unless the caller knows better
        # (a repartitioned record carries its source record's timestamp, as Kafka Streams keeps it).
        self._order_time = order_time or _record_time
        self._buffers: dict[tuple[str, int], deque[Message]] = {}
        self._starved_since: dict[tuple[str, int], float] = {}
        self._turns: dict[tuple[str, int], int] = {}
        self.name = name
        # Apart from the Faust app's own group (control agents): two protocols cannot share a group.
        self.group_id = f"{settings.topic_prefix}-{name}-data"
        self.handler = handler
        self.topics = topics
        self._on_assign_hook = on_assign
        self._on_revoke_hook = on_revoke
        self._on_idle = on_idle
        # The handler's state changed since the last call, as records to produce (a changelog), taken at
        # each commit: see `_commit`.
        self._state = state
        self.ready = ready
        self._dead_letter = dead_letter
        self._producer_config = dict(producer_config or {})
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._assigned: list[TopicPartition] | None = None  # the consumer's assignment (`_assignment`)
        self._subscribed: set[str] = set()
        self._positions: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._last_commit = time.monotonic()
        self._last_lag = 0.0
        self._in_txn = False
        self._offsets_sent = False
        self._delivery_errors: list[str] = []
        self._retry: list[Output] = []  # outputs that failed with a retriable error, to produce again
        self._join_deadline: float | None = None  # subscribed, not seen joining the group yet (JOIN_WAIT_S)
        # Since when the commit has been held (see `_holding`); None while nothing is held.
        self._holding_since: float | None = None
        self._abort_needed: str | None = None  # exactly-once: why the open transaction must be aborted
        # Exactly-once, after a transaction was given up (`_abort`): its abort is not acknowledged yet, and
        # the loop has to go back to the committed input (`_rewind`). Nothing is read or begun meanwhile.
        self._abort_pending = False
        self._rewind_pending = False
        self._in_revoke = False  # inside the revoke callback (no rewind there: see `_on_revoke`)
        self._rebalances = 0  # rebalance callbacks run so far (see `_still_assigned`)
        self._offsets_call: Future[Any] | None = None  # send_offsets_to_transaction running on its thread
        self._offsets_call_since = 0.0
        self._producer_overrides: dict[str, Any] = {}
        # replaced producers, kept RETIRE_AFTER_S and then let go on a daemon thread (see _retire)
        self._abandoned: list[Producer] = []
        self._fences: list[float] = []  # when this loop's producer was fenced (see FENCES_TOLERATED)
        self._last_hold_log = 0.0
        self._closing = False
        self._sizer = BatchSizer(settings.max_batch)
        self._idle = IdleWait()
        self._paused_until = 0.0  # reading waits until then for something unavailable (a registry)
        self._dependency_wait = 0.0
        self.processed = 0
        super().__init__(**kwargs)

    @property
    def transactional_id(self) -> str:
        """Exactly-once: the instance's own (a restart aborts what its crashed run left open at once)."""
        return f"{self.group_id}-{self.settings.instance_id}"

    # -- lifecycle ------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self._consumer = self._new_consumer()
        overrides: dict[str, Any] = {
            "linger.ms": self.settings.linger_ms,
            # A delivery report only for a failed output (`_on_delivery` acts on those alone): no Python
            # callback per delivered record. Flushes and the in-flight count work as before.
            "delivery.report.only.error": True,
            **self._producer_config,
        }
        if self.exactly_once:
            overrides["transactional.id"] = self.transactional_id
            # A crashed instance's open transaction holds back read_committed readers of its outputs until
            # the broker aborts it (librdkafka's default: 60 s) or the instance comes back.
            overrides.setdefault("transaction.timeout.ms", 10_000)
        self._producer_overrides = overrides
        self._producer = make_producer(self.settings, **overrides)
        if self.exactly_once:
            self._init_transactions()

    def _new_consumer(self) -> Consumer:
        return make_consumer(
            self.settings,
            self.group_id,
            **{
                "enable.auto.offset.store": False,
                "isolation.level": "read_committed",
                # A crashed instance's partitions move on after this: the broker's minimum (6 s by default);
                # heartbeats come from librdkafka's own thread, so a busy event loop does not expire it.
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                # A rebalance (a sibling leaving or joining) reaches the members with their next heartbeat.
                "heartbeat.interval.ms": HEARTBEAT_MS,
                **data_fetch(self.settings),
                "partition.assignment.strategy": "cooperative-sticky" if self._cooperative else "range",
                # Aligned loops: small runs per partition, so a batch holds several partitions to order.
                **({"max.partition.fetch.bytes": 64 * 1024} if self._aligned is not None else {}),
            },
        )

    async def on_stop(self) -> None:
        """Deliver, commit and close within STOP_TIMEOUT_S, whatever the broker does: outputs not
        acknowledged by then keep their input uncommitted (processed again after the restart)."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        consumer, producer = self._consumer, self._producer
        self._closing = True
        for task in list(self._gate_tasks):
            task.cancel()
        try:
            if consumer is not None and producer is not None:
                committed = self._commit(force=True, timeout_s=STOP_TIMEOUT_S / 2)
                while not committed and time.monotonic() < deadline - STOP_TIMEOUT_S / 4:
                    time.sleep(0.05)
                    committed = self._commit(force=True, timeout_s=0.5)
                if not committed:
                    log.warning(
                        "%s: outputs not acknowledged within %.0f s of stopping; their input stays "
                        "uncommitted and is processed again after the restart",
                        self.name,
                        STOP_TIMEOUT_S,
                    )
                    if self.exactly_once and self._in_txn:
                        # abort now rather than leave the next owner of the partitions waiting for the
                        # broker's transaction timeout (read_committed readers stop at an open transaction)
                        self._abort("stopping before the transaction could commit", timeout_s=0.1)
                if self._abort_pending:
                    self._finish_abort(max(0.5, deadline - time.monotonic()))
        except (KafkaException, StreamMLError):
            log.exception("%s: final commit failed; the uncommitted tail will be processed again", self.name)
        finally:
            if consumer is not None:
                try:
                    consumer.close()  # leaves the group; the revoke callback commits nothing new now
                except (KafkaException, RuntimeError) as exc:  # e.g. UNKNOWN_MEMBER_ID: already out
                    log.warning("%s: closing the consumer: %s", self.name, exc)
            if producer is not None:
                left = producer.flush(max(0.1, deadline - time.monotonic()))
                if left:
                    log.warning("%s: %d outputs not delivered at stop (not committed)", self.name, left)

    # -- rebalance ------------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self._assigned = None  # (read again after this rebalance: `_assignment`)
        if self._on_assign_hook is not None:
            # The committed offsets first, then the hook (the features service restores its windows from
            # the changelog, read to its end as it is then), and reading starts at exactly those offsets.
            # A read_committed consumer's offset fetch waits for pending transactional offsets (KIP-447's
            # require_stable), so the previous owner's last transaction has ended, committed or aborted,
            # before the changelog's end is read: every changelog record of a committed transaction is then
            # below that end. In the other order a transaction still flushing (its commit call timed out
            # and goes on in the background) could commit after the restore read the end: offsets past
            # events whose window updates the restored state lacks. Kafka Streams fetches a task's committed
            # offsets before restoring it for the same reason.
            partitions = self._on_assign_hook(self._committed_offsets(consumer, partitions))
            self._assign(consumer, partitions)
        if self._catch_up is not None and partitions:
            if self._on_assign_hook is None:
                self._assign(consumer, partitions)  # (in the callback: the library then assigns nothing)
            consumer.pause(partitions)  # before any fetch: nothing of them is read until `_open_gate`
            self._assignments += 1
            for tp in partitions:
                self._gated[(tp.topic, tp.partition)] = self._assignments
            task = asyncio.ensure_future(self._open_gate(self._assignments))
            self._gate_tasks.add(task)
            task.add_done_callback(self._gate_tasks.discard)
        self._assigned = None
        log.info("%s: assigned %s", self.name, [(p.topic, p.partition, p.offset) for p in partitions])

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the partitions of this rebalance: added to those kept (cooperative), or the whole new
        assignment (eager)."""
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    async def _caught_up(self, then: str) -> None:
        """Await `catch_up`; not caught up in time, or failed, is logged and counted, and the caller goes
        on (`then`): never left paused or out of the group for good."""
        assert self._catch_up is not None
        try:
            caught_up = await self._catch_up()
        except Exception:
            log.exception("%s: catching up failed; %s anyway", self.name, then)
            caught_up = False
        if not caught_up:
            ERRORS.labels(self.name, "catch_up_timeout").inc()
            log.warning("%s: not caught up with the control topics; %s anyway", self.name, then)

    async def _open_gate(self, assignment: int) -> None:
        """Resume the partitions paused by assignment number `assignment` once `catch_up` is done (those
        revoked or assigned again meanwhile are not this call's any more)."""
        started = time.monotonic()
        await self._caught_up("reading the new partitions")
        mine = [key for key, n in self._gated.items() if n == assignment]
        for key in mine:
            del self._gated[key]
        if mine and self._consumer is not None:
            try:
                self._consumer.resume([TopicPartition(t, p) for t, p in mine])
            except (KafkaException, RuntimeError) as exc:  # (not assigned any more, or closed: stopping)
                log.warning("%s: resuming %s: %s", self.name, mine, exc)
                return
            log.info("%s: caught up in %.2f s; reading %s", self.name, time.monotonic() - started, mine)

    def _committed_offsets(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        """The partitions with the group's stable committed offsets (see `_on_assign`), asked again while
        the broker cannot answer, up to COMMITTED_WAIT_S. After that they are returned as given (logged,
        counted: the consumer then fetches the offsets itself, and a transaction of the previous owner that
        is still open could commit after the restore)."""
        committed = self._stable_offsets(consumer, partitions, COMMITTED_WAIT_S)
        if committed is None:
            ERRORS.labels(self.name, "offset_fetch").inc()
            log.error(
                "%s: no stable committed offsets for %s within %.0f s; restoring without them",
                self.name, [(tp.topic, tp.partition) for tp in partitions], COMMITTED_WAIT_S,
            )  # fmt: skip
            return partitions
        return committed

    def _stable_offsets(
        self, consumer: Consumer, partitions: list[TopicPartition], wait_s: float
    ) -> list[TopicPartition] | None:
        """The group's stable committed offsets of `partitions` (an offset below 0: none committed), asked
        again while the broker cannot answer; None if it has not answered within `wait_s`."""
        if not partitions:
            return []
        asked = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            try:
                committed = consumer.committed(asked, timeout=max(0.5, min(10.0, left)))
                failed = [(tp.topic, tp.partition, str(tp.error)) for tp in committed if tp.error is not None]
                if not failed:
                    return list(committed)
                why = f"partition errors {failed[:3]}"
            except KafkaException as exc:
                why = str(kafka_error(exc) or exc)
            if time.monotonic() >= deadline:
                log.warning("%s: committed offsets not fetched (%s)", self.name, why)
                return None
            log.warning("%s: committed offsets not fetched yet (%s); asking again", self.name, why)
            time.sleep(0.2)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self._assigned = None
        if not self._closing:  # when closing, on_stop has just committed
            self._in_revoke = True
            try:
                # Outputs still unacknowledged after this wait leave the partitions uncommitted: their next
                # owner processes the tail again (at-least-once).
                if self.exactly_once and self._abort_needed is not None:
                    self._abort(self._abort_needed)
                elif not self._commit(force=True, timeout_s=REVOKE_WAIT_S) and self.exactly_once:
                    # Exactly-once: the open transaction holds outputs and state (changelog records) of the
                    # partitions given away. It must never commit once they are gone: their next owner may
                    # have restored the state without it already, and would then read on from offsets past
                    # it (windows missing those events). So it is aborted now, as Kafka Streams closes a
                    # task whose commit failed in a rebalance "dirty"; the next owner reads that input again.
                    self._abort("the partitions were revoked before the transaction could commit")
            finally:
                self._in_revoke = False
            if self._rewind_pending and not self._kept_after(consumer, partitions):
                self._rewind_pending = False  # everything goes anyway: nothing else to take back
        for p in partitions:
            self._gated.pop((p.topic, p.partition), None)
        self._forget_progress(partitions)  # (buffered records not handled: read again by the next owner)
        if self._on_revoke_hook is not None:  # after the commit: state of what was processed is written
            self._on_revoke_hook(partitions)
        self._assigned = None
        log.info("%s: revoked %s", self.name, [(p.topic, p.partition) for p in partitions])

    def _forget_progress(self, partitions: list[TopicPartition]) -> None:
        """Forget how far the loop got in `partitions` (positions, commits, buffered records, alignment
        waits): they are read again from their committed offsets, here or by their next owner."""
        for p in partitions:
            key = (p.topic, p.partition)
            self._positions.pop(key, None)
            self._committed.pop(key, None)
            self._buffers.pop(key, None)
            self._starved_since.pop(key, None)

    @staticmethod
    def _kept_after(consumer: Consumer, partitions: list[TopicPartition]) -> bool:
        """Whether partitions outside `partitions` stay assigned: after an abort in a revocation, those kept
        are rewound too (`_rewind`). The eager protocol revokes the whole assignment, so then there is
        nothing else to rewind; the cooperative one revokes only what moves."""
        try:
            kept = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        except (KafkaException, RuntimeError):
            return True
        return bool(kept - {(tp.topic, tp.partition) for tp in partitions})

    # -- the loop -------------------------------------------------------------------------------------
    @mode.Service.task
    async def _run(self) -> None:
        if self.ready is not None:
            await self.ready.wait()
        if self._catch_up is not None:  # partitions handed to this instance would only wait, paused
            await self._caught_up("joining the group")
        while not self.should_stop:
            assert self._consumer is not None
            started = time.monotonic()
            if self._abort_pending or self._rewind_pending:  # a given-up transaction (see `_abort`)
                if self._abort_pending and not self._finish_abort():
                    await asyncio.sleep(0.2)
                elif self._rewind_pending:
                    self._rewind()
                    if self._rewind_pending:  # (the broker did not answer, or a seek failed: logged)
                        await asyncio.sleep(0.2)
                continue
            if self._holding:  # outputs not acknowledged yet: retry them, read nothing new meanwhile
                self._commit(force=True, timeout_s=LOOP_WAIT_S)
                if self._holding and self.exactly_once and self._held_for() > HOLD_LIMIT_S:
                    self._abort_and_rewind(f"outputs not acknowledged for {HOLD_LIMIT_S:.0f} s")
                # The commit's waits (acknowledgements, the offsets call, the transaction) return as soon as
                # what they wait for is done, so the next attempt follows at once; only an attempt that had
                # nothing to wait on (e.g. the local queue still full) pauses before the next.
                quick = time.monotonic() - started < HOLD_RETRY_S
                await asyncio.sleep(HOLD_RETRY_S if self._holding and quick else 0)
                continue
            if self._paused_until:  # records wait for something unavailable (`_read_again_later`)
                if time.monotonic() < self._paused_until:
                    self._commit(timeout_s=LOOP_WAIT_S)
                    await asyncio.sleep(0.05)
                    continue
                self._paused_until = 0.0
            wanted = self.topics()
            if wanted != self._subscribed:
                self._resubscribe(wanted)
            if not self._subscribed:
                await asyncio.sleep(0.1)
                continue
            rebalances = self._rebalances
            msgs = self._consumer.consume(self._batch_limit, 0)
            self._check_joined()
            if self._abort_pending or self._rewind_pending:  # (an abort inside consume's rebalance callback)
                continue  # these records are read again from the committed offsets
            if msgs and self._rebalances != rebalances:
                msgs = self._still_assigned(msgs)
            if self._aligned is not None:
                msgs = self._take_aligned(msgs)
            if not msgs:
                if (
                    self._on_idle is not None
                    and time.monotonic() - self._last_commit >= self.settings.commit_interval_s
                ):
                    self._produce_all(self._on_idle())
                self._commit(timeout_s=LOOP_WAIT_S)
                self._check_step(started, 0)
                await asyncio.sleep(self._idle.after(0))
                continue
            self._idle.after(len(msgs))
            self.process(msgs)
            if not self._paused_until:
                self._dependency_wait = 0.0  # (what was unavailable is back)
            self._commit(timeout_s=LOOP_WAIT_S)
            self._check_step(started, len(msgs))
            await asyncio.sleep(0)  # let Faust agents (e.g. a model swap) run between batches

    def _still_assigned(self, msgs: list[Message]) -> list[Message]:
        """Of the records of a consume call that ran a rebalance callback, those of partitions still
        assigned. The call gathers records before and after it serves the callback, and a record fetched
        before a revocation can come back with the call's others (confluent-kafka-python issue 1013): its
        partition has a new owner, who reads it from the committed offset. Handled here it would be featured
        against windows this instance never restored, and its offset committed for a partition it does not
        own. Skipped, logged and counted (`streamml_records_skipped_total{reason="partition_revoked"}`)."""
        held = {(tp.topic, tp.partition) for tp in self._assignment()}
        kept: list[Message] = []
        gone: dict[tuple[str, int], int] = {}
        for msg in msgs:
            tp = (msg.topic() or "", msg.partition() or 0)
            if msg.error() is not None or tp in held:
                kept.append(msg)
            else:
                gone[tp] = gone.get(tp, 0) + 1
        if gone:
            SKIPPED.labels(self.name, "partition_revoked").inc(len(msgs) - len(kept))
            log.warning(
                "%s: records of partitions revoked meanwhile skipped (their new owner reads them): %s",
                self.name, sorted(gone.items()),
            )  # fmt: skip
        return kept

    def _check_step(self, started: float, n: int) -> None:
        self._sizer.step(self.name, n, time.monotonic() - started)

    @property
    def _batch_limit(self) -> int:
        return self._sizer.limit

    def _take_aligned(self, msgs: list[Message]) -> list[Message]:
        """Of the consumed records, those to handle now: records of aligned topics go through per-partition
        buffers and come out in timestamp order across the partitions, as long as every partition that has
        records left to read has one buffered (or has made us wait ALIGN_IDLE_S) — Kafka Streams' choice of
        the partition with the oldest head record. Without it, a consumer reading a repartition topic in
        runs per partition would emit one key-group's events long before another's of the same time."""
        now_handle: list[Message] = []
        for msg in msgs:
            topic = msg.topic() or ""
            if msg.error() is not None or self._aligned is None or not self._aligned(topic):
                now_handle.append(msg)
            else:
                self._buffers.setdefault((topic, msg.partition() or 0), deque()).append(msg)
        if not self._buffers:
            return now_handle
        assert self._consumer is not None
        now = time.monotonic()
        waiting = []
        for tp in self._assignment():  # every assigned partition, also those not fetched yet
            key = (tp.topic, tp.partition)
            if not self._aligned(tp.topic) or self._buffers.get(key):  # type: ignore[misc]
                self._starved_since.pop(key, None)
                continue
            if self._left_to_read(tp):  # (or not known yet): wait for its records a moment
                since = self._starved_since.setdefault(key, now)
                if now - since < ALIGN_IDLE_S:
                    waiting.append(key)
        # Equal timestamps (a whole batch of the hop can share one millisecond) go round-robin over the
        # partitions: the count taken from each partition is the second sort key.
        taken = 0
        turns = self._turns
        order_time = self._order_time
        heads = [(order_time(buf[0]), turns.get(key, 0), key) for key, buf in self._buffers.items() if buf]
        heapq.heapify(heads)
        while heads and not waiting and taken < self._batch_limit:
            _ts, turn, key = heapq.heappop(heads)
            buf = self._buffers[key]
            now_handle.append(buf.popleft())
            taken += 1
            turns[key] = turn + 1
            if buf:
                heapq.heappush(heads, (order_time(buf[0]), turn + 1, key))
            elif (  # more on the broker: wait a moment for its next fetch
                self._left_to_read(TopicPartition(*key))
                and now - self._starved_since.setdefault(key, now) < ALIGN_IDLE_S
            ):
                break
        return now_handle

    def _assignment(self) -> list[TopicPartition]:
        """The consumer's assignment, read once per rebalance: `Consumer.assignment()` is a round trip to
        librdkafka's main thread (~60 µs); read for every batch it took a tenth of the features loop's
        time at 6,000 events/s. Every rebalance callback, (re)subscription and consumer replacement forgets
        it; the library applies an assignment inside the `consume` call that ran the callback, before the
        next read here."""
        assert self._consumer is not None
        if self._assigned is None:
            self._assigned = self._consumer.assignment()
        return self._assigned

    def _left_to_read(self, tp: TopicPartition) -> bool:
        """Whether the broker holds records of the partition the consumer has not fetched yet (True while
        unknown). The fetch position, not the last record, is compared: transaction markers take offsets
        but are never delivered."""
        assert self._consumer is not None
        try:
            _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            (position,) = self._consumer.position([TopicPartition(tp.topic, tp.partition)])
        except KafkaException:
            return True
        return high < 0 or position.offset < 0 or position.offset < high

    @property
    def _holding(self) -> bool:
        """The last commit could not finish (outputs unacknowledged, the transaction not committed yet):
        it is finished before any new input is read."""
        return self._holding_since is not None

    @_holding.setter
    def _holding(self, holding: bool) -> None:
        if not holding:
            self._holding_since = None
        elif self._holding_since is None:
            self._holding_since = time.monotonic()

    def _held_for(self) -> float:
        """How long the commit has been held without a break (0 when it is not held)."""
        return 0.0 if self._holding_since is None else time.monotonic() - self._holding_since

    def _abort_and_rewind(self, why: str) -> None:
        """Exactly-once: abort the open transaction and go back to the last committed input (`_rewind`:
        state derived from input that is now uncommitted is dropped and restored, the partitions read
        again from their committed offsets)."""
        self._abort(why)
        if self._rewind_pending and not self._abort_pending and not self._in_revoke:
            self._rewind()

    def _abort(self, why: str, timeout_s: float = ABORT_WAIT_S) -> None:
        """Exactly-once: give up the open transaction, so that it never commits. What it held (outputs,
        offsets, retries) is forgotten; the input goes back to the committed offsets (`_rewind`, or the
        revocation under way). Until the broker acknowledges the abort, `_run` begins nothing new."""
        ERRORS.labels(self.name, "txn_aborted").inc()
        log.error("%s: aborting the transaction (%s); going back to the last committed input", self.name, why)
        self._forget_transaction()
        self._abort_pending = self._rewind_pending = True
        self._finish_abort(timeout_s)

    def _forget_transaction(self) -> None:
        """Drop what the given-up transaction held: its outputs, retries, positions and buffered input."""
        self._in_txn = self._offsets_sent = self._holding = False
        self._abort_needed = None
        self._retry.clear()
        self._delivery_errors.clear()
        self._buffers.clear()
        self._positions.clear()

    def _finish_abort(self, timeout_s: float = ABORT_WAIT_S) -> bool:
        """Ask the broker to abort the given-up transaction; True once it has (or there was none)."""
        assert self._producer is not None
        call = self._offsets_call
        if call is not None and not call.done():  # librdkafka refuses an abort while that call runs
            if not self._replaced_if_wedged():
                return False
            self._abort_pending = False  # the new producer fenced the open transaction: as good as an abort
            return True
        self._offsets_call = None
        try:
            self._producer.abort_transaction(timeout_s)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or err.fatal():
                return self._replace_failed_producer(err, exc)
            if err.code() == KafkaError._CONFLICT:
                return self._commit_resumed(timeout_s)
            if err.code() != KafkaError._STATE:  # (_STATE: no transaction open, nothing to abort)
                log.warning("%s: abort not acknowledged yet (%s); trying again", self.name, err)
                return False
        self._abort_pending = False
        return True

    def _commit_resumed(self, timeout_s: float) -> bool:
        """The given-up transaction's commit call timed out earlier: librdkafka goes on with it in the
        background and refuses any other transactional call (_CONFLICT) until that one is called again to
        its end. So it is resumed: the transaction ends committed (its records and offsets are durable, and
        the rewind restores from them) or fails (then it is aborted at the next call). True once ended."""
        assert self._producer is not None
        try:
            self._producer.commit_transaction(timeout_s)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or err.fatal():
                return self._replace_failed_producer(err, exc)
            log.warning("%s: the given-up transaction has not ended yet (%s); trying again", self.name, err)
            return False  # still going (retriable), or failed and to be aborted by the next call
        log.warning("%s: the given-up transaction committed after all (the rewind restores it)", self.name)
        self._abort_pending = False
        return True

    def _rewind(self) -> None:
        """Go back to the last committed input, in place, as Kafka Streams revives a task whose transaction
        was aborted: every assigned partition's state is put aside and taken back at its stable committed
        offset (the features service restores windows that had moved on from the changelog), and the
        partition is sought to that offset. Records fetched before the seek are never returned.

        The group is not left and joined again for this: a leave moved every sibling's partitions too, and
        when librdkafka merged the leave with the join (a rebalance already under way) no revocation came,
        so the loop read on past the aborted transaction's input (make chaos, exactly_once: 133 events
        without a prediction). Until it has succeeded (the offsets fetched, every seek taken) the rewind
        stays pending and `_run` reads nothing."""
        assert self._consumer is not None
        consumer = self._consumer
        if self._closing:  # nothing is read any more: the next owner starts from the committed offsets
            self._rewind_pending = False
            return
        try:
            held = self._assignment()
        except (KafkaException, RuntimeError) as exc:
            log.warning("%s: rewind: assignment not known (%s); trying again", self.name, exc)
            return
        self._forget_progress(held)
        committed = self._stable_offsets(consumer, held, REWIND_WAIT_S)
        if committed is None:
            ERRORS.labels(self.name, "rewind_retry").inc()
            return
        if self._on_revoke_hook is not None:
            self._on_revoke_hook(held)
        if self._on_assign_hook is not None:
            committed = self._on_assign_hook(committed)
        for tp in committed:
            # (no committed offset: the group's reset policy, earliest)
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            try:
                consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            except KafkaException as exc:
                err = kafka_error(exc)
                # Not fetching yet (just assigned, still paused for its catch-up or looking up its start):
                # nothing of it has been read since its assignment, which starts it at the committed offset.
                if err is not None and err.code() in NOT_FETCHING:
                    continue
                ERRORS.labels(self.name, "rewind_retry").inc()
                log.warning("%s: rewind: seeking %s failed (%s); trying again", self.name, tp, err or exc)
                return
        self._rewind_pending = False
        log.info("%s: back at the committed input %s", self.name,
                 [(tp.topic, tp.partition, tp.offset) for tp in committed])  # fmt: skip

    def _resubscribe(self, wanted: set[str]) -> None:
        assert self._consumer is not None
        self._commit(force=True)
        if wanted:
            self._subscribe(sorted(wanted))
        else:
            self._consumer.unsubscribe()
            self._assigned = None
            self._join_deadline = None
        self._subscribed = set(wanted)
        log.info("%s: subscribed to %s", self.name, sorted(wanted))

    def _subscribe(self, topics: list[str]) -> None:
        assert self._consumer is not None
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._assigned = None
        self._join_deadline = time.monotonic() + JOIN_WAIT_S

    def _check_joined(self) -> None:
        """Replace the consumer if the group coordinator has not seen it join JOIN_WAIT_S after it
        subscribed (see there): a new consumer subscribes to the same topics and joins afresh."""
        if self._join_deadline is None:
            return
        assert self._consumer is not None
        if self._consumer.memberid():
            self._join_deadline = None
            return
        if time.monotonic() < self._join_deadline:
            return
        ERRORS.labels(self.name, "group_join_stuck").inc()
        log.error(
            "%s: subscribed %.0f s ago but not a member of group %s yet; replacing the consumer",
            self.name, JOIN_WAIT_S, self.group_id,
        )  # fmt: skip
        old, self._consumer = self._consumer, self._new_consumer()
        self._assigned = None
        in_daemon_thread(f"{self.name}-close-consumer", old.close)  # (never joined: nothing to revoke)
        self._subscribe(sorted(self._subscribed))

    def process(self, msgs: list[Message]) -> None:
        assert self._producer is not None
        started = time.perf_counter()
        good = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                ERRORS.labels(self.name, "consume").inc()
                log.warning("%s: consume error %s", self.name, err)
        if not good:
            return
        try:
            prefetch_writers(m.value() for m in good)  # (returns at once without a schema registry)
        except DependencyUnavailableError as exc:
            self._read_again_later(good, exc)
            return
        if not self._begin():  # offsets of records without outputs still commit inside the transaction
            return
        self._produce_all(self._handle(interleave(good) if self._aligned is not None else good))
        positions = self._positions
        topic_counts: dict[str, int] = {}
        for msg in good:
            topic = msg.topic() or ""
            positions[(topic, msg.partition() or 0)] = (msg.offset() or 0) + 1
            topic_counts[topic] = topic_counts.get(topic, 0) + 1
        for topic, n in topic_counts.items():
            EVENTS_IN.labels(self.name, topic, topic.split(".")[-2] if topic.count(".") >= 2 else "").inc(n)
        self.processed += len(good)
        BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def _read_again_later(self, msgs: list[Message], why: BaseException) -> None:
        """Records that need something unavailable now (a writer schema while the registry is away) are
        neither handled nor dead-lettered: their partitions go back to the first of them, and reading
        pauses (0.5 s, doubling up to 5 s while it lasts). Nothing was handled, so no state changed."""
        assert self._consumer is not None
        for (topic, partition), offset in first_offsets(msgs).items():
            self._buffers.pop((topic, partition), None)  # (read again from there too)
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # e.g. revoked meanwhile: its next owner reads it
                log.warning("%s: cannot go back to %s[%d]@%d: %s", self.name, topic, partition, offset, exc)
        self._dependency_wait = min(DEPENDENCY_WAIT_MAX_S, max(DEPENDENCY_WAIT_S, self._dependency_wait * 2))
        self._paused_until = time.monotonic() + self._dependency_wait
        ERRORS.labels(self.name, "dependency_unavailable").inc()
        now = time.monotonic()
        if now - self._last_hold_log >= 5.0:
            self._last_hold_log = now
            wait = self._dependency_wait
            log.warning("%s: %d records wait (read again in %.1f s): %s", self.name, len(msgs), wait, why)

    def _handle(self, msgs: list[Message]) -> list[Output]:
        """The handler's outputs; if it fails on the batch, each record alone, and a record that still
        fails is dead-lettered (or skipped with a log line and a metric). Handlers catch at the record
        boundary themselves: this is the net under them, so no record can stop the loop."""
        try:
            return list(self.handler(msgs))
        except Exception:
            ERRORS.labels(self.name, "handler").inc()
            log.exception(
                "%s: handler failed on a batch of %d; retrying record by record", self.name, len(msgs)
            )
        outputs: list[Output] = []
        for msg in msgs:
            try:
                outputs.extend(self.handler([msg]))
            except Exception as exc:
                ERRORS.labels(self.name, "record").inc()
                where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
                if self._dead_letter is None:
                    log.error("%s: skipping %s: %s: %s", self.name, where, type(exc).__name__, exc)
                    continue
                log.error("%s: dead-lettering %s: %s: %s", self.name, where, type(exc).__name__, exc)
                outputs.append(self._dead_letter(msg, exc))
        return outputs

    def _begin(self) -> bool:
        """Exactly-once: open a transaction if none is. False if the producer cannot (it failed, and was
        replaced; or its last transaction must be aborted first): the loop then goes back to the committed
        input, and what the caller was about to handle or produce is dropped (it comes again)."""
        if self.exactly_once and not self._in_txn:
            assert self._producer is not None
            try:
                self._producer.begin_transaction()
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or err.fatal():
                    self._replace_failed_producer(err, exc)
                else:
                    self._abort_and_rewind(f"cannot begin a transaction: {err}")
                return False
            self._in_txn = True
        return True

    def _produce_all(self, outputs: Iterable[Output]) -> None:
        assert self._producer is not None
        outputs = list(outputs)
        if not outputs or not self._begin():
            return
        for out in outputs:
            self._send(out)
        self._producer.poll(0)

    def _send(self, out: Output) -> None:
        """Produce one output; one the local queue or the broker cannot take now is kept for a retry."""
        assert self._producer is not None
        if self._abort_needed is not None:  # the open transaction is lost anyway
            return
        if self._retry:  # others wait already (the queue was full): keep the order, do not block again
            self._retry.append(out)
            return
        try:
            try:
                produce(self._producer, out, partial(self._on_delivery, out))
            except BufferError:  # local queue full: serve deliveries a moment, then try once more
                self._producer.poll(0.1)
                produce(self._producer, out, partial(self._on_delivery, out))
        except BufferError:
            self._retry.append(out)
        except KafkaException as exc:
            err = kafka_error(exc)
            if self.exactly_once and err is not None and err.txn_requires_abort():
                self._abort_needed = f"the producer refused an output: {err}"
                return
            if err is not None and is_retriable(err):  # never enqueued: also fine inside a transaction
                ERRORS.labels(self.name, "delivery_retry").inc()
                self._retry.append(out)
            elif err is None or is_permanent(err) or not err.fatal():
                self._refused(out.topic, err or exc)  # refused locally (e.g. too large): this output only
            elif self.exactly_once:  # the producer failed: its transaction is aborted, the producer replaced
                self._abort_needed = f"the producer failed: {err}"
            else:
                raise StreamMLError(f"{self.name}: the producer failed: {err}") from exc

    def _on_delivery(self, out: Output, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            return
        if is_permanent(err):  # retrying or restarting cannot deliver it: count it, go on
            self._refused(msg.topic() or "", err)
            return
        if self.exactly_once:  # the transaction cannot commit with this output missing: abort it
            self._abort_needed = f"an output to {msg.topic()} failed: {err}"
            return
        if is_retriable(err):
            ERRORS.labels(self.name, "delivery_retry").inc()
            # the same output (headers, pipeline) to the partition it was given, so a key keeps its order
            self._retry.append(replace(out, partition=msg.partition()))
            return
        ERRORS.labels(self.name, "delivery").inc()
        self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _refused(self, topic: str, err: object) -> None:
        ERRORS.labels(self.name, "output_refused").inc()
        log.error("%s: an output to %s was refused and is dropped: %s", self.name, topic, err)

    def _report_lag(self) -> None:
        """Consumer lag per input topic, from librdkafka's cached high watermarks (no broker round trip)."""
        assert self._consumer is not None
        lag: dict[str, int] = {}
        for tp in self._assignment():
            try:
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            position = self._positions.get((tp.topic, tp.partition))
            if high >= 0 and position is not None:
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - position)
        for topic, value in lag.items():
            CONSUMER_LAG.labels(self.name, topic).set(value)

    def _produce_state(self) -> bool:
        """Produce the state changed since the last commit (True if there was any).

        At least once, the state goes out only after the outputs of the events it holds were acknowledged,
        and the input offsets after the state. A crash anywhere leaves, per key, either state without those
        events (they are processed again from the committed input, and their outputs come out the same) or
        state with them and their outputs delivered (a copy made again is a copy). Produced with the
        outputs, the state of one partition could land while an output to another did not: the event was
        then processed again against windows that already held it and the later events of its key, and the
        first output that ever reached its topic had the wrong window. Exactly once, the state is part of
        the transaction either way; it is taken per commit, not per batch, so a key changed by many batches
        is written once."""
        if self._state is None:
            return False
        records = list(self._state())
        if not records or not self._begin():
            return False
        for out in records:
            self._send(out)
        self._producer.poll(0)  # type: ignore[union-attr]
        return True

    def _delivered(self, timeout_s: float) -> bool:
        """Produce again what failed with a retriable error, then wait up to `timeout_s` for every output
        so far to be acknowledged. A delivery error that is neither retriable nor permanent is raised."""
        assert self._producer is not None
        if self._retry:
            retry, self._retry = self._retry, []
            for out in retry:
                self._send(out)
        left = self._producer.flush(timeout_s)
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise StreamMLError(f"{self.name}: {len(errors)} outputs failed: {errors[:3]}")
        return left == 0 and not self._retry

    def _commit(self, force: bool = False, timeout_s: float = COMMIT_WAIT_S) -> bool:
        """Commit the input of everything produced so far once its outputs are acknowledged; True when
        nothing is left uncommitted. Retriable broker errors never raise: the commit waits and is retried
        (`_holding`), and offsets are never committed past an output that was not delivered."""
        if not force and time.monotonic() - self._last_commit < self.settings.commit_interval_s:
            return not self._holding
        self._last_commit = time.monotonic()
        if self._last_commit - self._last_lag >= 1.0:
            self._last_lag = self._last_commit
            self._report_lag()
        assert self._consumer is not None and self._producer is not None
        if self.exactly_once:
            self._holding = not self._commit_transaction(timeout_s)
            return not self._holding
        self._holding = not self._delivered(timeout_s)
        if self._holding:
            self._log_holding()
            return False
        if self._produce_state():  # only now: after every output of the events it holds was acknowledged
            self._holding = not self._delivered(timeout_s)
            if self._holding:
                self._log_holding()
                return False
        done = self._committed  # offsets unchanged since the last commit are not committed again
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._positions.items() if done.get((t, p)) != o]
        if not offsets:
            return True
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or not commit_can_wait(err):
                raise StreamMLError(f"{self.name}: committing offsets failed: {err or exc}") from exc
            ERRORS.labels(self.name, "commit_retry").inc()
            log.warning("%s: offset commit failed (%s); trying again at the next commit", self.name, err)
            return False
        self._committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
        return True

    def _commit_transaction(self, timeout_s: float) -> bool:
        """Commit the open transaction (outputs and input offsets). A commit that times out or meets a
        retriable error goes on in the background and is resumed by the next call (librdkafka's contract),
        so the event loop is never held for long; an abortable or fatal error raises."""
        assert self._consumer is not None and self._producer is not None
        if not self._in_txn:
            return True
        if self._abort_needed is not None:
            self._abort_and_rewind(self._abort_needed)
            return True
        if self._retry:  # outputs the local queue could not take: still inside the open transaction
            retry, self._retry = self._retry, []
            for out in retry:
                self._send(out)
            if self._retry:
                self._log_holding(f"{len(self._retry)} outputs not taken by the producer yet")
                return False
        if not self._offsets_sent and self._produce_state():  # inside the transaction, with the offsets
            if self._abort_needed is not None:
                self._abort_and_rewind(self._abort_needed)
                return True
            if self._retry:
                self._log_holding(f"{len(self._retry)} state records not taken by the producer yet")
                return False
        try:
            if not self._offsets_sent:
                if not self._offsets_added(max(timeout_s, COMMIT_WAIT_S), wait_s=timeout_s):
                    return not self._holding_after_wedge()
                self._offsets_sent = True
            self._producer.commit_transaction(timeout_s)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is not None and err.retriable() and not err.txn_requires_abort() and not err.fatal():
                if err.code() != KafkaError._TIMED_OUT:  # (timed out: still under way, not an error)
                    ERRORS.labels(self.name, "commit_retry").inc()
                self._log_holding(f"transaction commit not done yet ({err})")
                return False
            if err is not None and not err.fatal():  # abortable (e.g. timed out on the broker's side)
                self._abort_and_rewind(f"transaction failed: {err}")
                return True
            return self._replace_failed_producer(err, exc)  # (raises if another process fenced this one)
        self._in_txn = False
        self._offsets_sent = False
        self._delivery_errors.clear()  # (a failed delivery would have failed the commit)
        return True

    def _offsets_added(self, timeout: float, wait_s: float) -> bool:
        """Add the input offsets to the open transaction (the call's own timeout: `timeout`); False while
        the broker has not answered.

        librdkafka's `send_offsets_to_transaction` can block for good, past its timeout, when the group
        coordinator's broker went away (librdkafka issues 5456 and 5511: seen here as a predictor whose
        event loop stopped for good while a broker was down), and takes seconds while the group rebalances.
        So the call runs on a daemon thread and the loop waits for it at most `wait_s` per turn (the
        periodic commit: LOOP_WAIT_S, then it holds); a librdkafka error it raises is raised here."""
        call = self._offsets_call
        if call is None:
            assert self._consumer is not None and self._producer is not None
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._positions.items()]
            metadata = self._consumer.consumer_group_metadata()
            call = self._offsets_call = in_daemon_thread(
                f"{self.name}-txn-offsets",
                partial(self._producer.send_offsets_to_transaction, offsets, metadata, timeout),
            )
            self._offsets_call_since = time.monotonic()
        try:
            call.result(timeout=wait_s)
        except FutureTimeout:
            return False
        finally:
            if call.done():
                self._offsets_call = None
        return True

    def _holding_after_wedge(self) -> bool:
        """The offsets call has not returned: hold (True), or, once it has hung for TXN_CALL_WEDGED_S,
        replace the producer and go back to the committed input (False: nothing is held any more)."""
        if self._replaced_if_wedged():
            return False
        waited = time.monotonic() - self._offsets_call_since
        self._log_holding(f"offsets not added to the transaction for {waited:.0f} s")
        return True

    def _replaced_if_wedged(self) -> bool:
        """Replace the producer if its offsets call has hung for TXN_CALL_WEDGED_S (never while stopping:
        a stop aborts what it can and closes); True if it was replaced."""
        waited = time.monotonic() - self._offsets_call_since
        if waited < TXN_CALL_WEDGED_S or self._closing:
            return False
        self._replace_producer(f"send_offsets_to_transaction has not returned for {waited:.0f} s: wedged")
        return True

    def _replace_failed_producer(self, err: KafkaError | None, exc: BaseException) -> bool:
        """A fatal transactional error: a new producer with the same id, as for a wedged one, and the loop
        goes back to the committed input. That covers librdkafka's transaction state machine giving up (e.g.
        INVALID_TXN_STATE on an abort after the broker timed the transaction out) and a fence (see
        FENCES_TOLERATED). No right to use the id, or fenced again and again: raised, this process must not
        write."""
        if err is None or err.code() in _DENIED:
            raise StreamMLError(f"{self.name}: the transactional producer failed: {err or exc}") from exc
        metric = "producer_failed"
        if err.code() in _FENCED:
            now = time.monotonic()
            self._fences = [t for t in self._fences if now - t < FENCE_WINDOW_S] + [now]
            if len(self._fences) > FENCES_TOLERATED:
                raise StreamMLError(
                    f"{self.name}: fenced {len(self._fences)} times within {FENCE_WINDOW_S:.0f} s ({err}): "
                    f"another process uses transactional id {self.transactional_id!r} "
                    "(each replica needs its own STREAMML_INSTANCE_ID)"
                ) from exc
            metric = "producer_fenced"
        self._replace_producer(f"it failed: {err}", metric)
        self._abort_pending = False  # the new producer aborted what was open
        return True

    def _replace_producer(self, why: str, metric: str = "producer_wedged") -> None:
        """A new transactional producer with the same transactional.id: initialising it fences the old
        one (the broker aborts its open transaction), and the loop goes back to the committed input. The
        old producer is kept referenced for good: destroying a wedged one could block on the call that
        hangs: it is let go on a daemon thread of its own after RETIRE_AFTER_S (see `_retire`)."""
        ERRORS.labels(self.name, metric).inc()
        log.error("%s: replacing the transactional producer (%s)", self.name, why)
        assert self._producer is not None
        self._retire(self._producer)
        self._producer = make_producer(self.settings, **self._producer_overrides)
        self._init_transactions()
        self._offsets_call = None
        self._forget_transaction()
        self._rewind_pending = True
        if not self._in_revoke:
            self._rewind()

    def _retire(self, producer: Producer) -> None:
        """Keep a replaced producer referenced for RETIRE_AFTER_S, then purge it and drop the reference on a
        daemon thread: its librdkafka handle is destroyed there, so a destroy that blocks on a wedged call
        holds that thread only, and replaced producers do not pile up over a long run."""
        abandoned = self._abandoned
        abandoned.append(producer)

        def let_go() -> None:
            time.sleep(RETIRE_AFTER_S)
            with contextlib.suppress(Exception):
                producer.purge()
            with contextlib.suppress(ValueError):
                abandoned.remove(producer)

        in_daemon_thread(f"{self.name}-retire-producer", let_go)

    def _init_transactions(self) -> None:
        """init_transactions on the current producer (it aborts what this id left open and fences an older
        producer), asked again while the broker answers with a retriable error, up to INIT_WAIT_S."""
        assert self._producer is not None
        deadline = time.monotonic() + INIT_WAIT_S
        while True:
            try:
                self._producer.init_transactions(max(1.0, min(30.0, deadline - time.monotonic())))
                return
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or not err.retriable() or err.fatal() or time.monotonic() >= deadline:
                    raise StreamMLError(f"{self.name}: cannot initialise transactions: {err or exc}") from exc
                ERRORS.labels(self.name, "init_retry").inc()
                log.warning("%s: transactions not initialised yet (%s); asking again", self.name, err)
                time.sleep(0.5)

    def _log_holding(self, what: str = "") -> None:
        """At most one line every 5 s while outputs wait for the broker, from a wait of COMMIT_WAIT_S on
        (shorter holds are the normal pace of a commit: see LOOP_WAIT_S)."""
        now = time.monotonic()
        if self._held_for() >= COMMIT_WAIT_S and now - self._last_hold_log >= 5.0:
            self._last_hold_log = now
            assert self._producer is not None
            what = what or (
                f"{len(self._producer)} outputs not acknowledged yet ({len(self._retry)} to produce again)"
            )
            log.warning("%s: %s; holding the commit and new input until they are", self.name, what)
