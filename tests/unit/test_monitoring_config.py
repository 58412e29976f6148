"""The monitoring configs without a running system: promtool checks and rule unit tests, dashboards as code,
every metric a query names is declared, and the local Prometheus helper (streamml.promstack).

The end-to-end counterpart, tests/e2e/test_observability.py, runs every query against real data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import streamml.metrics  # noqa: F401  (registers every StreamML metric in the default registry)
from streamml import promstack
from streamml.promstack import LocalPrometheus, PrometheusError, Query
from streamml.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "streamml.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "streamml_test.yml"
GENERATOR = ROOT / "deploy" / "grafana" / "generate.py"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
SEVERITIES = {"warning", "critical"}
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus not installed (apt-get install prometheus)"
)


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _declared_metric_names() -> set[str]:
    """Sample names of every metric in the default registry: ours and prometheus_client's process metrics."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


# --- promtool ------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_accepts_the_config_rendered_for_a_local_stack(tmp_path: Path) -> None:
    config = promstack.render_config({"features": 9501, "learner": 9502}, 9999, scrape_interval="1s")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = _promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test") or []]
    for alert in _alerts():
        name = alert["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"no test makes {name} fire"
        assert any(not case.get("exp_alerts") for case in mine), f"no test checks {name} stays silent"


# --- the rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alert", _alerts(), ids=lambda rule: rule["alert"])
def test_alert_is_a_query_compared_with_a_threshold(alert: dict[str, Any]) -> None:
    """The e2e test checks the part before the comparison returns data: it must be a whole query."""
    query, comparison = promstack.split_comparison(alert["expr"])
    assert re.fullmatch(r"(==|!=|>=|<=|>|<)\s*-?[0-9.]+", comparison), f"{alert['alert']}: {comparison!r}"
    assert query.count("(") == query.count(")")
    assert alert["labels"]["severity"] in SEVERITIES
    annotations = alert["annotations"]
    assert annotations["summary"] and annotations["description"]
    uids = {json.loads(path.read_text())["uid"] for path in DASHBOARDS}
    assert annotations["dashboard"].removeprefix("/d/") in uids, "the dashboard link points nowhere"


def test_alert_names_follow_one_convention_and_are_unique() -> None:
    names = [alert["alert"] for alert in _alerts()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"StreamML[A-Z][A-Za-z]+", name) for name in names), names
    records = [rule["record"] for rule in _rules() if "record" in rule]
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name) for name in records), records


def test_the_issue_s_alerts_all_exist() -> None:
    exprs = {alert["alert"]: alert["expr"] for alert in _alerts()}
    wanted = {
        "StreamMLNoPredictions": "streamml_events_out_total",
        "StreamMLDeadLetterRateHigh": "streamml_events_dead_lettered_total",
        "StreamMLConsumerLagGrowing": "streamml_consumer_lag_records",
        "StreamMLAccuracyLow": "pipeline:streamml_learner_accuracy:ratio10m",
        "StreamMLDriftDetected": "streamml_drift_alerts_total",
        "StreamMLModelArtifactRejected": "streamml_rejected_artifacts_total",
    }
    for name, metric in wanted.items():
        assert metric in exprs.get(name, ""), f"{name} missing or not based on {metric}"


# --- dashboards ----------------------------------------------------------------------------------


def test_dashboards_are_generated_from_the_code() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_three_dashboards_exist_with_annotations() -> None:
    boards = {path.stem: json.loads(path.read_text()) for path in DASHBOARDS}
    assert set(boards) == {"overview", "models", "drift"}
    notes = {board: {a["name"] for a in boards[board]["annotations"]["list"]} for board in boards}
    assert {"Model swaps", "Promotions and rollbacks"} <= notes["models"]
    assert "Drift alerts" in notes["drift"]


def _queries() -> list[Query]:
    return promstack.dashboard_queries() + promstack.rule_queries()


