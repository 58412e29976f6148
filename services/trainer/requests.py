"""Training requests, shared between trainer instances by partition, each answered once.

The requests topic is partitioned and keyed by pipeline; a consumer group shares its partitions between
the instances. Taking a partition, an instance first fences its previous owner (a transactional producer
whose transactional.id is the partition's: the newest `init_transactions` wins and aborts what the old
owner left open), then reads pipelines, model versions and training results to their end, and only then
takes requests of that partition. Each answer (the ModelVersion, the TrainingResult and the request's
offset) is one transaction: both records exist or neither, and a zombie owner cannot add one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import mode
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamml import metrics
from streamml.codec import prefetch_writers
from streamml.errors import DependencyUnavailableError, StreamMLError
from streamml.kafka import kafka_error, make_consumer, make_producer
from streamml.runtime import (
    DEPENDENCY_WAIT_S,
    HEARTBEAT_MS,
    SESSION_TIMEOUT_MS,
    Output,
    in_daemon_thread,
    is_retriable,
    produce,
)
from streamml.service import check_record_pipeline
from streamml.topics import MODEL_MAX_BYTES
from streams.trainer import route_request

if TYPE_CHECKING:
    from services.trainer.app import Trainer

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE_SLEEP_S = 0.05
BUSY_POLL_S = 0.1  # while a request trains, the consumer is still polled (heartbeats, rebalances)
CATCH_UP_TIMEOUT_S = 30.0  # one wait for the control topics' end; tried again while the partition is ours
PUBLISH_TIMEOUT_S = 120.0  # an answer's transaction keeps trying this long through retriable broker errors
# A transaction call that has not returned this long after its own deadline is taken as wedged: librdkafka's
# send_offsets_to_transaction can block for good when the group coordinator's broker went away (librdkafka
# issues 5456 and 5511, seen in the data loop). The answer is then lost as in a rebalance: the partition is
# prepared again with a new producer (fencing the wedged one) and the request answered again.
TRANSACT_WEDGED_S = PUBLISH_TIMEOUT_S + 30.0
KAFKA_TIMEOUT_S = 10.0
STOP_WAIT_S = 3.0  # a stop waits this long for an answer being committed; a fit in progress is left
REPREPARE_DELAY_S = 12.0  # after losing a partition's producer: past the group session timeout (10 s)


class OwnershipLostError(StreamMLError):
    """The partition's producer was fenced (a newer owner) or failed for good: nothing was committed."""


class TxnProducer(Protocol):
    """What `transact` uses of a transactional confluent-kafka Producer (tests pass a fake)."""

    def begin_transaction(self) -> None: ...
    def produce(self, topic: str, value: Any = ..., key: Any = ..., **kwargs: Any) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...
    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], metadata: Any, timeout: float
    ) -> None: ...
    def commit_transaction(self, timeout: float) -> None: ...
    def abort_transaction(self, timeout: float) -> None: ...


# The group moved on (this instance lost the partition in a rebalance): the offsets cannot commit here.
_GROUP_MOVED = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
MAX_ATTEMPTS = 3  # transactions tried (each after aborting the previous one) before the answer is given up


def transact(
    producer: TxnProducer,
    outputs: Sequence[Output],
    offsets: list[TopicPartition],
    group_metadata: Any,
    timeout_s: float,
) -> None:
    """Produce `outputs` and commit `offsets` in one transaction (blocking: for a worker thread). A commit
    that fails with a retriable error is tried again for up to `timeout_s`; an abortable failure aborts
    and starts over, up to MAX_ATTEMPTS times. Raises OwnershipLostError when the producer is fenced or
    fails for good, when the group has moved the partition, or when it gives up; then nothing of the
    transaction is visible to read_committed readers."""
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    attempt = 0
    while True:
        attempt += 1
        try:
            producer.begin_transaction()
            for out in outputs:
                _produce(producer, out, deadline)
            producer.send_offsets_to_transaction(offsets, group_metadata, left())
            _commit(producer, deadline)
            return
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or err.fatal() or not err.txn_requires_abort():
                raise OwnershipLostError(f"transaction failed: {err or exc}") from exc
            try:
                producer.abort_transaction(left())
            except KafkaException as abort_exc:
                raise OwnershipLostError(f"aborting the transaction failed: {abort_exc}") from abort_exc
            if err.code() in _GROUP_MOVED or attempt >= MAX_ATTEMPTS or time.monotonic() >= deadline:
                raise OwnershipLostError(f"transaction aborted: {err}") from exc
            log.warning("transaction failed (%s); aborted it, trying again", err)
            time.sleep(0.2)


