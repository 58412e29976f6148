"""`streamml status`: one terminal view of a whole deployment, from its control topics and its metrics.

Pipelines, live versions, promotions and drift alerts come from the topics (the system's record); rates,
lag and what the predictor really serves come from the running stack's /metrics when one runs here.
Building and rendering are pure functions over those inputs, so they are tested without a broker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from streamml import dashboard, promstack
from streamml.codec import codec_for
from streamml.control import ModelHistory
from streamml.errors import StreamMLError, ValidationError
from streamml.runtime import read_to_end
from streamml.settings import Settings
from streamml.topics import Catalogue

log = logging.getLogger(__name__)

CONSUMER_LAG = "streamml_consumer_lag_records"


@dataclass(frozen=True)
class Flow:
    """What the running stack's metrics say about one pipeline (None: not measured)."""

    events_in_per_s: float | None = None
    predictions_per_s: float | None = None
    dead_lettered_per_s: float | None = None
    lag: tuple[float, str] | None = None  # the largest lag of any service on the pipeline's topics
    serving: str | None = None  # what the predictor says it serves
    accuracy: float | None = None


@dataclass(frozen=True)
class PipelineStatus:
    name: str
    revision: int
    task: str
    promotion_mode: str
    deleted: bool
    live: str | None  # the last PROMOTE/ROLLBACK decision, "model vN"
    live_since_ms: int | None
    flow: Flow


@dataclass(frozen=True)
class StackStatus:
    """The services of the stack recorded in the state file, and their metrics (None: no stack here)."""

    services: tuple[dashboard.ServiceScrape, ...]
    note: str = ""


@dataclass(frozen=True)
class Status:
    pipelines: tuple[PipelineStatus, ...]
    promotions: tuple[Mapping[str, Any], ...]  # newest first
    alerts: tuple[Mapping[str, Any], ...]  # newest first
    stack: StackStatus | None
    prometheus_url: str | None = None
    firing: tuple[Mapping[str, Any], ...] = ()


# --- pure functions --------------------------------------------------------------------------------------


