"""Per-partition keyed state backed by a compacted changelog topic (the features service's rolling windows).

As in Kafka Streams and Faust tables: the state of one input partition lives in one store, every change is
written to the same partition number of a compacted changelog, and an instance that is assigned an input
partition reads that changelog partition to its end before it processes the partition's records.
Everything here but `read_changelog` is pure, so it is unit-tested without a broker.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from streamml.codec import codec_for
from streamml.errors import DecodeError, StreamMLError
from streamml.kafka import make_consumer
from streamml.runtime import Output, watermark_offsets
from streamml.settings import Settings

log = logging.getLogger(__name__)


_NOTHING = object()  # an append that pushed nothing out


@dataclass
class KeyedWindows:
    """Rolling windows of the last N values per (step output, entity key), with the input offset of the
    last event applied to each key, so an event read again after a crash is not counted twice; and, for
    events that came through the repartition hop, the offset of the last raw record applied per source
    partition, so a raw record the hop forwarded twice (at-least-once: its input read again after a crash)
    is not counted twice either."""

    windows: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    dirty: set[tuple[str, str]] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=dict)  # entity key → input offset of its last event
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # key → source partition → offset
    frozen: bool = False  # set while scoring a request that is not part of the stream (POST /predict)
    # The input offset after the last record of the partition handled with these windows (None: none yet):
    # what the group's committed offset is when they are exactly the committed state (see `resume`).
    position: int | None = None
    replayed: int = 0  # events not applied again because their key's windows already held them
    outputs: dict[str, list[str]] = field(default_factory=dict)  # entity key → outputs it has windows of
    _offset: int | None = None  # input offset of the event being applied (None: no offsets kept)
    _source: tuple[str, int] | None = None  # ("topic/partition", offset) of the raw record it was
    _replay: bool = False  # the event being applied is already in its key's windows
    _undo: list[tuple[Any, ...]] = field(default_factory=list)  # how to take the current event back out

    def begin(self, key: str, offset: int | None, source: tuple[str, int] | None = None) -> bool:
        """Start applying the event at `offset` (a copy of the raw record `source`, a ("topic/partition",
        offset) pair) to `key`'s windows; False if they already hold it."""
        self._offset = offset
        self._source = source
        self._undo = []
        last = self.offsets.get(key)
        self._replay = offset is not None and last is not None and offset <= last
        if source is not None and not self._replay:
            seen = self.sources.get(key, {}).get(source[0])
            self._replay = seen is not None and source[1] <= seen
        if self._replay:
            self.replayed += 1
        return not self._replay

    def push(self, output: str, key: str, value: float, size: int) -> deque[float]:
        if self.frozen:  # the window as it would be with `value`, leaving the state unchanged
            return deque([*self.windows.get((output, key), ()), value], maxlen=size)
        window = self.windows.get((output, key))
        if self._replay:  # already applied: the window as it stands (it holds the event, maybe later ones)
            return window if window is not None else deque([value], maxlen=size)
        undo: tuple[Any, ...]
        if window is None:
            undo = ("new", None)
            window = self.windows[(output, key)] = deque(maxlen=size)
            self.outputs.setdefault(key, []).append(output)
        elif window.maxlen != size:  # restored from the changelog, or the revision changed the size
            undo = ("replaced", window)
            window = self.windows[(output, key)] = deque(window, maxlen=size)
        else:  # what the append pushes out, to put it back if the event is refused later (O(1))
            undo = ("appended", window[0] if len(window) == window.maxlen else _NOTHING)
        source = self._source
        seen = self.sources.get(key, {}).get(source[0]) if source is not None else None
        self._undo.append((output, key, *undo, (output, key) in self.dirty, self.offsets.get(key), seen))
        window.append(value)
        self.dirty.add((output, key))
        if self._offset is not None:
            self.offsets[key] = self._offset
        if source is not None:
            self.sources.setdefault(key, {})[source[0]] = source[1]
        return window

    def rollback(self) -> None:
        """Take the event being applied back out of every window it entered (it was refused later)."""
        for output, key, how, old, was_dirty, offset, seen in reversed(self._undo):
            if how == "new":
                del self.windows[(output, key)]
                self.outputs[key].remove(output)
                if not self.outputs[key]:
                    del self.outputs[key]
            elif how == "replaced":
                self.windows[(output, key)] = old
            else:
                window = self.windows[(output, key)]
                window.pop()
                if old is not _NOTHING:
                    window.appendleft(old)
            if not was_dirty:
                self.dirty.discard((output, key))
            if offset is None:
                self.offsets.pop(key, None)
            else:
                self.offsets[key] = offset
            if self._source is not None:
                if seen is None:
                    self.sources.get(key, {}).pop(self._source[0], None)
                else:
                    self.sources.setdefault(key, {})[self._source[0]] = seen
        self._undo = []

    def take_dirty(self) -> dict[tuple[str, str], list[float]]:
        """The windows changed since the last call (what the service writes to its changelog)."""
        out = {k: list(self.windows[k]) for k in self.dirty}
        self.dirty.clear()
        return out

    def restore(self, output: str, key: str, values: list[float], size: int | None = None) -> None:
        """Put back a window; without `size` its length is set by the next push (the step knows it)."""
        if (output, key) not in self.windows:
            self.outputs.setdefault(key, []).append(output)
        self.windows[(output, key)] = deque(values, maxlen=size)

    def state_of(self, key: str) -> dict[str, list[float]]:
        """Every window of one key, by output name."""
        return {output: list(self.windows[(output, key)]) for output in self.outputs.get(key, ())}


