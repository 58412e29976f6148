"""Exactly-once data loop on a real broker whose transaction coordinator times a transaction out.

A transaction kept open longer than transaction.timeout.ms (a broker away for longer, in production) is
aborted by the coordinator, which bumps the producer's epoch: librdkafka then fails the commit as a fatal
fence. The loop's transactional id is its instance's own, so it replaces its producer, goes back to its
committed input, and every record still comes out exactly once (CI saw a features instance exit on it).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from confluent_kafka import Producer
from prometheus_client import REGISTRY

from streamml.runtime import BatchLoop, read_to_end
from tests.integration.copying import copy_to, exactly_once, source_and_sink

N = 200


def test_a_transaction_timed_out_by_the_coordinator_is_redone_not_fatal(kafka_bootstrap: str) -> None:
    # the open transaction outlives its 1 s timeout and the coordinator's sweep
    slow = exactly_once(kafka_bootstrap, commit_interval_s=14.0)
    prefix = slow.topic_prefix
    source, sink = source_and_sink(slow, 2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(N):
        producer.produce(source, str(i).encode(), partition=i % 2)
    assert producer.flush(30) == 0

    copy = copy_to(sink)

    name = f"copy-{prefix}"  # (its own metric series)
    loop = BatchLoop(
        slow, name=name, handler=copy, topics=lambda: {source},
        producer_config={"transaction.timeout.ms": 1000},
    )  # fmt: skip

    async def scenario() -> None:
        await loop.start()
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while not loop._abandoned:  # the commit was refused as fenced, the producer replaced
                assert asyncio.get_running_loop().time() < deadline, "the coordinator never timed it out"
                assert not loop.crashed, f"the loop crashed: {loop.crash_reason!r}"
                await asyncio.sleep(0.2)
            loop.settings = slow.model_copy(update={"commit_interval_s": 0.1})  # commits in time from now
            while len(read_to_end(slow, sink)) < N:
                assert asyncio.get_running_loop().time() < deadline + 30, "outputs never committed"
                assert not loop.crashed, f"the loop crashed: {loop.crash_reason!r}"
                await asyncio.sleep(0.5)
        finally:
            await loop.stop()

    asyncio.run(scenario())
    committed = Counter(m.value() for m in read_to_end(slow, sink))
    # replaced once (fenced once): commits were in time after that
    assert (
        REGISTRY.get_sample_value("streamml_errors_total", {"service": name, "kind": "producer_fenced"}) == 1
    )
    assert committed == Counter(str(i).encode() for i in range(N))  # each exactly once (read_committed)
