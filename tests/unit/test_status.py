"""Unit tests for `streamml status` (streamml.status): building and rendering the view from canned records."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from streamml import status
from streamml.dashboard import Sample, Scrape, ServiceScrape, Target, parse_metrics
from streamml.settings import Settings

NOW_MS = 1_800_000_000_000
PREDICTOR = Target("predictor", 103, 9103, 8103)
FEATURES = Target("features", 101, 9101, 8101)


def definition(name: str, revision: int = 1, deleted: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "revision": revision,
        "task": "BINARY",
        "promotion_mode": "AUTO",
        "deleted": deleted,
    }


def decision(pipeline: str, version: int, action: str, ago_s: int, actor: str = "auto") -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "model_name": "online",
        "action": action,
        "version": version,
        "previous_version": version - 1 if version > 1 else None,
        "actor": actor,
        "reason": f"{action.lower()} v{version}",
        "metrics": {},
        "decided_at": NOW_MS - ago_s * 1000,
    }


def alert(pipeline: str, kind: str, ago_s: int, severity: str = "WARNING") -> dict[str, Any]:
    return {
        "alert_id": f"{kind}-{ago_s}",
        "pipeline": pipeline,
        "model_name": "online",
        "model_version": 3,
        "kind": kind,
        "detector": "river.drift.ADWIN",
        "severity": severity,
        "message": f"{kind} changed",
        "detected_at": NOW_MS - ago_s * 1000,
    }


def text_of(renderable: object) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=250, color_system=None).print(renderable)
    return buffer.getvalue()


def features_page(raw_in: float, lag: float) -> str:
    return f"""# TYPE streamml_events_in_total counter
streamml_events_in_total{{pipeline="fraud",service="features",topic="streamml.fraud.raw"}} {raw_in}
# TYPE streamml_consumer_lag_records gauge
streamml_consumer_lag_records{{service="features",topic="streamml.fraud.raw"}} {lag}
streamml_consumer_lag_records{{service="features",topic="streamml.other.raw"}} 99999
"""


def predictor_page(out: float, dead: float, lag: float) -> str:
    return f"""# TYPE streamml_events_out_total counter