class PartitionedStore:
    """The windows of one pipeline: one `KeyedWindows` per input partition this instance owns.

    `input_topic` is the topic whose partitions own the keys (the repartition topic, or a raw topic that
    is keyed or whose pipeline has no key field). Changelog record key: "<partition>/<entity key>".
    """

    def __init__(self, pipeline: str, input_topic: str, changelog: str, changelog_partitions: int) -> None:
        self.pipeline = pipeline
        self.input_topic = input_topic
        self.changelog = changelog
        self.changelog_partitions = changelog_partitions
        self.parts: dict[int, KeyedWindows] = {}
        # Windows of partitions revoked in a rebalance, kept until the next assignment says whether they
        # come back here (`resume`), as Kafka Streams kept suspended tasks under the eager protocol.
        self.suspended: dict[int, KeyedWindows] = {}
        self._codec = codec_for("WindowState")

    def owned(self) -> set[int]:
        return set(self.parts)

    def changelog_partition(self, partition: int) -> int:
        """The same number (a keyed raw topic may have more partitions than the changelog: then modulo)."""
        return partition % self.changelog_partitions

    def get(self, partition: int) -> KeyedWindows:
        """The windows of an input partition. The data loop restores every partition on assignment; a
        partition seen without one (a handler driven directly, as in tests) starts empty."""
        windows = self.parts.get(partition)
        if windows is None:
            windows = self.parts[partition] = KeyedWindows()
        return windows

    def restore(self, partition: int, values: Iterable[bytes | None]) -> int:
        """Replace the windows of `partition` with its changelog records (oldest first); returns the keys.

        Records of another input topic or partition (sharing the changelog partition) are skipped, and so
        are undecodable ones (logged): a bad changelog record loses that key's history, not the service.
        """
        windows = KeyedWindows()
        decode = self._codec.decode
        skipped = 0
        for value in values:
            if value is None:  # (never written by us; a tombstone would delete a key)
                continue
            try:
                record = decode(value)
            except DecodeError:
                skipped += 1
                continue
            if record["input_topic"] != self.input_topic or record["partition"] != partition:
                continue
            key = record["key"]
            for output, vals in record["windows"].items():
                windows.restore(output, key, vals)
            windows.offsets[key] = record["offset"]
            if record.get("sources"):
                windows.sources[key] = dict(record["sources"])
        if skipped:
            where = f"{self.changelog}[{self.changelog_partition(partition)}]"
            log.warning("%s: %d undecodable records in %s skipped", self.pipeline, skipped, where)
        self.parts[partition] = windows
        return len(windows.offsets)

    def drop(self, partition: int) -> None:
        """Forget a partition this instance lost (its new owner restores it from the changelog)."""
        self.parts.pop(partition, None)

    def suspend(self, partition: int) -> None:
        """A rebalance took the partition away: its windows wait for the next assignment (`resume`)."""
        windows = self.parts.pop(partition, None)
        if windows is not None:
            self.suspended[partition] = windows

    def resume(self, partition: int, committed: int) -> bool:
        """The partition is assigned again, to be read from `committed`: its suspended windows are taken
        back if they are exactly the state at that offset (the records handled with them end there: the
        revocation committed them, and nobody read the partition since). Otherwise (the commit failed or was
        aborted, or another instance read on) False: the caller restores it from the changelog."""
        windows = self.suspended.pop(partition, None)
        if windows is None or windows.position is None or windows.position != committed or committed < 0:
            return False
        self.parts[partition] = windows
        return True

    def forget_suspended(self) -> None:
        """The assignment is complete: suspended windows not taken back belong to another instance now."""
        self.suspended.clear()

    def changes(self) -> list[Output]:
        """One changelog record per key changed since the last call, pinned to its partition's number."""
        outputs: list[Output] = []
        encode = self._codec.encode
        for partition, windows in self.parts.items():
            if not windows.dirty:
                continue
            keys = {key for _output, key in windows.dirty}
            windows.dirty.clear()
            for key in sorted(keys):
                record = {
                    "pipeline": self.pipeline,
                    "input_topic": self.input_topic,
                    "partition": partition,
                    "key": key,
                    "offset": windows.offsets.get(key, -1),
                    "sources": windows.sources.get(key, {}),
                    "windows": windows.state_of(key),
                }
                outputs.append(
                    Output(
                        self.changelog,
                        f"{partition}/{key}".encode(),
                        encode(record),
                        partition=self.changelog_partition(partition),
                        pipeline=self.pipeline,
                    )
                )
        return outputs


