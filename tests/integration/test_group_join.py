"""What the data loop's join watchdog (runtime.JOIN_WAIT_S) relies on, on the real broker: a consumer has
a member id as soon as the coordinator has seen its join, long before a slow rebalance ends."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewTopic

from streamml.kafka import make_admin, make_consumer
from streamml.settings import Settings


def test_a_joining_consumer_has_a_member_id_while_its_sibling_delays_the_rebalance(
    kafka_bootstrap: str,
) -> None:
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")
    topic = f"{settings.topic_prefix}.in"
    admin = make_admin(settings)
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result(30)
    group = f"{settings.topic_prefix}-g"
    conf = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "max.poll.interval.ms": 60_000}
    first, second = make_consumer(settings, group, **conf), make_consumer(settings, group, **conf)
    try:
        assigned: list[list[TopicPartition]] = []
        first.subscribe([topic], on_assign=lambda _c, ps: assigned.append(ps))
        deadline = time.monotonic() + 30
        while not assigned and time.monotonic() < deadline:
            first.consume(10, 0.1)
        assert assigned and first.memberid()
        assert not second.memberid()  # not subscribed: no member id
        second.subscribe([topic])
        # `first` does not poll for 8 s: the rebalance `second` starts waits for it (it has to revoke in a
        # poll call), yet the coordinator answered `second`'s join with its member id at once.
        started = time.monotonic()
        while not second.memberid() and time.monotonic() - started < 8:
            second.consume(10, 0.1)
        seen_after = time.monotonic() - started
        assert second.memberid(), "no member id while the rebalance waits for the other member"
        assert seen_after < 5.0, f"member id after {seen_after:.1f} s"
        assert not second.assignment()  # the rebalance still waits for `first`
    finally:
        first.close()
        second.close()
