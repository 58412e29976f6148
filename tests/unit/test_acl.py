"""The ACL plan derived from the catalogue: who may read and write what, and how apply reconciles."""

from __future__ import annotations

import stat
from pathlib import Path

from streamml import acl
from streamml.acl import Grant
from streamml.election import transactional_id
from streamml.settings import Settings
from streamml.topics import Catalogue

SETTINGS = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="sm", _env_file=None)
CATALOGUE = Catalogue(SETTINGS)


def _ops(grants: list[Grant], who: str, topic: str) -> set[str]:
    user = acl.user_name("sm", who)
    return {
        g.operation for g in grants if g.principal == user and g.resource_type == "TOPIC" and g.name == topic
    }


def test_the_issue_s_least_privilege_rules() -> None:
    grants = acl.plan(CATALOGUE, [("agrawal", None)])
    versions = CATALOGUE.model_versions().name
    assert "WRITE" not in _ops(grants, "predictor", versions)  # the predictor may not publish versions
    assert "READ" in _ops(grants, "predictor", versions)
    assert _ops(grants, "features", versions) == set()  # the features service may not even read them
    requests = CATALOGUE.training_requests().name
    writers = {g.principal for g in grants if g.name == requests and g.operation == "WRITE"}
    assert writers == {"sm-controller", "sm-cli"}  # only the controller and users request training
    for topic in (CATALOGUE.pipelines().name, CATALOGUE.promotions().name):
        assert "WRITE" in _ops(grants, "cli", topic)  # users apply pipelines, promote and roll back


def test_every_declared_reader_and_writer_is_granted_and_nobody_else() -> None:
    grants = acl.plan(CATALOGUE, [("agrawal", None)])
    for spec in CATALOGUE.global_topics() + CATALOGUE.pipeline_topics("agrawal"):
        for who in acl.PRINCIPALS:
            ops = _ops(grants, who, spec.name)
            assert ("READ" in ops) == (who in spec.readers), (spec.name, who)
            assert ("WRITE" in ops) == (who in spec.writers), (spec.name, who)
            assert ("DESCRIBE_CONFIGS" in ops) == (who in spec.readers or who in spec.writers)
            assert not ops & {"CREATE", "ALTER"} or who == "cli"


def test_groups_transactional_ids_and_faust_topics_are_the_service_s_own() -> None:
    grants = acl.plan(CATALOGUE)
    prefixed = {(g.principal, g.resource_type, g.name) for g in grants if g.pattern == "PREFIXED"}
    for service in ("features", "learner", "predictor", "monitor", "controller", "trainer"):
        user = f"sm-{service}"
        assert (user, "GROUP", f"sm-{service}") in prefixed
        assert (user, "TRANSACTIONAL_ID", f"sm-{service}") in prefixed
        assert (user, "TOPIC", f"sm-{service}") in prefixed  # Faust: sm-<service>[-<instance>]-...
        assert transactional_id(SETTINGS, service, 3).startswith(f"sm-{service}")
    assert not any(g.principal == "sm-cli" and g.resource_type == "TRANSACTIONAL_ID" for g in grants)
    # the user creates the catalogue's topics, nobody else creates any outside their own prefix
    creators = {(g.principal, g.name) for g in grants if g.operation == "CREATE"}
    assert ("sm-cli", "sm.") in creators
    assert all(name.startswith(user) or user == "sm-cli" for user, name in creators)


def test_a_raw_topic_named_by_the_pipeline_is_covered() -> None:
    grants = acl.plan(CATALOGUE, [("agrawal", "clicks")])
    assert "READ" in _ops(grants, "features", "clicks")
    assert {"WRITE", "CREATE"} <= _ops(grants, "cli", "clicks")
    assert _ops(grants, "features", "sm.agrawal.raw") == set()


def test_diff_adds_what_is_missing_and_removes_only_stale_grants_of_our_users() -> None:
    wanted = acl.plan(CATALOGUE, [("a", None)])
    stale = Grant("sm-features", "TOPIC", "LITERAL", "sm.gone.raw", "READ")
    foreign = Grant("someone-else", "TOPIC", "LITERAL", "sm.a.raw", "READ")
    to_add, to_remove = acl.diff(wanted, [*wanted[5:], stale, foreign])
    assert to_add == wanted[:5]
    assert to_remove == [stale]
    assert acl.diff(wanted, wanted) == ([], [])  # idempotent


def test_passwords_are_generated_once_private_and_reused(tmp_path: Path) -> None:
    folder = tmp_path / "users"
    first, created = acl.ensure_password(folder, "sm-features")
    again, created_again = acl.ensure_password(folder, "sm-features")
    assert created and not created_again and first == again and len(first) >= 40
    assert stat.S_IMODE(acl.password_file(folder, "sm-features").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_readme_s_access_table_says_what_the_catalogue_declares() -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    specs = CATALOGUE.global_topics() + CATALOGUE.pipeline_topics("p")
    for service in ("features", "learner", "predictor", "monitor", "controller", "trainer"):
        row = re.search(rf"^\| {service} \| (.*) \| (.*) \|$", readme, re.MULTILINE)
        assert row is not None, f"README's access table has no row for {service}"
        for column, who in ((row.group(1), "readers"), (row.group(2), "writers")):
            documented = {re.sub(r" \(.*\)", "", part).strip() for part in column.split(", ")}
            declared = {
                "dead letters" if s.role == "dead-letter" else s.role
                for s in specs
                if service in getattr(s, who)
            }
            assert documented == declared, (service, who, documented ^ declared)
