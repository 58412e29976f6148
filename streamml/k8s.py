"""Kubernetes manifests derived from what the code declares (services and their roles, the topic catalogue,
the ACL plan, consumer group names), so a deployment cannot drift from the code that runs in it.

The functions here are pure: settings, pipelines and grants in, manifests (dicts) out. `python -m
streamml.k8s` (`make k8s-manifests`) writes them as YAML under deploy/k8s/ (the `generated/` folders of the
base and the overlays); `--check` only compares, and tests/unit/test_k8s.py fails while a committed file
differs from what the code produces now. Settings come from deploy/k8s/base/config.env (the ConfigMap the
services read), never from this process's environment, so the output is the same on every machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from streamml import acl
from streamml.acl import Grant
from streamml.settings import Settings
from streamml.topics import (
    CLI,
    CONTROLLER,
    FEATURES,
    LEARNER,
    MONITOR,
    PREDICTOR,
    TRAINER,
    Catalogue,
    TopicSpec,
)

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = Path("deploy/k8s")
CONFIG_ENV = K8S_DIR / "base" / "config.env"
# The pipelines whose topics (KafkaTopics) and ACLs (KafkaUsers) the Strimzi overlay declares. Strimzi's user
# operator owns the ACLs of its users: a pipeline not listed gets no ACLs, so add its file and regenerate.
PIPELINE_FILES = (Path("pipelines/agrawal.yaml"), Path("pipelines/phishing.yaml"))

NAMESPACE = "streamml"
KAFKA_NAMESPACE = "kafka"
KAFKA_CLUSTER = "streamml"  # the Strimzi Kafka resource: bootstrap streamml-kafka-bootstrap.kafka.svc:9093
KEDA_NAMESPACE = "keda"
# Who may reach the services: Prometheus (metrics port) and applications calling the predictor's API.
PROMETHEUS_NAMESPACE = "monitoring"
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}
PREDICT_CLIENT_NAMESPACE_LABEL = {"streamml.io/predict-clients": "allowed"}

IMAGE = "streamml:0.1.0"  # what docker-compose.yml builds and tags (tests/unit/test_k8s.py checks)
UID = 10001  # any non-root uid works: the image's code is root-owned and world-readable
HTTP_PORT = 8080
SECRETS_DIR = "/etc/streamml/secrets"
TMP_DIR = "/tmp"

# Secrets the operator creates (README "Deploy on Kubernetes"); Strimzi makes the per-user ones.
CA_SECRET = ("streamml-kafka-ca", "ca.crt")  # a copy of the Strimzi cluster CA certificate
VERIFY_KEYS_SECRET = ("streamml-model-verify-keys", "verify-keys")
MODEL_KEY_SECRET = ("streamml-model-signing-key", "private.pem")
STATE_KEY_SECRET = ("streamml-state-signing-key", "key")
HTTP_TOKEN_SECRET = ("streamml-http-token", "token")
KEDA_USER = "keda"  # the principal KEDA reads consumer lag as (Describe only)
KEDA_AUTH = "streamml-kafka-lag"

STRIMZI_API = "kafka.strimzi.io/v1beta2"
KEDA_API = "keda.sh/v1alpha1"
_OPERATIONS = {
    "READ": "Read",
    "WRITE": "Write",
    "CREATE": "Create",
    "DELETE": "Delete",
    "ALTER": "Alter",
    "DESCRIBE": "Describe",
    "DESCRIBE_CONFIGS": "DescribeConfigs",
    "ALTER_CONFIGS": "AlterConfigs",
    "IDEMPOTENT_WRITE": "IdempotentWrite",
    "CLUSTER_ACTION": "ClusterAction",
    "ALL": "All",
}
_RESOURCE_TYPES = {
    "TOPIC": "topic",
    "GROUP": "group",
    "TRANSACTIONAL_ID": "transactionalId",
    "CLUSTER": "cluster",
}
_PATTERNS = {"LITERAL": "literal", "PREFIXED": "prefix"}


@dataclass(frozen=True)
class Role:
    """How one service runs on Kubernetes: what it holds and what it may use."""

    service: str
    # Single writers (learner, monitor, controller) run 2: one owns the writer slots, the other stands by in
    # the same consumer group on <prefix>.writers and takes them over when the first goes (see README).
    replicas: int
    cpu: tuple[str, str]  # request, limit
    memory: tuple[str, str]
    signs_models: bool = False  # learner and trainer hold the Ed25519 private key
    signs_state: bool = False  # the monitor signs its snapshots (HMAC)
    http: bool = False  # the predictor's POST /predict
    scaled_by_lag: bool = False  # consumer-group services: KEDA may add instances up to the partitions
    tmp_size: str = "256Mi"


# Resources are starting points (a service with two example pipelines), not measured on a cluster.
ROLES = (
    Role(FEATURES, 2, ("250m", "1"), ("384Mi", "768Mi"), scaled_by_lag=True),
    Role(LEARNER, 2, ("250m", "1"), ("512Mi", "1Gi"), signs_models=True),
    Role(PREDICTOR, 2, ("250m", "1"), ("512Mi", "1Gi"), http=True, scaled_by_lag=True),
    Role(MONITOR, 2, ("250m", "1"), ("512Mi", "1Gi"), signs_state=True),
    Role(TRAINER, 2, ("250m", "2"), ("768Mi", "2Gi"), signs_models=True, scaled_by_lag=True, tmp_size="1Gi"),
    Role(CONTROLLER, 2, ("100m", "500m"), ("256Mi", "512Mi")),
)


# -- settings ------------------------------------------------------------------------------------------


class _FileSettings(Settings):
    """Settings from the given values only: no environment variable or .env file of this machine."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as kustomize's configMapGenerator reads them (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ValueError(f"line {number}: expected KEY=VALUE, got {line!r}")
        values[key] = value
    return values


