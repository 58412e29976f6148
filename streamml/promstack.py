"""A local Prometheus (Debian's `prometheus` binary) scraping a running StreamML stack.

Used by `make demo` and the observability e2e test: the config is rendered from
deploy/prometheus/prometheus.local.yml with the stack's real metrics ports, so both load exactly the
repo's scrape settings and rules. Prometheus listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamml.errors import StreamMLError
from streamml.localkafka import die_with_parent_prefix, port_is_free
from streamml.stack import REPO_ROOT, free_port

log = logging.getLogger(__name__)

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
LOCAL_CONFIG = PROMETHEUS_DIR / "prometheus.local.yml"
DEFAULT_HOME = REPO_ROOT / ".local" / "prometheus"
DEFAULT_STACK_STATE = REPO_ROOT / ".local" / "stack.json"
STATE_FILE = "state.json"
STREAMML_JOB = "streamml"
SELF_JOB = "prometheus"
DEFAULT_PORT = 9090
HOST = "127.0.0.1"


class PrometheusError(StreamMLError):
    """Prometheus is missing, did not start, or rejected a query."""


# --- the repo's queries: Grafana dashboards and Prometheus rules ---------------------------------------

DASHBOARDS_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"
RULES_DIR = PROMETHEUS_DIR / "rules"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{[^}]*\}")
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2", "start", "end"})
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label lists, ranges and functions left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    return {
        match.group()
        for match in _IDENTIFIER.finditer(text)
        if match.group() not in _KEYWORDS and not text[match.end() :].lstrip().startswith("(")
    }


def variables_in(expr: str) -> set[str]:
    """Grafana variables an expression uses ($name, ${name}, ${name:format}, [[name]])."""
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr)}


def expand(expr: str, values: Mapping[str, str]) -> str:
    """The expression with Grafana variables replaced (KeyError for a variable without a value)."""
    return _VARIABLE.sub(lambda m: values[next(g for g in m.groups() if g)], expr)


def split_comparison(expr: str) -> tuple[str, str]:
    """(query, "op threshold") at the last comparison outside brackets and strings; ("expr", "") if none."""
    depth, quote, last, i = 0, "", None, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := _COMPARISON.match(expr, i)):
            last = i
            i = match.end()
            continue
        i += 1
    if last is None:
        return expr.strip(), ""
    return expr[:last].strip(), expr[last:].strip()


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard or rule file, with where it comes from (for messages)."""

    source: str
    expr: str
    kind: str  # "panel", "annotation", "alert" or "record"
    name: str = ""

    def metric_names(self) -> set[str]:
        return metric_names(self.expr)

    def uses_variables(self) -> bool:
        return bool(variables_in(self.expr))

    def expanded(self, values: Mapping[str, str]) -> str:
        return expand(self.expr, values)

    def data_expr(self, expr: str | None = None) -> str:
        """What returns data whenever the system runs: alerts and annotations without their threshold."""
        expr = self.expr if expr is None else expr
        return split_comparison(expr)[0] if self.kind in ("alert", "annotation") else expr


@dataclass(frozen=True)
class DashboardVariable:
    """A `label_values(metric, label)` template variable."""

    source: str
    name: str
    metric: str
    label: str


def _panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels") or []:
        found.append(panel)
        found.extend(panel.get("panels") or [])  # panels folded inside a collapsed row
    return found


def _dashboards(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, json.loads(path.read_text(encoding="utf-8"))) for path in sorted(directory.glob("*.json"))
    ]


def dashboard_queries(directory: Path = DASHBOARDS_DIR) -> list[Query]:
    """Every panel target and annotation query of the dashboards."""
    queries: list[Query] = []
    for file, board in _dashboards(directory):
        for panel in _panels(board):
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    source = f"{file} panel {panel.get('title')!r} ({target.get('refId', '?')})"
                    queries.append(Query(source, target["expr"], "panel"))
        for note in (board.get("annotations") or {}).get("list") or []:
            if note.get("expr"):
                queries.append(Query(f"{file} annotation {note.get('name')!r}", note["expr"], "annotation"))
    return queries


