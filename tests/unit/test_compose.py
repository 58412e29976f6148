"""Static checks of docker-compose.yml, the Dockerfile and the Prometheus/Grafana files.

No Docker engine runs here, so these parse the files and check what a `docker compose up` would trip on.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamml.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

# Services of this profile are planned by later issues: their module may not exist yet.
PLANNED_PROFILE = "ml"
KAFKA = "kafka"
PROMETHEUS = "prometheus"
GRAFANA = "grafana"
TOPICS_COMMAND = ["streamml", "topics", "create"]
CORE_METRICS = (
    "streamml_events_in_total",
    "streamml_events_out_total",
    "streamml_events_dead_lettered_total",
)

SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|SIGNING_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# ${VAR}, ${VAR:?msg}, ${VAR?msg}, ${VAR:-} and ${VAR-}: the value comes from the environment.
SUBSTITUTION = re.compile(r"^\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}$")


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


COMPOSE: dict[str, Any] = _load_yaml(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _argv(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _env(service: dict[str, Any]) -> dict[str, str]:
    """Environment of a service as strings, from either the map or the KEY=VALUE list form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {key: value for key, value in pairs}
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name -> condition (the short list form means service_started)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def _ports(service: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """Each published port as (host ip, host port, container port)."""
    published: list[tuple[str | None, str, str]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published.append((entry.get("host_ip"), str(entry.get("published", "")), str(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]
        host, _, target = spec.rpartition(":")
        host_ip, _, host_port = host.rpartition(":")
        published.append((host_ip or None, host_port, target))
    return published


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """Each mount as (source, container path); sources of bind mounts start with '.', '/' or '~'."""
    mounts: list[tuple[str, str]] = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            source, target, *_ = str(entry).split(":")
            mounts.append((source, target))
    return mounts


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _bind_target(service: dict[str, Any], host_path: Path) -> str:
    """Container path at which a service mounts the given repo path (fails if it does not)."""
    for source, target in _volumes(service):
        if _is_bind(source) and (ROOT / source).resolve() == host_path.resolve():
            return target
    raise AssertionError(f"{host_path.relative_to(ROOT)} is not bind-mounted")


def _streamml_services() -> dict[str, dict[str, Any]]:
    """Services that run our image (built from the Dockerfile)."""
    return {name: svc for name, svc in SERVICES.items() if "build" in svc}


def _metrics_ports() -> dict[str, int]:
    return {
        name: int(_env(svc)["STREAMML_METRICS_PORT"])
        for name, svc in SERVICES.items()
        if "STREAMML_METRICS_PORT" in _env(svc)
    }


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _dockerfile_cmd() -> list[str]:
    cmds = [args for keyword, args in _dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    last = cmds[-1]
    return list(json.loads(last)) if last.startswith("[") else shlex.split(last)


def _is_substituted(value: str) -> bool:
    """True when the value comes from the environment at run time, with no default that is a literal."""
    match = SUBSTITUTION.match(value)
    if match is None:
        return False
    op, arg = match.group("op"), match.group("arg")
    return op is None or "?" in op or arg == ""


def _scrape_targets(config: dict[str, Any]) -> set[str]:
    return {
        target
        for job in config.get("scrape_configs") or []
        for static in job.get("static_configs") or []
        for target in static.get("targets") or []
    }


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []  # panels folded inside a collapsed row


def _datasource_uids() -> set[str]:
    uids: set[str] = set()
    for path in sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.y*ml")):
        for source in _load_yaml(path).get("datasources") or []:
            uids.add(source["uid"])
    return uids


def _dashboard_files() -> list[Path]:
    return sorted((GRAFANA_DIR / "dashboards").rglob("*.json"))


# --- images, build, mounts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_image_is_pinned(name: str) -> None:
    image = SERVICES[name].get("image")
    assert image, f"{name}: set `image` (with a tag) so every service runs a pinned, named image"
    reference = image.split("@", 1)[0]
    repository, sep, tag = reference.rpartition(":")
    assert sep and "/" not in tag, f"{name}: image {image!r} has no tag"
    assert tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: image {image!r} is not pinned"
    if "build" in SERVICES[name]:
        version = PYPROJECT["project"]["version"]
        assert tag == version, f"{name}: the built image {repository} should be tagged {version} (pyproject)"


@pytest.mark.parametrize("name", sorted(_streamml_services()))
def test_build_context_holds_its_dockerfile(name: str) -> None:
    build = SERVICES[name]["build"]
    context, dockerfile = (
        (build, "Dockerfile")
        if isinstance(build, str)
        else (
            build.get("context", "."),
            build.get("dockerfile", "Dockerfile"),
        )
    )
    assert (ROOT / context).is_dir(), f"{name}: build context {context!r} does not exist"
    assert (ROOT / context / dockerfile).is_file(), f"{name}: {dockerfile!r} not found in {context!r}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_bind_mounts_exist_and_named_volumes_are_declared(name: str) -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for source, target in _volumes(SERVICES[name]):
        if _is_bind(source):
            assert not source.startswith(("/", "~")), f"{name}: {source!r} is outside the repo"
            assert (ROOT / source).exists(), f"{name}: bind-mounted {source!r} does not exist"
        else:
            assert source in declared, f"{name}: volume {source!r} (at {target}) is not declared"


# --- commands --------------------------------------------------------------------------------------


def _command_cases() -> list[Any]:
    cases = [pytest.param("Dockerfile CMD", _dockerfile_cmd(), [], id="Dockerfile-CMD")]
    for name, svc in sorted(_streamml_services().items()):
        cases.append(pytest.param(name, _argv(svc.get("command")), svc.get("profiles") or [], id=name))
    return cases


@pytest.mark.parametrize(("name", "argv", "profiles"), _command_cases())
def test_every_command_resolves(name: str, argv: list[str], profiles: list[str]) -> None:
    assert argv, f"{name}: no command; every StreamML service names what it runs"
    if argv[:2] == ["python", "-m"]:
        module = argv[2]
        spec = importlib.util.find_spec(module)
        if spec is None and PLANNED_PROFILE in profiles:
            pytest.skip(f"{name}: module {module} does not exist yet (planned, profile {PLANNED_PROFILE!r})")
        assert spec is not None, f"{name}: `python -m {module}` would fail: no module {module}"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(f"{module}.__main__"), f"{name}: package {module} has no __main__"
    elif argv[0] == "streamml":
        target = PYPROJECT["project"]["scripts"]["streamml"]
        module, _, func = target.partition(":")
        code = f"from {module} import {func}; {func}()"
        result = subprocess.run(
            [sys.executable, "-c", code, *argv[1:], "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (
            f"{name}: `{shlex.join([*argv, '--help'])}` exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
        assert "Usage" in result.stdout, f"{name}: no usage text from {shlex.join(argv)} --help"
    else:
        pytest.fail(f"{name}: unknown command form {argv!r} (use `python -m X` or `streamml ...`)")


# --- Kafka -----------------------------------------------------------------------------------------


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)}."""
    parsed: dict[str, tuple[str, int]] = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        parsed[name] = (host, int(port))
    return parsed


def test_kafka_is_a_single_kraft_node_with_internal_and_host_listeners() -> None:
    kafka = SERVICES[KAFKA]
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller not in advertised
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@{KAFKA}:{listeners[controller][1]}"
    )
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols) == set(listeners)
    for name, (_, port) in advertised.items():
        assert listeners[name][1] == port, f"listener {name} advertises a port it does not listen on"

    assert (KAFKA, 29092) in advertised.values(), "containers need the internal listener kafka:29092"
    published = {(host_port, int(target)) for _, host_port, target in _ports(kafka)}
    host_side = [(name, port) for name, (host, port) in advertised.items() if host == "127.0.0.1"]
    assert host_side, "host clients need a listener advertised as 127.0.0.1"
    for name, port in host_side:
        assert (str(port), port) in published, f"{name} is advertised on 127.0.0.1:{port} but not published"

    for key, value in env.items():
        if key.endswith(("_REPLICATION_FACTOR", "_MIN_ISR", "MIN_INSYNC_REPLICAS")):
            assert value == "1", f"{key}={value} cannot be met by a single broker"
    assert env.get("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR") == "1"


def test_kafka_never_creates_topics_on_its_own() -> None:
    """Topics come from the `topics` job (the catalogue), never from a producer naming an unknown topic."""
    assert _env(SERVICES[KAFKA]).get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "false"


def test_kafka_healthcheck_probes_a_listener_of_the_broker() -> None:
    kafka = SERVICES[KAFKA]
    test = kafka.get("healthcheck", {}).get("test")
    assert test, "kafka needs a healthcheck so clients can wait for a usable broker"
    argv = _argv(test[1:] if test[0] in ("CMD", "CMD-SHELL") else test)
    argv = shlex.split(argv[0]) if len(argv) == 1 else argv
    assert "--bootstrap-server" in argv, f"healthcheck {test!r} does not talk to the broker"
    host, _, port = argv[argv.index("--bootstrap-server") + 1].rpartition(":")
    listen_ports = {port_ for _, port_ in _listeners(_env(kafka)["KAFKA_LISTENERS"]).values()}
    assert host in ("localhost", "127.0.0.1", KAFKA) and int(port) in listen_ports


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_kafka_clients_use_the_internal_listener_and_wait_for_a_healthy_broker(name: str) -> None:
    env = _env(SERVICES[name])
    if "STREAMML_BOOTSTRAP_SERVERS" not in env:
        assert name not in _streamml_services(), f"{name} runs StreamML but is given no bootstrap servers"
        return
    advertised = _listeners(_env(SERVICES[KAFKA])["KAFKA_ADVERTISED_LISTENERS"])
    internal = {f"{host}:{port}" for host, port in advertised.values() if host == KAFKA}
    assert env["STREAMML_BOOTSTRAP_SERVERS"] in internal
    assert _depends_on(SERVICES[name]).get(KAFKA) == "service_healthy", (
        f"{name} must depend on {KAFKA} with condition: service_healthy"
    )


def test_topics_job_runs_once_after_kafka_and_services_wait_for_it() -> None:
    jobs = [name for name, svc in _streamml_services().items() if _argv(svc.get("command")) == TOPICS_COMMAND]
    assert len(jobs) == 1, f"expected one `{shlex.join(TOPICS_COMMAND)}` job, found {jobs}"
    job = jobs[0]
    assert str(SERVICES[job].get("restart", "no")) == "no", "a one-shot job must not be restarted"
    assert not SERVICES[job].get("profiles"), "topics must be created in every profile"
    for name, svc in _streamml_services().items():
        if name != job:
            assert _depends_on(svc).get(job) == "service_completed_successfully", (
                f"{name} should start after the topics exist ({job}: service_completed_successfully)"
            )


# --- ports and environment -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_published_ports_bind_loopback_only(name: str) -> None:
    for host_ip, host_port, target in _ports(SERVICES[name]):
        assert host_ip == "127.0.0.1", f"{name}: port {host_port or target} must be published on 127.0.0.1"


@pytest.mark.parametrize("name", sorted(_streamml_services()))
def test_streamml_settings_are_known_and_metrics_reachable(name: str) -> None:
    env = _env(SERVICES[name])
    known = {f"STREAMML_{field.upper()}" for field in Settings.model_fields}
    unknown = sorted(key for key in env if key.startswith("STREAMML_") and key not in known)
    assert not unknown, f"{name}: {unknown} are not settings of streamml.settings.Settings"
    # Prometheus scrapes from another container, so the endpoint must listen beyond the loopback.
    assert env.get("STREAMML_METRICS_HOST") == "0.0.0.0"
    # The literal values must also pass the settings' own validation (ports, host:port lists).
    Settings.model_validate(
        {
            key.removeprefix("STREAMML_").lower(): value
            for key, value in env.items()
            if key.startswith("STREAMML_") and not value.startswith("${")
        }
    )


def test_metrics_ports_are_distinct() -> None:
    ports = _metrics_ports()
    assert ports, "no service sets STREAMML_METRICS_PORT"
    assert len(set(ports.values())) == len(ports), f"metrics ports collide: {ports}"


# --- secrets and the Dockerfile --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${GRAFANA_ADMIN_PASSWORD}", True),
        ("${GRAFANA_ADMIN_PASSWORD:?set it}", True),
        ("${STREAMML_SIGNING_KEY:-}", True),
        ("${GRAFANA_ADMIN_PASSWORD:-admin}", False),
        ("admin", False),
        ("prefix-${TOKEN}", False),
    ],
)
def test_secret_check_tells_substitutions_from_literals(value: str, expected: bool) -> None:
    assert _is_substituted(value) is expected


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_no_secret_literals_in_compose(name: str) -> None:
    for key, value in _env(SERVICES[name]).items():
        if SECRET_KEY.search(key) and key.endswith("_FILE"):  # a path: it must be a compose secret's file
            secret = value.removeprefix("/run/secrets/")
            assert value.startswith("/run/secrets/") and secret in SERVICES[name].get("secrets", []), (
                f"{name}: {key} must name a compose secret it declares, not {value!r}"
            )
            assert secret in COMPOSE.get("secrets", {}), f"{name}: secret {secret} is not declared"
        elif SECRET_KEY.search(key):
            assert _is_substituted(value), (
                f"{name}: {key} must come from ${{...}} with no default, not {value!r}"
            )


def test_grafana_admin_password_comes_from_the_environment() -> None:
    value = _env(SERVICES[GRAFANA]).get("GF_SECURITY_ADMIN_PASSWORD", "")
    match = SUBSTITUTION.match(value)
    assert match and match.group("op") in (":?", "?"), (
        "GF_SECURITY_ADMIN_PASSWORD must be ${VAR:?message}: Grafana otherwise falls back to admin/admin"
    )


def test_dockerfile_is_pinned_unprivileged_and_secret_free() -> None:
    instructions = _dockerfile_instructions()
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?( AS \w+)?", b, re.I) for b in bases), (
        bases
    )
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "pip install --no-cache-dir -e ." in runs
    assert not [args for keyword, args in instructions if keyword == "ENTRYPOINT"], (
        "no ENTRYPOINT: compose commands are full argv (python -m ... or streamml ...)"
    )
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or args.split()[:1]
            assert not [n for n in names if SECRET_KEY.search(n)], f"secret-like {keyword} {args!r}"


def test_dockerignore_keeps_secrets_and_vcs_out_of_the_image() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".git"} <= entries


# --- Prometheus ------------------------------------------------------------------------------------


def test_prometheus_mounts_its_config_and_rules() -> None:
    prometheus = SERVICES[PROMETHEUS]
    assert _bind_target(prometheus, PROMETHEUS_DIR / "prometheus.yml") == "/etc/prometheus/prometheus.yml"
    assert _bind_target(prometheus, PROMETHEUS_DIR / "rules") == "/etc/prometheus/rules"


@pytest.mark.parametrize(
    ("config_name", "local"), [("prometheus.yml", False), ("prometheus.local.yml", True)]
)
def test_prometheus_scrapes_every_metrics_port(config_name: str, local: bool) -> None:
    config = _load_yaml(PROMETHEUS_DIR / config_name)
    targets = _scrape_targets(config)
    for service, port in _metrics_ports().items():
        host = "127.0.0.1" if local else service
        assert f"{host}:{port}" in targets, f"{config_name} does not scrape {service} on {port}"
    rule_files = config.get("rule_files") or []
    assert rule_files, f"{config_name} loads no rule files"
    for pattern in rule_files:
        matches = sorted(PROMETHEUS_DIR.glob(pattern))
        assert matches, f"{config_name}: rule_files {pattern!r} matches nothing"
        for path in matches:
            assert isinstance(_load_yaml(path).get("groups"), list), f"{path.name} has no `groups` list"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
@pytest.mark.parametrize("config_name", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_accepts_the_config(config_name: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "config", config_name],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------------------------------


def test_grafana_datasource_points_at_the_compose_prometheus() -> None:
    grafana = SERVICES[GRAFANA]
    assert _bind_target(grafana, GRAFANA_DIR / "provisioning") == "/etc/grafana/provisioning"
    sources = [
        source
        for path in sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.y*ml"))
        for source in _load_yaml(path).get("datasources") or []
    ]
    prometheus_sources = [source for source in sources if source["type"] == "prometheus"]
    assert len(prometheus_sources) == 1, sources
    source = prometheus_sources[0]
    assert source["uid"] == "streamml-prom"
    container_ports = {target for _, _, target in _ports(SERVICES[PROMETHEUS])}
    assert any(source["url"] == f"http://{PROMETHEUS}:{port}" for port in container_ports), source["url"]
    assert _depends_on(grafana).get(PROMETHEUS), "grafana should start after prometheus"


def test_grafana_provider_reads_the_mounted_dashboards() -> None:
    grafana = SERVICES[GRAFANA]
    mounted = _bind_target(grafana, GRAFANA_DIR / "dashboards")
    providers = [
        provider
        for path in sorted((GRAFANA_DIR / "provisioning" / "dashboards").glob("*.y*ml"))
        for provider in _load_yaml(path).get("providers") or []
    ]
    assert [p["options"]["path"] for p in providers if p.get("type", "file") == "file"] == [mounted]
    env = _env(grafana)
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer", "anonymous users may view, not edit"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (
            home.startswith(mounted + "/")
            and (GRAFANA_DIR / "dashboards" / home[len(mounted) + 1 :]).is_file()
        )


def test_dashboards_are_valid_and_use_the_provisioned_datasource() -> None:
    files = _dashboard_files()
    assert files, "no dashboard JSON under deploy/grafana/dashboards"
    uids = _datasource_uids()
    seen: set[str] = set()
    for path in files:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard.get("title") and dashboard.get("uid"), f"{path.name}: needs a title and a fixed uid"
        assert dashboard["uid"] not in seen, f"{path.name}: duplicate dashboard uid {dashboard['uid']}"
        seen.add(dashboard["uid"])
        refs = [value for key, value in _walk(dashboard) if key == "datasource"]
        assert refs, f"{path.name}: no datasource references"
        for ref in refs:
            assert isinstance(ref, dict) and ref.get("uid") in uids, (
                f"{path.name}: datasource {ref!r} is not the provisioned one {sorted(uids)}"
            )
        for panel in _panels(dashboard):
            if panel.get("type") != "row":
                exprs = [target.get("expr") for target in panel.get("targets") or []]
                assert exprs and all(exprs), f"{path.name}: panel {panel.get('title')!r} has no query"


def test_overview_dashboard_shows_the_core_event_counters() -> None:
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "overview.json").read_text(encoding="utf-8"))
    exprs = " ".join(str(value) for key, value in _walk(dashboard) if key in ("expr", "query", "definition"))
    for metric in CORE_METRICS:
        assert metric in exprs, f"overview.json does not chart {metric}"
    for label in ("service", "topic", "pipeline"):
        assert re.search(rf"\b{label}\b", exprs), f"overview.json never uses the {label!r} label"
