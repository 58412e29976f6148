"""Live terminal view of a running StreamML stack (``streamml top``), built from each service's /metrics.

A service may run as several instances (state file labels `<service>`, `<service>-1`, ...): its figures
are summed over them. Parsing and rate arithmetic are pure functions over metrics text, so they are tested
without a network.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import io
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from streamml.errors import ValidationError
from streamml.stack import REPO_ROOT

__all__ = [
    "DEFAULT_STATE",
    "STAGES",
    "AccuracyPoint",
    "PipelineRow",
    "RecentAccuracy",
    "Sample",
    "Scrape",
    "ServiceScrape",
    "Stage",
    "StageFigures",
    "Target",
    "View",
    "build_view",
    "counter_rate",
    "interval_accuracy",
    "live_models_from_health",
    "load_targets",
    "parse_metrics",
    "render",
    "run",
]

log = logging.getLogger(__name__)

DEFAULT_STATE = REPO_ROOT / ".local" / "stack.json"
SCRAPE_TIMEOUT_S = 0.8
UNKNOWN = "(no pipeline)"

EVENTS_IN = "streamml_events_in_total"
EVENTS_OUT = "streamml_events_out_total"
DEAD_LETTERED = "streamml_events_dead_lettered_total"
LIVE_VERSION = "streamml_live_model_version"
SWAPS = "streamml_model_swaps_total"
LEARNER_METRIC = "streamml_learner_metric"
MODEL_METRIC = "streamml_model_metric"
VERSIONS_PUBLISHED = "streamml_model_versions_published_total"
DRIFT_ALERTS = "streamml_drift_alerts_total"
TRAINING_REQUESTS = "streamml_training_requests_total"
DECISIONS = "streamml_controller_decisions_total"
LATENCY_SUM = "streamml_end_to_end_latency_seconds_sum"
LATENCY_COUNT = "streamml_end_to_end_latency_seconds_count"
WRITER_SLOTS = "streamml_writer_slots"
WRITER_SLOTS_CONFIGURED = "streamml_writer_slots_configured"
_INSTANCE_LABEL = re.compile(r"(?P<service>.+)-[0-9]+")

# Errors a scrape may meet when a service is down, hung or half-started: shown as "down", never raised.
_SCRAPE_ERRORS = (OSError, ValueError, http.client.HTTPException)

Fetch = Callable[[str, float], bytes]


@dataclass(frozen=True)
class Sample:
    """One line of a /metrics page."""

    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Target:
    """One service instance as the stack's state file records it.

    ``service`` is its label there: the service's name for instance 0, ``<service>-<i>`` for the others;
    ``belongs_to`` is the service it is an instance of (derived from the label when not given).
    """

    service: str
    pid: int | None
    metrics_port: int | None
    http_port: int | None
    belongs_to: str = ""

    def __post_init__(self) -> None:
        if not self.belongs_to:
            match = _INSTANCE_LABEL.fullmatch(self.service)
            object.__setattr__(self, "belongs_to", match["service"] if match else self.service)


@dataclass(frozen=True)
class ServiceScrape:
    """What one service answered; ``samples`` is None when it did not answer (``error`` says why)."""

    target: Target
    samples: tuple[Sample, ...] | None
    error: str = ""

    @property
    def up(self) -> bool:
        return self.samples is not None


@dataclass(frozen=True)
class Scrape:
    """All services at one instant; ``live`` is the predictor's own account of its live models, if any."""

    at: float
    services: tuple[ServiceScrape, ...]
    live: Mapping[str, str] | None = None

    def instances_of(self, service: str) -> tuple[ServiceScrape, ...]:
        return tuple(s for s in self.services if s.target.belongs_to == service)

    def samples_of(self, service: str) -> tuple[Sample, ...] | None:
        """The samples of every instance of a service that answered (sums over them add the instances up);
        None when none did."""
        answered = [s.samples for s in self.instances_of(service) if s.samples is not None]
        return None if not answered else tuple(sample for samples in answered for sample in samples)


