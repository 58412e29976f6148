"""A copying data loop's topics and handler, for tests of the exactly-once loop on a real broker: every
record of `<prefix>.in` goes to the same partition of `<prefix>.out`, so a read_committed reader of the
sink can count each input exactly once."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Message
from confluent_kafka.admin import AdminClient, NewTopic

from streamml.runtime import Output


def source_and_sink(bootstrap: str, prefix: str, partitions: int) -> tuple[str, str]:
    """Create `<prefix>.in` and `<prefix>.out` with `partitions` each; their names."""
    source, sink = f"{prefix}.in", f"{prefix}.out"
    admin = AdminClient({"bootstrap.servers": bootstrap})
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
