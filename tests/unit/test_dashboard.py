"""Unit tests for streamml.dashboard: metrics parsing, rates and rendering from canned /metrics pages."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from streamml.dashboard import (
    AccuracyPoint,
    RecentAccuracy,
    Scrape,
    ServiceScrape,
    StageFigures,
    Target,
    build_view,
    counter_rate,
    interval_accuracy,
    live_models_from_health,
    load_targets,
    parse_metrics,
    render,
    run,
    scrape,
)
from streamml.errors import ValidationError

FEATURES = Target("features", 101, 9101, 8101)
LEARNER = Target("learner", 102, 9102, 8102)
PREDICTOR = Target("predictor", 103, 9103, 8103)
TARGETS = (FEATURES, LEARNER, PREDICTOR)


def features_page(raw_in: float, dead: float = 0, other_in: float = 0) -> str:
    """A features /metrics page as prometheus_client writes it (HELP/TYPE lines, _created samples)."""
    text = f"""# HELP streamml_events_in_total Records consumed.
# TYPE streamml_events_in_total counter
streamml_events_in_total{{pipeline="agrawal",service="features",topic="streamml.agrawal.raw"}} {raw_in}
streamml_events_in_total{{pipeline="other",service="features",topic="streamml.other.raw"}} {other_in}
streamml_events_in_created{{pipeline="agrawal",service="features",topic="streamml.agrawal.raw"}} 1.7e+09
# HELP streamml_batch_processing_seconds Time to process one consumed batch.
# TYPE streamml_batch_processing_seconds histogram
streamml_batch_processing_seconds_bucket{{le="0.001",service="features"}} 3.0
streamml_batch_processing_seconds_bucket{{le="+Inf",service="features"}} 5.0
streamml_batch_processing_seconds_count{{service="features"}} 5.0
streamml_batch_processing_seconds_sum{{service="features"}} 0.01
"""
    if dead:
        text += f"""# HELP streamml_events_dead_lettered_total Records sent to a dead-letter topic.
# TYPE streamml_events_dead_lettered_total counter
streamml_events_dead_lettered_total{{pipeline="agrawal",reason="DecodeError",service="features"}} {dead}
"""
    return text


def learner_page(feats: float, labels_in: float, versions: float, accuracy: float, seen: float) -> str:
    return f"""# HELP streamml_events_in_total Records consumed.
# TYPE streamml_events_in_total counter
streamml_events_in_total{{pipeline="agrawal",service="learner",topic="streamml.agrawal.features"}} {feats}
streamml_events_in_total{{pipeline="agrawal",service="learner",topic="streamml.agrawal.labels"}} {labels_in}
# HELP streamml_model_versions_published_total Model versions published.
# TYPE streamml_model_versions_published_total counter
streamml_model_versions_published_total{{model="online",pipeline="agrawal"}} {versions}
# HELP streamml_learner_metric Prequential metric of the online learner.
# TYPE streamml_learner_metric gauge
streamml_learner_metric{{metric="accuracy",pipeline="agrawal"}} {accuracy}
streamml_learner_metric{{metric="log_loss",pipeline="agrawal"}} 0.4
streamml_learner_metric{{metric="events_seen",pipeline="agrawal"}} {seen}
"""


def predictor_page(out: float, latency_sum: float, latency_count: float, dead: float = 0) -> str:
    return f"""# HELP streamml_events_out_total Records produced.
