"""Composition root of the features service: pipelines follower, and one data loop with two stages.

1. Repartition: a pipeline with a key field whose raw topic is not declared keyed (`raw_keyed`) has its raw
   events forwarded, bytes unchanged, to `<prefix>.<pipeline>.repartition`, keyed by the key field, so all
   events of one key meet in one partition (header `streamml-source` names the raw record).
2. Features: the state input topic (the repartition topic, or the raw topic itself when it is keyed or the
   pipeline has no key field) is turned into feature vectors. Its rolling windows are kept per input
   partition (streamml.state), restored from the compacted changelog `<prefix>.<pipeline>.windows` when a
   partition is assigned (before any of its records is processed) and dropped when it is revoked; the
   windows changed since the last commit go to the changelog at each commit: at least once after the
   outputs of their events were acknowledged and before the input offsets, exactly once in the transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import faust
from confluent_kafka import Message, TopicPartition

from streamml import metrics
from streamml.codec import codec_for, decode_raw, registry_in_use
from streamml.contracts import contracts_of
from streamml.kafka import ensure_topics
from streamml.registry import FramedEncoder, Registry, RegistryError
from streamml.runtime import BatchLoop, Output, faust_app
from streamml.service import (
    ControlFollower,
    dead_letter,
    frame_dead_letters,
    now_ms,
    prepare,
    run_service,
)
from streamml.settings import Settings
from streamml.state import PartitionedStore, read_changelog
from streamml.topics import Catalogue
from streams.features import FeatureEngine
from streams.repartition import Source, key_of, partition_for, source_time

log = logging.getLogger(__name__)
SERVICE = "features"


@dataclass(frozen=True)
class Hop:
    """Stage 1 of one pipeline: its raw topic is read and forwarded to its repartition topic."""

    engine: FeatureEngine
    key_field: str
    topic: str
    partitions: int


def needs_repartition(definition: dict[str, Any]) -> bool:
    """Rolling windows are per key: a key field whose raw topic is not keyed by it needs the hop."""
    return bool(definition["key_field"]) and not definition.get("raw_keyed", False)


class Features:
    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.control = ControlFollower(settings, SERVICE)
        self.engines: dict[str, FeatureEngine] = {}
        self.hops: dict[str, Hop] = {}  # raw topic → stage 1
        self.by_input: dict[str, FeatureEngine] = {}  # state input topic → stage 2
        self.stores: dict[str, PartitionedStore] = {}  # state input topic → windows per partition
        self.hop_inputs: set[str] = set()  # state input topics that are repartition topics
        self._features = codec_for("FeatureVector")
        self._loopback: dict[tuple[str, int], int] = {}  # handle_through's next offset per partition
        # reads Confluent-framed raw events: the process's registry (its schema cache is the one the data
        # loop fills before a batch is handled), or one of its own when driven directly (tests)
        shared = registry_in_use()
        self.registry = shared if isinstance(shared, Registry) else Registry.from_settings(settings)
        # With a registry: each pipeline's vectors in its typed contract, Confluent-framed (by pipeline)
        self.encoders: dict[str, FramedEncoder] = {}
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._replay_logged = 0.0  # (exactly once: see _replayed_under_exactly_once)

    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        engine = None
        if not record["deleted"]:  # build and prepare the new revision before dropping the old one
            engine = FeatureEngine(record)
            ensure_topics(
                self.settings, self.catalogue.used_by(self.catalogue.pipeline_topics(name), SERVICE)
            )
            frame_dead_letters(self.catalogue, name)
        old = self.engines.pop(name, None)
        if old is not None:
            self.hops = {t: h for t, h in self.hops.items() if h.engine is not old}
            self.by_input = {t: e for t, e in self.by_input.items() if e is not old}
            self.hop_inputs = {h.topic for h in self.hops.values()}
        old_stores = {t: s for t, s in self.stores.items() if s.pipeline == name}
        for topic in old_stores:
            del self.stores[topic]
        if engine is None:
            log.info("pipeline %s deleted", name)
            return
        raw_topic = record["raw_topic"]
        if needs_repartition(record):
            hop = self.catalogue.repartition(name)
            self.hops[raw_topic] = Hop(engine, record["key_field"], hop.name, hop.partitions)
            input_topic = hop.name
            self.hop_inputs.add(hop.name)
        else:
            input_topic = raw_topic
        self.by_input[input_topic] = engine
        # A new revision keeps the per-key history, unless its events now come from another input topic
        # (then the data loop's next assignment restores that topic's partitions).
        store = old_stores.get(input_topic)
        if store is None:
            changelog = self.catalogue.windows(name)
            store = PartitionedStore(name, input_topic, changelog.name, changelog.partitions)
        self.stores[input_topic] = store
        self.engines[name] = engine
        self._typed_encoder(record)
        log.info(
            "pipeline %s revision %s: reading %s%s",
            name,
            record["revision"],
            raw_topic,
            f" through {input_topic}" if input_topic != raw_topic else "",
        )

    def _typed_encoder(self, record: dict[str, Any]) -> None:
        """With a registry, the pipeline's vectors are written with its typed contract (registered here
        too: the same schema gets the id `pipeline apply` registered). A registry that cannot be reached
        leaves them in the generic encoding, which every reader also reads."""
        name = record["name"]
        self.encoders.pop(name, None)
        if self.registry is None:
            return
        contract = contracts_of(record).features
        try:
            schema_id = self.registry.register(self.catalogue.features(name).name, contract)
        except RegistryError as exc:
            log.error("%s: feature vectors stay in the generic encoding: %s", name, exc)
            return
        self.encoders[name] = FramedEncoder(contract, schema_id)
        log.info("%s: feature vectors typed as %s (schema id %d)", name, contract.fullname, schema_id)

    def topics(self) -> set[str]:
        return set(self.hops) | set(self.by_input)

    # -- assignment -----------------------------------------------------------------------------------
    def on_assign(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Restore the windows of each newly assigned input partition from its changelog partition. Runs
        inside the consumer's rebalance callback, so before any record of these partitions is returned.
        A partition that was revoked from this instance in the same rebalance and comes back, to be read
        from where its windows stand, keeps them (the eager protocol revokes every partition first)."""
        wanted: dict[str, list[int]] = {}
        kept: list[tuple[str, int]] = []
        for tp in partitions:
            store = self.stores.get(tp.topic)
            if store is None:
                continue
            if tp.partition in store.owned():
                # Every partition held was put aside by the revocation (or the rewind) before this: windows
                # of a partition not held were made outside any assignment, and are not its committed state.
                log.warning(
                    "%s: windows of %s[%d] held outside an assignment; restoring them from %s",
                    store.pipeline, tp.topic, tp.partition, store.changelog,
                )  # fmt: skip
                store.drop(tp.partition)
            if store.resume(tp.partition, tp.offset):
                kept.append((tp.topic, tp.partition))
            else:
                wanted.setdefault(tp.topic, []).append(tp.partition)
        for store in self.stores.values():
            store.forget_suspended()
        if kept:
            log.info("windows kept through the rebalance (read on from where they stand): %s", kept)
        for topic, parts in wanted.items():
            store = self.stores[topic]
            started = time.monotonic()
            values = read_changelog(
                self.settings, store.changelog, {p: store.changelog_partition(p) for p in parts}
            )
            keys = {p: store.restore(p, values[p]) for p in parts}
            log.info(
                "%s: restored windows of %s partitions %s from %s in %.2f s (keys per partition %s)",
                store.pipeline, topic, sorted(parts), store.changelog, time.monotonic() - started, keys,
            )  # fmt: skip
        return partitions

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Put aside the windows of partitions taken away (the data loop has committed what it processed):
        the next assignment takes them back if they come back here unread by anyone else, else drops them."""
        for tp in partitions:
            store = self.stores.get(tp.topic)
            if store is not None:
                store.suspend(tp.partition)

    # -- records --------------------------------------------------------------------------------------
    def handle(self, msgs: list[Message]) -> list[Output]:
        now = now_ms()
        outputs: list[Output] = []
        counts: dict[tuple[str, str], int] = {}
        for msg in msgs:
            topic = msg.topic() or ""
            engine = self.by_input.get(topic)
            if engine is not None:
                out = self._features_of(engine, topic, msg, now)
            else:
                hop = self.hops.get(topic)
                if hop is None:  # pipeline deleted while its records were in flight
                    metrics.SKIPPED.labels(SERVICE, "pipeline_deleted").inc()
                    continue
                engine = hop.engine
                out = self._repartition(hop, msg)
            outputs.append(out)
            if out.pipeline is not None:  # (dead letters carry none)
                counts[(out.topic, engine.pipeline)] = counts.get((out.topic, engine.pipeline), 0) + 1
        for (topic, pipeline), n in counts.items():
            metrics.EVENTS_OUT.labels(SERVICE, topic, pipeline).inc(n)
        return outputs

    def state_changes(self) -> list[Output]:
        """The windows changed since the last call, one changelog record per key at its partition (the data
        loop takes them at each commit, after the outputs of the events they hold: `BatchLoop._commit`)."""
        return [out for store in self.stores.values() for out in store.changes()]

    def _repartition(self, hop: Hop, msg: Message) -> Output:
        """Stage 1: the raw record, unchanged, to the partition of its key; undecodable → dead letter."""
        try:
            raw = decode_raw(msg.value(), self.registry)
        except Exception as exc:  # the record boundary: any failure dead-letters this record only
            return dead_letter(self.catalogue, SERVICE, hop.engine.pipeline, msg, exc)
        key = key_of(raw, hop.key_field)
        source = Source(
            msg.topic() or "", msg.partition() or 0, msg.offset() or 0, msg.timestamp()[1], msg.key()
        )
        partition = partition_for(key, hop.partitions)
        return Output(hop.topic, key, msg.value(), partition, hop.engine.pipeline, source.headers())

    def _features_of(self, engine: FeatureEngine, topic: str, msg: Message, now: int) -> Output:
        """Stage 2: the feature vector of one event, with its input partition's windows."""
        partition, offset = msg.partition() or 0, msg.offset() or 0
        windows = self.stores[topic].get(partition)
        windows.position = offset + 1  # (whatever its fate below: the record is handled)
        origin: Message = msg
        named = Source.from_headers(msg.headers()) if topic in self.hop_inputs else None
        raw_record = None
        if named is not None:  # the raw record it was, as stage 1 named it
            source = named
            origin = cast(Message, named.as_message(msg.value()))
            raw_record = (f"{named.topic}/{named.partition}", named.offset)
        else:
            source = Source(topic, partition, offset, msg.timestamp()[1])
        replayed = windows.replayed
        try:
            raw = decode_raw(msg.value(), self.registry)
            fv = engine.transform(
                raw,
                timestamp_ms=source.timestamp,
                now_ms=now,
                source={
                    "topic": source.topic,
                    "partition": source.partition,
                    "start_offset": source.offset,
                    "end_offset": source.offset + 1,
                },
                windows=windows,
                offset=offset,
                raw_record=raw_record,
            )
            encoder = self.encoders.get(engine.pipeline)
            value = encoder.encode(fv) if encoder is not None else self._features.encode(fv)
        except Exception as exc:  # the record boundary: any failure dead-letters this record only
            return dead_letter(self.catalogue, SERVICE, engine.pipeline, origin, exc)
        if windows.replayed != replayed and self.exactly_once:
            self._replayed_under_exactly_once(engine.pipeline, topic, partition, offset, windows.replayed)
        return Output(
            self.catalogue.features(engine.pipeline).name, fv["event_id"].encode(), value,
            pipeline=engine.pipeline,
        )  # fmt: skip

    def _replayed_under_exactly_once(
        self, pipeline: str, topic: str, partition: int, offset: int, so_far: int
    ) -> None:
        """An event its key's windows already held. At least once that is a record read again after a
        crash; exactly once the windows are always the committed state of the offset read from, so it means
        they were ahead of the input: counted (`streamml_errors_total{kind="window_replay"}`) and logged at
        most every 5 s, never silent."""
        metrics.ERRORS.labels(SERVICE, "window_replay").inc()
        now = time.monotonic()
        if now - self._replay_logged >= 5.0:
            self._replay_logged = now
            log.warning(
                "%s: %s[%d]@%d was already in its key's windows (%d such records of the partition so far): "
                "exactly once, the windows were ahead of the committed input",
                pipeline, topic, partition, offset, so_far,
            )  # fmt: skip

    def handle_through(self, msgs: list[Message]) -> list[Output]:
        """Both stages in one call, without a broker (tests, benchmarks): repartition records are read
        back at once, at consecutive offsets per partition. Returns what leaves the service (feature
        vectors, dead letters), not its internal records (repartition, changelog)."""
        internal = self.hop_inputs
        visible: list[Output] = []
        for out in self.handle(msgs):
            if out.topic not in internal:
                visible.append(out)
                continue
            partition = out.partition or 0
            offset = self._loopback.get((out.topic, partition), 0)
            self._loopback[(out.topic, partition)] = offset + 1
            back = _Loopback(out, partition, offset)
            visible.extend(self.handle([cast(Message, back)]))
        self.state_changes()  # what the data loop would write to the changelog at its next commit
        return visible