def live_versions(decisions: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """pipeline -> the decision that made its current version live (as `streamml model list` says)."""
    histories: dict[str, ModelHistory] = {}
    for decision in sorted(decisions, key=lambda d: d["decided_at"]):
        histories.setdefault(decision["pipeline"], ModelHistory()).decisions.append(dict(decision))
    live = {pipeline: history.live() for pipeline, history in histories.items()}
    return {pipeline: decision for pipeline, decision in live.items() if decision is not None}


def pipeline_lag(samples: Iterable[dashboard.Sample], pipeline: str) -> tuple[float, str] | None:
    """(records, service) of the service furthest behind on topics named <prefix>.<pipeline>.<role>."""
    per_service: dict[str, float] = {}
    for sample in samples:
        topic = sample.labels.get("topic", "")
        parts = topic.split(".")
        if sample.name == CONSUMER_LAG and len(parts) >= 3 and parts[-2] == pipeline:
            service = sample.labels.get("service", "?")
            per_service[service] = per_service.get(service, 0.0) + sample.value
    if not per_service:
        return None
    service = max(per_service, key=lambda name: per_service[name])
    return per_service[service], service


def flows(previous: dashboard.Scrape | None, current: dashboard.Scrape) -> dict[str, Flow]:
    """Per pipeline: rates between two scrapes, lag, live model and accuracy from the latest one."""
    view = dashboard.build_view(previous, current)
    samples = [sample for scraped in current.services for sample in scraped.samples or ()]
    result = {}
    for row in view.rows:
        if not row.pipeline:
            continue
        result[row.pipeline] = Flow(
            events_in_per_s=row.stages["features in"].rate,
            predictions_per_s=row.stages["predictions out"].rate,
            dead_lettered_per_s=row.dead_lettered.rate,
            lag=pipeline_lag(samples, row.pipeline),
            serving=row.live_model,
            accuracy=row.accuracy,
        )
    return result


def build_status(
    pipelines: Mapping[str, Mapping[str, Any]],
    decisions: Sequence[Mapping[str, Any]],
    alerts: Sequence[Mapping[str, Any]],
    *,
    pipeline_flows: Mapping[str, Flow] | None = None,
    stack: StackStatus | None = None,
    recent: int = 5,
    prometheus_url: str | None = None,
    firing: Sequence[Mapping[str, Any]] = (),
) -> Status:
    """Everything the view shows, from already-read records; the latest `recent` promotions and alerts."""
    live = live_versions(decisions)
    rows = []
    for name in sorted(pipelines):
        definition = pipelines[name]
        decision = live.get(name)
        rows.append(
            PipelineStatus(
                name=name,
                revision=int(definition["revision"]),
                task=str(definition["task"]),
                promotion_mode=str(definition["promotion_mode"]),
                deleted=bool(definition["deleted"]),
                live=f"{decision['model_name']} v{decision['version']}" if decision else None,
                live_since_ms=int(decision["decided_at"]) if decision else None,
                flow=(pipeline_flows or {}).get(name, Flow()),
            )
        )
    newest_decisions = sorted(decisions, key=lambda d: d["decided_at"], reverse=True)[:recent]
    newest_alerts = sorted(alerts, key=lambda a: a["detected_at"], reverse=True)[:recent]
    return Status(
        tuple(rows), tuple(newest_decisions), tuple(newest_alerts), stack, prometheus_url, tuple(firing)
    )


def ago(then_ms: int | None, now_ms: int) -> str:
    """'42 s ago', '3 min ago', '5 h ago', '2 d ago' (or '-')."""
    if then_ms is None:
        return "-"
    seconds = max(0, (now_ms - then_ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}/s" if value >= 10 else f"{value:.1f}/s"


def _lag(lag: tuple[float, str] | None) -> str:
    return "-" if lag is None else f"{lag[0]:,.0f} ({lag[1]})"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _version(decision: Mapping[str, Any]) -> str:
    return f"{decision['model_name']} v{decision['version']}"


def render(status: Status, *, now_ms: int, title: str = "", ascii_only: bool = False) -> RenderableType:
    """The view: services, pipelines, recent promotions and drift alerts, Prometheus and its alerts."""
    style = box.ASCII if ascii_only else box.ROUNDED
    parts: list[RenderableType] = [Text(title or "StreamML status", style="bold")]

    if status.stack is None:
        parts.append(
            Text("no stack runs here (.local/stack.json): rates, lag and serving not measured", "dim")
        )
    else:
        services = Table("service", "status", "pid", "metrics", box=style, title="Services")
        for scraped in status.stack.services:
            target = scraped.target
            state = Text("up", "green") if scraped.up else Text(f"down ({scraped.error})", "red")
            port = f"127.0.0.1:{target.metrics_port}" if target.metrics_port else "-"
            services.add_row(target.service, state, str(target.pid or "-"), port)
        parts.append(services)
        if status.stack.note:
            parts.append(Text(status.stack.note, "yellow"))

    if not status.pipelines:
        parts.append(Text("no pipeline yet: `streamml pipeline apply pipelines/<name>.yaml`"))
    else:
        pipelines = Table(
            "pipeline", "rev", "task", "promotion", "live (decided)", "since", "serving",
            "events in", "predictions", "dead-lettered", "max lag", "accuracy",
            box=style, title="Pipelines",
        )  # fmt: skip
        for column in pipelines.columns[7:]:
            column.justify = "right"
        for row in status.pipelines:
            flow = row.flow
            serving = flow.serving or "-"
            mismatch = bool(flow.serving and row.live) and row.live not in serving.split(", ")
            dead = _rate(flow.dead_lettered_per_s)
            pipelines.add_row(
                row.name + (" (deleted)" if row.deleted else ""),
                str(row.revision),
                row.task.lower(),
                row.promotion_mode.lower(),
                row.live or "none yet",
                ago(row.live_since_ms, now_ms),
                Text(serving, "red") if mismatch else serving,
                _rate(flow.events_in_per_s),
                _rate(flow.predictions_per_s),
                Text(dead, "bold red") if flow.dead_lettered_per_s else dead,
                _lag(flow.lag),
                _percent(flow.accuracy),
                style="dim" if row.deleted else "",
            )
        parts.append(pipelines)

    promotions = Table("when", "pipeline", "action", "version", "previous", "by", "reason", box=style)
    promotions.title = "Recent promotions"
    for d in status.promotions:
        previous = "-" if d.get("previous_version") is None else f"v{d['previous_version']}"
        promotions.add_row(ago(d["decided_at"], now_ms), d["pipeline"], d["action"], _version(d), previous,
                           d["actor"], d["reason"])  # fmt: skip
    parts.append(promotions if status.promotions else Text("no promotion decision yet", "dim"))

    alerts = Table("when", "pipeline", "kind", "severity", "model", "detector", "message", box=style)
    alerts.title = "Recent drift alerts"
    for a in status.alerts:
        severity = Text(a["severity"], "bold red" if a["severity"] == "CRITICAL" else "yellow")
        alerts.add_row(ago(a["detected_at"], now_ms), a["pipeline"], a["kind"], severity,
                       f"{a['model_name']} v{a['model_version']}", a["detector"], a["message"])  # fmt: skip
    parts.append(alerts if status.alerts else Text("no drift alert", "green"))

    if status.prometheus_url is None:
        parts.append(Text("Prometheus: not running here (`make demo` starts one)", "dim"))
    else:
        parts.append(Text(f"Prometheus: {status.prometheus_url}  ({len(status.firing)} alerts firing)"))
        if status.firing:
            firing = Table(
                "alert", "severity", "labels", "since", "summary", box=style, title="Firing alerts"
            )
            for alert in status.firing:
                labels = alert.get("labels", {})
                shown = ", ".join(
                    f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity")
                )
                since = alert.get("activeAt", "")[:19].replace("T", " ")
                firing.add_row(labels.get("alertname", "?"), labels.get("severity", "-"), shown, since,
                               alert.get("annotations", {}).get("summary", ""))  # fmt: skip
            parts.append(firing)
    return Group(*parts)


# --- I/O -------------------------------------------------------------------------------------------------


def _records(settings: Settings, topic: str, schema: str) -> list[dict[str, Any]]:
    codec = codec_for(schema)
    return [codec.decode(v) for m in read_to_end(settings, topic) if (v := m.value()) is not None]


def _pipelines(settings: Settings) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for record in _records(settings, Catalogue(settings).pipelines().name, "PipelineDefinition"):
        latest[record["name"]] = record
    return latest


def _stack_note(state: Path, settings: Settings) -> str:
    """A warning when the stack on this machine serves another deployment (topic prefix) than the CLI's."""
    try:
        prefix = json.loads(state.read_text()).get("env", {}).get("STREAMML_TOPIC_PREFIX")
    except (OSError, ValueError, AttributeError):
        return ""
    if prefix and prefix != settings.topic_prefix:
        return f"the stack in {state} uses topic prefix {prefix!r}, this view reads {settings.topic_prefix!r}"
    return ""


def collect(
    settings: Settings,
    state: Path = dashboard.DEFAULT_STATE,
    *,
    recent: int = 5,
    sample_s: float = 1.0,
    fetch: dashboard.Fetch = dashboard.http_get,
    sleep: Callable[[float], None] = time.sleep,
    prometheus_home: Path = promstack.DEFAULT_HOME,
) -> Status:
    """Read the control topics and, if a stack runs here, scrape it twice `sample_s` apart for rates."""
    catalogue = Catalogue(settings)
    pipelines = _pipelines(settings)
    decisions = _records(settings, catalogue.promotions().name, "Promotion")
    alerts = _records(settings, catalogue.drift_alerts().name, "DriftAlert")
    stack = None
    pipeline_flows: dict[str, Flow] = {}
    try:
        targets = dashboard.load_targets(state)
    except ValidationError:
        targets = ()
    if targets:
        first = dashboard.scrape(targets, fetch)
        sleep(sample_s)
        second = dashboard.scrape(targets, fetch)
        pipeline_flows = flows(first, second)
        stack = StackStatus(second.services, _stack_note(state, settings))
    prometheus = promstack.running(prometheus_home)
    firing: list[dict[str, Any]] = []
    if prometheus is not None:
        try:
            firing = prometheus.firing_alerts()
        except StreamMLError as exc:
            log.warning("could not read alerts from %s: %s", prometheus.url, exc)
    return build_status(
        pipelines,
        decisions,
        alerts,
        pipeline_flows=pipeline_flows,
        stack=stack,
        recent=recent,
        prometheus_url=prometheus.url if prometheus else None,
        firing=firing,
    )


def title(settings: Settings) -> str:
    clock = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return f"StreamML status {clock}  (broker {settings.bootstrap_servers}, topics {settings.topic_prefix}.*)"