def settings_from_env(values: dict[str, str]) -> Settings:
    """The settings the services will run with, from the ConfigMap's STREAMML_* values."""
    fields: dict[str, Any] = {}
    for key, value in values.items():
        name = key.removeprefix("STREAMML_").lower()
        if not key.startswith("STREAMML_") or name not in Settings.model_fields:
            raise ValueError(f"{key} is not a StreamML setting (see README, Configuration)")
        fields[name] = value
    return _FileSettings(**fields)


def kafka_port(settings: Settings) -> int:
    """The brokers' port (one for all of them: the NetworkPolicies open exactly it)."""
    ports = {int(server.rpartition(":")[2]) for server in settings.bootstrap_servers.split(",")}
    if len(ports) != 1:
        raise ValueError(f"bootstrap servers use several ports {sorted(ports)}: use one listener port")
    return ports.pop()


# -- helpers ---------------------------------------------------------------------------------------------


def labels(service: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "streamml", "app.kubernetes.io/component": service}


def _meta(name: str, component: str | None) -> dict[str, Any]:
    own = labels(component) if component else {"app.kubernetes.io/name": "streamml"}
    return {"name": name, "namespace": NAMESPACE, "labels": {**own, "app.kubernetes.io/part-of": "streamml"}}


def resource_name(service: str) -> str:
    return f"streamml-{service}"


def dns_name(topic: str) -> str:
    """A Kubernetes-safe resource name for a Kafka topic (dots and other characters become dashes)."""
    name = re.sub(r"[^a-z0-9-]+", "-", topic.lower()).strip("-")
    if not name or len(name) > 253:
        raise ValueError(f"topic {topic!r} has no usable Kubernetes resource name")
    return name


# -- the services (base) ---------------------------------------------------------------------------------


def _secret_items(role: Role, prefix: str) -> list[tuple[str, str, str]]:
    """(secret, key, file name under SECRETS_DIR) of everything this service holds; nothing more."""
    items = [
        (acl.user_name(prefix, role.service), "password", "kafka-password"),  # Strimzi's KafkaUser secret
        (*CA_SECRET, "kafka-ca.crt"),
        (*VERIFY_KEYS_SECRET, "model-verify-keys"),
    ]
    if role.signs_models:
        items.append((*MODEL_KEY_SECRET, "model-signing-key.pem"))
    if role.signs_state:
        items.append((*STATE_KEY_SECRET, "state-signing-key"))
    if role.http:
        items.append((*HTTP_TOKEN_SECRET, "http-token"))
    return items