# TYPE streamml_events_out_total counter
streamml_events_out_total{{pipeline="agrawal",service="predictor",topic="streamml.agrawal.predictions"}} {out}
# HELP streamml_events_dead_lettered_total Records sent to a dead-letter topic.
# TYPE streamml_events_dead_lettered_total counter
streamml_events_dead_lettered_total{{pipeline="",reason="DecodeError",service="predictor"}} {dead}
streamml_events_dead_lettered_total{{pipeline="agrawal",reason="StreamMLError",service="predictor"}} 2.0
# HELP streamml_end_to_end_latency_seconds Event time to prediction time.
# TYPE streamml_end_to_end_latency_seconds histogram
streamml_end_to_end_latency_seconds_bucket{{le="+Inf",pipeline="agrawal"}} {latency_count}
streamml_end_to_end_latency_seconds_count{{pipeline="agrawal"}} {latency_count}
streamml_end_to_end_latency_seconds_sum{{pipeline="agrawal"}} {latency_sum}
# HELP streamml_live_model_version Version serving predictions.
# TYPE streamml_live_model_version gauge
streamml_live_model_version{{model="online",pipeline="agrawal"}} 7.0
# HELP streamml_model_swaps_total Live model changes in the predictor.
# TYPE streamml_model_swaps_total counter
streamml_model_swaps_total{{model="online",pipeline="agrawal"}} 7.0
"""


def snapshot(at: float, features: str | None, learner: str | None, predictor: str | None) -> Scrape:
    pages = (features, learner, predictor)
    return Scrape(
        at,
        tuple(
            ServiceScrape(t, None if p is None else parse_metrics(p), "" if p else "refused")
            for t, p in zip(TARGETS, pages, strict=True)
        ),
    )


def captured(force_terminal: bool | None = None) -> tuple[Console, io.StringIO]:
    """A console writing into a buffer (not a terminal unless force_terminal=True)."""
    buffer = io.StringIO()
    return Console(file=buffer, width=120, color_system=None, force_terminal=force_terminal), buffer


def plain(renderable: object) -> str:
    console, buffer = captured()
    console.print(renderable)
    return buffer.getvalue()


FIRST = snapshot(
    10.0,
    features_page(1000, dead=1),
    learner_page(990, 5, versions=3, accuracy=0.9, seen=990),
    predictor_page(980, latency_sum=50.0, latency_count=980),
)
SECOND = snapshot(
    12.0,
    features_page(1400, dead=4, other_in=30),
    learner_page(1380, 15, versions=4, accuracy=0.85, seen=1380),
    predictor_page(1380, latency_sum=90.0, latency_count=1380, dead=1),
)


# --- parsing ----------------------------------------------------------------------------------------------


def test_parse_metrics_keeps_sample_names_labels_and_values() -> None:
    samples = parse_metrics(features_page(1234.0))
    by_name = {(s.name, s.labels.get("pipeline")): s for s in samples}
    raw = by_name[("streamml_events_in_total", "agrawal")]
    assert raw.value == 1234.0
    assert raw.labels == {"pipeline": "agrawal", "service": "features", "topic": "streamml.agrawal.raw"}
    assert ("streamml_events_in_created", "agrawal") in by_name  # counters' _created series are kept apart
    assert any(s.name == "streamml_batch_processing_seconds_bucket" for s in samples)


def test_parse_metrics_rejects_a_page_that_is_not_prometheus_text() -> None:
    with pytest.raises(ValueError):
        parse_metrics("<html><body>Not Found</body></html>\n")


def test_live_models_from_health() -> None:
    body = json.dumps({"status": "ok", "live": {"agrawal": {"model": "online", "version": 12}}}).encode()
    assert live_models_from_health(body) == {"agrawal": "online v12"}


# --- rates ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "current", "seconds", "expected"),
    [
        (100.0, 300.0, 2.0, 100.0),
        (100.0, 100.0, 1.0, 0.0),
        (500.0, 40.0, 2.0, 20.0),  # the service restarted: its counter began again from zero
        (None, 300.0, 2.0, None),  # first scrape
        (100.0, None, 2.0, None),  # service down now
        (100.0, 300.0, 0.0, None),
        (100.0, 300.0, None, None),
    ],
)
def test_counter_rate(
    previous: float | None, current: float | None, seconds: float | None, expected: float | None
) -> None:
    assert counter_rate(previous, current, seconds) == expected


def test_first_scrape_has_totals_but_no_rates() -> None:
    view = build_view(None, FIRST)
    assert view.interval_s is None
    row = {r.pipeline: r for r in view.rows}["agrawal"]
    assert row.stages["features in"].total == 1000
    assert row.stages["learner in"].total == 995  # features and labels topics together
    assert row.stages["predictions out"].total == 980
    assert all(f.rate is None for f in row.stages.values())
    assert row.latency_s is None


def test_second_scrape_rates_per_stage_from_counter_deltas() -> None:
    view = build_view(FIRST, SECOND)
    assert view.interval_s == 2.0
    rows = {r.pipeline: r for r in view.rows}
    agrawal = rows["agrawal"]
    assert agrawal.stages["features in"].rate == 200.0  # (1400 - 1000) / 2 s
    assert agrawal.stages["learner in"].rate == 200.0  # (1395 - 995) / 2 s
    assert agrawal.stages["predictions out"].rate == 200.0
    assert agrawal.latency_s == pytest.approx(40.0 / 400)  # only the 400 predictions of this interval
    assert rows["other"].stages["features in"].rate == 15.0
    assert rows["other"].stages["predictions out"].total == 0  # up, but nothing predicted yet


def test_dead_letters_are_summed_over_services_per_pipeline() -> None:
    first = {r.pipeline: r for r in build_view(None, FIRST).rows}
    assert first["agrawal"].dead_lettered.total == 1 + 2
    assert "" not in first  # pipeline="" (records nobody could read) is shown only once it has dead letters
    second = {r.pipeline: r for r in build_view(FIRST, SECOND).rows}
    assert second["agrawal"].dead_lettered.total == 4 + 2
    assert second["agrawal"].dead_lettered.rate == 1.5
    assert second[""].dead_lettered.total == 1
    assert [r.pipeline for r in build_view(FIRST, SECOND).rows] == ["agrawal", "other", ""]


def test_model_columns() -> None:
    row = {r.pipeline: r for r in build_view(FIRST, SECOND).rows}["agrawal"]
    assert (row.live_model, row.swaps, row.versions, row.accuracy) == ("online v7", 7, 4, 0.85)


def test_live_model_prefers_the_predictors_own_answer_over_gauges() -> None:
    with_health = Scrape(SECOND.at, SECOND.services, {"agrawal": "batch v2"})
    rows = {r.pipeline: r for r in build_view(None, with_health).rows}
    assert rows["agrawal"].live_model == "batch v2"
    assert rows["other"].live_model == "none yet"  # the predictor is up but serves nothing for it
    down = {r.pipeline: r for r in build_view(None, snapshot(1.0, features_page(1), None, None)).rows}
    assert down["agrawal"].live_model is None  # predictor down: unknown, not "none"


def test_a_down_service_shows_no_figures_and_never_breaks_the_view() -> None:
    down = snapshot(13.0, features_page(1500), None, predictor_page(1390, 91.0, 1390))
    row = {r.pipeline: r for r in build_view(SECOND, down).rows}["agrawal"]
    assert row.stages["learner in"] == StageFigures(None, None)
    assert row.accuracy is None and row.versions is None
    assert row.stages["features in"].rate == 100.0
    out = plain(render(build_view(SECOND, down), ascii_only=True))
    assert "learner   | down (refused)" in out

    all_down = snapshot(14.0, None, None, None)
    view = build_view(down, all_down)
    assert view.rows == ()
    assert "no pipeline has reported yet" in plain(render(view))


# --- recent accuracy ----------------------------------------------------------------------------------------


def test_interval_accuracy_isolates_the_events_between_two_readings() -> None:
    # 900 of the first 1000 right, then 300 of the next 1000: cumulative 60%, but recently only 30%.
    assert interval_accuracy(AccuracyPoint(1000, 0.9), AccuracyPoint(2000, 0.6)) == pytest.approx(0.3)
    assert interval_accuracy(AccuracyPoint(1000, 0.9), AccuracyPoint(1000, 0.9)) is None


def test_recent_accuracy_remembers_the_last_two_distinct_readings() -> None:
    def learner_only(at: float, accuracy: float, seen: float) -> Scrape:
        return snapshot(at, None, learner_page(seen, 0, 1, accuracy, seen), None)

    tracker = RecentAccuracy()
    assert tracker.update(learner_only(1, 0.9, 1000)) == {}
    assert tracker.update(learner_only(2, 0.9, 1000)) == {}  # unchanged gauge: still one reading
    assert tracker.update(learner_only(3, 0.6, 2000)) == pytest.approx({"agrawal": 0.3})
    assert tracker.update(learner_only(4, 0.6, 2000)) == pytest.approx({"agrawal": 0.3})  # kept
    assert tracker.update(learner_only(5, 0.7, 3000)) == pytest.approx({"agrawal": 0.9})
    assert tracker.update(learner_only(6, 0.5, 100)) == {}  # learner restarted from scratch


# --- rendering --------------------------------------------------------------------------------------------


def test_render_shows_rates_totals_and_models() -> None:
    view = build_view(FIRST, SECOND, {"agrawal": 0.7})
    out = plain(render(view, title="StreamML top", ascii_only=True))
    assert out.startswith("StreamML top")
    flow = [
        "| agrawal       | features in     |      200 | 1,400 |",
        "|               | learner in      |      200 | 1,395 |",
        "|               | predictions out |      200 | 1,380 |",
        "|               | dead-lettered   |      1.5 |     6 |",
        "|---------------+-----------------+----------+-------|",
        "| other         | features in     |       15 |    30 |",
    ]
    assert "\n".join(flow) in out
    assert "| (no pipeline) | dead-lettered   |      0.5 |     1 |" in out
    models = [  # served: no monitor in this scrape; learner: prequential, overall and recent
        "| agrawal  | online v7  |     7 |        4 |      - |             - |   85.0% |          70.0% "
        "|  100 ms |",
        "| other    | none yet   |     0 |        0 |      - |             - |       - |              - "
        "|       - |",
    ]
    assert all(row in out for row in models), out
    assert "| features  | up     | 101 | 127.0.0.1:9101 |" in out


# --- state file and scraping ------------------------------------------------------------------------------


def write_state(path: Path, targets: tuple[Target, ...] = TARGETS) -> Path:
    services = {
        t.service: {"pid": t.pid, "metrics_port": t.metrics_port, "http_port": t.http_port, "log": "x.log"}
        for t in targets
    }
    path.write_text(json.dumps({"env": {}, "services": services}))
    return path


def test_load_targets(tmp_path: Path) -> None:
    assert load_targets(write_state(tmp_path / "stack.json")) == TARGETS
    with pytest.raises(ValidationError, match=r"no stack state file; start the services with `make demo`"):
        load_targets(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"services": [1, 2]}')
    with pytest.raises(ValidationError, match="not a readable stack state file"):
        load_targets(tmp_path / "bad.json")


def fake_fetch(pages: dict[int, str | Exception]) -> Callable[[str, float], bytes]:
    def fetch(url: str, _timeout: float) -> bytes:
        port = int(url.split(":")[2].split("/")[0])
        page = pages.get(port, ConnectionRefusedError())
        if isinstance(page, Exception):
            raise page
        return page.encode()

    return fetch


def test_scrape_marks_services_that_fail_as_down() -> None:
    fetch = fake_fetch(
        {
            9101: features_page(10),
            9102: "this is not a metrics page {{{",
            9103: TimeoutError(),
            8103: json.dumps({"live": {"agrawal": {"model": "online", "version": 3}}}),
        }
    )
    result = scrape(TARGETS, fetch, clock=lambda: 42.0)
    assert result.at == 42.0
    assert [(s.target.service, s.up, s.error) for s in result.services] == [
        ("features", True, ""),
        ("learner", False, "bad metrics page"),
        ("predictor", False, "timeout"),
    ]
    assert result.live == {"agrawal": "online v3"}
    assert scrape(TARGETS, fake_fetch({})).live is None  # predictor down: no health answer either


class FakeClock:
    """Time that only moves when the dashboard sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def counting_pages() -> Callable[[str, float], bytes]:
    """Each scrape of the features service sees 500 more events."""
    counts: Iterator[int] = iter(range(0, 10**6, 500))

    def fetch(url: str, timeout: float) -> bytes:
        if ":9101/" in url:
            return features_page(next(counts)).encode()
        raise ConnectionRefusedError

    return fetch


