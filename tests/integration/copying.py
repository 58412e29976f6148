"""A copying data loop's topics and handler, for tests of the exactly-once loop on a real broker: every
record of `<prefix>.in` goes to the same partition of `<prefix>.out`, so a read_committed reader of the
sink can count each input exactly once."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message
from confluent_kafka.admin import AdminClient, NewTopic

from streamml.runtime import Output
from streamml.settings import Settings


def exactly_once(bootstrap: str, **overrides: Any) -> Settings:
    """Exactly-once settings under a topic prefix of their own."""
    return Settings(
        bootstrap_servers=bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        processing_guarantee="exactly_once",
        **overrides,
    )  # type: ignore[call-arg]


def source_and_sink(settings: Settings, partitions: int) -> tuple[str, str]:
    """Create `<prefix>.in` and `<prefix>.out` with `partitions` each; their names."""
    prefix = settings.topic_prefix
    source, sink = f"{prefix}.in", f"{prefix}.out"
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    for created in admin.create_topics(
        [NewTopic(source, partitions, 1), NewTopic(sink, partitions, 1)]
    ).values():
        created.result(30)
    return source, sink


def copy_to(sink: str) -> Callable[[list[Message]], list[Output]]:
    """The handler that copies each record to the same partition of `sink`."""

    def copy(msgs: list[Message]) -> list[Output]:
        return [Output(sink, None, m.value() or b"", partition=m.partition()) for m in msgs]

    return copy