@dataclass(frozen=True)
class Stage:
    """A point of the data path whose throughput is shown: one counter of one service."""

    title: str
    service: str
    metric: str


STAGES = (
    Stage("features in", "features", EVENTS_IN),
    Stage("learner in", "learner", EVENTS_IN),
    Stage("predictions out", "predictor", EVENTS_OUT),
)


@dataclass(frozen=True)
class StageFigures:
    total: float | None  # None: the service is down
    rate: float | None  # events/s since the previous scrape; None on the first scrape or when down


@dataclass(frozen=True)
class PipelineRow:
    pipeline: str  # "" for records whose pipeline could not be read (only dead letters are counted)
    stages: Mapping[str, StageFigures]
    dead_lettered: StageFigures  # summed over every service
    live_model: str | None
    swaps: float | None
    versions: float | None
    accuracy: float | None  # prequential, over everything the learner has seen
    recent_accuracy: float | None  # prequential, over the events between its last two snapshots
    latency_s: float | None  # mean event-to-prediction latency over the last interval
    # what the live version served, on joined labels, as the monitor measures it: since it went live and
    # over the monitor's rolling window (None: no monitor, or no label joined yet)
    served_accuracy: float | None = None
    served_recent: float | None = None
    # the closed loop: monitor alerts, controller retrains and decisions (None when not running)
    drift_alerts: float | None = None
    retrains: float | None = None
    shadowed: float | None = None
    promoted: float | None = None
    discarded: float | None = None


@dataclass(frozen=True)
class View:
    services: tuple[ServiceScrape, ...]
    rows: tuple[PipelineRow, ...]
    interval_s: float | None


# --- pure functions --------------------------------------------------------------------------------------