def test_every_metric_a_query_names_is_declared() -> None:
    declared = _declared_metric_names() | {"up"}  # `up` is written by Prometheus itself
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    unknown = {
        f"{name} ({query.source})"
        for query in _queries()
        for name in query.metric_names()
        if name not in declared | recorded
    }
    assert not unknown, f"not declared in streamml/metrics.py: {sorted(unknown)}"


def test_every_streamml_metric_follows_the_naming_conventions() -> None:
    for family in REGISTRY.collect():
        if not family.name.startswith("streamml_"):
            continue
        if family.type == "counter":
            assert family.name + "_total" in _declared_metric_names()
        if family.type in ("gauge", "histogram"):
            assert not family.name.endswith("_total"), f"{family.name}: _total is for counters"
        if "seconds" in family.name or family.type == "histogram":
            assert re.search(r"_seconds$", family.name), f"{family.name}: the unit ends the name"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_variables_are_defined_and_matched_as_regexes(path: Path) -> None:
    board = json.loads(path.read_text())
    defined = {var["name"] for var in board["templating"]["list"]}
    exprs = [q.expr for q in promstack.dashboard_queries(path.parent) if q.source.startswith(path.name)]
    for expr in exprs:
        assert promstack.variables_in(expr) <= defined | GRAFANA_BUILTINS, expr
        # "All" is `.*` and several values are `(a|b)`: only a regex matcher can take them.
        for op, literal in re.findall(r'(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', expr):
            if promstack.variables_in(literal) - GRAFANA_BUILTINS:
                assert op == "=~", f"{path.name}: {op}{literal!r} needs =~"
    assert all(var["allValue"] == ".*" for var in board["templating"]["list"])


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_have_unique_ids_and_do_not_overlap(path: Path) -> None:
    panels = json.loads(path.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{path.name}: {panel['title']!r} overlaps another panel"
        cells |= area


# --- query helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (pipeline) (rate(streamml_events_in_total{service="features"}[5m]))',
            {"streamml_events_in_total"},
        ),
        ("a / on (pipeline) group_left (model) b offset 15m > bool 1e-9", {"a", "b"}),
        (
            'histogram_quantile(0.9, sum by (le) (rate(x_bucket{le=~"0.1|1"}[$__rate_interval])))',
            {"x_bucket"},
        ),
        (
            "pipeline:streamml_learner_accuracy:ratio10m < 0.7 and up",
            {"pipeline:streamml_learner_accuracy:ratio10m", "up"},
        ),
        ('time() - max(last_seconds{topic=~".*[.]($pipeline)[.]x"})', {"last_seconds"}),
    ],
)
def test_metric_names_finds_selectors_only(expr: str, names: set[str]) -> None:
    assert promstack.metric_names(expr) == names


@pytest.mark.parametrize(
    ("expr", "query", "comparison"),
    [
        ("up == 0", "up", "== 0"),
        ('(a{x="<"} or on (p) 0 * b) < 1', '(a{x="<"} or on (p) 0 * b)', "< 1"),
        ("x / (y >= 100)", "x / (y >= 100)", ""),
        ("sum(x) > on (p) sum(y) > 0.05", "sum(x) > on (p) sum(y)", "> 0.05"),
    ],
)
def test_split_comparison_cuts_at_the_last_top_level_comparison(
    expr: str, query: str, comparison: str
) -> None:
    assert promstack.split_comparison(expr) == (query, comparison)


def test_expand_replaces_every_variable_syntax() -> None:
    expr = 'x{a=~"$pipeline", b=~"${service}", c=~"${pipeline:regex}", d=~"[[pipeline]]"}[$__range]'
    assert promstack.variables_in(expr) == {"pipeline", "service", "__range"}
    assert promstack.expand(expr, {"pipeline": "p", "service": ".*", "__range": "5m"}) == (
        'x{a=~"p", b=~".*", c=~"p", d=~"p"}[5m]'
    )
    with pytest.raises(KeyError):
        promstack.expand(expr, {"pipeline": "p"})


