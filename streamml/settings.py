"""The one settings class of StreamML, read from STREAMML_* environment variables (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
# Secrets that may also come from a file, `<name>_file` (Kubernetes and compose secrets are files).
SECRET_FILES = ("sasl_password", "signing_key", "http_token", "schema_registry_basic_auth")


class Settings(BaseSettings):
    """Everything a StreamML process can be configured with; frozen so a process sees one config."""

    model_config = SettingsConfigDict(env_prefix="STREAMML_", env_file=".env", extra="ignore", frozen=True)

    bootstrap_servers: str = Field(
        DEFAULT_BOOTSTRAP, description="Kafka bootstrap servers, comma separated host:port."
    )
    client_id: str = Field("streamml", description="Kafka client.id prefix for this process.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol."
    )
    sasl_mechanism: str | None = Field(None, description="SASL mechanism, e.g. PLAIN or SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password.")
    sasl_password_file: str | None = Field(None, description="File holding the SASL password (a secret).")
    ssl_ca_location: str | None = Field(None, description="Path of the CA bundle for TLS.")
    ssl_certificate_location: str | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_key_location: str | None = Field(None, description="Client key for mutual TLS.")

    topic_prefix: str = Field("streamml", description="Prefix of every topic StreamML declares.")
    default_partitions: int = Field(3, ge=1, description="Partitions of per-pipeline data topics.")
    replication_factor: int = Field(1, ge=1, description="Replication factor of created topics.")
    min_insync_replicas: int = Field(1, ge=1, description="min.insync.replicas of created topics.")

    metrics_host: str = Field("127.0.0.1", description="Bind address of the Prometheus metrics endpoint.")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Port of the metrics endpoint (0 = off).")
    http_host: str = Field("127.0.0.1", description="Bind address of HTTP APIs (e.g. POST /predict).")
    http_port: int = Field(8080, ge=0, le=65535, description="Port of the HTTP API.")
    http_token: SecretStr | None = Field(
        None, description="Bearer token every HTTP API request must carry (none: no authentication)."
    )
    http_token_file: str | None = Field(None, description="File holding the HTTP bearer token (a secret).")

    signing_key: SecretStr | None = Field(
        None,
        description="Shared HMAC-SHA256 key: signs the monitor's state; signs and verifies models only where "
        "no Ed25519 keys are configured (the former scheme: every holder can forge).",
    )
    signing_key_file: str | None = Field(None, description="File holding the shared HMAC key (a secret).")
    model_signing_key_file: str | None = Field(
        None, description="Ed25519 private key (PEM) that signs model versions: learner and trainer only."
    )
    model_verify_keys: str | None = Field(
        None, description="Public keys that verify model versions: 'ed25519 <base64>' separated by commas."
    )
    model_verify_keys_file: str | None = Field(
        None, description="File of public keys that verify model versions, one 'ed25519 <base64>' per line."
    )
    accept_hmac_models: bool = Field(
        False, description="With Ed25519 verify keys: still accept HMAC-signed versions (while migrating)."
    )
    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible Schema Registry API (e.g. http://127.0.0.1:8081, or Apicurio's "
        ".../apis/ccompat/v7): pipeline contracts are registered there and raw topics also accept "
        "Confluent-framed Avro. None: no registry (Avro single-object encoding only).",
    )
    schema_registry_basic_auth: SecretStr | None = Field(
        None, description="Registry credentials 'user:password' (HTTP basic auth), if it needs them."
    )
    schema_registry_basic_auth_file: str | None = Field(
        None, description="File holding the registry credentials 'user:password' (a secret)."
    )
    schema_registry_ca_location: str | None = Field(
        None, description="CA bundle that verifies an https registry (default: the system's)."
    )
    schema_registry_wait_s: float = Field(
        30.0,
        ge=0,
        description="How long a service waits at start for the registry to answer; after that it writes "
        "its control topics single-object encoded (logged) until restarted.",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="at_least_once: outputs may repeat after a crash; exactly_once: Kafka transactions.",
    )
    commit_interval_s: float = Field(0.2, gt=0, description="How often services commit offsets/transactions.")
    max_batch: int = Field(2000, ge=1, description="Most records a service processes per batch.")
    linger_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a data loop's producer gathers outputs into one request (librdkafka "
        "linger.ms): a few ms of latency per hop for fewer, larger requests to the broker.",
    )
    fetch_min_bytes: int = Field(
        1,
        ge=1,
        le=16 * 1024 * 1024,
        description="Data a data loop's fetch asks the broker to gather before answering (fetch.min.bytes): "
        "fewer, larger fetches under load; 1 answers as soon as there is anything.",
    )
    fetch_max_wait_ms: int = Field(
        500,
        ge=1,
        le=10_000,
        description="Longest a data loop's fetch waits at the broker for fetch_min_bytes (fetch.wait.max.ms):"
        " the added latency per hop at low rates.",
    )
    writer_slots: int = Field(
        6, ge=1, le=64, description="Writer slots of single-writer services (partitions of <prefix>.writers)."
    )
    instance_id: str = Field("0", description="Distinguishes replicas of one service (group and txn ids).")
    data_dir: str = Field(".local/data", description="Folder for service-local state (Faust data dirs).")
    broker_timeout_s: float = Field(10.0, gt=0, description="How long to wait for the broker at start.")
    log_level: str = Field("INFO", description="Python log level of services and the CLI.")

    @field_validator(
        "signing_key", "sasl_password", "http_token", "schema_registry_basic_auth", mode="before"
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        """Compose passes `${VAR:-}` as an empty string: treat it as not configured, never as a key."""
        return None if value == "" else value

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """`<secret>_file` (e.g. STREAMML_SASL_PASSWORD_FILE, a Kubernetes or compose secret) fills the
        secret when it is not set directly; the file's content is never shown, trailing newlines dropped."""
        if not isinstance(data, dict):
            return data
        for secret in SECRET_FILES:
            path = data.get(f"{secret}_file")
            if path and not data.get(secret):
                try:
                    text = Path(path).read_text().rstrip("\r\n")
                except OSError as exc:
                    raise ValueError(f"cannot read {secret}_file {path}: {exc.strerror}") from exc
                if not text.strip():  # an empty secret is a mistake, never "no password" or "no token"
                    raise ValueError(f"{secret}_file {path} is empty")
                data = {**data, secret: text}
        return data

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers or any(":" not in s for s in servers):
            raise ValueError(
                f"bootstrap_servers must be host:port[,host:port], got {value!r} "
                "(set STREAMML_BOOTSTRAP_SERVERS, or run `make kafka-up` for a local broker)"
            )
        return ",".join(servers)

    def kafka_config(self) -> dict[str, Any]:
        """Client options shared by producers, consumers and the admin client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
