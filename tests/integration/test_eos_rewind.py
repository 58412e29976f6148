"""Exactly-once data loops on a real broker that give up transactions again and again, while the group
rebalances around them.

`make chaos` (exactly_once) once lost 133 events: two predictor instances aborted a transaction each, about
a second apart, while the group was rebalancing. The rewind then left the group and joined it again, and
for one instance librdkafka merged the leave with the join: no revocation came, so that instance read on
past the input of the transaction it had given up, and those records never came out. Here two instances of
a copying loop abort at random moments while a third member joins and leaves the group, and every input
record must still come out exactly once for a read_committed reader.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from confluent_kafka import Producer

from streamml.runtime import BatchLoop, read_to_end
from tests.integration.copying import copy_to, exactly_once, source_and_sink

N = 6000
PARTITIONS = 4


def test_transactions_given_up_during_rebalances_lose_and_repeat_nothing(kafka_bootstrap: str) -> None:
    # small batches: many transactions, many chances to give one up
    base = exactly_once(kafka_bootstrap, commit_interval_s=0.2, max_batch=50)
    prefix = base.topic_prefix
    source, sink = source_and_sink(base, PARTITIONS)

    copy = copy_to(sink)

    def instance(i: int) -> BatchLoop:
        return BatchLoop(
            base.model_copy(update={"instance_id": f"i{i}"}), name=f"copy-{prefix}", handler=copy,
            topics=lambda: {source}, cooperative=True,
        )  # fmt: skip

    rng = random.Random(11)
    loops = [instance(0), instance(1)]
    aborted = 0

    async def produce_slowly() -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
        for i in range(N):
            producer.produce(source, str(i).encode(), partition=i % PARTITIONS)
            if i % 100 == 99:  # ~12 s in all
                producer.poll(0)
                await asyncio.sleep(0.2)
        assert await asyncio.to_thread(producer.flush, 30) == 0

    async def scenario() -> None:
        nonlocal aborted
        for loop in loops:
            await loop.start()
        feeding = asyncio.ensure_future(produce_slowly())
        visitor: BatchLoop | None = None
        try:
            deadline = asyncio.get_running_loop().time() + 120
            turn = 0
            while not feeding.done() or len(read_to_end(base, sink)) < N:
                assert asyncio.get_running_loop().time() < deadline, "outputs never all committed"
                for loop in loops:
                    assert not loop.crashed, f"a loop crashed: {loop.crash_reason!r}"
                turn += 1
                if not feeding.done():
                    # give up the open transaction of one instance (between its batches, as `_commit` does)
                    victim = rng.choice(loops)
                    if victim._in_txn and not victim._abort_pending:
                        victim._abort_and_rewind("given up by the test")
                        aborted += 1
                    if turn % 8 == 0:  # a third member joins, or leaves: the group rebalances
                        if visitor is None:
                            visitor = instance(2)
                            await visitor.start()
                        else:
                            await visitor.stop()
                            visitor = None
                await asyncio.sleep(rng.uniform(0.05, 0.25))
        finally:
            feeding.cancel()
            for loop in [*loops, *([visitor] if visitor is not None else [])]:
                await loop.stop()

    asyncio.run(scenario())
    committed = Counter(m.value() for m in read_to_end(base, sink))
    assert aborted >= 10, f"only {aborted} transactions given up: the scenario did not test the rewind"
    missing = [i for i in range(N) if committed[str(i).encode()] == 0]
    repeated = {v: n for v, n in committed.items() if n > 1}
    assert not missing and not repeated, f"{len(missing)} lost (e.g. {missing[:5]}), {len(repeated)} repeated"
    assert sum(committed.values()) == N
