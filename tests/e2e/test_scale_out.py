"""Scale out and fail over (issue 9): two instances of every service on three brokers, kills mid-stream.

The scenario is bench/chaos.py's `Run` with a short fixed schedule: 12k agrawal events (keyed rolling
windows per zipcode) produced WITHOUT keys at 300/s with a concept drift at event 5000; once predictions
flow, one instance of each stateful service is SIGKILLed (the current writer for learner, monitor and
controller) and restarted 12 s later, and broker 2 is stopped for 15 s. Everything is judged from the
topics (bench/invariants.py).

Exactly once, and only that here: it is the guarantee under which every invariant is exact. Under at least
once a crash may legitimately repeat predictions and push a replayed event into a window a second time
(state and offsets are not committed atomically), so "no duplicate" and "features equal the reference"
would not be requirements there. `make chaos` runs both guarantees and reports the at-least-once numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.chaos import Config, Run, fixed_schedule
from streamml.localkafka import LocalKafka
from tests.e2e.conftest import System

pytestmark = [pytest.mark.scale_out, pytest.mark.slow]
GUARANTEE = "exactly_once"


# What the features instances log about their windows' provenance (shown when a rolling feature is wrong).
EVIDENCE = (
    "ahead of the committed input",
    "revoked meanwhile",
    "outside an assignment",
    "aborting the transaction",
    "no stable committed offsets",
    "restored windows",
    "kept through the rebalance",
    "replacing the",
)


def window_evidence(system: System, most: int = 60) -> list[str]:
    lines = []
    for svc in system.stack.services.values():
        if svc.name == "features" and svc.log_path.exists():
            text = svc.log_path.read_text(errors="replace")
            lines += [
                f"{svc.label}: {line[:300]}" for line in text.splitlines() if any(e in line for e in EVIDENCE)
            ]
    return lines[:most]


def test_two_instances_of_every_service_survive_kills_and_a_broker_restart(
    kafka3: LocalKafka, make_cluster_system: Callable[..., System]
) -> None:
    system = make_cluster_system(partitions=4, instances=2, guarantee=GUARANTEE)
    config = Config(
        events=12_000, rate=300.0, drift_at=5_000, schedule=fixed_schedule(down_s=12.0), drain_timeout_s=90.0
    )
    run = Run(kafka3, system.stack, system.settings, config)
    result = run.run()
    print(run.text(GUARANTEE))
    d = run.details
    failures = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    # the harness did what it was asked: every action happened, killed instances exited by the signal
    expect(not [x for x in run.done if x.error], f"actions failed: {[(x.label, x.error) for x in run.done]}")
    kills = [x for x in run.done if x.action.kind == "stop"]
    expect(
        len(kills) == 5 and all(x.exit_code == -9 for x in kills),
        f"SIGKILL exits: {[(x.label, x.exit_code) for x in kills]}",
    )
    expect(not run.produce_errors, f"producer: {run.produce_errors[:3]}")
    # the system
    count = d["count"]
    expect(
        count.lost == 0,
        f"{count.lost} of {count.expected} valid events never predicted, e.g. {count.lost_examples}",
    )
    expect(
        count.duplicates == 0,
        f"{count.duplicates} duplicate predictions (read_committed), e.g. {count.duplicate_examples}",
    )
    expect(count.unexpected == 0, f"{count.unexpected} predictions of malformed or unknown events")
    fcheck, ocheck = d["features"], d["features_read_order"]
    expect(fcheck.records > 0 and fcheck.unordered == 0, f"feature records without source: {fcheck}")
    expect(
        fcheck.mismatches == 0 and ocheck.mismatches == 0 and ocheck.copies == 0,
        f"{fcheck.mismatches} of {fcheck.records} records' rolling features differ from the per-key "
        f"reference (in the repartition topic's order: {ocheck.mismatches}, {ocheck.copies} copies), e.g. "
        f"{ocheck.examples[:2] or fcheck.examples[:2]}; the features instances said:\n"
        + "\n".join(window_evidence(system)),
    )
    lineage = d["lineage"]
    expect(
        lineage.conflicting == 0,
        f"{lineage.conflicting} version numbers with two artifacts, e.g. {lineage.conflict_examples}",
    )
    served = d["served"]
    expect(
        served.regressions == 0,
        f"served versions went back {served.regressions} times, e.g. "
        f"(partition, offset, model, version, after) {served.examples}",
    )
    # One CONCEPT alert per served lineage, each answered by one training request and one loop. The drift
    # is gradual (River's ConceptDriftStream, width 1000): a challenger retrained at its first detection
    # learns a mix of both concepts, and its error can rise again as the drift completes: a second, true
    # detection on another lineage (seen in 3 of 21 local runs). A second writer or a replay would alert
    # twice on one lineage, or repeat a request, answer or decision.
    concept = d["concept"]
    expect(
        1 <= concept.records <= 2 and concept.one_per_lineage and concept.lineages[0][0] == "online",
        f"{concept.records} CONCEPT alerts ({concept.distinct} ids) on lineages {concept.lineages}",
    )
    loop = d["loop"]
    alerts = concept.records
    # Every alert followed by a retraining window of events (and a margin for a controller that was down)
    # was answered by one request; a later one (the stream ended first: its tail is bounded) may not be.
    # At least one request in all: an alert that came late (after a long stall, CI once: 22 s after a kill)
    # is followed by fewer events than that margin by the time the stream ends, and is still answered.
    expect(
        loop.requests >= 1 and d["concept_due"] <= loop.requests <= alerts,
        f"{loop.requests} training requests for {alerts} CONCEPT alerts, {d['concept_due']} of them due",
    )
    expect(loop.answered_twice == 0, f"{loop.answered_twice} requests answered more than once")
    expect(
        loop.each_once and loop.shadows <= alerts,
        f"loops: {loop.shadows} SHADOW, {loop.verdicts} verdicts by the controller (each challenger once, "
        "the first judged)",
    )
    expect(not d["stuck"], f"partitions a read_committed reader cannot read to the end: {d['stuck']}")
    expect(not d["dead"], f"instances dead at the end: {d['dead']}")
    print({k: result[k] for k in ("max_stall_s", "rebalance_p50_s", "duration_s")})
    assert not failures, "\n".join(failures)
