"""LoopWatch: a blocked event loop is reported while it is blocked, with where it is stuck."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from streamml.metrics import LOOP_STALLS
from streamml.stalls import LoopWatch


def _blocking_call_under_test(seconds: float) -> None:
    time.sleep(seconds)


async def _run(watch: LoopWatch, block_s: float) -> None:
    watch.start()
    await asyncio.sleep(0.3)  # a free loop: nothing to report
    _blocking_call_under_test(block_s)
    await asyncio.sleep(0.6)  # the watcher notices the end of the stall
    watch.stop()


def test_a_blocked_loop_is_reported_once_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    before = LOOP_STALLS.labels("unit-stall")._value.get()
    watch = LoopWatch("unit-stall", stall_after_s=0.5)
    with caplog.at_level(logging.WARNING, logger="streamml.stalls"):
        asyncio.run(_run(watch, 1.5))
    assert watch.stalls == 1
    assert LOOP_STALLS.labels("unit-stall")._value.get() == before + 1
    blocked = [r.getMessage() for r in caplog.records if "blocked for" in r.getMessage()]
    assert len(blocked) == 1 and "_blocking_call_under_test" in blocked[0]
    ended = [r.getMessage() for r in caplog.records if "free again after" in r.getMessage()]
    assert len(ended) == 1
    lasted = float(ended[0].split("after ")[1].split(" s")[0])
    assert 1.2 <= lasted <= 2.5


def test_a_busy_but_free_loop_is_not_reported() -> None:
    watch = LoopWatch("unit-free", stall_after_s=0.5)

    async def busy() -> None:
        watch.start()
        for _ in range(20):  # short blocking steps between awaits: the loop stays responsive
            _blocking_call_under_test(0.05)
            await asyncio.sleep(0)
        watch.stop()

    asyncio.run(busy())
    assert watch.stalls == 0
