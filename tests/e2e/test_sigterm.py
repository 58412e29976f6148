"""SIGTERM stops each service cleanly while data flows: status 0 within 10 s, no event lost or repeated."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from streamml.sources import open_source
from streamml.stack import SERVICES
from tests.e2e.conftest import System, SystemFactory

STOP_WITHIN_S = 10.0
RATE = 400.0  # events/s: the services are busy when they are stopped, without saturating 2 shared cores


def _produce(system: System, stop: threading.Event, produced: list[str]) -> None:
    """Agrawal events until `stop` is set; `produced` collects the ids of every event the broker acked."""
    producer = system.producer()
    topic = system.catalogue.raw("agrawal").name
    start = time.monotonic()
    for i, event in enumerate(open_source("river:synth.Agrawal?classification_function=0", limit=10**6)):
        if stop.is_set():
            break
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        event_id = str(event.value["event_id"])

        def acked(err: Any, _msg: Any, event_id: str = event_id) -> None:
            if err is None:
                produced.append(event_id)

        producer.produce(topic, json.dumps(event.value).encode(), on_delivery=acked)
        producer.poll(0)
    assert producer.flush(30) == 0


@pytest.mark.slow
def test_sigterm_stops_each_service_cleanly_while_events_flow(make_system: SystemFactory) -> None:
    system = make_system()
    system.apply("agrawal", snapshot_every_events=500, snapshot_every_seconds=2.0)
    system.stack.start_all(SERVICES)
    stop = threading.Event()
    produced: list[str] = []
    producer = threading.Thread(target=_produce, args=(system, stop, produced))
    producer.start()
    exits: dict[str, tuple[int | None, float]] = {}
    stop_logs: dict[str, str] = {}
    try:
        # Predictions flow before the first stop, so every service has work in flight when it is stopped.
        system.read(system.catalogue.predictions("agrawal").name, lambda m: len(m) >= 200, timeout_s=120)
        for name in SERVICES:
            time.sleep(1.0)  # a moment of traffic since the last restart
            svc = system.stack.services[name]
            assert svc.proc is not None and svc.alive(), f"{name} died: {system.stack.tail(name)}"
            log_start = svc.log_path.stat().st_size
            started = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = svc.proc.wait(STOP_WITHIN_S + 20)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait(10)
                code = None
            exits[name] = (code, time.monotonic() - started)
            print(f"{name}: exit code {code} after {exits[name][1]:.2f} s")
            with svc.log_path.open("rb") as f:  # what the stopping process logged, for a failure report
                f.seek(log_start)
                stop_logs[name] = f.read().decode(errors="replace")[-6000:]
            # Restarted without waiting for it: the next service is stopped while this one starts and
            # catches up (work in flight everywhere); all are waited for at the end.
            system.stack.start(name)
        for name in SERVICES:
            system.stack.wait_ready(name, timeout_s=90)
        time.sleep(2.0)  # traffic through the restarted services
    finally:
        stop.set()
        producer.join()

    slow_or_failed = {n: e for n, e in exits.items() if e[0] != 0 or e[1] > STOP_WITHIN_S}
    assert not slow_or_failed, f"(exit code, seconds) per service: {exits}\n" + "\n".join(
        f"--- {n} while stopping:\n{stop_logs[n]}" for n in slow_or_failed
    )

    # Nothing lost, nothing repeated: a clean stop commits its outputs and offsets before it exits.
    wanted = {e.encode() for e in produced}
    preds_topic = system.catalogue.predictions("agrawal").name
    msgs = system.read(
        preds_topic, lambda m: wanted <= {x.key() for x in m}, timeout_s=120, read_committed=True
    )
    counts = collections.Counter(m.key() for m in msgs)
    assert set(counts) == wanted, f"{len(wanted - set(counts))} events never predicted"
    repeated = {k: c for k, c in counts.items() if c > 1}
    assert not repeated, f"{len(repeated)} events predicted more than once, e.g. {list(repeated.items())[:5]}"
    died = [n for n in SERVICES if not system.stack.services[n].alive()]
    assert not died, f"died after their restart: {died}"