def test_run_prints_plain_snapshots_until_the_duration(tmp_path: Path) -> None:
    state = write_state(tmp_path / "stack.json")
    console, buffer = captured()
    assert not console.is_terminal
    clock = FakeClock()
    run(state, duration=12, console=console, fetch=counting_pages(), clock=clock, sleep=clock.sleep)
    out = buffer.getvalue()
    assert clock.sleeps == [5.0, 5.0, 2.0]  # a snapshot every 5 s, the last one at the end
    assert out.count("StreamML top") == 4
    assert "1/3 services up" in out and "down (refused)" in out
    assert "| agrawal  | features in     |        - |     0 |" in out  # first snapshot: no rate yet
    assert "| agrawal  | features in     |      100 |   500 |" in out  # 500 events in 5 s
    assert "| agrawal  | features in     |      250 | 1,500 |" in out  # 500 events in the last 2 s


def test_run_saves_the_last_view_as_a_picture(tmp_path: Path) -> None:
    state = write_state(tmp_path / "stack.json")
    console, _ = captured()
    clock = FakeClock()
    picture = tmp_path / "top.svg"
    run(
        state,
        duration=6,
        console=console,
        fetch=counting_pages(),
        clock=clock,
        sleep=clock.sleep,
        svg=picture,
    )
    svg = picture.read_text()
    assert svg.startswith("<svg") and "StreamML" in svg and "features" in svg


