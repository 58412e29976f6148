"""Shared pieces of the service composition roots: logging, settings, control-topic state, dead letters."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from confluent_kafka import Message

from streamml.codec import codec_for
from streamml.errors import DecodeError, StreamMLError
from streamml.kafka import check_broker, ensure_topics
from streamml.metrics import DEAD_LETTERED, ERRORS
from streamml.runtime import Output, end_offsets, read_to_end
from streamml.settings import Settings
from streamml.topics import Catalogue

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def prepare(settings: Settings) -> Catalogue:
    """Fail fast without a broker; make sure the global topics exist before anything subscribes."""
    check_broker(settings)
    catalogue = Catalogue(settings)
    ensure_topics(settings, catalogue.global_topics())
    return catalogue


def dead_letter(
    catalogue: Catalogue, service: str, pipeline: str | None, msg: Message, exc: Exception
) -> Output:
    """A DeadLetter record for the pipeline's dead-letter topic, with the original bytes and the reason."""
    reason = type(exc).__name__
    DEAD_LETTERED.labels(service, pipeline or "", reason).inc()
    record = {
        "source_topic": msg.topic() or "",
        "source_partition": msg.partition() or 0,
        "source_offset": msg.offset() or 0,
        "original_key": msg.key() if isinstance(msg.key(), bytes) else None,
        "original_value": msg.value() if isinstance(msg.value(), bytes) else None,
        "error_type": reason,
        "error": str(exc),
        "service": service,
        "pipeline": pipeline,
        "failed_at": now_ms(),
    }
    topic = catalogue.dead_letter(pipeline).name if pipeline else f"{catalogue.prefix}.dead-letter"
    key = f"{record['source_topic']}/{record['source_partition']}/{record['source_offset']}".encode()
    return Output(topic, key, codec_for("DeadLetter").encode(record))


@dataclass
class ControlFollower:
    """Applies control-topic records once each: first all existing ones (bootstrap), then new ones.

    The bootstrap reads each topic to its end before the data path starts ("load the live state before
    consuming"); a Faust agent then follows the topic, and records it already applied are skipped by
    offset, so replays after a restart or rebalance change nothing.
    """

    settings: Settings
    applied: dict[tuple[str, int], int] = field(default_factory=dict)

    def bootstrap(
        self, topic: str, schema: str, apply: Callable[[dict[str, Any] | None, Message], None]
    ) -> int:
        msgs = read_to_end(self.settings, topic)
        for msg in msgs:
            self._apply(topic, schema, msg.partition() or 0, msg.offset() or 0, msg.value(), apply, msg)
        return len(msgs)

    def skip_history(self, topic: str) -> None:
        """Treat everything already on `topic` as applied: only records produced from now on act."""
        for msg_partition, high in end_offsets(self.settings, topic).items():
            self.applied[(topic, msg_partition)] = high

    def follow(
        self, app: faust.App, topic: str, schema: str, apply: Callable[[dict[str, Any] | None, Any], None]
    ) -> None:
        """Register a Faust agent that applies new records of `topic`."""
        channel = app.topic(topic, value_serializer="raw", key_serializer="raw")

        async def agent(stream: faust.StreamT[bytes]) -> None:
            async for event in stream.events():
                message = event.message
                self._apply(topic, schema, message.partition, message.offset, event.value, apply, message)

        agent.__name__ = f"follow_{topic.replace('.', '_').replace('-', '_')}"
        agent.__qualname__ = agent.__name__
        app.agent(channel, name=agent.__name__)(agent)

    def _apply(
        self,
        topic: str,
        schema: str,
        partition: int,
        offset: int,
        value: bytes | None,
        apply: Callable[[dict[str, Any] | None, Any], None],
        msg: Any,
    ) -> None:
        if offset < self.applied.get((topic, partition), 0):
            return
        self.applied[(topic, partition)] = offset + 1
        if value is None:
            apply(None, msg)
            return
        try:
            record = codec_for(schema).decode(value)
        except DecodeError as exc:
            ERRORS.labels(self.settings.client_id, "control_decode").inc()
            log.error("skipping undecodable record %s[%d]@%d: %s", topic, partition, offset, exc)
            return
        try:
            apply(record, msg)
        except StreamMLError:
            ERRORS.labels(self.settings.client_id, "control_apply").inc()
            log.exception("control record %s[%d]@%d could not be applied", topic, partition, offset)


def run_service(compose: Callable[[Settings], tuple[faust.App, list[Any]]]) -> None:
    """Entry point of every service: settings, logging, composition, metrics endpoint, then the worker.

    A configuration or broker problem found while composing exits with status 2 and one clear line.
    """
    from streamml import metrics
    from streamml.settings import get_settings

    settings = get_settings()
    setup_logging(settings)
    try:
        app, services = compose(settings)
    except StreamMLError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc
    metrics.serve(settings.metrics_host, settings.metrics_port)
    run_worker(app, *services, loglevel=settings.log_level)


def run_worker(app: faust.App, *services: Any, loglevel: str = "INFO") -> None:
    """Run the Faust worker (handles SIGTERM/SIGINT: services stop and commit)."""
    worker = faust.Worker(app, *services, loglevel=loglevel.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
