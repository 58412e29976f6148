"""`streamml doctor`: a deployment checked from the user's seat, each problem with its fix.

Every check is a function returning `Check`s; none changes anything (no topic is created, no partition
added, no ACL written). A check that cannot run (no broker, not the operator's credentials) says so
instead of failing the others.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException

from streamml import acl, control
from streamml.errors import StreamMLError
from streamml.kafka import _cleanup_policies, make_admin
from streamml.registry import Registry, subject
from streamml.settings import Settings
from streamml.signing import key_id, keys_from, load_private_key, parse_public_keys
from streamml.topics import Catalogue, TopicSpec

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    area: str
    status: Status
    detail: str
    fix: str = ""


def broker(settings: Settings, timeout_s: float = 10.0) -> tuple[list[Check], Any]:
    """Reachable, who we are, how many brokers. Returns the admin client for the next checks (or None)."""
    admin = make_admin(settings)
    who = settings.sasl_username or (
        "client certificate" if settings.ssl_certificate_location else "anonymous"
    )
    try:
        cluster = admin.describe_cluster(request_timeout=timeout_s).result()
    except KafkaException as exc:
        fix = (
            "start it (`make kafka-up`) or set STREAMML_BOOTSTRAP_SERVERS; on a secured cluster check "
            "STREAMML_SECURITY_PROTOCOL, the SASL user and password file, and STREAMML_SSL_CA_LOCATION"
        )
        return [Check("broker", "fail", f"{settings.bootstrap_servers} as {who}: {exc.args[0]}", fix)], None
    nodes = len(cluster.nodes)
    detail = (
        f"{settings.bootstrap_servers}: {nodes} broker(s), cluster {cluster.cluster_id}, "
        f"{settings.security_protocol} as {who}"
    )
    checks = [Check("broker", "ok", detail)]
    if settings.replication_factor > nodes:
        checks.append(Check(
            "broker", "fail", f"STREAMML_REPLICATION_FACTOR={settings.replication_factor} > {nodes} brokers",
            "lower STREAMML_REPLICATION_FACTOR (and STREAMML_MIN_INSYNC_REPLICAS) or add brokers",
        ))  # fmt: skip
    if settings.security_protocol == "PLAINTEXT":
        checks.append(Check(
            "broker", "warn", "PLAINTEXT: no encryption, no logins: whoever reaches it can do anything",
            "run Kafka with SASL_SSL and ACLs (`make kafka-up SECURE=1`, README: Security)",
        ))  # fmt: skip
    return checks, admin


def _pipelines(settings: Settings, catalogue: Catalogue, topics: Iterable[str]) -> dict[str, str | None]:
    if catalogue.pipelines().name not in topics:
        return {}
    state = control.read_pipelines(settings)
    return {n: r["raw_topic"] for n, r in state.current.items() if not r["deleted"]}


def topics(
    settings: Settings, admin: Any, timeout_s: float = 10.0
) -> tuple[list[Check], dict[str, str | None]]:
    """Every declared topic exists with its declared partitions and cleanup policy."""
    catalogue = Catalogue(settings)
    existing = admin.list_topics(timeout=timeout_s).topics
    pipelines = _pipelines(settings, catalogue, existing)
    specs: list[TopicSpec] = list(catalogue.global_topics())
    for name, raw in pipelines.items():
        specs += acl.pipeline_topics(catalogue, name, raw)
    missing = [s.name for s in specs if s.name not in existing]
    checks = []
    if missing:
        checks.append(Check(
            "topics", "fail", f"{len(missing)} declared topic(s) missing: {', '.join(missing[:6])}"
            + (" ..." if len(missing) > 6 else ""),
            "`streamml topics create` (with --pipeline NAME for a pipeline's topics)",
        ))  # fmt: skip
    present = [s for s in specs if s.name in existing]
    try:
        policies = _cleanup_policies(admin, [s.name for s in present], time.monotonic() + timeout_s)
    except StreamMLError as exc:
        policies = {}
        checks.append(Check("topics", "warn", f"cannot read topic configs: {exc}", "run as a user with "
                            "DESCRIBE_CONFIGS on the topics (the cli principal)"))  # fmt: skip
    wrong = []
    for spec in present:
        count = len(existing[spec.name].partitions)
        if count != spec.partitions and not (spec.may_grow and count < spec.partitions):
            wrong.append(f"{spec.name}: {count} partitions, declared {spec.partitions}")
        policy = policies.get(spec.name)
        if policy is not None and policy != spec.cleanup_policy:
            wrong.append(f"{spec.name}: cleanup.policy={policy}, declared {spec.cleanup_policy}")
    if wrong:
        checks.append(Check(
            "topics", "fail", "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""),
            "recreate them (data is lost) or change STREAMML_DEFAULT_PARTITIONS / the prefix to match",
        ))  # fmt: skip
    if not checks:
        names = ", ".join(sorted(pipelines)) or "none yet"
        checks.append(Check("topics", "ok", f"{len(specs)} declared topics as declared (pipelines: {names})"))
    return checks, pipelines


def acls(
    settings: Settings, admin: Any, pipelines: dict[str, str | None], timeout_s: float = 10.0
) -> list[Check]:
    """The ACLs `streamml acl apply` would make, against the cluster's (operator only). SCRAM users are not
    read back (see acl.apply): a missing one shows as its service failing to log in."""
    if settings.security_protocol == "PLAINTEXT":
        return [Check("principals", "skip", "PLAINTEXT cluster: no principals or ACLs")]
    wanted = acl.plan(Catalogue(settings), pipelines.items())
    try:
        current = acl.current_grants(admin, timeout_s)
    except KafkaException as exc:
        why = f"needs the operator's credentials to read ACLs ({exc.args[0]})"
        return [Check("principals", "skip", why, "run it with the operator's settings (admin.env) to check")]
    if not current:  # a principal without DESCRIBE on the cluster sees none (the broker may not refuse)
        why = "no ACL is visible to this principal"
        fix = "run it with the operator's settings (admin.env); if they see none either: `streamml acl apply`"
        return [Check("principals", "skip", why, fix)]
    to_add, to_remove = acl.diff(wanted, current)
    if to_add:
        detail = f"{len(to_add)} ACL(s) missing"
        return [Check("principals", "fail", detail, "`streamml acl apply --dry-run`, then without --dry-run")]
    if to_remove:  # e.g. granted ahead for a pipeline not applied yet: more access than the plan, not less
        detail = f"{len(to_remove)} ACL(s) of StreamML users beyond the plan (a pipeline not applied yet?)"
        fix = "apply the pipeline, or `streamml acl apply` (it removes them)"
        return [Check("principals", "warn", detail, fix)]
    return [Check("principals", "ok", f"{len(wanted)} ACLs of {len(acl.PRINCIPALS)} principals as declared")]


def signing(settings: Settings) -> list[Check]:
    """The model keys this environment holds make sense together."""
    try:
        keys = keys_from(settings, signs=False)
    except StreamMLError as exc:
        return [Check("signing keys", "fail", str(exc), "fix the key settings (README: Model signatures)")]
    checks = []
    if not keys.verifier.configured:
        checks.append(Check(
            "signing keys", "fail", "no key verifies model versions: every version would be rejected",
            "set STREAMML_MODEL_VERIFY_KEYS (`streamml keys show FILE` prints the line)",
        ))  # fmt: skip
    elif not keys.verifier.public:
        checks.append(Check(
            "signing keys", "warn", "the former shared HMAC scheme: every verifier can also forge models",
            "move to Ed25519 (`streamml keys generate`; README: Model signatures)",
        ))  # fmt: skip
    if settings.model_signing_key_file and settings.model_verify_keys and not settings.model_verify_keys_file:
        private = load_private_key(settings.model_signing_key_file)
        if key_id(private.public_key()) not in parse_public_keys(settings.model_verify_keys):
            checks.append(Check(
                "signing keys", "fail", "the private key's public half is not in STREAMML_MODEL_VERIFY_KEYS: "
                "the other services will reject what this one signs",
                f"add `streamml keys show {settings.model_signing_key_file}` to every service's verify keys",
            ))  # fmt: skip
    if not checks:
        ids = ", ".join(sorted(keys.verifier.public)) or "HMAC"
        checks.append(Check("signing keys", "ok", f"versions verify with: {ids}"))
    return checks


def services(state_file: Path, timeout_s: float = 2.0) -> list[Check]:
    """Each service the local stack started answers on its metrics (and HTTP) endpoint."""
    if not state_file.is_file():
        return [
            Check(
                "services",
                "skip",
                f"no {state_file} (started by `make demo` / `python -m streamml.stack up`)",
            )
        ]
    state = json.loads(state_file.read_text())
    checks = []
    for label, info in sorted(state.get("services", {}).items()):
        urls = [f"http://127.0.0.1:{info['metrics_port']}/metrics"]
        if info.get("service") == "predictor":
            urls.append(f"http://127.0.0.1:{info['http_port']}/healthz")
        problem = next((p for url in urls if (p := _answers(url, timeout_s))), None)
        if problem:
            checks.append(Check(
                f"service {label}", "fail", f"pid {info.get('pid')}: {problem}",
                f"see its log {info.get('log')}; restart with `make demo` or `python -m streamml.stack up`",
            ))  # fmt: skip
        else:
            checks.append(Check(f"service {label}", "ok", f"pid {info.get('pid')} answers"))
    return checks


def _answers(url: str, timeout_s: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # loopback only
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code == 401 else f"{url} answered {exc.code}"  # 401: up, wants its token
    except OSError as exc:
        return f"{url}: {exc}"


def registry(settings: Settings, pipelines: dict[str, str | None]) -> list[Check]:
    """The schema registry answers, and holds the contracts of every applied pipeline."""
    if not settings.schema_registry_url:
        return [Check("schema registry", "skip", "none configured (STREAMML_SCHEMA_REGISTRY_URL)")]
    try:
        client = Registry(settings, timeout_s=5.0)
        subjects = set(client.subjects())
    except Exception as exc:  # transport, TLS, auth: reported, never raised
        fix = "`make registry-up`, or fix STREAMML_SCHEMA_REGISTRY_URL and its credentials"
        return [Check("schema registry", "fail", f"{settings.schema_registry_url}: {exc}", fix)]
    catalogue = Catalogue(settings)
    wanted = {
        subject(t)
        for name, raw in pipelines.items()
        for t in (raw or catalogue.raw(name).name, catalogue.features(name).name)
    }
    missing = sorted(wanted - subjects)
    if missing:
        fix = "re-apply those pipelines (`streamml pipeline apply FILE`) to register their contracts"
        return [Check("schema registry", "warn", f"subjects missing: {', '.join(missing)}", fix)]
    detail = f"{settings.schema_registry_url}: {len(wanted)} pipeline subjects registered"
    return [Check("schema registry", "ok", detail)]


def run(settings: Settings, state_file: Path, report: Callable[[Check], None]) -> bool:
    """All checks, reported as they finish; True when none failed."""
    failed = False

    def emit(checks: Iterable[Check]) -> None:
        nonlocal failed
        for check in checks:
            failed = failed or check.status == "fail"
            report(check)

    found, admin = broker(settings)
    emit(found)
    if admin is not None:
        topic_checks, pipelines = topics(settings, admin)
        emit(topic_checks)
        emit(acls(settings, admin, pipelines))
        emit(registry(settings, pipelines))
    emit(signing(settings))
    emit(services(state_file))
    return not failed