class _Loopback:
    """A repartition Output as the consumer would read it back (for `handle_through`)."""

    def __init__(self, out: Output, partition: int, offset: int) -> None:
        self._out, self._partition, self._offset = out, partition, offset

    def topic(self) -> str:
        return self._out.topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._out.key

    def value(self) -> bytes | None:
        return self._out.value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._out.headers

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


def build(settings: Settings) -> tuple[faust.App, Features, BatchLoop]:
    catalogue = prepare(settings, SERVICE)
    service = Features(settings, catalogue)
    service.control.bootstrap(catalogue.pipelines().name, "PipelineDefinition", service.on_pipeline)
    app = faust_app(SERVICE, settings)
    service.control.follow(app, catalogue.pipelines().name, "PipelineDefinition", service.on_pipeline)
    loop = BatchLoop(
        settings,
        name=SERVICE,
        handler=service.handle,
        topics=service.topics,
        on_assign=service.on_assign,
        on_revoke=service.on_revoke,
        state=service.state_changes,
        dead_letter=lambda msg, exc: dead_letter(catalogue, SERVICE, None, msg, exc),
        # events of all keys in the order they came (by their raw records' timestamps), not in runs per
        # partition
        aligned=lambda topic: topic in service.hop_inputs,
        order_time=source_time,
    )
    return app, service, loop


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service, loop = build(settings)
        return app, [loop]

    run_service(SERVICE, compose)