def test_run_ends_quietly_on_ctrl_c(tmp_path: Path) -> None:
    state = write_state(tmp_path / "stack.json")
    console, buffer = captured()

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    run(state, console=console, fetch=counting_pages(), sleep=interrupted)
    assert buffer.getvalue().count("StreamML top") == 1


def test_run_redraws_in_place_on_a_terminal(tmp_path: Path) -> None:
    state = write_state(tmp_path / "stack.json")
    console, buffer = captured(force_terminal=True)
    clock = FakeClock()
    run(state, duration=3, console=console, fetch=counting_pages(), clock=clock, sleep=clock.sleep)
    assert clock.sleeps == [1.0, 1.0, 1.0]  # refreshed every second
    out = buffer.getvalue()
    assert "\x1b[" in out  # cursor movements: the frame is redrawn, not appended
    assert "Ctrl-C ends this view" in out


def test_run_without_a_stack_fails_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no stack state file"):
        run(tmp_path / "none.json", duration=1, console=Console(file=io.StringIO()))


# --- the CLI command ----------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_streamml_top_shows_a_stopped_stack_as_down(tmp_path: Path) -> None:
    port = closed_port()  # nothing listens there once the socket is closed: every scrape is refused
    state = write_state(tmp_path / "stack.json", (Target("features", None, port, None),))
    done = subprocess.run(
        [sys.executable, "-m", "streamml.cli", "top", "--state", str(state), "--duration", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "0/1 services up" in done.stdout and "down (refused)" in done.stdout


def test_streamml_top_without_a_stack_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamml.cli", "top", "--state", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no stack state file" in done.stderr


def test_closed_loop_columns_from_monitor_and_controller() -> None:
    monitor = Target("monitor", 104, 9104, None)
    controller = Target("controller", 106, 9106, None)
    monitor_page = (
        "# TYPE streamml_drift_alerts_total counter\n"
        'streamml_drift_alerts_total{detector="river.drift.ADWIN",kind="CONCEPT",pipeline="agrawal"} 2.0\n'
        'streamml_drift_alerts_total{detector="ks",kind="DATA",pipeline="agrawal"} 1.0\n'
    )
    controller_page = (
        "# TYPE streamml_training_requests_total counter\n"
        'streamml_training_requests_total{pipeline="agrawal",requested_by="controller"} 1.0\n'
        "# TYPE streamml_controller_decisions_total counter\n"
        'streamml_controller_decisions_total{action="SHADOW",pipeline="agrawal"} 1.0\n'
        'streamml_controller_decisions_total{action="PROMOTE",pipeline="agrawal"} 1.0\n'
    )
    scrape = Scrape(
        SECOND.at,
        (
            *SECOND.services,
            ServiceScrape(monitor, parse_metrics(monitor_page)),
            ServiceScrape(controller, parse_metrics(controller_page)),
        ),
    )
    [row] = [r for r in build_view(FIRST, scrape).rows if r.pipeline == "agrawal"]
    assert (row.drift_alerts, row.retrains, row.shadowed, row.promoted) == (3.0, 1.0, 1.0, 1.0)
    assert row.discarded == 0  # the controller runs but has discarded nothing yet
    assert "drift alerts" in plain(render(build_view(FIRST, scrape)))
    # without the loop services the columns show as unknown, not zero
    [without] = [r for r in build_view(FIRST, SECOND).rows if r.pipeline == "agrawal"]
    assert without.drift_alerts is None and without.promoted is None


# --- several instances of a service -----------------------------------------------------------------

LEARNER_1 = Target("learner-1", 112, 9112, 8112)
PREDICTOR_1 = Target("predictor-1", 113, 9113, 8113)


def slots_page(service: str, owned: int, configured: int = 6) -> str:
    return (
        "# TYPE streamml_writer_slots gauge\n"
        f'streamml_writer_slots{{service="{service}"}} {owned}\n'
        "# TYPE streamml_writer_slots_configured gauge\n"
        f'streamml_writer_slots_configured{{service="{service}"}} {configured}\n'
    )


def instances(at: float, learner_1: str | None, predictor_1: str | None, base: Scrape) -> Scrape:
    """`base` (features, learner, predictor) plus a second learner and predictor instance."""
    extra = (
        ServiceScrape(LEARNER_1, None if learner_1 is None else parse_metrics(learner_1), "refused"),
        ServiceScrape(PREDICTOR_1, None if predictor_1 is None else parse_metrics(predictor_1), "refused"),
    )
    return Scrape(at, (*base.services, *extra))


def test_instance_labels_belong_to_their_service(tmp_path: Path) -> None:
    assert (LEARNER_1.belongs_to, LEARNER.belongs_to, Target("x-y", 1, 2, 3).belongs_to) == (
        "learner",
        "learner",
        "x-y",
    )
    state = tmp_path / "stack.json"
    services = {
        "learner": {"service": "learner", "instance": 0, "pid": 102, "metrics_port": 9102, "http_port": 8102},
        "learner-1": {
            "service": "learner",
            "instance": 1,
            "pid": 112,
            "metrics_port": 9112,
            "http_port": 8112,
        },
        "predictor-1": {"pid": 113, "metrics_port": 9113, "http_port": 8113},  # an older file: no "service"
    }
    state.write_text(json.dumps({"env": {}, "services": services}))
    assert load_targets(state) == (LEARNER, LEARNER_1, PREDICTOR_1)
    assert [t.belongs_to for t in load_targets(state)] == ["learner", "learner", "predictor"]


def test_counters_are_summed_over_the_instances_of_a_service() -> None:
    # learner-1 wrote for agrawal before a hand-over: its counts add to learner's
    first = instances(
        10.0,
        learner_page(500, 10, versions=2, accuracy=0.7, seen=400) + slots_page("learner", 2),
        predictor_page(20, latency_sum=10.0, latency_count=20),
        FIRST,
    )
    second = instances(
        12.0,
        learner_page(700, 12, versions=3, accuracy=0.7, seen=400) + slots_page("learner", 2),
        predictor_page(420, latency_sum=30.0, latency_count=420),
        SECOND,
    )
    row = {r.pipeline: r for r in build_view(first, second).rows}["agrawal"]
    assert row.stages["learner in"] == StageFigures(1380 + 15 + 700 + 12, (1395 - 995 + 712 - 510) / 2)
    assert row.stages["predictions out"] == StageFigures(1380 + 420, (400 + 400) / 2)
    assert row.versions == 4 + 3 and row.swaps == 7 + 7
    assert row.latency_s == pytest.approx((40.0 + 20.0) / (400 + 400))  # over both predictors' predictions
    assert row.dead_lettered.total == 4 + 2 + 2  # predictor-1 dead-letters too
    # the learner that has learned the most gives the accuracy (a ratio is not summed; learner-1 is stale)
    assert row.accuracy == 0.85
    assert row.live_model == "online v7"  # both predictors serve it: named once

    out = plain(render(build_view(first, second), ascii_only=True))
    assert "| learner-1   | up     | 112 | 127.0.0.1:9112 |          2/6 |" in out
    assert "| predictor-1 | up     | 113 | 127.0.0.1:9113 |            - |" in out


def test_an_instance_that_stops_answering_does_not_turn_the_rates_negative() -> None:
    learner_1 = learner_page(700, 0, versions=3, accuracy=0.9, seen=5000)
    first = instances(10.0, learner_1, None, FIRST)
    second = instances(12.0, None, None, SECOND)  # learner-1 is down now
    row = {r.pipeline: r for r in build_view(first, second).rows}["agrawal"]
    # what the instances still answering counted, and only their rates (no "reset" of the summed counter)
    assert row.stages["learner in"] == StageFigures(1380 + 15, (1395 - 995) / 2)
    assert row.accuracy == 0.85
    # the other way round: a new instance's count is in the total, its rate from the next scrape on
    back = instances(14.0, learner_page(800, 0, versions=3, accuracy=0.9, seen=5100), None, SECOND)
    assert {r.pipeline: r for r in build_view(second, back).rows}["agrawal"].stages["learner in"] == (
        StageFigures(1380 + 15 + 800, 0.0)
    )
    # and the learner that has learned the most now is learner-1: its accuracy is shown
    assert {r.pipeline: r for r in build_view(second, back).rows}["agrawal"].accuracy == 0.9


def _monitor_page(version: int, labelled: float, overall: float, recent: float) -> str:
    labels = f'model="online",pipeline="agrawal",version="{version}"'
    return (
        "# TYPE streamml_model_metric gauge\n"
        f'streamml_model_metric{{{labels},metric="accuracy",window="all"}} {overall}\n'
        f'streamml_model_metric{{{labels},metric="accuracy",window="rolling"}} {recent}\n'
        f'streamml_model_metric{{{labels},metric="labelled",window="all"}} {labelled}\n'
    )


def test_served_accuracy_of_the_live_version_comes_from_the_monitor_that_joined_the_most() -> None:
    """Issue 12: what the served model achieves (the monitor, per live version) next to the learner's
    prequential accuracy; a monitor instance that handed the pipeline over keeps stale figures."""
    monitor, monitor_1 = Target("monitor", 104, 9104, None), Target("monitor-1", 114, 9114, None)
    pages = {
        monitor: _monitor_page(7, 300, 0.70, 0.60) + _monitor_page(6, 9000, 0.99, 0.99),
        monitor_1: _monitor_page(7, 1200, 0.977, 0.95),
    }
    extra = tuple(ServiceScrape(t, parse_metrics(p), "") for t, p in pages.items())
    scrape = Scrape(SECOND.at, SECOND.services + extra)
    row = {r.pipeline: r for r in build_view(FIRST, scrape).rows}["agrawal"]
    assert row.live_model == "online v7"
    assert (row.served_accuracy, row.served_recent, row.accuracy) == (0.977, 0.95, 0.85)
    out = plain(render(build_view(FIRST, scrape), ascii_only=True))
    assert "served recent" in out and "97.7%" in out and "85.0%" in out
    no_monitor = {r.pipeline: r for r in build_view(FIRST, SECOND).rows}["agrawal"]
    assert no_monitor.served_accuracy is None
