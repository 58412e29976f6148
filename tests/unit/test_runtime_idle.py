"""IdleWait: how long a data loop sleeps between polls that found nothing."""

from __future__ import annotations

import itertools

from streamml.runtime import IDLE_WAIT_MAX_S, IDLE_WAIT_MIN_S, IdleWait


def test_idle_sleeps_double_up_to_the_cap_and_records_end_them_at_once() -> None:
    idle = IdleWait()
    sleeps = [idle.after(0) for _ in range(8)]
    assert sleeps[0] == IDLE_WAIT_MIN_S
    assert all(b == min(IDLE_WAIT_MAX_S, 2 * a) for a, b in itertools.pairwise(sleeps))
    assert sleeps[-1] == IDLE_WAIT_MAX_S  # capped: a first record after a quiet spell waits at most this
    assert idle.after(5) == 0.0  # records: the next poll follows at once
    assert idle.after(0) == IDLE_WAIT_MIN_S  # and the next quiet spell starts short again
