"""Observability end to end: a real Prometheus scrapes the services while a short stream flows; then every
Grafana panel, annotation and variable query and every alert and recording rule must return data.

"No panel silently empty": a query over a metric name that does not exist, or that no code populates,
returns an empty result instead of an error, so only running the queries against real data catches it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from river import datasets

from streamml import promstack, status
from streamml.promstack import LocalPrometheus, PrometheusError, Query
from streamml.stack import free_port
from tests.e2e.conftest import System, SystemFactory, promote, publish_version, trained_version

PHISHING = list(datasets.Phishing())
PIPELINE = "phishing"
TAMPERED_VERSION = 1000  # far above the versions the learner publishes during the test
# Declared in streamml/metrics.py but not populated by the stack this test runs. While Prometheus has
# never seen such a metric, queries over it may be empty; once it exists they must return data like any.
AWAITING: dict[str, str] = {
    "streamml_drift_alerts_total": "the monitor service (not in the default stack yet) counts drift alerts",
    "streamml_model_metric": "the monitor service (not in the default stack yet) sets it",
    "streamml_errors_total": "only the trainer (not in the default stack) counts errors so far",
}
# Grafana's own variables, as the test sets them: windows longer than the whole test (even on a busy
# machine), so every rate covers the stream; each dashboard variable is tried as "All" (.*) and as the
# real pipeline.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "15s", "__range": "10m"}
VARIABLE_CHOICES = ({"pipeline": ".*", "service": ".*"}, {"pipeline": PIPELINE, "service": ".*"})


def _malformed() -> list[bytes]:
    good = {"event_id": "bad", **PHISHING[0][0], "label": True}
    return [
        b'{"event_id": "bad-0", "https": ',  # invalid JSON
        json.dumps({**good, "event_id": "bad-1", "popup_window": "often"}).encode(),  # wrong type
        json.dumps({k: v for k, v in good.items() if k != "event_id"}).encode(),  # no event id
    ]


def _produce(system: System, first: int, last: int, rate: float | None, bad: list[bytes]) -> None:
    """Phishing events first..last-1 as JSON at a steady rate, with the `bad` ones spread through them."""
    producer = system.producer()
    topic = system.catalogue.raw(PIPELINE).name
    step = (last - first) // (len(bad) + 1)
    start = time.monotonic()
    for n, i in enumerate(range(first, last)):
        delay = start + n / rate - time.monotonic() if rate else 0
        if delay > 0:
            time.sleep(delay)
        x, y = PHISHING[i]
        producer.produce(topic, json.dumps({"event_id": f"o-{i}", **x, "label": y}).encode())
        if bad and n % step == step - 1:
            producer.produce(topic, bad.pop())
        producer.poll(0)
    assert producer.flush(30) == 0


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[LocalPrometheus]:
    server = LocalPrometheus(tmp_path / "prometheus", free_port())
    yield server
    server.stop()


def _empty_queries(prometheus: LocalPrometheus, queries: list[Query], known: set[str]) -> list[str]:
    """Every query that is invalid or returns no number, as 'source: expr (why)'."""
    problems = []
    for query in queries:
        awaited = query.metric_names() & set(AWAITING)
        if awaited and not awaited & known:
            continue  # the metric it needs is not populated by any code yet (see AWAITING)
        for choice in VARIABLE_CHOICES if query.uses_variables() else ({},):
            expr = query.expanded({**GRAFANA_BUILTINS, **choice})
            try:
                # Alert rules return nothing while they do not fire, so the part before the final
                # comparison is what must return data; the whole expression must still be valid.
                prometheus.query(expr)
                result = prometheus.query(query.data_expr(expr))
                if not any(promstack.is_number(sample["value"][1]) for sample in result):
                    why = f"only NaN: {result[:3]}" if result else "no data"
                    problems.append(f"{query.source}: {query.data_expr(expr)} ({why})")
            except PrometheusError as exc:
                problems.append(f"{query.source}: {expr} ({exc})")
    return problems


def test_every_dashboard_query_and_alert_rule_returns_data(
    make_system: SystemFactory, prometheus: LocalPrometheus, tmp_path: Path
) -> None:
    queries = promstack.dashboard_queries() + promstack.rule_queries()
    variables = promstack.dashboard_variables()
    assert len(queries) > 40 and variables, "the dashboards and rules were not found"

    system = make_system()
    system.apply(PIPELINE, snapshot_every_events=100)  # promotion: auto, so every version is a swap
    system.stack.start_all()
    targets = {name: svc.metrics_port for name, svc in system.stack.services.items()}
    prometheus.start(targets, scrape_interval="1s", die_with_parent=True)

    # Enough events for the first versions to go live; then the rest flows while Prometheus watches, so
    # every counter and histogram grows across scrapes (a series born with its final value has no rate).
    predictions = system.catalogue.predictions(PIPELINE).name
    warm_up = 300
    _produce(system, 0, warm_up, None, [])
    system.read(predictions, lambda msgs: len(msgs) > 0)
    producer = threading.Thread(target=_produce, args=(system, warm_up, len(PHISHING), 150.0, _malformed()))
    producer.start()
    tampered = trained_version(system, PIPELINE, TAMPERED_VERSION, 50)
    tampered["artifact"] = tampered["artifact"][:-3] + b"XYZ"  # checksum no longer matches
    publish_version(system, tampered)
    promote(system, PIPELINE, TAMPERED_VERSION)
    producer.join()
    system.read(predictions, lambda msgs: len(msgs) >= len(PHISHING))

    # Prometheus scrapes every second: poll until everything has data (or the deadline passes).
    started = time.monotonic()
    deadline = started + 30
    while True:
        known = prometheus.metric_names()
        problems = _empty_queries(prometheus, queries, known)
        firing = {a["labels"]["alertname"] for a in prometheus.firing_alerts()}
        if (not problems and "StreamMLModelArtifactRejected" in firing) or time.monotonic() > deadline:
            break
        time.sleep(1)

    assert prometheus.targets_up() == dict.fromkeys(targets, True)
    waited = f"after waiting {time.monotonic() - started:.0f} s"
    assert not problems, f"queries that return no data {waited}:\n" + "\n".join(problems)

    missing = {
        f"{name} (in {query.source})"
        for query in queries
        for name in query.metric_names() - known
        if name not in AWAITING
    }
    assert not missing, f"metric names Prometheus has never seen: {sorted(missing)}"
    for variable in variables:
        values = prometheus.label_values(variable.label, variable.metric)
        assert values, f"{variable.source}: label_values({variable.metric}, {variable.label}) is empty"
        if variable.label == "pipeline":
            assert PIPELINE in values

    # Every rule loaded and evaluates without error; the rejected artifact fired its alert.
    rules = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert set(rules) == {q.name for q in queries if q.kind in ("alert", "record")}
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    assert "StreamMLModelArtifactRejected" in firing, f"firing: {sorted(firing)}"

    _check_status(system, prometheus, tmp_path / "stack.json")


def _check_status(system: System, prometheus: LocalPrometheus, state: Path) -> None:
    """`streamml status` shows the same system, from its topics, its metrics and this Prometheus."""
    system.stack.save(state)
    prometheus.save()
    view = status.collect(system.settings, state, sample_s=0.5, prometheus_home=prometheus.home)
    (row,) = view.pipelines
    assert row.name == PIPELINE and row.live is not None and row.live.startswith("online v")
    assert row.flow.serving is not None and row.flow.serving.startswith("online v")
    assert row.flow.events_in_per_s is not None and row.flow.lag is not None
    # the predictor rejects the tampered version when promoted (ARTIFACT); the learner and trainer skip it
    # as an invalid control record when they read it (CONTROL), naming the same version
    alerts = [(a["kind"], a["model_version"]) for a in view.alerts]
    assert ("ARTIFACT", TAMPERED_VERSION) in alerts
    assert {kind for kind, _ in alerts} <= {"ARTIFACT", "CONTROL"}
    assert {version for _, version in alerts} == {TAMPERED_VERSION}
    assert view.stack is not None and all(s.up for s in view.stack.services)
    assert view.prometheus_url == prometheus.url
    assert "StreamMLModelArtifactRejected" in {a["labels"]["alertname"] for a in view.firing}
    buffer = io.StringIO()
    Console(file=buffer, width=250, color_system=None).print(
        status.render(view, now_ms=int(time.time() * 1000))
    )
    assert "SHA-256 mismatch" in buffer.getvalue()

    # The command itself, as an operator runs it (no signing key needed to read).
    command = [sys.executable, "-c", "from streamml.cli import main; main()", "status", "--state", str(state)]
    env = {**os.environ, **{k: v for k, v in system.stack.env.items() if k != "STREAMML_SIGNING_KEY"}}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for expected in (PIPELINE, "SHA-256 mismatch", "Recent promotions", "Recent drift alerts"):
        assert expected in done.stdout, (expected, done.stdout)