def _produce(producer: TxnProducer, out: Output, deadline: float) -> None:
    while True:
        try:
            produce(producer, out)  # type: ignore[arg-type]
            return
        except BufferError:  # the local queue is full: let deliveries drain, then once more
            if time.monotonic() >= deadline:
                raise
            producer.poll(0.1)


def _commit(producer: TxnProducer, deadline: float) -> None:
    """commit_transaction, called again while it fails with a retriable error (librdkafka's contract)."""
    while True:
        try:
            producer.commit_transaction(max(0.5, deadline - time.monotonic()))
            return
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is None or not err.retriable() or err.txn_requires_abort() or err.fatal():
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


@dataclass(eq=False)
class Owned:
    """A requests partition this instance was assigned: ready once fenced and caught up."""

    partition: int
    producer: Any = None
    ready: bool = False
    backlog: collections.deque[Message] = field(default_factory=collections.deque)
    next_offset: int = -1  # requests below it were handled by this owner already


class RequestLoop(mode.Service):
    """Takes requests of the partitions this instance owns, one at a time, on the Faust event loop; the
    slice read and the fit run in a worker thread while the consumer keeps polling (all partitions paused)."""

    def __init__(self, trainer: Trainer, **kwargs: Any) -> None:
        self.trainer = trainer
        self.settings = trainer.settings
        catalogue = trainer.catalogue
        self.topic = catalogue.training_requests().name
        self.partitions = catalogue.training_requests().partitions
        self.group_id = f"{self.settings.topic_prefix}-trainer-requests"
        self.catch_up_topics = [
            catalogue.pipelines().name,
            catalogue.model_versions().name,
            catalogue.training_results().name,
        ]
        self._consumer: Consumer | None = None
        self._owned: dict[int, Owned] = {}
        self._busy = False
        self._publishing: asyncio.Future[Any] | None = None
        self._closing = False
        self._last_error_log = 0.0
        self.handled = 0
        super().__init__(**kwargs)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        self._consumer = make_consumer(
            self.settings,
            self.group_id,
            **{
                "isolation.level": "read_committed",
                "enable.auto.offset.store": False,
                "partition.assignment.strategy": "cooperative-sticky",  # a fit on a kept partition goes on
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": HEARTBEAT_MS,
                "fetch.wait.max.ms": 100,
            },
        )
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    async def on_stop(self) -> None:
        """An answer being committed gets STOP_WAIT_S; a fit in progress is left (its request is not
        committed: the partition's next owner answers it)."""
        self._closing = True
        if self._publishing is not None and not self._publishing.done():
            await asyncio.wait({self._publishing}, timeout=STOP_WAIT_S)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()  # leaves the group: the partitions move to the other instances at once
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the requests consumer: %s", exc)
        self._owned.clear()  # producers are left to the exit: the next owner aborts what is open

    # -- rebalance ------------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        consumer.pause(partitions)  # until fenced and caught up
        for tp in partitions:
            owned = Owned(tp.partition)
            self._owned[tp.partition] = owned
            self.add_future(self._prepare(owned))
        log.info("assigned requests partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            owned = self._owned.pop(tp.partition, None)
            if owned is not None and owned.producer is not None and not self._closing:
                self._dispose(owned.producer)
        log.info("requests partitions %s revoked", sorted(tp.partition for tp in partitions))

    def _dispose(self, producer: Any) -> None:
        """Destroy a producer in a worker thread (librdkafka's destroy may wait on the broker)."""
        asyncio.get_running_loop().run_in_executor(None, producer.flush, 1.0)

    def _is_current(self, owned: Owned) -> bool:
        return self._owned.get(owned.partition) is owned and not self._closing

    async def _prepare(self, owned: Owned, delay_s: float = 0.0) -> None:
        """Fence the partition's previous owner, catch up on the control topics, then take requests."""
        loop = asyncio.get_running_loop()
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            tid = f"{self.settings.topic_prefix}-trainer-requests-{owned.partition}"
            producer = make_producer(
                self.settings,
                **{"transactional.id": tid, "linger.ms": 0, "message.max.bytes": MODEL_MAX_BYTES},
            )
            owned.producer = producer  # disposed with `owned` if anything below fails
            while True:
                try:
                    await loop.run_in_executor(None, producer.init_transactions, KAFKA_TIMEOUT_S)
                    break
                except KafkaException as exc:
                    err = kafka_error(exc)
                    if err is None or not is_retriable(err) or not self._is_current(owned):
                        raise
                    log.warning("partition %d: init_transactions: %s; trying again", owned.partition, err)
            if not self._is_current(owned):
                return
            for topic in self.catch_up_topics:
                while not await self.trainer.control.caught_up(topic, CATCH_UP_TIMEOUT_S):
                    if not self._is_current(owned):
                        return
                    log.warning("partition %d: %s not read to its end yet", owned.partition, topic)
            if not self._is_current(owned):
                return
            owned.ready = True
            log.info("requests partition %d: previous owner fenced, control topics read; taking requests",
                     owned.partition)  # fmt: skip
            self._resume()
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. the broker away for long: give the partition another try later
            metrics.ERRORS.labels("trainer", "ownership").inc()
            log.exception("partition %d: taking ownership failed; trying again", owned.partition)
            if owned.producer is not None:
                self._dispose(owned.producer)
                owned.producer = None
            if self._is_current(owned):
                self.add_future(self._prepare(owned, REPREPARE_DELAY_S))

    def _resume(self) -> None:
        """Let ready partitions deliver again (none while a request is in progress)."""
        if self._consumer is None or self._busy:
            return
        ready = [TopicPartition(self.topic, p) for p, o in self._owned.items() if o.ready]
        if ready:
            self._consumer.resume(ready)

    def _pause_all(self) -> None:
        if self._consumer is not None:
            assigned = [TopicPartition(self.topic, p) for p in self._owned]
            if assigned:
                self._consumer.pause(assigned)

    # -- the loop -------------------------------------------------------------------------------------
    @mode.Service.task
    async def _run(self) -> None:
        while not self.should_stop and not self._closing:
            msg = self._next()
            if msg is None:
                await asyncio.sleep(IDLE_SLEEP_S)
                continue
            owned = self._owned.get(msg.partition() or 0)
            if owned is None:
                continue  # revoked since it was fetched: its next owner handles it
            try:
                await self.handle(owned, msg)
            except OwnershipLostError as exc:
                self._lost(owned, msg, exc)
            except Exception:  # the record boundary: the loop must outlive any request
                metrics.ERRORS.labels("trainer", "request").inc()
                log.exception("request at %s[%s]@%s failed", self.topic, msg.partition(), msg.offset())
            await asyncio.sleep(0)

    def _next(self) -> Message | None:
        """The next request of a ready partition: one held back while busy, else a new one."""
        for held in self._owned.values():
            if held.ready and held.backlog:
                return held.backlog.popleft()
        msg = self._poll()
        if msg is None:
            return None
        owned = self._owned.get(msg.partition() or 0)
        if owned is None or not owned.ready:
            if owned is not None:
                owned.backlog.append(msg)  # fetched before the pause took effect: kept in order
            return None
        return msg

    def _poll(self) -> Message | None:
        """One record, never waiting; serves rebalance callbacks. Broker errors are logged, not raised."""
        if self._consumer is None:
            return None
        try:
            msgs = self._consumer.consume(1, 0)
        except KafkaException as exc:
            self._log_error(kafka_error(exc) or exc)
            return None
        for msg in msgs:
            err = msg.error()
            if err is None:
                return msg
            if err.code() != KafkaError._PARTITION_EOF:
                self._log_error(err)
        return None

    def _log_error(self, err: object) -> None:
        metrics.ERRORS.labels("trainer", "consume").inc()
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:
            self._last_error_log = now
            log.warning("reading training requests: %s", err)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in a worker thread while the consumer keeps polling (see `polling`)."""
        return await self.polling(asyncio.get_running_loop().run_in_executor(None, fn, *args))

    async def polling(self, future: asyncio.Future[T], timeout_s: float | None = None) -> T:
        """Wait for `future` with every partition paused, polling the consumer meanwhile: heartbeats and
        rebalances are served during a long fit, and no new request is taken. TimeoutError after
        `timeout_s` (the future is left running)."""
        self._busy = True
        self._pause_all()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=BUSY_POLL_S)
                if done:
                    return future.result()
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"not done after {timeout_s:.0f} s")
                msg = self._poll()
                if msg is not None and (owned := self._owned.get(msg.partition() or 0)) is not None:
                    owned.backlog.append(msg)
        finally:
            self._busy = False
            self._resume()

    # -- one request ----------------------------------------------------------------------------------
    async def handle(self, owned: Owned, msg: Message) -> None:
        """Answer, skip or forward one request; whatever it is, its offset commits in the transaction."""
        partition, offset = msg.partition() or 0, msg.offset() or 0
        if offset < owned.next_offset:
            return  # delivered again after a pause: handled already
        try:
            prefetch_writers([msg.value()])  # (a framed request's writer schema; at once without a registry)
        except DependencyUnavailableError as exc:  # the registry is away: not this request's fault
            log.warning("request at %s[%d]@%d waits for the schema registry: %s", self.topic, partition,
                        offset, exc)  # fmt: skip
            owned.backlog.appendleft(msg)  # tried again first, after a pause
            await asyncio.sleep(DEPENDENCY_WAIT_S)
            return
        try:
            request = self.trainer.requests_codec.decode(msg.value() or b"")
            check_record_pipeline(request)
        except Exception as exc:  # not a request: skipped with a CONTROL alert, offset committed
            self.trainer.control.skip(self.topic, partition, offset, exc, None)
            await self.commit(owned, offset, [])
            return
        route = route_request(
            request["request_id"], request["pipeline"], partition, self.partitions, self.trainer.answered
        )
        if route.action == "skip":
            log.info("%s; skipping it", route.reason)
            await self.commit(owned, offset, [])
        elif route.action == "forward":
            log.warning("request %s arrived on partition %d: %s, forwarding it",
                        request["request_id"], partition, route.reason)  # fmt: skip
            key = request["pipeline"].encode()
            await self.commit(owned, offset, [Output(self.topic, key, msg.value(), route.partition)])
        else:
            await self.answer(owned, offset, request)

    async def answer(self, owned: Owned, offset: int, request: dict[str, Any]) -> None:
        started = time.monotonic()
        answer = await self.trainer.answer(request, self.in_thread, lambda: self._is_current(owned))
        if answer is None:
            log.info("request %s: partition %d moved on while training; its new owner answers it",
                     request["request_id"], owned.partition)  # fmt: skip
            return
        await self.commit(owned, offset, answer.outputs)
        self.trainer.answered_one(request, answer, time.monotonic() - started)

    async def commit(self, owned: Owned, offset: int, outputs: list[Output]) -> None:
        """One transaction: the outputs and the request's offset. Raises OwnershipLostError if the
        partition is no longer ours (nothing of it is then visible)."""
        if not self._is_current(owned) or self._consumer is None:
            raise OwnershipLostError(f"partition {owned.partition} is no longer ours")
        metadata = self._consumer.consumer_group_metadata()
        offsets = [TopicPartition(self.topic, owned.partition, offset + 1)]
        # A daemon thread of its own, not the default executor: a wedged call never returns, and must
        # neither hold a pool's thread nor the process at exit.
        call = in_daemon_thread(
            f"trainer-txn-{owned.partition}",
            partial(transact, owned.producer, outputs, offsets, metadata, PUBLISH_TIMEOUT_S),
        )
        self._publishing = asyncio.wrap_future(call)
        try:
            await self.polling(self._publishing, TRANSACT_WEDGED_S)
        except TimeoutError as exc:
            raise OwnershipLostError(
                f"the transaction has not returned for {TRANSACT_WEDGED_S:.0f} s (wedged); "
                "its producer is replaced"
            ) from exc
        owned.next_offset = offset + 1
        self.handled += 1

    def _lost(self, owned: Owned, msg: Message, exc: Exception) -> None:
        """The answer was not committed. If the partition is still assigned here, start over from this
        request once the group has settled: fence again, catch up, and it is answered (or skipped)."""
        metrics.ERRORS.labels("trainer", "ownership").inc()
        log.warning("partition %d: %s; the request at offset %s is answered again", owned.partition, exc,
                    msg.offset())  # fmt: skip
        if not self._is_current(owned) or self._consumer is None:
            return
        fresh = Owned(owned.partition)
        self._owned[owned.partition] = fresh
        if owned.producer is not None:
            self._dispose(owned.producer)
        tp = TopicPartition(self.topic, owned.partition, msg.offset() or 0)
        self._consumer.pause([tp])
        try:
            self._consumer.seek(tp)
        except KafkaException as exc2:
            log.warning("partition %d: seeking back failed (%s)", owned.partition, exc2)
        self.add_future(self._prepare(fresh, REPREPARE_DELAY_S))
