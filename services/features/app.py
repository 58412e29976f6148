"""Composition root of the features service: pipelines follower, data loop, per-key windows table.

The per-key rolling windows are kept in a Faust table (changelog-backed, so they survive restarts): the
data loop updates them in memory and writes the windows it changed to the table once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust
from confluent_kafka import Message

from streamml import metrics
from streamml.codec import codec_for, decode_raw
from streamml.kafka import ensure_topics
from streamml.runtime import BatchLoop, Output, faust_app
from streamml.service import (
    ControlFollower,
    dead_letter,
    now_ms,
    prepare,
    run_service,
)
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.features import FeatureEngine

log = logging.getLogger(__name__)
SERVICE = "features"


class Features:
    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.control = ControlFollower(settings, SERVICE)
        self.engines: dict[str, FeatureEngine] = {}
        self.by_topic: dict[str, FeatureEngine] = {}
        self.table: Any = None  # the Faust table of windows, set by `build`
        self._last_persist = 0.0
        self._out_topic: dict[str, str] = {}
        self._features = codec_for("FeatureVector")

    def on_pipeline(self, record: dict[str, Any] | None, _msg: Any) -> None:
        if record is None:
            return
        name = record["name"]
        engine = None
        if not record["deleted"]:  # build and prepare the new revision before dropping the old one
            engine = FeatureEngine(record)
            ensure_topics(self.settings, self.catalogue.pipeline_topics(name))
        old = self.engines.pop(name, None)
        if old is not None:
            self.by_topic = {t: e for t, e in self.by_topic.items() if e is not old}
        if engine is None:
            log.info("pipeline %s deleted", name)
            return
        if old is not None:
            engine.windows = old.windows  # a new revision keeps the per-key history
        elif self.table is not None:
            self._restore_windows(engine)
        self.engines[name] = engine
        self.by_topic[record["raw_topic"]] = engine
        log.info("pipeline %s revision %s: reading %s", name, record["revision"], record["raw_topic"])

    def _restore_windows(self, engine: FeatureEngine) -> None:
        prefix = f"{engine.pipeline}|"
        for key, values in self.table.items():
            if isinstance(key, str) and key.startswith(prefix):
                _, output, entity = key.split("|", 2)
                engine.windows.restore(output, entity, list(values), max(len(values), 1))

    def topics(self) -> set[str]:
        return set(self.by_topic)

    def handle(self, msgs: list[Message]) -> list[Output]:
        now = now_ms()
        outputs: list[Output] = []
        encode = self._features.encode
        counts: dict[str, int] = {}
        for msg in msgs:
            topic = msg.topic() or ""
            engine = self.by_topic.get(topic)
            if engine is None:  # pipeline deleted while its records were in flight
                metrics.SKIPPED.labels(SERVICE, "pipeline_deleted").inc()
                continue
            try:
                raw = decode_raw(msg.value())
                partition, offset = msg.partition() or 0, msg.offset() or 0
                source = {
                    "topic": topic,
                    "partition": partition,
                    "start_offset": offset,
                    "end_offset": offset + 1,
                }
                fv = engine.transform(raw, timestamp_ms=msg.timestamp()[1], now_ms=now, source=source)
                value = encode(fv)
            except Exception as exc:  # the record boundary: any failure dead-letters this record only
                outputs.append(dead_letter(self.catalogue, SERVICE, engine.pipeline, msg, exc))
                continue
            outputs.append(
                Output(self.catalogue.features(engine.pipeline).name, fv["event_id"].encode(), value)
            )
            counts[engine.pipeline] = counts.get(engine.pipeline, 0) + 1
        for pipeline, n in counts.items():
            metrics.EVENTS_OUT.labels(SERVICE, self.catalogue.features(pipeline).name, pipeline).inc(n)
        self._persist_windows()
        return outputs

    def _persist_windows(self) -> None:
        """Write the windows changed since the last write to the Faust table (its changelog: durable).

        At most once a second: Faust's changelog producer is pure Python, and a hot key changes every event.
        """
        now = time.monotonic()
        if self.table is None or now - self._last_persist < 1.0:
            return
        self._last_persist = now
        for engine in self.engines.values():
            changed = engine.windows.take_dirty()
            for i, ((output, entity), values) in enumerate(changed.items()):
                try:
                    self.table[f"{engine.pipeline}|{output}|{entity}"] = values
                except (TypeError, KeyError, AssertionError) as exc:
                    # Right after start Faust may not know the changelog topic's partitions yet: keep
                    # the rest dirty and write them with the next batch (the in-memory windows are exact).
                    log.debug("windows table not writable yet (%s); retrying next batch", exc)
                    engine.windows.dirty.update(list(changed)[i:])
                    return


def build(settings: Settings) -> tuple[faust.App, Features, BatchLoop]:
    catalogue = prepare(settings)
    service = Features(settings, catalogue)
    service.control.bootstrap(catalogue.pipelines().name, "PipelineDefinition", service.on_pipeline)
    app = faust_app(SERVICE, settings)
    service.table = app.Table("windows", default=list, partitions=1, use_partitioner=True)
    service.control.follow(app, catalogue.pipelines().name, "PipelineDefinition", service.on_pipeline)
    ready = app_ready(app, service)
    loop = BatchLoop(
        settings,
        name=SERVICE,
        handler=service.handle,
        topics=service.topics,
        ready=ready,
        dead_letter=lambda msg, exc: dead_letter(catalogue, SERVICE, None, msg, exc),
    )
    return app, service, loop


def app_ready(app: faust.App, service: Features) -> asyncio.Event:
    """An event set once Faust has recovered the windows table, so windows resume where they were."""
    ready = asyncio.Event()

    @app.task
    async def _when_recovered() -> None:
        await app.tables.recovery.completed.wait()  # type: ignore[attr-defined]
        for engine in service.engines.values():
            service._restore_windows(engine)
        ready.set()

    return ready


def main() -> None:
    def compose(settings: Settings) -> tuple[faust.App, list[Any]]:
        app, _service, loop = build(settings)
        return app, [loop]

    run_service(compose)