def read_changelog(
    settings: Settings, topic: str, partitions: Mapping[int, int], timeout_s: float = 60.0
) -> dict[int, list[bytes | None]]:
    """The values of changelog partitions, oldest first, up to their end now (committed records only).

    `partitions` maps each input partition to its changelog partition; the answer is keyed by input
    partition. Raises StreamMLError if the end is not reached within `timeout_s`.
    """
    wanted = sorted(set(partitions.values()))
    got: dict[int, list[bytes | None]] = {p: [] for p in wanted}
    consumer = make_consumer(
        settings,
        f"{settings.topic_prefix}-restore-{time.monotonic_ns()}",  # assigned, never committed
        **{"isolation.level": "read_committed", "enable.auto.offset.store": False},
    )
    try:
        deadline = time.monotonic() + timeout_s
        ends: dict[int, int] = {}
        for p in wanted:
            try:
                low, high = watermark_offsets(consumer, TopicPartition(topic, p), deadline)
            except KafkaException as exc:
                raise StreamMLError(f"cannot read the end of {topic}[{p}]: {exc}") from exc
            if high > low:
                ends[p] = high
        if ends:
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        while ends:
            if time.monotonic() > deadline:
                raise StreamMLError(f"timed out restoring {topic} partitions {sorted(ends)}")
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None and msg.partition() in ends:
                    got[msg.partition() or 0].append(msg.value())
            # The position says when a partition is done: transaction markers take offsets too.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
    finally:
        consumer.close()
    return {inp: got[chg] for inp, chg in partitions.items()}
