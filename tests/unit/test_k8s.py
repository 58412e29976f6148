"""deploy/k8s: the generated manifests are current, every kustomization renders, core resources validate
against Kubernetes' own schemas, the CRDs (Strimzi, KEDA) carry what their operators require, and what is
deployed holds exactly what the code declares (topics, ACLs, consumer groups, secrets per role)."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.trainer.requests import RequestLoop
from streamml import acl, k8s
from streamml.acl import Grant
from streamml.runtime import BatchLoop
from streamml.settings import Settings
from streamml.topics import CLI, SERVICES, Catalogue

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("base", "overlays/strimzi", "overlays/keda")
# Core kinds are checked against the Kubernetes OpenAPI schemas (strict: an unknown field is an error), for
# the oldest Kubernetes the manifests claim to support and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_KINDS = {"Namespace", "ServiceAccount", "Deployment", "Service", "ConfigMap", "Secret"} | {
    "PodDisruptionBudget",
    "NetworkPolicy",
}
CRD_KINDS = {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "ScaledObject", "TriggerAuthentication"}
SINGLE_WRITERS = {"learner", "monitor", "controller"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

requires_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: cannot render the kustomizations"
)


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy/k8s" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment).get("env", [])}


def config_settings(docs: tuple[dict[str, Any], ...]) -> Settings:
    """The settings the services get from the rendered ConfigMap."""
    (config,) = (
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("streamml-")
    )
    return k8s.settings_from_env(config["data"])


def declared_pipelines(settings: Settings) -> list[tuple[str, str]]:
    return k8s.pipelines_declared(ROOT, settings)


# -- generated files -----------------------------------------------------------------------------------


def test_committed_manifests_are_what_the_code_generates() -> None:
    assert k8s.stale(ROOT) == [], "deploy/k8s is out of date with the code: run `make k8s-manifests`"


def test_generation_ignores_this_machines_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_TOPIC_PREFIX", "elsewhere")
    monkeypatch.setenv("STREAMML_SASL_PASSWORD_FILE", "/nonexistent")
    monkeypatch.setenv("STREAMML_DEFAULT_PARTITIONS", "12")
    assert k8s.stale(ROOT) == []


def test_config_env_holds_only_streamml_settings() -> None:
    values = k8s.parse_env((ROOT / k8s.CONFIG_ENV).read_text())
    k8s.settings_from_env(values)  # raises on a key that is not a setting (a typo would be ignored silently)
    with pytest.raises(ValueError, match="STREAMML_BOOTSTRAP_SERVER is not a StreamML setting"):
        k8s.settings_from_env({"STREAMML_BOOTSTRAP_SERVER": "x:1"})
    with pytest.raises(ValueError, match="line 2"):
        k8s.parse_env("# comment\nno equals sign\n")
    assert values["STREAMML_METRICS_HOST"] == "0.0.0.0"  # probes and Prometheus reach the pod's address


def test_topic_resource_names_are_dns_safe_and_collisions_refused() -> None:
    assert k8s.dns_name("streamml.agrawal.shadow-predictions") == "streamml-agrawal-shadow-predictions"
    assert k8s.dns_name("Orders_RAW.v2") == "orders-raw-v2"
    settings = k8s.settings_from_env({})
    spec = Catalogue(settings).pipelines()
    twin = type(spec)(**{**spec.__dict__, "name": "streamml-pipelines"})
    with pytest.raises(ValueError, match="map to one resource name"):
        k8s.kafka_topics([spec, twin], 1)


def test_strimzi_acls_keep_every_grant() -> None:
    settings = k8s.settings_from_env({})
    plan = acl.plan(Catalogue(settings), [("agrawal", None)])
    users = k8s.kafka_users(plan)
    assert {u["metadata"]["name"] for u in users} == {g.principal for g in plan}
    assert set().union(*(k8s.grants_of(u) for u in users)) == set(plan)
    with pytest.raises(ValueError, match="no Strimzi form"):
        k8s.strimzi_acls([Grant("u", "DELEGATION_TOKEN", "LITERAL", "x", "READ")])


def test_image_is_the_one_compose_builds() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-streamml-service"]["image"] == k8s.IMAGE


# -- rendering and schemas ---------------------------------------------------------------------------------


@requires_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_resource_is_validated(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert kinds <= CORE_KINDS | CRD_KINDS, f"kinds nobody validates: {kinds - CORE_KINDS - CRD_KINDS}"
    validated: Counter[str] = Counter()
    for doc in docs:
        if doc["kind"] not in CORE_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{overlay}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}"
                )
        validated[doc["kind"]] += 1
    services = len(SERVICES)
    expected = {
        "Namespace": 1,
        "ServiceAccount": 1,
        "ConfigMap": 1,
        "Deployment": services,
        "Service": services,
        "PodDisruptionBudget": services,
        "NetworkPolicy": services + 2,  # + default deny + the CLI pod's
    }
    if overlay == "overlays/keda":
        expected["Secret"] = 1  # the (non-secret) user name KEDA's TriggerAuthentication reads
    assert validated == expected


def test_the_validator_is_strict() -> None:
    """An unknown field (a typo such as `readOnlyRootFileSystem`) fails: a pass means something."""
    deployment = k8s.deployment(k8s.ROLES[0], k8s.settings_from_env({}))
    kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = (
        True
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@requires_kubectl
def test_every_service_has_a_hardened_deployment_a_budget_and_a_policy() -> None:
    docs = render("base")
    settings = config_settings(docs)
    deployments = of_kind(docs, "Deployment")
    budgets, policies, services = (
        of_kind(docs, k) for k in ("PodDisruptionBudget", "NetworkPolicy", "Service")
    )
    assert set(deployments) == {f"streamml-{s}" for s in SERVICES}
    for name, dep in deployments.items():
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert budgets[name]["spec"]["selector"]["matchLabels"] == selector
        assert policies[name]["spec"]["podSelector"]["matchLabels"] == selector
        assert services[name]["spec"]["selector"] == selector
        assert budgets[name]["spec"]["maxUnavailable"] == 1

        c = container(dep)
        pod = dep["spec"]["template"]["spec"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, f"{name}: {probe}"
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == settings.metrics_port
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, f"{name}: resources.{kind}"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in (settings.data_dir, "/tmp"):
            assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} is not an emptyDir"
        service_name = name.removeprefix("streamml-")
        assert dep["spec"]["replicas"] == 2, f"{name}: single writers run one writer + one standby"
        if service_name in SINGLE_WRITERS:
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@requires_kubectl
def test_each_service_holds_exactly_its_secrets_as_files() -> None:
    docs = render("base")
    settings = config_settings(docs)
    expected_files = {
        "STREAMML_SASL_PASSWORD_FILE": set(SERVICES),
        "STREAMML_MODEL_VERIFY_KEYS_FILE": set(SERVICES),
        "STREAMML_MODEL_SIGNING_KEY_FILE": {"learner", "trainer"},
        "STREAMML_SIGNING_KEY_FILE": {"monitor"},
        "STREAMML_HTTP_TOKEN_FILE": {"predictor"},
    }
    for name, dep in of_kind(docs, "Deployment").items():
        service_name = name.removeprefix("streamml-")
        env = env_of(dep)
        assert set(env) - {"HOME"} <= {f"STREAMML_{f.upper()}" for f in Settings.model_fields}
        assert env["STREAMML_SASL_USERNAME"] == acl.user_name(settings.topic_prefix, service_name)
        assert env["STREAMML_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        for var, holders in expected_files.items():
            assert (var in env) == (service_name in holders), f"{name}: {var}"
        for secret in ("STREAMML_SASL_PASSWORD", "STREAMML_SIGNING_KEY", "STREAMML_HTTP_TOKEN"):
            assert secret not in env, f"{name}: {secret} must come from a file, never the environment"
        (mount,) = (m for m in container(dep)["volumeMounts"] if m["name"] == "secrets")
        (volume,) = (v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")
        files = {
            f"{mount['mountPath']}/{item['path']}": source["secret"]["name"]
            for source in volume["projected"]["sources"]
            for item in source["secret"]["items"]
        }
        wanted = {v for k, v in env.items() if k.endswith("_FILE")} | {env["STREAMML_SSL_CA_LOCATION"]}
        assert wanted == set(files), f"{name}: mounted secret files differ from the ones its settings name"
        assert files[env["STREAMML_SASL_PASSWORD_FILE"]] == env["STREAMML_SASL_USERNAME"]  # Strimzi's secret
        assert mount["readOnly"] is True


@requires_kubectl
def test_readme_names_every_secret_the_operator_creates() -> None:
    readme = (ROOT / "README.md").read_text()
    docs = render("overlays/keda")
    generated = set(of_kind(docs, "Secret")) | set(of_kind(docs, "KafkaUser"))  # Strimzi makes these
    referenced = {
        source["secret"]["name"]
        for dep in of_kind(docs, "Deployment").values()
        for volume in dep["spec"]["template"]["spec"]["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
    } | {
        ref["name"]
        for auth in of_kind(docs, "TriggerAuthentication").values()
        for ref in auth["spec"]["secretTargetRef"]
    }
    for secret in sorted(referenced - generated):
        assert f"`{secret}`" in readme, f"README's Kubernetes section does not say to create {secret}"


@requires_kubectl
def test_network_policies_deny_by_default_and_open_only_kafka_dns_and_scrapes() -> None:
    docs = render("base")
    settings = config_settings(docs)
    policies = of_kind(docs, "NetworkPolicy")
    deny = policies.pop("default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert set(policies) == {f"streamml-{s}" for s in (*SERVICES, CLI)}
    for name, policy in policies.items():
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        kafka, dns = spec["egress"]
        assert kafka["to"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}
        ]
        assert kafka["ports"] == [{"port": k8s.kafka_port(settings), "protocol": "TCP"}]
        assert {p["port"] for p in dns["ports"]} == {53}
        ingress = spec.get("ingress", [])
        ports = sorted(p["port"] for rule in ingress for p in rule["ports"])
        if name == "streamml-cli":
            assert ports == []
        elif name == "streamml-predictor":
            assert ports == ["http", "metrics"]
        else:
            assert ports == ["metrics"]
        for rule in ingress:
            for peer in rule["from"]:
                assert "namespaceSelector" in peer, f"{name}: ingress from the whole cluster"


# -- Strimzi ---------------------------------------------------------------------------------------------


@requires_kubectl
def test_strimzi_cluster_has_what_the_services_expect() -> None:
    docs = render("overlays/strimzi")
    settings = config_settings(docs)
    (kafka,) = of_kind(docs, "Kafka").values()
    assert (
        kafka["metadata"]["namespace"] == k8s.KAFKA_NAMESPACE
        and kafka["metadata"]["name"] == k8s.KAFKA_CLUSTER
    )
    assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled"
    spec = kafka["spec"]["kafka"]
    assert spec["authorization"]["type"] == "simple"
    (listener,) = spec["listeners"]
    assert {k: listener[k] for k in ("name", "type", "tls")} == {
        "name": "tls",
        "type": "internal",
        "tls": True,
    }
    assert listener["authentication"] == {"type": "scram-sha-512"}
    host, _, port = settings.bootstrap_servers.partition(":")
    assert int(port) == listener["port"]
    assert host == f"{k8s.KAFKA_CLUSTER}-kafka-bootstrap.{k8s.KAFKA_NAMESPACE}.svc"
    assert settings.security_protocol == "SASL_SSL" and settings.sasl_mechanism == "SCRAM-SHA-512"
    assert spec["config"]["auto.create.topics.enable"] is False
    operators = kafka["spec"]["entityOperator"]
    assert (
        operators["topicOperator"]["watchedNamespace"]
        == operators["userOperator"]["watchedNamespace"]
        == "streamml"
    )

    (pool,) = of_kind(docs, "KafkaNodePool").values()
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == k8s.KAFKA_CLUSTER
    assert pool["metadata"]["namespace"] == k8s.KAFKA_NAMESPACE
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["spec"]["storage"]["type"] in {"jbod", "persistent-claim", "ephemeral"}
    assert pool["spec"]["replicas"] >= settings.replication_factor > settings.min_insync_replicas


@requires_kubectl
def test_kafka_topics_are_the_catalogue() -> None:
    docs = render("overlays/strimzi")
    settings = config_settings(docs)
    topics = of_kind(docs, "KafkaTopic")
    catalogue = Catalogue(settings)
    expected = k8s.topic_specs(catalogue, declared_pipelines(settings))
    assert len(expected) == len(Catalogue.GLOBAL_ROLES) + 2 * len(Catalogue.PIPELINE_ROLES)
    by_topic = {t["spec"]["topicName"]: t for t in topics.values()}
    assert set(by_topic) == {s.name for s in expected}
    for spec in expected:
        topic = by_topic[spec.name]
        assert DNS_SUBDOMAIN.match(topic["metadata"]["name"]) and len(topic["metadata"]["name"]) <= 253
        assert topic["metadata"]["namespace"] == "streamml"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == k8s.KAFKA_CLUSTER
        assert topic["spec"]["partitions"] == spec.partitions
        assert topic["spec"]["replicas"] == spec.replication_factor == settings.replication_factor
        assert topic["spec"]["config"] == spec.topic_config(settings.min_insync_replicas)


@requires_kubectl
def test_kafka_users_hold_exactly_the_acl_plan() -> None:
    docs = render("overlays/strimzi")
    settings = config_settings(docs)
    users = of_kind(docs, "KafkaUser")
    plan = acl.plan(Catalogue(settings), declared_pipelines(settings))
    assert set(users) == {acl.user_name(settings.topic_prefix, who) for who in acl.PRINCIPALS}
    held: set[Grant] = set()
    for user in users.values():
        assert user["metadata"]["namespace"] == "streamml"
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == k8s.KAFKA_CLUSTER
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        assert user["spec"]["authorization"]["type"] == "simple"
        for rule in user["spec"]["authorization"]["acls"]:
            assert rule["resource"]["type"] in {"topic", "group", "transactionalId", "cluster"}
            assert rule["resource"]["patternType"] in {"literal", "prefix"}
            assert rule["resource"]["name"] and rule["operations"]
        held |= k8s.grants_of(user)
    assert held == set(plan)
    for dep in of_kind(docs, "Deployment").values():  # every service logs in as a user Strimzi creates
        assert env_of(dep)["STREAMML_SASL_USERNAME"] in users


# -- KEDA -------------------------------------------------------------------------------------------------


@requires_kubectl
def test_keda_scales_consumer_group_services_by_their_real_groups() -> None:
    docs = render("overlays/keda")
    settings = config_settings(docs)
    deployments = of_kind(docs, "Deployment")
    scaled = of_kind(docs, "ScaledObject")
    auths = of_kind(docs, "TriggerAuthentication")
    catalogue = Catalogue(settings)
    groups = {
        "features": (BatchLoop(settings, name="features", handler=lambda b: [], topics=set).group_id, None),
        "predictor": (BatchLoop(settings, name="predictor", handler=lambda b: [], topics=set).group_id, None),
    }
    requests = RequestLoop(SimpleNamespace(settings=settings, catalogue=catalogue))  # type: ignore[arg-type]
    groups["trainer"] = (requests.group_id, requests.topic)
    assert set(scaled) == {f"streamml-{s}" for s in groups}
    for service_name, (group, topic) in groups.items():
        spec = scaled[f"streamml-{service_name}"]["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in deployments and "replicas" not in deployments[target]["spec"], "HPA owns replicas"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == group
        assert meta.get("topic") == topic
        assert meta["bootstrapServers"] == settings.bootstrap_servers
        assert (meta["sasl"], meta["tls"]) == ("scram_sha512", "enable")
        assert int(meta["lagThreshold"]) >= 1
        auth = auths[trigger["authenticationRef"]["name"]]
        params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert params == {"username", "password", "ca"}
        assert all(ref["name"] and ref["key"] for ref in auth["spec"]["secretTargetRef"])
    assert scaled["streamml-trainer"]["spec"]["maxReplicaCount"] == catalogue.training_requests().partitions
    for writer in SINGLE_WRITERS:
        assert deployments[f"streamml-{writer}"]["spec"]["replicas"] == 2
    keda_user = of_kind(docs, "KafkaUser")[acl.user_name(settings.topic_prefix, k8s.KEDA_USER)]
    described = k8s.grants_of(keda_user)
    assert {g.operation for g in described} == {"DESCRIBE"}, "KEDA only reads lag"
    assert {g.name for g in described if g.resource_type == "GROUP"} == {g for g, _ in groups.values()}
    (kafka,) = of_kind(docs, "Kafka").values()
    peers = kafka["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    assert {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in peers} == {
        "streamml",
        k8s.KEDA_NAMESPACE,
    }