def dashboard_variables(directory: Path = DASHBOARDS_DIR) -> list[DashboardVariable]:
    """The query variables of the dashboards (all of them must be `label_values(metric, label)`)."""
    found: list[DashboardVariable] = []
    for file, board in _dashboards(directory):
        for var in (board.get("templating") or {}).get("list") or []:
            if var.get("type") != "query":
                continue
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            match = _LABEL_VALUES.match(text)
            if match is None:
                raise PrometheusError(
                    f"{file}: variable {var.get('name')!r} is not label_values(...): {text!r}"
                )
            found.append(DashboardVariable(f"{file} variable ${var['name']}", var["name"], *match.groups()))
    return found


def rule_queries(directory: Path = RULES_DIR) -> list[Query]:
    """Every alerting and recording rule of the rule files."""
    queries: list[Query] = []
    for path in sorted(directory.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                kind, name = ("alert", rule["alert"]) if "alert" in rule else ("record", rule["record"])
                source = f"{path.name} {kind} {name}"
                queries.append(Query(source, " ".join(str(rule["expr"]).split()), kind, name))
    return queries


def render_config(
    targets: Mapping[str, int],
    listen_port: int,
    *,
    scrape_interval: str | None = None,
    template: Path = LOCAL_CONFIG,
) -> dict[str, Any]:
    """The local config with the StreamML job scraping `targets` (component -> metrics port).

    Rule file patterns become absolute, so the rendered file may live anywhere (a tmp dir, .local/).
    """
    config: dict[str, Any] = yaml.safe_load(template.read_text(encoding="utf-8"))
    if scrape_interval is not None:
        config.setdefault("global", {})
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str((template.parent / p).resolve()) for p in config.get("rule_files") or []]
    jobs = {job["job_name"]: job for job in config.get("scrape_configs") or []}
    if STREAMML_JOB not in jobs:
        raise PrometheusError(f"{template} has no scrape job named {STREAMML_JOB!r}")
    jobs[STREAMML_JOB]["static_configs"] = [
        {"targets": [f"{HOST}:{port}"], "labels": {"component": name}}
        for name, port in sorted(targets.items())
    ]
    if SELF_JOB in jobs:
        jobs[SELF_JOB]["static_configs"] = [{"targets": [f"{HOST}:{listen_port}"]}]
    return config


def stack_targets(stack_state: Path) -> dict[str, int]:
    """component -> metrics port of the stack recorded by `python -m streamml.stack up`."""
    try:
        services = json.loads(stack_state.read_text())["services"]
        return {
            str(name): int(info["metrics_port"]) for name, info in services.items() if info["metrics_port"]
        }
    except FileNotFoundError as exc:
        raise PrometheusError(f"{stack_state}: no running stack (start it with `make demo`)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrometheusError(f"{stack_state}: not a readable stack state file ({exc})") from exc


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("the `prometheus` binary is not installed (apt-get install prometheus)")
    return found


def is_number(value: str) -> bool:
    """A sample value of the HTTP API that is a number (not NaN, which Grafana shows as no value)."""
    return not math.isnan(float(value))


@dataclass
class LocalPrometheus:
    """One Prometheus process: config, data and log under `home`, listening on 127.0.0.1:`port`."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def log_path(self) -> Path:
        return self.home / "prometheus.log"

    def start(
        self,
        targets: Mapping[str, int],
        *,
        scrape_interval: str | None = None,
        die_with_parent: bool = False,
        timeout_s: float = 30.0,
    ) -> str:
        """Write the config, start Prometheus, wait until it is ready; returns its URL.

        With die_with_parent (tests) it gets SIGTERM if the caller dies; otherwise it runs in its own
        session so Ctrl-C in the terminal that ran `make demo` leaves it running.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        config = render_config(targets, self.port, scrape_interval=scrape_interval)
        self.config_path.write_text(
            "# Rendered by streamml.promstack from deploy/prometheus/prometheus.local.yml; do not edit.\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        cmd = [
            binary(),
            f"--config.file={self.config_path}",
            f"--web.listen-address={HOST}:{self.port}",
            f"--storage.tsdb.path={self.home / 'data'}",
            "--storage.tsdb.retention.time=2d",
        ]
        if die_with_parent:
            cmd = [*die_with_parent_prefix(), *cmd]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=not die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout_s} s:\n{self.tail()}")
            time.sleep(0.1)
        log.info("prometheus ready at %s (pid %d)", self.url, self.proc.pid)
        return self.url

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:  # loopback only
                return int(resp.status) == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- HTTP API -----------------------------------------------------------------------------------
    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """The `data` of an /api/v1 answer; an error answer raises PrometheusError with its message."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusError(f"{path}: HTTP {exc.code}") from exc
        except OSError as exc:
            raise PrometheusError(f"{url}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at the current time; the result as a list (a scalar becomes one sample)."""
        data = self.api("query", [("query", expr)])
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def has_finite_sample(self, expr: str) -> bool:
        """True when the query returns at least one sample that is a number (not NaN)."""
        return any(is_number(sample["value"][1]) for sample in self.query(expr))

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def label_values(self, label: str, metric: str) -> list[str]:
        return list(self.api(f"label/{label}/values", [("match[]", metric)]))

    def targets_up(self, job: str = STREAMML_JOB) -> dict[str, bool]:
        """component (or instance) -> whether its last scrape succeeded."""
        active = self.api("targets", [("state", "active")])["activeTargets"]
        return {
            t["labels"].get("component", t["labels"]["instance"]): t["health"] == "up"
            for t in active
            if t["labels"].get("job") == job
        }

    def firing_alerts(self) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a.get("state") == "firing"]

    # -- state file (for `make demo` / `make down`) ---------------------------------------------------
    def save(self) -> None:
        state = {"pid": self.proc.pid if self.proc else None, "port": self.port, "url": self.url}
        (self.home / STATE_FILE).write_text(json.dumps(state, indent=2))