def parse_metrics(text: str) -> tuple[Sample, ...]:
    """The samples of one /metrics page; a malformed page raises ValueError."""
    return tuple(
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def load_targets(path: Path) -> tuple[Target, ...]:
    """The services recorded in the stack's state file (written by ``python -m streamml.stack up``)."""
    try:
        state = json.loads(path.read_text())
        services = state["services"]
        return tuple(
            Target(
                service=str(name),
                pid=_optional_int(info.get("pid")),
                metrics_port=_optional_int(info.get("metrics_port")),
                http_port=_optional_int(info.get("http_port")),
                belongs_to=str(info.get("service") or ""),
            )
            for name, info in services.items()
        )
    except FileNotFoundError as exc:
        raise ValidationError(
            f"{path}: no stack state file; start the services with `make demo`"
            " or `python -m streamml.stack up`"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValidationError(f"{path}: not a readable stack state file ({exc})") from exc


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def live_models_from_health(body: bytes) -> dict[str, str]:
    """``{pipeline: "model vN"}`` from the predictor's /healthz answer."""
    live = json.loads(body)["live"]
    return {str(p): f"{m['model']} v{m['version']}" for p, m in live.items()}


def counter_rate(previous: float | None, current: float | None, seconds: float | None) -> float | None:
    """Events/s between two readings of a counter; a counter that went down was reset by a restart."""
    if previous is None or current is None or seconds is None or seconds <= 0:
        return None
    delta = current - previous if current >= previous else current
    return delta / seconds


def _matching(samples: Iterable[Sample], name: str, labels: Mapping[str, str]) -> list[float]:
    return [
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _counter(samples: Sequence[Sample] | None, name: str, **labels: str) -> float | None:
    """Sum of a counter's matching series; 0 when none exist yet, None when the service is down."""
    return None if samples is None else sum(_matching(samples, name, labels))


def _gauge(samples: Sequence[Sample] | None, name: str, **labels: str) -> float | None:
    """A gauge's value in one instance's samples, or None when it is not set (or the instance is down)."""
    values = [] if samples is None else _matching(samples, name, labels)
    return values[0] if values else None


def _totals(scrape: Scrape, service: str | None, name: str, **labels: str) -> dict[str, float] | None:
    """Per instance that answered (by label), the sum of a metric's matching series; None when no
    instance of `service` (of any service when None) answered."""
    scraped = scrape.services if service is None else scrape.instances_of(service)
    totals = {
        s.target.service: sum(_matching(s.samples, name, labels)) for s in scraped if s.samples is not None
    }
    return totals or None


def _figures(
    previous: Scrape | None, current: Scrape, service: str | None, name: str, **labels: str
) -> StageFigures:
    """A counter summed over the instances, and its rate as the sum of each instance's own rate, so an
    instance that restarts or stops answering does not look like the whole service's counter going back."""
    now = _totals(current, service, name, **labels)
    if now is None:
        return StageFigures(None, None)
    before = {} if previous is None else _totals(previous, service, name, **labels) or {}
    seconds = None if previous is None else current.at - previous.at
    rates = [counter_rate(before.get(label), value, seconds) for label, value in now.items()]
    known = [rate for rate in rates if rate is not None]
    return StageFigures(sum(now.values()), sum(known) if known else None)


def _learner_reading(scrape: Scrape, pipeline: str) -> tuple[float, float | None] | None:
    """The learner's cumulative accuracy and events seen, from the instance that has learned the most.

    Not summed over instances: accuracy is a ratio, and an instance that handed the pipeline over keeps
    exporting its last (smaller) figures, while its successor resumed from them and counts on.
    """
    best: tuple[float, float | None] | None = None
    for scraped in scrape.instances_of("learner"):
        accuracy = _gauge(scraped.samples, LEARNER_METRIC, pipeline=pipeline, metric="accuracy")
        events = _gauge(scraped.samples, LEARNER_METRIC, pipeline=pipeline, metric="events_seen")
        if accuracy is not None and (best is None or (events or 0.0) > (best[1] or 0.0)):
            best = (accuracy, events)
    return best


def _pipelines(scrape: Scrape) -> list[str]:
    """Every pipeline some service reports on; "" (records whose pipeline is unknown) only if it has any."""
    names: set[str] = set()
    for scraped in scrape.services:
        for sample in scraped.samples or ():
            pipeline = sample.labels.get("pipeline")
            if pipeline is not None and (pipeline or (sample.name == DEAD_LETTERED and sample.value > 0)):
                names.add(pipeline)
    return sorted(names, key=lambda name: (name == "", name))  # the unknown pipeline last


def _live_model(scrape: Scrape, pipeline: str) -> str | None:
    if scrape.live is not None and pipeline in scrape.live:
        return scrape.live[pipeline]
    samples = scrape.samples_of("predictor")
    if samples is None:
        return None  # the predictor is down: unknown
    gauges = [s for s in samples if s.name == LIVE_VERSION and s.labels.get("pipeline") == pipeline]
    # Without the predictor's own answer, the gauges are all we have (one per model ever live, and per
    # instance: every predictor instance serves every pipeline, so the same versions are named once).
    names = dict.fromkeys(f"{s.labels.get('model', '?')} v{s.value:.0f}" for s in gauges)
    return ", ".join(names) or "none yet"


@dataclass(frozen=True)
class AccuracyPoint:
    """One reading of the learner's cumulative accuracy and how many events it covers."""

    events: float
    accuracy: float


def interval_accuracy(older: AccuracyPoint, newer: AccuracyPoint) -> float | None:
    """Accuracy on just the events learnt between two cumulative readings: it shows a drift at once,
    where the cumulative figure only sags slowly."""
    events = newer.events - older.events
    if events <= 0:
        return None
    correct = round(newer.accuracy * newer.events) - round(older.accuracy * older.events)
    return min(max(correct / events, 0.0), 1.0)


class RecentAccuracy:
    """Remembers each pipeline's last two distinct accuracy readings across refreshes.

    The learner updates its gauges only when it publishes a version (every few seconds), so most
    refreshes see no change; the interval between its last two versions is the useful window.
    """

    def __init__(self) -> None:
        self._points: dict[str, tuple[AccuracyPoint | None, AccuracyPoint]] = {}

    def update(self, scrape: Scrape) -> dict[str, float]:
        for pipeline in _pipelines(scrape):
            reading = _learner_reading(scrape, pipeline)
            if reading is None or reading[1] is None:
                continue
            point = AccuracyPoint(reading[1], reading[0])
            known = self._points.get(pipeline)
            if known is None or point.events < known[1].events:  # first reading, or the learner restarted
                self._points[pipeline] = (None, point)
            elif point.events > known[1].events:
                self._points[pipeline] = (known[1], point)
        recent = {}
        for pipeline, (older, newer) in self._points.items():
            value = None if older is None else interval_accuracy(older, newer)
            if value is not None:
                recent[pipeline] = value
        return recent


def build_view(
    previous: Scrape | None, current: Scrape, recent_accuracy: Mapping[str, float] | None = None
) -> View:
    """Totals from the current scrape; rates and latency from its difference with the previous one."""
    seconds = None if previous is None else current.at - previous.at
    rows = []
    for pipeline in _pipelines(current):
        stages = {
            stage.title: _figures(previous, current, stage.service, stage.metric, pipeline=pipeline)
            for stage in STAGES
        }
        learner = current.samples_of("learner")
        predictor = current.samples_of("predictor")
        reading = _learner_reading(current, pipeline)
        rows.append(
            PipelineRow(
                pipeline=pipeline,
                stages=stages,
                # from every service that answered
                dead_lettered=_figures(previous, current, None, DEAD_LETTERED, pipeline=pipeline),
                live_model=_live_model(current, pipeline),
                swaps=_counter(predictor, SWAPS, pipeline=pipeline),
                versions=_counter(learner, VERSIONS_PUBLISHED, pipeline=pipeline),
                accuracy=None if reading is None else reading[0],
                recent_accuracy=(recent_accuracy or {}).get(pipeline),
                latency_s=_interval_latency(previous, current, pipeline),
                **_served(current, pipeline),
                drift_alerts=_counter(current.samples_of("monitor"), DRIFT_ALERTS, pipeline=pipeline),
                retrains=_counter(current.samples_of("controller"), TRAINING_REQUESTS, pipeline=pipeline),
                shadowed=_counter(
                    current.samples_of("controller"), DECISIONS, pipeline=pipeline, action="SHADOW"
                ),
                promoted=_counter(
                    current.samples_of("controller"), DECISIONS, pipeline=pipeline, action="PROMOTE"
                ),
                discarded=_counter(
                    current.samples_of("controller"), DECISIONS, pipeline=pipeline, action="DISCARD"
                ),
            )
        )
    return View(current.services, tuple(rows), seconds)


def _served(scrape: Scrape, pipeline: str) -> dict[str, float | None]:
    """The monitor's accuracy of the live version (the first one named, if several), from the monitor
    instance that has joined the most labels for it: one that handed the pipeline over keeps its last,
    stale, figures."""
    none: dict[str, float | None] = {"served_accuracy": None, "served_recent": None}
    live = _live_model(scrape, pipeline)
    model, _, version = (live or "").split(",")[0].strip().partition(" v")
    if not model or not version.isdigit():
        return none
    best: tuple[float, float | None, float | None] | None = None
    for scraped in scrape.instances_of("monitor"):
        if scraped.samples is None:
            continue
        labels = {"pipeline": pipeline, "model": model, "version": version}
        covered = _gauge(scraped.samples, MODEL_METRIC, **labels, metric="labelled", window="all")
        overall = _gauge(scraped.samples, MODEL_METRIC, **labels, metric="accuracy", window="all")
        recent = _gauge(scraped.samples, MODEL_METRIC, **labels, metric="accuracy", window="rolling")
        if overall is not None and (best is None or (covered or 0.0) > best[0]):
            best = (covered or 0.0, overall, recent)
    return none if best is None else {"served_accuracy": best[1], "served_recent": best[2]}


def _interval_latency(previous: Scrape | None, current: Scrape, pipeline: str) -> float | None:
    """Mean latency of the predictions made since the previous scrape (the histogram's sum/count deltas,
    per predictor instance, added up)."""
    if previous is None:
        return None
    count = _figures(previous, current, "predictor", LATENCY_COUNT, pipeline=pipeline).rate
    total = _figures(previous, current, "predictor", LATENCY_SUM, pipeline=pipeline).rate
    if not count or total is None:
        return None
    return total / count


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _slots(scraped: ServiceScrape) -> str:
    """`owned/configured` writer slots of a single-writer instance; "-" for other services or when down."""
    service = scraped.target.belongs_to
    owned = _gauge(scraped.samples, WRITER_SLOTS, service=service)
    configured = _gauge(scraped.samples, WRITER_SLOTS_CONFIGURED, service=service)
    if owned is None:
        return "-"
    return f"{owned:.0f}" if configured is None else f"{owned:.0f}/{configured:.0f}"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def render(view: View, *, title: str = "", ascii_only: bool = False) -> RenderableType:
    """The tables shown on every refresh; ``ascii_only`` for logs and pipes."""
    style = box.ASCII if ascii_only else box.ROUNDED
    services = Table("service", "status", "pid", "metrics", "writer slots", box=style)
    services.columns[4].justify = "right"
    for scraped in view.services:
        target = scraped.target
        status = Text("up", style="green") if scraped.up else Text(f"down ({scraped.error})", style="red")
        port = f"127.0.0.1:{target.metrics_port}" if target.metrics_port else "-"
        services.add_row(target.service, status, str(target.pid or "-"), port, _slots(scraped))

    flow = Table("pipeline", "stage", "events/s", "total", box=style)
    models = Table(
        "pipeline",
        "live model",
        "swaps",
        "versions",
        "served",
        "served recent",
        "learner",
        "learner recent",
        "latency",
        box=style,
    )
    loop = Table("pipeline", "drift alerts", "retrains", "in shadow", "promoted", "discarded", box=style)
    for column in (*flow.columns[2:], *models.columns[2:], *loop.columns[1:]):
        column.justify = "right"
    for row in view.rows:
        dead = row.dead_lettered
        dead_style = "bold red" if dead.total else ""
        if not row.pipeline:
            flow.add_row(UNKNOWN, "dead-lettered", _rate(dead.rate), _count(dead.total), style=dead_style)
            continue
        for n, stage in enumerate(STAGES):
            figures = row.stages[stage.title]
            flow.add_row(
                row.pipeline if n == 0 else "", stage.title, _rate(figures.rate), _count(figures.total)
            )
        flow.add_row("", "dead-lettered", _rate(dead.rate), _count(dead.total), style=dead_style)
        flow.add_section()
        models.add_row(
            row.pipeline,
            row.live_model or "-",
            _count(row.swaps),
            _count(row.versions),
            _percent(row.served_accuracy),
            _percent(row.served_recent),
            _percent(row.accuracy),
            _percent(row.recent_accuracy),
            _latency(row.latency_s),
        )
        loop.add_row(
            row.pipeline,
            _count(row.drift_alerts),
            _count(row.retrains),
            _count(row.shadowed),
            _count(row.promoted),
            _count(row.discarded),
        )
    header = Text(title, style="bold")
    if not view.rows:
        return Group(header, services, Text("no pipeline has reported yet (apply one and produce events)"))
    return Group(header, services, flow, models, loop)


# --- I/O -------------------------------------------------------------------------------------------------


def http_get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # loopback only
        return bytes(resp.read())


def scrape(
    targets: Sequence[Target], fetch: Fetch = http_get, clock: Callable[[], float] = time.monotonic
) -> Scrape:
    """Read every service's /metrics (in parallel, so one hung service costs one timeout, not several)."""

    def one(target: Target) -> ServiceScrape:
        if not target.metrics_port:
            return ServiceScrape(target, None, "no metrics port")
        try:
            body = fetch(f"http://127.0.0.1:{target.metrics_port}/metrics", SCRAPE_TIMEOUT_S)
            return ServiceScrape(target, parse_metrics(body.decode()))
        except _SCRAPE_ERRORS as exc:
            log.debug("scraping %s failed: %s", target.service, exc)
            return ServiceScrape(target, None, _reason(exc))

    def health() -> dict[str, str] | None:
        predictor = next((t for t in targets if t.belongs_to == "predictor" and t.http_port), None)
        if predictor is None:
            return None
        try:
            return live_models_from_health(fetch(f"http://127.0.0.1:{predictor.http_port}/healthz", 0.5))
        except (*_SCRAPE_ERRORS, KeyError, TypeError, AttributeError):
            return None

    with ThreadPoolExecutor(max_workers=len(targets) + 1) as pool:
        live = pool.submit(health)
        services = tuple(pool.map(one, targets))
        return Scrape(clock(), services, live.result())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason  # urllib wraps the socket error
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ValueError):
        return "bad metrics page"
    return type(exc).__name__


def run(
    state: Path = DEFAULT_STATE,
    *,
    duration: float | None = None,
    console: Console | None = None,
    refresh_s: float = 1.0,
    plain_every_s: float = 5.0,
    fetch: Fetch = http_get,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    svg: Path | None = None,
) -> None:
    """Refresh the view until ``duration`` elapses or Ctrl-C (which ends the view, never the stack).

    On a terminal the view redraws in place every ``refresh_s``; otherwise (a pipe, a log) a plain
    snapshot is printed every ``plain_every_s`` so the output stays readable. With ``svg``, the last view
    is also saved as a picture (rich's terminal export), as README's is.
    """
    console = console or Console()
    targets = load_targets(state)  # fail fast, with a hint, when no stack was started
    live_mode = console.is_terminal
    interval = refresh_s if live_mode else plain_every_s
    started = clock()
    previous: Scrape | None = None
    accuracy = RecentAccuracy()

    def frame(current: Scrape) -> RenderableType:
        view = build_view(previous, current, accuracy.update(current))
        up = sum(s.up for s in view.services)
        clock_time = dt.datetime.now().strftime("%H:%M:%S")
        hint = "Ctrl-C ends this view, the stack keeps running" if live_mode else str(state)
        title = f"StreamML top {clock_time}  {up}/{len(view.services)} services up  ({hint})"
        return render(view, title=title, ascii_only=not live_mode)

    def tick() -> Scrape:
        nonlocal targets
        # A restarted stack has new ports; a stopped one (no file) keeps the last targets, shown as down.
        with contextlib.suppress(ValidationError):
            targets = load_targets(state)
        return scrape(targets, fetch, clock)

    last: Scrape | None = None
    try:
        with Live(console=console, auto_refresh=False) if live_mode else contextlib.nullcontext() as live:
            while True:
                current = tick()
                last = current
                if isinstance(live, Live):
                    live.update(frame(current), refresh=True)  # redrawn in place
                else:
                    console.print(frame(current))  # appended: a log keeps every snapshot
                previous = current
                if _finished(started, clock(), duration, interval, sleep):
                    break
    except KeyboardInterrupt:
        log.debug("view ended by Ctrl-C")
    if svg is not None and last is not None:
        picture = Console(record=True, width=112, file=io.StringIO(), force_terminal=True)
        view = build_view(previous if previous is not last else None, last, accuracy.update(last))
        picture.print(render(view, title="StreamML top"))
        picture.save_svg(str(svg), title="streamml top")


def _finished(
    started: float, now: float, duration: float | None, interval: float, sleep: Callable[[float], None]
) -> bool:
    """Sleep until the next refresh; True when the duration is used up (the last frame is already shown)."""
    if duration is not None and now - started >= duration:
        return True
    wait = interval if duration is None else min(interval, started + duration - now)
    sleep(max(wait, 0.0))
    return False
