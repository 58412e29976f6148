"""Single writers: which instance of a service writes for which pipeline, elected and fenced by Kafka.

Election: the instances of a service join one consumer group on `<prefix>.writers`; its partitions are
writer slots, and a pipeline belongs to slot `slot_of(name)`. The group protocol gives each slot to exactly
one live member (cooperative-sticky: a rebalance moves only the slots that must move), so pipelines spread
over instances and a crashed member's slots move on after its session times out.

Fencing: the owner of slot k publishes only through a transactional producer whose `transactional.id` is
`<prefix>-<service>-writer-<k>`. Initialising it bumps that id's epoch and aborts whatever the previous
owner left open, so a previous owner that still believes it writes (paused, cut off) fails its next commit
with a fencing error, and read_committed readers never see its records.

Hand-over: a new owner restores its pipelines (the service's `on_gain`) only after fencing, so whatever the
previous owner committed is on the topics by then; a slot given up in a rebalance commits its open
transaction first (`on_revoke`), so its last outputs are part of what the next owner restores.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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

from streamml.codec import encoder_for, prefetch_writers
from streamml.errors import DependencyUnavailableError, StreamMLError
from streamml.kafka import data_fetch, kafka_error, make_consumer, make_producer
from streamml.metrics import BATCH_SECONDS, ERRORS, EVENTS_IN, WRITER_SLOTS, WRITER_SLOTS_CONFIGURED
from streamml.runtime import (
    DEPENDENCY_WAIT_MAX_S,
    DEPENDENCY_WAIT_S,
    HEARTBEAT_MS,
    MIN_BATCH,
    RETRIABLE,
    SESSION_TIMEOUT_MS,
    BatchSizer,
    IdleWait,
    Output,
    first_offsets,
    interleave,
    is_permanent,
    produce,
)
from streamml.settings import Settings
from streamml.topics import Catalogue

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 30.0  # init_transactions waits this long for the coordinator (it aborts the old epoch)
COMMIT_TIMEOUT_S = 5.0
# A transaction left open by a crashed writer holds back read_committed readers of its topics until the
# next writer fences it (within a session timeout) or the broker aborts it after this long.
TRANSACTION_TIMEOUT_MS = 15_000
# A slot dropped while the group still gives it to this instance (fenced by a transaction timeout, or a
# restore that failed) is claimed again after this long: enough for a real zombie to learn from the group
# that it is out (its session has timed out by then), so two live instances never fence each other in turn.
REGAIN_AFTER_S = 12.0


def slot_of(pipeline: str, slots: int) -> int:
    """The writer slot of a pipeline: stable across processes, versions and restarts (CRC-32)."""
    return zlib.crc32(pipeline.encode()) % slots


def transactional_id(settings: Settings, service: str, slot: int) -> str:
    return f"{settings.topic_prefix}-{service}-writer-{slot}"


class Fenced(StreamMLError):
    """Another instance owns the slot now: this one must stop writing for it."""


class WriterSlots:
    """The slots this instance writes for, each with its fenced transactional producer.

    `on_gain(slots)` runs after fencing (restore the slots' pipelines from durable state); `on_lose(slots)`
    when slots go (drop their state). Both run on the thread that calls `poll`/`commit`.
    """

    def __init__(
        self,
        settings: Settings,
        service: str,
        *,
        on_gain: Callable[[list[int]], None],
        on_lose: Callable[[list[int]], None],
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.count = settings.writer_slots
        self.topic = Catalogue(settings).writers().name
        self.group_id = f"{settings.topic_prefix}-{service}-writers"
        self.on_gain = on_gain
        self.on_lose = on_lose
        self._producer_config = dict(producer_config or {})
        self.producers: dict[int, Producer] = {}
        self._open: set[int] = set()  # slots with an open transaction
        self._consumer: Consumer | None = None
        self.pipelines_of: Callable[[int], list[str]] = lambda _slot: []
        self.changes = 0  # bumped at every gain or loss: readers of the slots' inputs seek again
        self._dropped_at: dict[int, float] = {}
        WRITER_SLOTS_CONFIGURED.labels(service).set(self.count)  # what alert rules compare the owned sum with
        WRITER_SLOTS.labels(service).set(0)  # an instance that owns nothing shows as 0, not as absent

    # -- membership -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._consumer = make_consumer(
            self.settings,
            self.group_id,
            **{
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": SESSION_TIMEOUT_MS,  # a crashed writer's slots move on after ~6 s
                "heartbeat.interval.ms": HEARTBEAT_MS,
                # An instance whose event loop stalls this long (librdkafka heartbeats from its own thread)
                # leaves the group: its slots move on, and it is fenced if it writes again.
                "max.poll.interval.ms": 30_000,
                "auto.offset.reset": "latest",  # the claims on the topic are for people, not for us
            },
        )
        self._consumer.subscribe(
            [self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    def poll(self) -> None:
        """Serve the group (heartbeats, rebalances: gains and losses happen inside this call)."""
        if self._consumer is None:
            return
        self._consumer.consume(100, 0)
        if self._dropped_at:  # dropped, yet still ours by the group's word: claim it again after a while
            now = time.monotonic()
            assigned = {tp.partition for tp in self._consumer.assignment()}
            again = [s for s, at in self._dropped_at.items() if now - at >= REGAIN_AFTER_S and s in assigned]
            for slot in [s for s in self._dropped_at if s not in assigned or s in again]:
                del self._dropped_at[slot]
            if again:
                log.warning("%s: slots %s are still assigned here: claiming them again", self.service, again)
                self._gain(again)

    def close(self, timeout_s: float = 3.0) -> None:
        """Commit what is open and leave the group (the slots move on at once, not after a timeout)."""
        for slot in list(self.producers):
            try:
                self.commit(slot, timeout_s)
            except StreamMLError as exc:
                log.warning("%s: slot %d: final commit failed: %s", self.service, slot, exc)
        if self._consumer is not None:
            try:
                self._consumer.close()  # revokes every slot (the callback commits nothing new now)
            except (KafkaException, RuntimeError) as exc:
                log.warning("%s: leaving the writers group: %s", self.service, exc)
            self._consumer = None

    def owns(self, pipeline: str) -> bool:
        return slot_of(pipeline, self.count) in self.producers

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._gain([tp.partition for tp in partitions])

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        slots = [tp.partition for tp in partitions if tp.partition in self.producers]
        for slot in slots:
            try:
                self.commit(slot, COMMIT_TIMEOUT_S)  # the next owner restores from this
            except StreamMLError as exc:
                log.warning("%s: slot %d: commit at hand-over failed: %s", self.service, slot, exc)
        self._drop(slots, "revoked", regain=False)

    def _lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(
            [tp.partition for tp in partitions if tp.partition in self.producers], "lost", regain=False
        )

    def _gain(self, slots: list[int]) -> None:
        """Fence every previous writer of `slots` first, then restore their pipelines (all at once)."""
        if not slots:
            return
        started = time.monotonic()

        def fence(slot: int) -> Producer | KafkaException:
            tid = transactional_id(self.settings, self.service, slot)
            conf = {"transactional.id": tid, "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS}
            producer = make_producer(self.settings, **{**conf, **self._producer_config})
            try:
                producer.init_transactions(INIT_TIMEOUT_S)  # fences the previous owner, aborts its open txn
            except KafkaException as exc:
                return exc
            return producer

        # All slots at once: each init_transactions waits for its coordinator (seconds while a fresh broker
        # loads its transaction log), and one after another they held the event loop (and SIGTERM) 10-20 s.
        with ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="fence") as pool:
            outcomes = list(zip(slots, pool.map(fence, slots), strict=True))
        fenced = []
        for slot, outcome in outcomes:
            if isinstance(outcome, KafkaException):  # e.g. the coordinator moving: claimed again in a while
                ERRORS.labels(self.service, "fence").inc()
                log.error(
                    "%s: slot %d: cannot fence the previous writer now (%s)", self.service, slot, outcome
                )
                self._dropped_at[slot] = time.monotonic()
                continue
            self.producers[slot] = outcome
            fenced.append(slot)
        slots = fenced
        if not slots:
            return
        self.changes += 1
        WRITER_SLOTS.labels(self.service).set(len(self.producers))
        try:
            self.on_gain(slots)
        except Exception:  # restoring failed: write nothing rather than from stale state
            log.exception(
                "%s: slots %s: restoring failed; retrying at the next assignment", self.service, slots
            )
            self._drop(slots, "restore failed")
            return
        for slot in slots:
            self._claim(slot, transactional_id(self.settings, self.service, slot))
            try:
                self.commit(slot)
            except StreamMLError as exc:  # fenced already: someone newer owns it
                log.error("%s", exc)
        pipelines = [p for slot in slots for p in self.pipelines_of(slot)]
        log.info(
            "%s: writing for slots %s (%s) from now on; fenced and restored in %.1f s",
            self.service,
            slots,
            ", ".join(pipelines) or "no pipelines yet",
            time.monotonic() - started,
        )

    def _claim(self, slot: int, tid: str) -> None:
        """An audit record of the take-over, on the slot's own partition (and a first fencing check)."""
        record = {
            "service": self.service,
            "slot": slot,
            "instance_id": self.settings.instance_id,
            "transactional_id": tid,
            "pipelines": self.pipelines_of(slot),
            "claimed_at": time.time_ns() // 1_000_000,
        }
        key = f"{self.service}/{slot}".encode()
        self.send(
            slot,
            Output(self.topic, key, encoder_for(self.topic, "WriterClaim").encode(record), partition=slot),
        )

    def _drop(self, slots: list[int], why: str, regain: bool = True) -> None:
        if not slots:
            return
        if regain:
            self._dropped_at.update({slot: time.monotonic() for slot in slots})
        producers = [self.producers.pop(slot, None) for slot in slots]
        self._open.difference_update(slots)
        self.changes += 1
        WRITER_SLOTS.labels(self.service).set(len(self.producers))
        try:
            self.on_lose(slots)
        except Exception:
            log.exception("%s: slots %s: dropping their state failed", self.service, slots)
        for producer in producers:
            if producer is not None:
                producer.flush(0)  # an open transaction is aborted by the next owner's init_transactions
        log.info("%s: slots %s %s: no longer writing for them", self.service, slots, why)

    # -- writing --------------------------------------------------------------------------------------
    def send(self, slot: int, output: Output) -> bool:
        """Produce inside the slot's open transaction; False (dropped, counted) if this instance does not
        own the slot (any more)."""
        producer = self.producers.get(slot)
        if producer is None:
            ERRORS.labels(self.service, "not_writer").inc()
            return False
        if slot not in self._open:
            try:
                producer.begin_transaction()
            except KafkaException as exc:  # a producer in a fatal state: a new one reclaims the slot
                ERRORS.labels(self.service, "fenced").inc()
                self._drop([slot], f"its producer failed ({kafka_error(exc) or exc})")
                raise Fenced(f"{self.service}: slot {slot}: {kafka_error(exc) or exc}") from exc
            self._open.add(slot)
        try:
            produce(producer, output)
        except BufferError:
            producer.poll(0.5)
            produce(producer, output)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or not is_permanent(err):
                raise
            ERRORS.labels(self.service, "output_refused").inc()
            log.error("%s: an output to %s was refused and is dropped: %s", self.service, output.topic, err)
        return True

    def commit(self, slot: int, timeout_s: float = COMMIT_TIMEOUT_S) -> bool:
        """Commit the slot's open transaction: True when done. A retriable failure leaves it open (False,
        try again); a fenced producer drops the slot and raises Fenced; an abortable failure aborts and
        restores the slot from durable state again (its in-memory state had run ahead of what was
        committed), then raises StreamMLError."""
        producer = self.producers.get(slot)
        if producer is None or slot not in self._open:
            return True
        try:
            producer.commit_transaction(timeout_s)
        except KafkaException as exc:
            err = kafka_error(exc)
            passing = err is not None and (err.retriable() or err.code() in RETRIABLE)
            if passing and err is not None and not err.txn_requires_abort() and not err.fatal():
                ERRORS.labels(self.service, "commit_retry").inc()
                return False
            if err is not None and err.txn_requires_abort() and not err.fatal():
                ERRORS.labels(self.service, "txn_aborted").inc()
                try:
                    producer.abort_transaction(timeout_s)
                except KafkaException as abort_exc:
                    # The producer cannot go on (e.g. INVALID_TXN_STATE after an authorization failure):
                    # let go of the slot; it is claimed again, by a new producer, after REGAIN_AFTER_S.
                    ERRORS.labels(self.service, "fenced").inc()
                    self._drop([slot], f"its transaction could not be aborted ({kafka_error(abort_exc)})")
                    raise Fenced(f"{self.service}: slot {slot}: {err}; abort failed") from exc
                self._open.discard(slot)
                self.changes += 1
                self.on_lose([slot])
                self.on_gain([slot])
                raise StreamMLError(
                    f"{self.service}: slot {slot}: transaction aborted ({err}); restored from durable state"
                ) from exc
            ERRORS.labels(self.service, "fenced").inc()
            self._drop([slot], f"fenced ({err or exc})")
            raise Fenced(f"{self.service}: slot {slot}: {err or exc}") from exc
        self._open.discard(slot)
        return True

    def commit_all(self, timeout_s: float = COMMIT_TIMEOUT_S) -> bool:
        """Commit every open transaction within `timeout_s` in all (not each: the caller holds the event
        loop meanwhile); False if one is left open (retried at the next call)."""
        deadline = time.monotonic() + timeout_s
        done = True
        for slot in list(self._open):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                done = self.commit(slot, left) and done
            except StreamMLError as exc:
                log.error("%s", exc)
        return done


Handler = Callable[[str, list[Message]], Iterable[Output]]


class WriterLoop(mode.Service):
    """The data path of a single-writer service: reads every partition of the topics of the pipelines
    this instance writes for (by assignment, from where the service's durable state says), hands each
    pipeline's records to `handler(pipeline, msgs)`, and publishes the outputs in the slot's transaction,
    committed every `commit_interval_s`. No consumer offsets: the service's durable state (a published
    version, a snapshot) records how far it got, so a new owner resumes exactly there.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        slots: WriterSlots,
        handler: Handler,
        inputs: Callable[[], dict[str, dict[int, int]]],
        pipeline_of: Callable[[str], str | None],
        on_idle: Callable[[], Iterable[Output]] | None = None,
        dead_letter: Callable[[Message, BaseException], Output] | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.name = name
        self.slots = slots
        self.handler = handler
        self.inputs = inputs
        self.pipeline_of = pipeline_of
        self._on_idle = on_idle
        self._dead_letter = dead_letter
        self._consumer: Consumer | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._changes = -1  # the slots' change count the assignment was made for
        self._partitions: dict[str, list[int]] = {}
        self._last_commit = time.monotonic()
        self._pending = False  # a commit that met a retriable error: retried before new input
        # An online learner can take a millisecond per record (a deep adaptive tree, on a starved core):
        # batches start small and grow while steps stay quick, so the event loop (SIGTERM, control topics)
        # is never held for seconds, even while catching up after a restart.
        self._sizer = BatchSizer(settings.max_batch, start=MIN_BATCH)
        self._idle = IdleWait()
        self._dependency_wait = 0.0  # the pause before reading again while the registry is away
        self.processed = 0
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self._consumer = make_consumer(
            self.settings,
            f"{self.settings.topic_prefix}-{self.name}-writer-data",  # never joined, never committed
            **{
                "isolation.level": "read_committed",
                **data_fetch(self.settings),
                "max.partition.fetch.bytes": 64 * 1024,
            },
        )
        self.slots.start()

    async def on_stop(self) -> None:
        self.slots.close()
        if self._consumer is not None:
            self._consumer.close()

    @mode.Service.task
    async def _run(self) -> None:
        while not self.should_stop:
            try:
                await self._step()
            except Exception:  # a broker error in a hand-over or a read: never the end of the loop
                ERRORS.labels(self.name, "writer_loop").inc()
                log.exception("%s: writer loop step failed; going on in a second", self.name)
                await asyncio.sleep(1.0)

    async def _step(self) -> None:
        """One turn: serve the group, commit when due, read and handle one batch."""
        self.slots.poll()
        if self._pending or time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
            if self._on_idle is not None:
                self._send(self._on_idle(), None)
            self._last_commit = time.monotonic()
            self._pending = not self.slots.commit_all(1.0)
            if self._pending:
                await asyncio.sleep(0.1)
                return
        self._reassign()
        msgs = self._consumer.consume(self._sizer.limit, 0) if self._assigned else []  # type: ignore[union-attr]
        if msgs and not await self._writers_known(msgs):
            return
        if msgs:
            started = time.monotonic()
            self.process(msgs)
            self._sizer.step(self.name, len(msgs), time.monotonic() - started)
        await asyncio.sleep(self._idle.after(len(msgs)))

    async def _writers_known(self, msgs: list[Message]) -> bool:
        """With a schema registry: fetch the writer schemas of the batch's framed records first. While the
        registry cannot answer, none of them is handled (a decode would dead-letter it): their partitions go
        back to the batch's first records, read again after a pause (0.5 s, doubling up to 5 s)."""
        try:
            prefetch_writers(m.value() for m in msgs if m.error() is None)
        except DependencyUnavailableError as exc:
            for (topic, partition), offset in first_offsets(msgs).items():
                try:
                    self._consumer.seek(TopicPartition(topic, partition, offset))  # type: ignore[union-attr]
                except KafkaException as seek_exc:  # (unassigned meanwhile: read from its resume point)
                    log.warning("%s: cannot go back to %s[%d]@%d: %s", self.name, topic, partition, offset,
                                seek_exc)  # fmt: skip
            self._dependency_wait = min(
                DEPENDENCY_WAIT_MAX_S, max(DEPENDENCY_WAIT_S, self._dependency_wait * 2)
            )
            ERRORS.labels(self.name, "dependency_unavailable").inc()
            log.warning("%s: %d records wait (read again in %.1f s): %s", self.name, len(msgs),
                        self._dependency_wait, exc)  # fmt: skip
            await asyncio.sleep(self._dependency_wait)
            return False
        self._dependency_wait = 0.0
        return True

    def _reassign(self) -> None:
        """Read exactly the partitions of the owned pipelines' topics, from the service's resume points."""
        assert self._consumer is not None
        wanted = self.inputs()
        targets: dict[tuple[str, int], int] = {}
        for topic, starts in wanted.items():
            parts = self._partitions.get(topic)
            if parts is None:
                meta = self._consumer.list_topics(topic, timeout=5).topics.get(topic)
                if meta is None or meta.error is not None or not meta.partitions:
                    continue
                parts = self._partitions[topic] = sorted(meta.partitions)
            for p in parts:
                targets[(topic, p)] = starts.get(p, OFFSET_BEGINNING)
        if self.slots.changes != self._changes:  # a slot came or went: every input seeks to its resume point
            self._changes = self.slots.changes
            if self._assigned:
                self._consumer.incremental_unassign([TopicPartition(t, p) for t, p in self._assigned])
                self._assigned = set()
        gone = self._assigned - set(targets)
        new = set(targets) - self._assigned
        if gone:
            self._consumer.incremental_unassign([TopicPartition(t, p) for t, p in gone])
        if new:
            self._consumer.incremental_assign([TopicPartition(t, p, targets[(t, p)]) for t, p in new])
        if gone or new:
            self._assigned = set(targets)
            log.info("%s: reading %d partitions (+%d, -%d)", self.name, len(targets), len(new), len(gone))

    def process(self, msgs: list[Message]) -> None:
        started = time.perf_counter()
        groups: dict[str, list[Message]] = defaultdict(list)
        for msg in interleave(msgs):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    ERRORS.labels(self.name, "consume").inc()
                    log.warning("%s: consume error %s", self.name, err)
                continue
            pipeline = self.pipeline_of(msg.topic() or "")
            if pipeline is not None and self.slots.owns(pipeline):
                groups[pipeline].append(msg)
        for pipeline, group in groups.items():
            self._send(self._handle(pipeline, group), pipeline)
            topic = group[0].topic() or ""
            EVENTS_IN.labels(self.name, topic, pipeline).inc(len(group))
            self.processed += len(group)
        BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def _handle(self, pipeline: str, msgs: list[Message]) -> list[Output]:
        """The handler's outputs; if it fails on the batch, each record alone, and a record that still
        fails is dead-lettered: no record can stop the loop."""
        try:
            return list(self.handler(pipeline, msgs))
        except Exception:
            ERRORS.labels(self.name, "handler").inc()
            log.exception("%s: handler failed on %d records; retrying one by one", self.name, len(msgs))
        outputs: list[Output] = []
        for msg in msgs:
            try:
                outputs.extend(self.handler(pipeline, [msg]))
            except Exception as exc:
                ERRORS.labels(self.name, "record").inc()
                if self._dead_letter is not None:
                    outputs.append(self._dead_letter(msg, exc))
        return outputs

    def _send(self, outputs: Iterable[Output], pipeline: str | None) -> None:
        for out in outputs:
            owner = out.pipeline or pipeline
            if owner is None:
                log.error("%s: an output to %s names no pipeline; dropped", self.name, out.topic)
                ERRORS.labels(self.name, "unrouted").inc()
                continue
            self.slots.send(slot_of(owner, self.slots.count), out)
