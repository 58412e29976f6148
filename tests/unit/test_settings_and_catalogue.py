"""Settings from the environment and the topic catalogue."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamml.errors import BrokerUnavailableError
from streamml.kafka import check_broker
from streamml.settings import Settings
from streamml.topics import Catalogue


def test_settings_read_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_BOOTSTRAP_SERVERS", "10.0.0.1:9092, 10.0.0.2:9092")
    monkeypatch.setenv("STREAMML_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("STREAMML_SECURITY_PROTOCOL", "SASL_SSL")
    s = Settings()
    assert s.bootstrap_servers == "10.0.0.1:9092,10.0.0.2:9092"
    conf = s.kafka_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.password"] == "s3cret"
    assert "s3cret" not in repr(s)  # secrets never show up in logs


def test_settings_defaults_bind_loopback_and_are_frozen() -> None:
    s = Settings(_env_file=None)
    assert s.metrics_host == "127.0.0.1" and s.http_host == "127.0.0.1"
    with pytest.raises(ValidationError):
        s.metrics_port = 1  # type: ignore[misc]


def test_bad_bootstrap_setting_says_what_to_do() -> None:
    with pytest.raises(ValidationError, match="make kafka-up"):
        Settings(bootstrap_servers="localhost")


def test_unreachable_broker_fails_fast_with_hint() -> None:
    s = Settings(bootstrap_servers="127.0.0.1:1", broker_timeout_s=0.5)
    with pytest.raises(BrokerUnavailableError, match="make kafka-up"):
        check_broker(s)


def test_catalogue_declares_every_role_once() -> None:
    cat = Catalogue(Settings(_env_file=None))
    specs = cat.global_topics() + cat.pipeline_topics("agrawal") + cat.pipeline_topics("phishing")
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert {s.role for s in cat.global_topics()} == set(Catalogue.GLOBAL_ROLES)
    assert {s.role for s in cat.pipeline_topics("x")} == set(Catalogue.PIPELINE_ROLES)


def test_control_topics_are_compacted_and_model_versions_allow_large_messages() -> None:
    cat = Catalogue(Settings(_env_file=None))
    for spec in (cat.pipelines(), cat.model_versions(), cat.promotions()):
        assert spec.cleanup_policy == "compact"
        assert spec.topic_config(1)["retention.ms"] == "-1"
    assert int(cat.model_versions().topic_config(1)["max.message.bytes"]) >= 16 * 1024 * 1024
    assert cat.features("a").cleanup_policy == "delete"


def test_every_declared_topic_names_an_existing_schema() -> None:
    from streamml.schemas import all_schemas

    cat = Catalogue(Settings(_env_file=None))
    for spec in cat.global_topics() + cat.pipeline_topics("p"):
        assert spec.schema in all_schemas(), spec


def test_resolve_maps_names_back_to_declarations() -> None:
    cat = Catalogue(Settings(_env_file=None))
    assert cat.resolve("streamml.agrawal.predictions") == cat.predictions("agrawal")
    assert cat.resolve("streamml.model-versions") == cat.model_versions()
    assert cat.resolve("other.topic") is None
    assert cat.resolve("streamml.agrawal.unknown-role") is None


def test_invalid_pipeline_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid pipeline name"):
        Catalogue(Settings(_env_file=None)).raw("Bad Name")


def test_min_insync_never_exceeds_replication() -> None:
    cat = Catalogue(Settings(_env_file=None, replication_factor=1))
    assert cat.features("a").topic_config(2)["min.insync.replicas"] == "1"


def test_empty_signing_key_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMML_SIGNING_KEY", "")
    assert Settings(_env_file=None).signing_key is None


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`STREAMML_{name.upper()}`" in readme, f"README's configuration table misses {name}"


def test_readme_s_command_list_shows_every_cli_command() -> None:
    import re
    from pathlib import Path

    import typer.main

    from streamml.cli import app

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    root = typer.main.get_command(app)
    commands = []
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        subs = getattr(command, "commands", None)
        commands += [f"{name} {sub}" for sub in subs] if subs else [name]
    for command in commands:
        words = command.split()
        pattern = rf"streamml {re.escape(words[0])}\b" + (
            rf"[^\n]*\b{re.escape(words[1])}\b" if len(words) > 1 else ""
        )
        assert re.search(pattern, block), f"README's command list misses `streamml {command}`"
