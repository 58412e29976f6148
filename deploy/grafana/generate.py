"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from the panel lists in this file.

The JSON files are what Grafana provisions; edit this file, run `python deploy/grafana/generate.py`,
and commit both (tests/unit/test_monitoring_config.py fails when the JSON is stale). `--check` only
compares. Every query uses the provisioned datasource and `pipeline=~"$pipeline"` (a regex, so "All"
is `.*`); tests/e2e/test_observability.py runs every query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "streamml-prom"}
GRID_WIDTH = 24

# A label matcher fragment for the pipeline variable; consumer lag has no pipeline label, but every
# data topic is named <prefix>.<pipeline>.<role>.
PIPELINE = 'pipeline=~"$pipeline"'
PIPELINE_TOPIC = 'topic=~".*[.]($pipeline)[.][a-z-]+"'
RATE = "$__rate_interval"
RAW_IN = f'streamml_events_in_total{{service="features", {PIPELINE}}}'


def recent(selector: str, window: str, by: str) -> str:
    """Events of a rare counter within `window`, its first increment included.

    Counters appear at their first increment, and increase() needs two samples, so a series born
    inside the window is counted by its whole value instead.
    """
    return f"sum by ({by}) (({selector} unless {selector} offset {window}) or increase({selector}[{window}]))"


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    kind: str = "timeseries"  # or "stat"
    unit: str = "short"
    width: int = 12
    height: int = 8
    bars: bool = False
    stacked: bool = False
    minimum: float | None = 0
    maximum: float | None = None
    thresholds: list[tuple[str, float | None]] = field(default_factory=lambda: [("green", None)])
    overrides: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Row:
    title: str


@dataclass
class Annotation:
    name: str
    expr: str
    title: str
    text: str
    color: str


@dataclass
class Variable:
    name: str
    label: str
    metric: str
    metric_label: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    variables: list[Variable]
    panels: list[Panel | Row]
    annotations: list[Annotation] = field(default_factory=list)


def _variable(var: Variable) -> dict[str, Any]:
    query = f"label_values({var.metric}, {var.metric_label})"
    return {
        "name": var.name,
        "label": var.label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{var.name}-var"},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def _annotation(note: Annotation) -> dict[str, Any]:
    return {
        "name": note.name,
        "datasource": DATASOURCE,
        "enable": True,
        "hide": False,
        "iconColor": note.color,
        "expr": note.expr,
        "step": "30s",
        "titleFormat": note.title,
        "textFormat": note.text,
        "useValueForTime": False,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": color, "value": value} for color, value in panel.thresholds],
        },
    }
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    options: dict[str, Any]
    if panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value_and_name",
            "justifyMode": "auto",
        }
    else:
        defaults["custom"] = {
            "drawStyle": "bars" if panel.bars else "line",
            "lineInterpolation": "stepAfter" if panel.bars else "linear",
            "fillOpacity": 60 if panel.bars else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
        options = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": panel.overrides},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend or "__auto",
                "range": True,
                "instant": False,
            }
            for n, target in enumerate(panel.targets)
        ],
    }