def test_alert_and_annotation_queries_drop_their_threshold_for_the_data_check() -> None:
    assert Query("s", "up == 0", "alert").data_expr() == "up"
    assert Query("s", "sum(x) > 0", "annotation").data_expr() == "sum(x)"
    assert Query("s", "x / (y >= 100)", "record").data_expr() == "x / (y >= 100)"
    assert Query("s", "sum(x) > 0", "panel").data_expr() == "sum(x) > 0"


def test_dashboard_variables_must_be_label_values(tmp_path: Path) -> None:
    board = {"templating": {"list": [{"type": "query", "name": "v", "query": {"query": "query_result(up)"}}]}}
    (tmp_path / "d.json").write_text(json.dumps(board))
    with pytest.raises(PrometheusError, match="not label_values"):
        promstack.dashboard_variables(tmp_path)


# --- local Prometheus ----------------------------------------------------------------------------


def test_render_config_points_the_streamml_job_at_the_stack() -> None:
    config = promstack.render_config({"predictor": 9503, "features": 9501}, 19090, scrape_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["streamml"]["static_configs"] == [
        {"targets": ["127.0.0.1:9501"], "labels": {"component": "features"}},
        {"targets": ["127.0.0.1:9503"], "labels": {"component": "predictor"}},
    ]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:19090"]}]
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "1s"
    assert config["rule_files"] == [str(PROMETHEUS_DIR / "rules" / "*.yml")]


def test_render_config_needs_the_streamml_job(tmp_path: Path) -> None:
    template = tmp_path / "p.yml"
    template.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "other"}]}))
    with pytest.raises(PrometheusError, match="no scrape job named 'streamml'"):
        promstack.render_config({}, 9090, template=template)


def test_stack_targets_reads_the_stack_state_file(tmp_path: Path) -> None:
    state = tmp_path / "stack.json"
    with pytest.raises(PrometheusError, match="make demo"):
        promstack.stack_targets(state)
    state.write_text(json.dumps({"services": {"learner": {"metrics_port": 9502, "pid": 1}}}))
    assert promstack.stack_targets(state) == {"learner": 9502}
    state.write_text("{")
    with pytest.raises(PrometheusError, match="not a readable"):
        promstack.stack_targets(state)


@pytest.fixture
def local_prometheus(tmp_path: Path) -> Iterator[LocalPrometheus]:
    server = LocalPrometheus(tmp_path / "prom", free_port())
    yield server
    server.stop()


@needs_prometheus
def test_local_prometheus_starts_answers_queries_and_stops(local_prometheus: LocalPrometheus) -> None:
    url = local_prometheus.start({}, scrape_interval="1s", die_with_parent=True)
    assert url == f"http://127.0.0.1:{local_prometheus.port}" and local_prometheus.ready()
    assert local_prometheus.query("vector(7)")[0]["value"][1] == "7"
    assert not local_prometheus.has_finite_sample("vector(0) / 0")  # NaN is no data
    with pytest.raises(PrometheusError, match="parse error"):
        local_prometheus.query("sum(")
    rules = {r["name"] for g in local_prometheus.api("rules")["groups"] for r in g["rules"]}
    assert rules == {rule.get("alert", rule.get("record")) for rule in _rules()}
    local_prometheus.save()
    assert promstack.running(local_prometheus.home) is not None
    assert promstack.stop_saved(local_prometheus.home) == local_prometheus.proc.pid  # type: ignore[union-attr]
    assert not local_prometheus.ready() and promstack.running(local_prometheus.home) is None


def test_stop_saved_never_kills_a_process_that_is_not_its_prometheus(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"pid": os.getpid(), "port": 1, "url": "x"}))
    assert promstack.stop_saved(tmp_path) is None  # our own pid: not a Prometheus with that config
    assert not (tmp_path / "state.json").exists()