def _env(role: Role, settings: Settings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "STREAMML_SASL_USERNAME", "value": acl.user_name(settings.topic_prefix, role.service)},
        {"name": "STREAMML_SASL_PASSWORD_FILE", "value": f"{SECRETS_DIR}/kafka-password"},
        {"name": "STREAMML_SSL_CA_LOCATION", "value": f"{SECRETS_DIR}/kafka-ca.crt"},
        {"name": "STREAMML_MODEL_VERIFY_KEYS_FILE", "value": f"{SECRETS_DIR}/model-verify-keys"},
    ]
    if role.signs_models:
        env.append(
            {"name": "STREAMML_MODEL_SIGNING_KEY_FILE", "value": f"{SECRETS_DIR}/model-signing-key.pem"}
        )
    if role.signs_state:
        env.append({"name": "STREAMML_SIGNING_KEY_FILE", "value": f"{SECRETS_DIR}/state-signing-key"})
    if role.http:
        env += [
            {"name": "STREAMML_HTTP_TOKEN_FILE", "value": f"{SECRETS_DIR}/http-token"},
            # In a pod 127.0.0.1 is the pod itself: the Service reaches the pod's address. The
            # NetworkPolicy admits only labelled application namespaces, and the API requires the token.
            {"name": "STREAMML_HTTP_HOST", "value": "0.0.0.0"},
            {"name": "STREAMML_HTTP_PORT", "value": str(HTTP_PORT)},
        ]
    env += [
        # Unique among the live pods of a service: its transactional and Faust group ids include it.
        {"name": "STREAMML_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HOME", "value": TMP_DIR},  # the root filesystem is read-only
    ]
    return env


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/healthz", "port": "metrics"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def deployment(role: Role, settings: Settings) -> dict[str, Any]:
    name = resource_name(role.service)
    ports = [{"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"}]
    if role.http:
        ports.append({"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"})
    container = {
        "name": role.service,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", f"services.{role.service}"],
        "envFrom": [{"configMapRef": {"name": "streamml-config"}}],
        "env": _env(role, settings),
        "ports": ports,
        # The metrics server starts once the service is composed (broker reached, topics verified, control
        # topics read to their end): the startup probe allows 5 minutes for that, then /healthz is both
        # readiness and liveness (the process serves).
        "startupProbe": _probe(5, 60),
        "readinessProbe": _probe(10, 3),
        "livenessProbe": _probe(10, 3),
        "resources": {
            "requests": {"cpu": role.cpu[0], "memory": role.memory[0]},
            "limits": {"cpu": role.cpu[1], "memory": role.memory[1]},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True},
            {"name": "data", "mountPath": settings.data_dir},
            {"name": "tmp", "mountPath": TMP_DIR},
        ],
    }
    sources = [
        {"secret": {"name": secret, "items": [{"key": key, "path": path}]}}
        for secret, key, path in _secret_items(role, settings.topic_prefix)
    ]
    pod_spec = {
        "serviceAccountName": "streamml",
        "automountServiceAccountToken": False,  # the services never call the Kubernetes API
        # No <SERVICE>_PORT variables from the namespace's Services: they could collide with STREAMML_*.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,  # a service stops within 9 s (README, "Broker trouble")
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,  # the secret files are group-readable (0440) by it
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": labels(role.service)},
            }
        ],
        "containers": [container],
        "volumes": [
            {"name": "secrets", "projected": {"defaultMode": 0o440, "sources": sources}},
            {"name": "data", "emptyDir": {"sizeLimit": "256Mi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": role.tmp_size}},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, role.service),
        "spec": {
            "replicas": role.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": labels(role.service)},
            # The new pod starts (and stands by) before the old one stops and hands its work over.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": {**labels(role.service), "app.kubernetes.io/part-of": "streamml"},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(settings.metrics_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(role: Role, settings: Settings) -> dict[str, Any]:
    ports = [{"name": "metrics", "port": settings.metrics_port, "targetPort": "metrics", "protocol": "TCP"}]
    if role.http:
        ports.append({"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(resource_name(role.service), role.service),
        "spec": {"type": "ClusterIP", "selector": labels(role.service), "ports": ports},
    }


def disruption_budget(role: Role) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(resource_name(role.service), role.service),
        "spec": {
            # A drain takes one pod at a time: a single writer's standby takes over before the next goes.
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",  # a crash-looping pod never blocks a drain
            "selector": {"matchLabels": labels(role.service)},
        },
    }


def _kafka_egress(settings: Settings) -> list[dict[str, Any]]:
    return [
        {
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KAFKA_NAMESPACE}}}],
            "ports": [{"port": kafka_port(settings), "protocol": "TCP"}],
        },
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                }
            ],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
        },
    ]