def render(board: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model; panels flow left to right and wrap at the grid width."""
    panels: list[dict[str, Any]] = []
    x = y = line_height = 0
    for n, item in enumerate(board.panels, start=1):
        if isinstance(item, Row):
            y += line_height
            x, line_height = 0, 0
            panels.append(
                {
                    "id": n,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
            continue
        if x + item.width > GRID_WIDTH:
            y += line_height
            x, line_height = 0, 0
        panels.append(_panel(item, n, x, y))
        x += item.width
        line_height = max(line_height, item.height)
    return {
        "uid": board.uid,
        "title": board.title,
        "description": board.description,
        "tags": ["streamml"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [_variable(v) for v in board.variables]},
        "annotations": {"list": [_annotation(a) for a in board.annotations]},
        "links": [
            {"type": "dashboards", "tags": ["streamml"], "asDropdown": False, "title": "StreamML dashboards"}
        ],
        "panels": panels,
    }


# --- the dashboards ------------------------------------------------------------------------------

PIPELINE_VAR = Variable("pipeline", "Pipeline", "streamml_events_in_total", "pipeline")
SERVICE_VAR = Variable("service", "Service", "streamml_events_in_total", "service")
RATE_THRESHOLDS: list[tuple[str, float | None]] = [("green", None), ("red", 1e-9)]
LIVE_VERSION_AXIS = {
    "matcher": {"id": "byRegexp", "options": ".*live version"},
    "properties": [
        {"id": "custom.axisPlacement", "value": "right"},
        {"id": "custom.lineInterpolation", "value": "stepAfter"},
        {"id": "unit", "value": "none"},
        {"id": "decimals", "value": 0},
        {"id": "min", "value": 0},
    ],
}
ACCURACY_WINDOWED = Target(
    f"pipeline:streamml_learner_accuracy:ratio10m{{{PIPELINE}}}", "{{pipeline}} last 10 min"
)
ACCURACY_CUMULATIVE = Target(
    f'max by (pipeline) (streamml_learner_metric{{metric="accuracy", {PIPELINE}}})',
    "{{pipeline}} since start",
)
ERROR_METRICS = Target(
    f'max by (pipeline, metric) (streamml_learner_metric{{metric=~"log_loss|mae|rmse", {PIPELINE}}})',
    "{{pipeline}} {{metric}}",
)
SWAP_NOTE = Annotation(
    "Model swaps",
    recent(f"streamml_model_swaps_total{{{PIPELINE}}}", "1m", "pipeline, model") + " > 0",
    "Live model changed",
    "{{pipeline}}: {{model}}",
    "blue",
)
PROMOTION_NOTE = Annotation(
    "Promotions and rollbacks",
    recent(f"streamml_promotions_total{{{PIPELINE}}}", "1m", "pipeline, action, actor") + " > 0",
    "Promotion decision",
    "{{pipeline}}: {{action}} by {{actor}}",
    "green",
)
REJECTION_NOTE = Annotation(
    "Rejected artifacts",
    recent(f"streamml_rejected_artifacts_total{{{PIPELINE}}}", "1m", "pipeline, reason") + " > 0",
    "Model artifact rejected",
    "{{pipeline}}: {{reason}}",
    "red",
)
DRIFT_NOTE = Annotation(
    "Drift alerts",
    recent(f"streamml_drift_alerts_total{{{PIPELINE}}}", "1m", "pipeline, kind, detector") + " > 0",
    "Drift alert",
    "{{pipeline}}: {{kind}} ({{detector}})",
    "orange",
)

# Scrape targets are labelled `component`: the service's name for instance 0, `<service>-<i>` for the others.
COMPONENT = 'component=~"($service)(-[0-9]+)?"'
SINGLE_WRITERS = ("learner", "monitor", "controller")
CONFIGURED_LINE = {
    "matcher": {"id": "byName", "options": "configured"},
    "properties": [
        {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
        {"id": "custom.fillOpacity", "value": 0},
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
    ],
}


def writer_slots(service: str) -> Panel:
    """Slots owned by each instance of a single-writer service, stacked up to the configured count."""
    return Panel(
        f"Writer slots: {service}",
        f"Writer slots each {service} instance owns, stacked; the stack should reach the dashed line (the "
        "configured count). Below it some pipelines have no writer (StreamMLWriterSlotsUnowned); above "
        "it two instances claim the same slot, normal only for a moment during a hand-over "
        "(StreamMLWriterSlotsClaimedTwice).",
        [
            Target(
                f'sum by (component, instance) (streamml_writer_slots{{service="{service}"}})',
                "{{component}} ({{instance}})",
            ),
            Target(f'max(streamml_writer_slots_configured{{service="{service}"}})', "configured"),
        ],
        stacked=True,
        width=8,
        height=7,
        overrides=[CONFIGURED_LINE],
    )


SNAPSHOT_BYTES = f"streamml_monitor_snapshot_bytes{{{PIPELINE}}}"
SNAPSHOTTING = f"rate(streamml_monitor_snapshot_seconds_count{{{PIPELINE}}}[{RATE}]) > 0"

OVERVIEW = Dashboard(
    uid="streamml-overview",
    title="StreamML overview",
    description="Event flow through the StreamML services: throughput per stage, latency, lag, dead letters.",
    variables=[PIPELINE_VAR, SERVICE_VAR],
    annotations=[SWAP_NOTE, REJECTION_NOTE],
    panels=[
        Row("Throughput"),
        Panel(
            "Raw events in /s",
            "Raw events consumed by the features service.",
            [Target(f"sum(rate({RAW_IN}[{RATE}]))")],
            kind="stat",
            unit="ops",
            width=5,
            height=4,
        ),
        Panel(
            "Predictions /s",
            "Predictions written by the predictor.",
            [Target(f'sum(rate(streamml_events_out_total{{service="predictor", {PIPELINE}}}[{RATE}]))')],
            kind="stat",
            unit="ops",
            width=5,
            height=4,
        ),
        Panel(
            "Dead-lettered /s",
            "Records any service sent to a dead-letter topic; anything above zero needs a look.",
            [Target(f"sum(rate(streamml_events_dead_lettered_total{{{PIPELINE}}}[{RATE}]))")],
            kind="stat",
            unit="ops",
            width=5,
            height=4,
            thresholds=RATE_THRESHOLDS,
        ),
        Panel(
            "Largest consumer lag",
            "Records the most lagging service has yet to read from one of the pipeline's topics.",
            [Target(f"max(streamml_consumer_lag_records{{{PIPELINE_TOPIC}}})")],
            kind="stat",
            width=5,
            height=4,
            thresholds=[("green", None), ("orange", 1000), ("red", 10000)],
        ),
        Panel(
            "Services up",
            "StreamML processes Prometheus scraped successfully last time.",
            [Target('sum(up{job="streamml"})')],
            kind="stat",
            width=4,
            height=4,
        ),
        Panel(
            "Events in by stage",
            "Consumption rate per service and topic; a flat line at zero means a stalled consumer.",
            [
                Target(
                    "sum by (service, topic) (rate(streamml_events_in_total"
                    f'{{{PIPELINE}, service=~"$service"}}[{RATE}]))',
                    "{{service}} ← {{topic}}",
                )
            ],
            unit="ops",
        ),
        Panel(
            "Events out by stage",
            "Production rate per service and output topic.",
            [
                Target(
                    "sum by (service, topic) (rate(streamml_events_out_total"
                    f'{{{PIPELINE}, service=~"$service"}}[{RATE}]))',
                    "{{service}} → {{topic}}",
                )
            ],
            unit="ops",
        ),
        Panel(
            "Dead-lettered by service and reason",
            "Which service rejects records and why (the reason is the error type).",
            [
                Target(
                    "sum by (service, pipeline, reason) (rate(streamml_events_dead_lettered_total"
                    f'{{{PIPELINE}, service=~"$service"}}[{RATE}]))',
                    "{{service}} {{pipeline}}: {{reason}}",
                )
            ],
            unit="ops",
        ),
        Panel(
            "Dead-letter ratio by pipeline",
            "Dead-lettered records per raw event consumed; StreamMLDeadLetterRateHigh fires over 5 %.",
            [
                Target(
                    f"sum by (pipeline) (rate(streamml_events_dead_lettered_total{{{PIPELINE}}}[{RATE}]))"
                    " / on (pipeline) "
                    f"sum by (pipeline) (rate({RAW_IN}[{RATE}]))",
                    "{{pipeline}}",
                )
            ],
            unit="percentunit",
            thresholds=[("green", None), ("red", 0.05)],
        ),
        Row("Latency"),
        Panel(
            "End-to-end latency",
            "From the event's time to its prediction, per pipeline (quantiles of the predictor's histogram).",
            [
                Target(
                    f"histogram_quantile({q}, sum by (pipeline, le) "
                    f"(rate(streamml_end_to_end_latency_seconds_bucket{{{PIPELINE}}}[{RATE}])))",
                    f"{{{{pipeline}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s",
        ),
        Panel(
            "Batch processing time",
            "Time each service spends on one consumed batch.",
            [
                Target(
                    f"histogram_quantile({q}, sum by (service, le) "
                    f'(rate(streamml_batch_processing_seconds_bucket{{service=~"$service"}}[{RATE}])))',
                    f"{{{{service}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.95)
            ],
            unit="s",
        ),
        Row("Lag"),
        Panel(
            "Consumer lag by service and topic",
            "Records between each service's position and the end of its input topics.",
            [
                Target(
                    "sum by (service, topic) (streamml_consumer_lag_records"
                    f'{{{PIPELINE_TOPIC}, service=~"$service"}})',
                    "{{service}} ← {{topic}}",
                )
            ],
            width=24,
        ),
        Row("Writers"),
        *(writer_slots(service) for service in SINGLE_WRITERS),
        Panel(
            "Monitor snapshot size",
            "Size of the last state snapshot the monitor wrote for each pipeline (it grows with the label "
            "join and the detectors' windows). Taken from the instance writing for the pipeline now (it "
            "snapshotted in the interval); a pipeline nobody snapshotted lately shows the largest last size "
            "any instance reports, since an instance that handed a pipeline over keeps its last value.",
            [
                Target(
                    f"max by (pipeline) ({SNAPSHOT_BYTES} and on (pipeline, instance) ({SNAPSHOTTING}))"
                    f" or max by (pipeline) ({SNAPSHOT_BYTES})",
                    "{{pipeline}}",
                )
            ],
            unit="bytes",
        ),
        Panel(
            "Monitor snapshot serialization p95",
            "95th percentile of the time to serialize one monitor snapshot, per pipeline (over every "
            "instance): the monitor's event loop is blocked meanwhile.",
            [
                Target(
                    "histogram_quantile(0.95, sum by (pipeline, le) "
                    f"(rate(streamml_monitor_snapshot_seconds_bucket{{{PIPELINE}}}[{RATE}])))",
                    "{{pipeline}} p95",
                )
            ],
            unit="s",
        ),
        Row("Processes"),
        Panel(
            "Scrape targets up",
            "1 when Prometheus could scrape the service's /metrics, 0 when not.",
            [Target(f'up{{job="streamml", {COMPONENT}}}', "{{component}}")],
            width=6,
            maximum=1,
        ),
        Panel(
            "CPU by service",
            "CPU seconds per second of each service process.",
            [
                Target(
                    f'rate(process_cpu_seconds_total{{job="streamml", {COMPONENT}}}[{RATE}])',
                    "{{component}}",
                )
            ],
            unit="percentunit",
            width=6,
        ),
        Panel(
            "Memory by service",
            "Resident memory of each service process.",
            [Target(f'process_resident_memory_bytes{{job="streamml", {COMPONENT}}}', "{{component}}")],
            unit="bytes",
            width=6,
        ),
        Panel(
            "Unexpected errors",
            "Errors the services caught and survived, by kind.",
            [
                Target(
                    f'sum by (service, kind) (rate(streamml_errors_total{{service=~"$service"}}[{RATE}]))',
                    "{{service}}: {{kind}}",
                )
            ],
            unit="ops",
            width=6,
            thresholds=RATE_THRESHOLDS,
        ),
        Panel(
            "Event-loop stalls (10 min)",
            "Times each process's event loop was blocked for 2 s or more in the last 10 minutes (its log has "
            "where); StreamMLEventLoopStalled fires at 3.",
            [
                Target(
                    f"sum by (component) (increase(streamml_event_loop_stalls_total{{{COMPONENT}}}[10m]))",
                    "{{component}}",
                )
            ],
            width=6,
            thresholds=[("green", None), ("orange", 1), ("red", 3)],
        ),
    ],
)

MODELS = Dashboard(
    uid="streamml-models",
    title="StreamML models",
    description="Which model version serves each pipeline, how accurate it is, and every swap and promotion.",
    variables=[PIPELINE_VAR],
    annotations=[SWAP_NOTE, PROMOTION_NOTE, REJECTION_NOTE],
    panels=[
        Row("Live"),
        Panel(
            "Live version",
            "The model version the predictor serves, per pipeline.",
            [
                Target(
                    f"max by (pipeline, model) (streamml_live_model_version{{{PIPELINE}}})",
                    "{{pipeline}} {{model}}",
                )
            ],
            kind="stat",
            unit="none",
            width=8,
            height=5,
        ),
        Panel(
            "Since the last swap",
            "Time since the live model last changed, per pipeline.",
            [
                Target(
                    f"time() - max by (pipeline) (streamml_last_swap_timestamp_seconds{{{PIPELINE}}})",
                    "{{pipeline}}",
                )
            ],
            kind="stat",
            unit="s",
            width=8,
            height=5,
        ),
        Panel(
            "Rejected artifacts in range",
            "Model artifacts the predictor refused (bad checksum or signature) in the time range shown.",
            [
                Target(
                    recent(f"streamml_rejected_artifacts_total{{{PIPELINE}}}", "$__range", "pipeline"),
                    "{{pipeline}}",
                )
            ],
            kind="stat",
            width=8,
            height=5,
            thresholds=[("green", None), ("red", 1)],
        ),
        Row("Accuracy"),
        Panel(
            "Accuracy and live version",
            "Prequential accuracy of the online learner over the last 10 minutes and since it started, "
            "with the live version on the right axis: each step of the version is a swap.",
            [
                ACCURACY_WINDOWED,
                ACCURACY_CUMULATIVE,
                Target(
                    f"max by (pipeline) (streamml_live_model_version{{{PIPELINE}}})",
                    "{{pipeline}} live version",
                ),
            ],
            unit="percentunit",
            width=16,
            height=9,
            overrides=[LIVE_VERSION_AXIS],
        ),
        Panel(
            "Error metrics",
            "Log loss (classification) or MAE and RMSE (regression) of the online learner since it started.",
            [ERROR_METRICS],
            width=8,
            height=9,
        ),
        Panel(
            "Served accuracy per version",
            "What each live or shadow version scored on the predictions it served once their labels came "
            "(the monitor's rolling window; MAE for regression). One line per version: a swap ends one.",
            [
                Target(
                    "max by (pipeline, model, version, metric) (streamml_model_metric"
                    f'{{metric=~"accuracy|mae", window="rolling", {PIPELINE}}})',
                    "{{pipeline}} {{model}} v{{version}} {{metric}}",
                )
            ],
            width=24,
            height=9,
        ),
        Row("Deployments"),
        Panel(
            "Versions published",
            "New model versions the learner published.",
            [
                Target(
                    "sum by (pipeline, model) "
                    f"(increase(streamml_model_versions_published_total{{{PIPELINE}}}[{RATE}]))",
                    "{{pipeline}} {{model}}",
                )
            ],
            bars=True,
            stacked=True,
            width=6,
        ),
        Panel(
            "Swaps",
            "Times the predictor changed its live model.",
            [
                Target(
                    f"sum by (pipeline, model) (increase(streamml_model_swaps_total{{{PIPELINE}}}[{RATE}]))",
                    "{{pipeline}} {{model}}",
                )
            ],
            bars=True,
            stacked=True,
            width=6,
        ),
        Panel(
            "Promotion decisions",
            "PROMOTE, ROLLBACK, SHADOW and DISCARD decisions, by who made them (auto, controller, user).",
            [
                Target(
                    "sum by (pipeline, action, actor) "
                    f"(increase(streamml_promotions_total{{{PIPELINE}}}[{RATE}]))",
                    "{{pipeline}} {{action}} by {{actor}}",
                )
            ],
            bars=True,
            stacked=True,
            width=6,
        ),
        Panel(
            "Rejected artifacts since the predictor started",
            "Cumulative count per reason: rare events, so the total is shown rather than a rate.",
            [
                Target(
                    f"sum by (pipeline, reason) (streamml_rejected_artifacts_total{{{PIPELINE}}})",
                    "{{pipeline}}: {{reason}}",
                )
            ],
            width=6,
            thresholds=[("green", None), ("red", 1)],
        ),
    ],
)

DRIFT = Dashboard(
    uid="streamml-drift",
    title="StreamML drift",
    description="Signs that the data or the concept changed: drift alerts, windowed accuracy, input errors.",
    variables=[PIPELINE_VAR],
    annotations=[DRIFT_NOTE, PROMOTION_NOTE, REJECTION_NOTE],
    panels=[
        Row("Alerts"),
        Panel(
            "Drift alerts in range",
            "Drift alerts published on the drift-alerts topic in the time range shown, by kind.",
            [
                Target(
                    recent(f"streamml_drift_alerts_total{{{PIPELINE}}}", "$__range", "pipeline, kind"),
                    "{{pipeline}} {{kind}}",
                )
            ],
            kind="stat",
            width=8,
            height=6,
            thresholds=[("green", None), ("orange", 1)],
        ),
        Panel(
            "Drift alerts since the monitor started",
            "Cumulative drift alerts per kind and detector (`streamml status` lists the latest ones).",
            [
                Target(
                    f"sum by (pipeline, kind, detector) (streamml_drift_alerts_total{{{PIPELINE}}})",
                    "{{pipeline}} {{kind}} {{detector}}",
                )
            ],
            width=8,
            height=6,
        ),
        Panel(
            "Artifact alerts",
            "Model artifacts the predictor rejected (each one is also an ARTIFACT alert on the topic).",
            [
                Target(
                    f"sum by (pipeline, reason) (streamml_rejected_artifacts_total{{{PIPELINE}}})",
                    "{{pipeline}}: {{reason}}",
                )
            ],
            width=8,
            height=6,
        ),
        Row("Concept drift: the model's error"),
        Panel(
            "Accuracy: last 10 minutes against since start",
            "After a concept drift the windowed accuracy falls at once while the cumulative one sags slowly.",
            [ACCURACY_WINDOWED, ACCURACY_CUMULATIVE],
            unit="percentunit",
            maximum=1,
        ),
        Panel(
            "Accuracy drop",
            "Accuracy since start minus accuracy over the last 10 minutes; a sustained rise suggests drift.",
            [
                Target(
                    f'max by (pipeline) (streamml_learner_metric{{metric="accuracy", {PIPELINE}}})'
                    f" - on (pipeline) pipeline:streamml_learner_accuracy:ratio10m{{{PIPELINE}}}",
                    "{{pipeline}}",
                )
            ],
            unit="percentunit",
            minimum=None,
            thresholds=[("green", None), ("orange", 0.1)],
        ),
        Panel(
            "Error metrics",
            "Log loss (classification) or MAE and RMSE (regression) since the learner started.",
            [ERROR_METRICS],
        ),
        Row("Data drift: the inputs"),
        Panel(
            "Dead-letter reasons",
            "Input that no longer fits the pipeline's schema shows up here first.",
            [
                Target(
                    "sum by (pipeline, reason) (rate(streamml_events_dead_lettered_total"
                    f'{{service="features", {PIPELINE}}}[{RATE}]))',
                    "{{pipeline}}: {{reason}}",
                )
            ],
            unit="ops",
        ),
        Panel(
            "Raw input rate",
            "Raw events per second: a sudden change of volume often comes with a change of content.",
            [
                Target(
                    f"sum by (pipeline) (rate({RAW_IN}[{RATE}]))",
                    "{{pipeline}}",
                )
            ],
            unit="ops",
        ),
    ],
)

DASHBOARDS = {"overview.json": OVERVIEW, "models.json": MODELS, "drift.json": DRIFT}


def dump(board: Dashboard) -> str:
    return json.dumps(render(board), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report dashboards that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, board in DASHBOARDS.items():
        path = DASHBOARDS_DIR / name
        text = dump(board)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        sys.stderr.write(f"out of date: {', '.join(stale)} (run python deploy/grafana/generate.py)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