streamml_events_out_total{{pipeline="fraud",service="predictor",topic="streamml.fraud.predictions"}} {out}
# TYPE streamml_events_dead_lettered_total counter
streamml_events_dead_lettered_total{{pipeline="fraud",reason="DecodeError",service="predictor"}} {dead}
# TYPE streamml_consumer_lag_records gauge
streamml_consumer_lag_records{{service="predictor",topic="streamml.fraud.features"}} {lag}
"""


def scrape_at(at: float, raw_in: float, out: float, dead: float, lag: float) -> Scrape:
    return Scrape(
        at,
        (
            ServiceScrape(FEATURES, parse_metrics(features_page(raw_in, 10))),
            ServiceScrape(PREDICTOR, parse_metrics(predictor_page(out, dead, lag))),
        ),
        live={"fraud": "online v2"},
    )


def test_live_version_is_the_last_promote_or_rollback_of_each_pipeline() -> None:
    decisions = [
        decision("fraud", 3, "PROMOTE", 30),
        decision("fraud", 1, "PROMOTE", 300),
        decision("fraud", 2, "ROLLBACK", 10, actor="ana"),
        decision("fraud", 4, "SHADOW", 5),  # a shadow does not serve
        decision("spam", 7, "DISCARD", 1),
    ]
    live = status.live_versions(decisions)
    assert set(live) == {"fraud"}  # spam never had a version live
    assert (live["fraud"]["version"], live["fraud"]["action"]) == (2, "ROLLBACK")


def test_pipeline_lag_is_the_service_furthest_behind_on_that_pipeline_only() -> None:
    samples = [
        Sample("streamml_consumer_lag_records", {"service": "learner", "topic": "p.fraud.features"}, 40),
        Sample("streamml_consumer_lag_records", {"service": "learner", "topic": "p.fraud.labels"}, 30),
        Sample("streamml_consumer_lag_records", {"service": "predictor", "topic": "p.fraud.features"}, 50),
        Sample("streamml_consumer_lag_records", {"service": "features", "topic": "p.other.raw"}, 900),
        Sample("streamml_events_in_total", {"service": "features", "topic": "p.fraud.raw"}, 5000),
    ]
    assert status.pipeline_lag(samples, "fraud") == (70, "learner")  # features + labels topics together
    assert status.pipeline_lag(samples, "nothing") is None


def test_flows_come_from_the_difference_of_two_scrapes() -> None:
    flows = status.flows(scrape_at(10.0, 1000, 900, 1, 5), scrape_at(12.0, 1400, 1300, 3, 7))
    fraud = flows["fraud"]
    assert fraud.events_in_per_s == 200.0
    assert fraud.predictions_per_s == 200.0
    assert fraud.dead_lettered_per_s == 1.0
    assert fraud.lag == (10.0, "features")
    assert fraud.serving == "online v2"


def test_build_status_keeps_the_newest_promotions_and_alerts() -> None:
    decisions = [decision("fraud", v, "PROMOTE", 100 - v) for v in range(1, 9)]
    alerts = [alert("fraud", "DATA", 500), alert("fraud", "CONCEPT", 20), alert("fraud", "ARTIFACT", 60)]
    view = status.build_status(
        {"fraud": definition("fraud", 4), "old": definition("old", 2, deleted=True)},
        decisions,
        alerts,
        recent=3,
    )
    assert [p.name for p in view.pipelines] == ["fraud", "old"]
    fraud = view.pipelines[0]
    assert (fraud.revision, fraud.live, fraud.live_since_ms) == (4, "online v8", NOW_MS - 92_000)
    assert view.pipelines[1].live is None and view.pipelines[1].deleted
    assert [d["version"] for d in view.promotions] == [8, 7, 6]
    assert [a["kind"] for a in view.alerts] == ["CONCEPT", "ARTIFACT", "DATA"]
    assert view.stack is None and view.pipelines[0].flow == status.Flow()


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        (None, "-"),
        (NOW_MS - 42_000, "42 s ago"),
        (NOW_MS - 185_000, "3 min ago"),
        (NOW_MS - 7_300_000, "2 h ago"),
        (NOW_MS - 3 * 86_400_000, "3 d ago"),
        (NOW_MS + 5_000, "0 s ago"),
    ],
)
def test_ago(then: int | None, expected: str) -> None:
    assert status.ago(then, NOW_MS) == expected


def test_render_shows_pipelines_rates_lag_promotions_alerts_and_prometheus() -> None:
    flows = status.flows(scrape_at(10.0, 1000, 900, 1, 5), scrape_at(12.0, 1400, 1300, 3, 7))
    view = status.build_status(
        {"fraud": definition("fraud", 4)},
        [decision("fraud", 2, "PROMOTE", 120), decision("fraud", 3, "PROMOTE", 30)],
        [alert("fraud", "ARTIFACT", 15, severity="CRITICAL")],
        pipeline_flows=flows,
        stack=status.StackStatus(scrape_at(12.0, 1400, 1300, 3, 7).services),
        prometheus_url="http://127.0.0.1:9090",
        firing=[
            {
                "labels": {
                    "alertname": "StreamMLModelArtifactRejected",
                    "severity": "critical",
                    "pipeline": "fraud",
                },
                "annotations": {"summary": "Pipeline fraud: model artifact rejected"},
                "activeAt": "2027-01-15T08:00:00.123Z",
            }
        ],
    )
    text = text_of(status.render(view, now_ms=NOW_MS, title="T", ascii_only=True))
    row = next(line for line in text.splitlines() if "| fraud " in line and "binary" in line)
    # decided v3, but the predictor serves v2: both are shown (the mismatch in red on a terminal)
    for cell in ("4", "auto", "online v3", "30 s ago", "online v2", "200/s", "1.0/s", "10 (features)"):
        assert cell in row, (cell, row)
    assert "2 min ago" in text and "promote v3" in text
    assert "ARTIFACT" in text and "CRITICAL" in text and "ARTIFACT changed" in text
    assert "Prometheus: http://127.0.0.1:9090  (1 alerts firing)" in text
    assert (
        "StreamMLModelArtifactRejected" in text and "pipeline=fraud" in text and "2027-01-15 08:00:00" in text
    )
    assert "predictor" in text and "127.0.0.1:9103" in text


def test_render_of_an_empty_system_says_what_to_do() -> None:
    text = text_of(status.render(status.build_status({}, [], []), now_ms=NOW_MS))
    assert "streamml pipeline apply" in text
    assert "no stack runs here" in text
    assert "no promotion decision yet" in text and "no drift alert" in text
    assert "Prometheus: not running here" in text


def test_a_stack_of_another_deployment_is_pointed_out(tmp_path: Path) -> None:
    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"env": {"STREAMML_TOPIC_PREFIX": "demo"}, "services": {}}))
    settings = Settings(topic_prefix="prod", _env_file=None)  # type: ignore[call-arg]
    assert "uses topic prefix 'demo'" in status._stack_note(state, settings)
    assert status._stack_note(state, Settings(topic_prefix="demo", _env_file=None)) == ""  # type: ignore[call-arg]
    assert status._stack_note(tmp_path / "missing.json", settings) == ""


def test_status_command_without_a_broker_says_what_to_run() -> None:
    env = {**os.environ, "STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:1", "STREAMML_BROKER_TIMEOUT_S": "1"}
    command = [sys.executable, "-c", "from streamml.cli import main; main()", "status"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "make kafka-up" in done.stderr and "Traceback" not in done.stderr