def network_policy(role: Role, settings: Settings) -> dict[str, Any]:
    """Ingress: Prometheus on the metrics port (and applications on the predictor's API); egress: the
    Kafka brokers' listener and DNS only (StreamML uses no schema registry: the schemas are in the image)."""
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": PROMETHEUS_NAMESPACE}},
        "podSelector": {"matchLabels": PROMETHEUS_POD_LABELS},
    }
    ingress: list[dict[str, Any]] = [
        {"from": [prometheus], "ports": [{"port": "metrics", "protocol": "TCP"}]}
    ]
    if role.http:
        clients = {"namespaceSelector": {"matchLabels": PREDICT_CLIENT_NAMESPACE_LABEL}}
        ingress.append({"from": [clients], "ports": [{"port": "http", "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(resource_name(role.service), role.service),
        "spec": {
            "podSelector": {"matchLabels": labels(role.service)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": _kafka_egress(settings),
        },
    }


def common(settings: Settings) -> list[dict[str, Any]]:
    """What every service shares, and the policy of a CLI pod (`streamml ...` as the user streamml-cli)."""
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta("streamml", None),
        "automountServiceAccountToken": False,
    }
    cli_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(resource_name(CLI), CLI),
        "spec": {
            "podSelector": {"matchLabels": labels(CLI)},
            "policyTypes": ["Ingress", "Egress"],
            "egress": _kafka_egress(settings),
        },
    }
    return [account, cli_policy]


def workloads(role: Role, settings: Settings) -> list[dict[str, Any]]:
    return [
        deployment(role, settings),
        service(role, settings),
        disruption_budget(role),
        network_policy(role, settings),
    ]


# -- Strimzi: topics and users ------------------------------------------------------------------------


def topic_specs(catalogue: Catalogue, pipelines: Iterable[tuple[str, str | None]]) -> list[TopicSpec]:
    specs = list(catalogue.global_topics())
    for name, raw_topic in pipelines:
        specs += acl.pipeline_topics(catalogue, name, raw_topic)
    return specs


def kafka_topics(specs: Sequence[TopicSpec], min_insync_replicas: int) -> list[dict[str, Any]]:
    """One KafkaTopic per declared topic, exactly as `streamml topics create` would create it."""
    seen: dict[str, str] = {}
    out = []
    for spec in specs:
        name = dns_name(spec.name)
        if seen.setdefault(name, spec.name) != spec.name:
            raise ValueError(f"topics {seen[name]!r} and {spec.name!r} map to one resource name {name!r}")
        out.append(
            {
                "apiVersion": STRIMZI_API,
                "kind": "KafkaTopic",
                "metadata": {
                    "name": name,
                    "namespace": NAMESPACE,
                    "labels": {"strimzi.io/cluster": KAFKA_CLUSTER, "app.kubernetes.io/part-of": "streamml"},
                },
                "spec": {
                    "topicName": spec.name,
                    "partitions": spec.partitions,
                    "replicas": spec.replication_factor,
                    "config": spec.topic_config(min_insync_replicas),
                },
            }
        )
    return out


def strimzi_acls(grants: Iterable[Grant]) -> list[dict[str, Any]]:
    """Strimzi's `simple` ACL rules: one per resource, with its operations (sorted: stable output)."""
    by_resource: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for g in grants:
        try:
            resource = (_RESOURCE_TYPES[g.resource_type], g.name, _PATTERNS[g.pattern])
            by_resource[resource].add(_OPERATIONS[g.operation])
        except KeyError as exc:
            raise ValueError(f"no Strimzi form for {g}") from exc
    return [
        {"resource": {"type": kind, "name": name, "patternType": pattern}, "operations": sorted(ops)}
        for (kind, name, pattern), ops in sorted(by_resource.items())
    ]


def grants_of(user: dict[str, Any]) -> set[Grant]:
    """The grants a KafkaUser holds (the inverse of `kafka_users`): what tests compare with the plan."""
    kinds = {v: k for k, v in _RESOURCE_TYPES.items()}
    patterns = {v: k for k, v in _PATTERNS.items()}
    operations = {v: k for k, v in _OPERATIONS.items()}
    principal = user["metadata"]["name"]
    out = set()
    for rule in user["spec"]["authorization"]["acls"]:
        res = rule["resource"]
        for op in rule["operations"]:
            out.add(
                Grant(
                    principal, kinds[res["type"]], patterns[res["patternType"]], res["name"], operations[op]
                )
            )
    return out


def kafka_users(grants: Iterable[Grant]) -> list[dict[str, Any]]:
    """One KafkaUser per principal (SCRAM-SHA-512; Strimzi puts its password in the Secret of that name)."""
    by_user: dict[str, list[Grant]] = defaultdict(list)
    for g in grants:
        by_user[g.principal].append(g)
    return [
        {
            "apiVersion": STRIMZI_API,
            "kind": "KafkaUser",
            "metadata": {
                "name": user,
                "namespace": NAMESPACE,
                "labels": {"strimzi.io/cluster": KAFKA_CLUSTER, "app.kubernetes.io/part-of": "streamml"},
            },
            "spec": {
                "authentication": {"type": "scram-sha-512"},
                "authorization": {"type": "simple", "acls": strimzi_acls(user_grants)},
            },
        }
        for user, user_grants in sorted(by_user.items())
    ]


# -- KEDA --------------------------------------------------------------------------------------------------


def lag_groups(settings: Settings) -> dict[str, tuple[str, str | None]]:
    """Consumer groups whose lag says a service needs more instances: service -> (group, topic or None).

    The data loops' group is `<prefix>-<service>-data` (streamml.runtime.BatchLoop) over every pipeline's
    input topics, so no single topic: KEDA then counts the lag of every topic the group commits. The trainer's
    is `<prefix>-trainer-requests` (services.trainer.requests) on the training-requests topic.
    """
    prefix = settings.topic_prefix
    return {
        FEATURES: (f"{prefix}-{FEATURES}-data", None),
        PREDICTOR: (f"{prefix}-{PREDICTOR}-data", None),
        TRAINER: (f"{prefix}-trainer-requests", Catalogue(settings).training_requests().name),
    }


def keda_grants(settings: Settings, raw_topics: Iterable[str] = ()) -> list[Grant]:
    """What KEDA's lag reader needs: Describe on the scaled groups and on the topics they read."""
    user = acl.user_name(settings.topic_prefix, KEDA_USER)
    grants = {
        Grant(user, "GROUP", "LITERAL", group, "DESCRIBE") for group, _ in lag_groups(settings).values()
    }
    grants.add(Grant(user, "TOPIC", "PREFIXED", f"{settings.topic_prefix}.", "DESCRIBE"))
    for topic in raw_topics:  # a raw topic a pipeline names outside the prefix
        if not topic.startswith(f"{settings.topic_prefix}."):
            grants.add(Grant(user, "TOPIC", "LITERAL", topic, "DESCRIBE"))
    return sorted(grants)


def keda(settings: Settings, pipelines: int, raw_topics: Iterable[str] = ()) -> list[dict[str, Any]]:
    """KEDA's principal and credentials, and a ScaledObject per consumer-group service (single writers keep
    their fixed 2 replicas: a third would only stand by too)."""
    user = acl.user_name(settings.topic_prefix, KEDA_USER)
    catalogue = Catalogue(settings)
    max_replicas = {
        FEATURES: settings.default_partitions * pipelines,  # one instance per partition of the state input
        PREDICTOR: settings.default_partitions * pipelines,  # one per partition of the features topics
        TRAINER: catalogue.training_requests().partitions,
    }
    # The trainer's requests are whole training runs: one waiting is enough to start another instance.
    lag_threshold = {FEATURES: "1000", PREDICTOR: "1000", TRAINER: "1"}
    username_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(f"{user}-auth", None),
        "type": "Opaque",
        "stringData": {"username": user},  # not secret; TriggerAuthentication reads parameters from Secrets
    }
    auth = {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": _meta(KEDA_AUTH, None),
        "spec": {
            "secretTargetRef": [
                {"parameter": "username", "name": f"{user}-auth", "key": "username"},
                {"parameter": "password", "name": user, "key": "password"},  # Strimzi's KafkaUser secret
                {"parameter": "ca", "name": CA_SECRET[0], "key": CA_SECRET[1]},
            ]
        },
    }
    out = [*kafka_users(keda_grants(settings, raw_topics)), username_secret, auth]
    for service_name, (group, topic) in lag_groups(settings).items():
        role = next(r for r in ROLES if r.service == service_name)
        metadata = {
            "bootstrapServers": settings.bootstrap_servers,
            "consumerGroup": group,
            **({"topic": topic} if topic else {}),
            "lagThreshold": lag_threshold[service_name],
            "offsetResetPolicy": "earliest",  # as the services' consumers: a new group reads from the start
            "sasl": "scram_sha512",
            "tls": "enable",
        }
        out.append(
            {
                "apiVersion": KEDA_API,
                "kind": "ScaledObject",
                "metadata": _meta(resource_name(service_name), service_name),
                "spec": {
                    "scaleTargetRef": {"name": resource_name(service_name)},
                    "minReplicaCount": 1 if service_name == TRAINER else role.replicas,
                    "maxReplicaCount": max(max_replicas[service_name], role.replicas),
                    "pollingInterval": 15,
                    "cooldownPeriod": 300,
                    "advanced": {
                        "horizontalPodAutoscalerConfig": {
                            # every change of membership is a rebalance: scale down slowly, one pod at a time
                            "behavior": {
                                "scaleDown": {
                                    "stabilizationWindowSeconds": 300,
                                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                                }
                            }
                        }
                    },
                    "triggers": [
                        {"type": "kafka", "metadata": metadata, "authenticationRef": {"name": KEDA_AUTH}}
                    ],
                },
            }
        )
    return out


# -- files -------------------------------------------------------------------------------------------------


def _dump(docs: Sequence[dict[str, Any]], source: str) -> str:
    header = (
        "# Generated by `make k8s-manifests` (python -m streamml.k8s): do not edit, regenerate and commit.\n"
        f"# From {source}.\n"
        "# tests/unit/test_k8s.py fails while this file differs from what the code generates.\n"
    )
    body = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=120, explicit_start=True)
    return header + body


