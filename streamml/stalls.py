"""Event-loop stalls: noticed while they last, and logged with where the loop is stuck.

Every service runs its control agents, timers, signal handling and (for most) its data loop on one asyncio
event loop. A call that blocks it (a broker call with a long timeout, a large model serialised inline)
delays everything, SIGTERM included. Faust logs a timer that "woke up too late" once the loop is free again,
which says that it stalled but not where. A `LoopWatch` thread notices a stall while it lasts and logs the
event loop thread's stack once per stall, then the stall's length when it ends, and counts both in metrics.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from streamml.metrics import LOOP_STALL_SECONDS, LOOP_STALLS

log = logging.getLogger(__name__)

TICK_S = 0.25  # the loop notes that it is alive this often
STALL_AFTER_S = 2.0  # a loop silent this long is reported (with its stack) while the stall lasts
STACK_LIMIT = 30  # innermost frames logged


def stack_of(thread_id: int | None) -> str:
    """Where a thread is now: its innermost STACK_LIMIT frames, as a traceback prints them."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    return (
        "".join(traceback.format_stack(frame, limit=STACK_LIMIT)).rstrip() if frame is not None else "(gone)"
    )


class LoopWatch:
    """Watches one event loop from a daemon thread (start it from a coroutine running on that loop)."""

    def __init__(self, service: str, *, stall_after_s: float = STALL_AFTER_S) -> None:
        self.service = service
        self.stall_after_s = stall_after_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id: int | None = None
        self._alive_at = time.monotonic()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.stalls = 0
        # Series from the start at 0: the first stall is an increase (a counter born at 1 shows none).
        LOOP_STALLS.labels(service)
        LOOP_STALL_SECONDS.labels(service)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._alive_at = time.monotonic()
        self._loop.call_soon(self._tick)
        self._watcher = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        self._alive_at = time.monotonic()
        if not self._stop.is_set() and self._loop is not None:
            self._loop.call_later(TICK_S, self._tick)

    def _watch(self) -> None:
        reported: float | None = None  # the last tick of the stall being reported
        while not self._stop.wait(TICK_S):
            alive_at = self._alive_at
            silent = time.monotonic() - alive_at
            if reported is not None and alive_at != reported:  # the reported stall is over
                self._ended(alive_at - reported)
                reported = None
            if reported is None and silent >= self.stall_after_s:
                reported = alive_at
                self._report(silent)

    def _report(self, silent: float) -> None:
        self.stalls += 1
        LOOP_STALLS.labels(self.service).inc()
        log.warning(
            "%s: event loop blocked for %.1f s so far (timers, control topics, SIGTERM wait); it is in:\n%s",
            self.service,
            silent,
            stack_of(self._thread_id),
        )

    def _ended(self, lasted: float) -> None:
        LOOP_STALL_SECONDS.labels(self.service).observe(lasted)
        log.warning("%s: event loop free again after %.1f s", self.service, lasted)