def running(home: Path = DEFAULT_HOME) -> LocalPrometheus | None:
    """The demo's Prometheus if its state file names a live process that answers, else None."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
        prometheus = LocalPrometheus(home, int(state["port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prometheus if prometheus.ready() else None


def _is_ours(pid: int, config: Path) -> bool:
    """The pid still runs Prometheus with our config (pids get reused)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--config.file={config}".encode() in args


def stop_saved(home: Path = DEFAULT_HOME, timeout_s: float = 15.0) -> int | None:
    """Stop the Prometheus recorded in home's state file; returns its pid if one was stopped."""
    state_path = home / STATE_FILE
    try:
        pid = int(json.loads(state_path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    state_path.unlink(missing_ok=True)
    if not _is_ours(pid, home / "prometheus.yml"):
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _is_ours(pid, home / "prometheus.yml"):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    return pid


def _up(args: argparse.Namespace) -> int:
    stop_saved(args.home)
    try:
        targets = stack_targets(args.stack)
        port = args.port if port_is_free(args.port) else free_port()
        prometheus = LocalPrometheus(args.home, port)
        url = prometheus.start(targets, scrape_interval=args.scrape_interval)
    except PrometheusError as exc:
        if args.optional:
            print(f"no local Prometheus: {exc}")
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prometheus.save()
    pid = prometheus.proc.pid if prometheus.proc else "?"
    print(f"prometheus pid {pid}  {url}  (alerts {url}/alerts, log {prometheus.log_path})")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamml.promstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Prometheus scraping the stack in --stack")
    up.add_argument("--stack", type=Path, default=DEFAULT_STACK_STATE, help="the stack's state file")
    up.add_argument("--home", type=Path, default=DEFAULT_HOME, help="config, data and log folder")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="preferred port (else a free one)")
    up.add_argument("--scrape-interval", default=None, help="override the config's scrape interval")
    up.add_argument("--optional", action="store_true", help="exit 0 with a note if it cannot start")
    down = sub.add_parser("down", help="stop the Prometheus started by `up`")
    down.add_argument("--home", type=Path, default=DEFAULT_HOME)
    url = sub.add_parser("url", help="print the URL of the running Prometheus (exit 1 if none)")
    url.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "up":
        sys.exit(_up(args))
    if args.command == "down":
        pid = stop_saved(args.home)
        print(f"stopped prometheus (pid {pid})" if pid else "prometheus: nothing was running")
        return
    prometheus = running(args.home)
    if prometheus is None:
        sys.exit(1)
    print(prometheus.url)


if __name__ == "__main__":
    main()