def pipelines_declared(root: Path, settings: Settings) -> list[tuple[str, str]]:
    """(name, raw topic) of the declared pipelines, as `streamml acl apply --pipeline FILE` reads them."""
    from streamml import pipelines

    out = []
    for path in PIPELINE_FILES:
        spec = pipelines.load_file(root / path)
        out.append((spec.name, spec.raw_topic or Catalogue(settings).raw(spec.name).name))
    return out


def generate(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file (path relative to root) and its content."""
    settings = settings_from_env(parse_env((root / CONFIG_ENV).read_text()))
    catalogue = Catalogue(settings)
    pipes = pipelines_declared(root, settings)
    base = K8S_DIR / "base/generated"
    strimzi = K8S_DIR / "overlays/strimzi/generated"
    keda_dir = K8S_DIR / "overlays/keda/generated"
    files = {base / "common.yaml": _dump(common(settings), "streamml/k8s.py and base/config.env")}
    for role in ROLES:
        files[base / f"{role.service}.yaml"] = _dump(
            workloads(role, settings), "streamml/k8s.py (ROLES) and base/config.env"
        )
    sources = "the topic catalogue (streamml/topics.py), base/config.env and " + ", ".join(
        str(p) for p in PIPELINE_FILES
    )
    files[strimzi / "kafkatopics.yaml"] = _dump(
        kafka_topics(topic_specs(catalogue, pipes), settings.min_insync_replicas), sources
    )
    files[strimzi / "kafkausers.yaml"] = _dump(
        kafka_users(acl.plan(catalogue, pipes)), "the ACL plan (streamml/acl.py) of " + sources
    )
    files[keda_dir / "keda.yaml"] = _dump(
        keda(settings, len(pipes), [raw for _, raw in pipes]),
        "streamml/k8s.py (lag_groups), base/config.env and " + ", ".join(str(p) for p in PIPELINE_FILES),
    )
    return files


def stale(root: Path = ROOT) -> list[Path]:
    """Generated files whose committed content differs from what the code produces now."""
    return [
        path
        for path, text in generate(root).items()
        if not (root / path).is_file() or (root / path).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamml.k8s", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    args = parser.parse_args(argv)
    root: Path = args.root
    if args.check:
        outdated = stale(root)
        for path in outdated:
            print(f"stale: {path} (run `make k8s-manifests`)", file=sys.stderr)
        return 1 if outdated else 0
    for path, text in generate(root).items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        changed = not target.is_file() or target.read_text() != text
        if changed:
            target.write_text(text)
        print(f"{'wrote' if changed else 'unchanged'} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
