"""Least-privilege access on a secured cluster, derived from the topic catalogue: one SCRAM principal per
service (and one for the user's `streamml` commands), and exactly the ACLs its declared reads and writes need.

`plan` is pure (catalogue + pipelines -> grants); `apply` reconciles a cluster to it the way Strimzi's User
Operator does: missing users and ACLs are created, ACLs of our principals that the plan no longer holds are
removed, everything else is left alone, so a second run changes nothing.

What each principal gets:
- every topic whose declaration names it as a reader: READ (which implies DESCRIBE) and DESCRIBE_CONFIGS
  (services verify the topics they use at start); as a writer: WRITE and DESCRIBE_CONFIGS;
- its consumer groups, transactional ids and Faust's internal topics, all named `<prefix>-<who>...`: READ on
  the groups, WRITE on the transactional ids, CREATE/READ/WRITE/DESCRIBE_CONFIGS on the topics (Faust
  declares its assignor and changelog topics at every start);
- the throw-away groups of whole-topic readers (`<prefix>-reader-*`, `<prefix>-watermarks`): they are
  assigned partitions and never commit, but librdkafka still looks their coordinator up;
- the user (`cli`) may also CREATE the catalogue's topics (`streamml topics create`, `pipeline apply`)
  and add partitions to topics declared `may_grow`.
Nobody gets cluster-level rights: creating users and ACLs stays with the operator's super user.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from streamml.tlsca import write_new_private_file
from streamml.topics import CLI, SERVICES, Catalogue, TopicSpec

log = logging.getLogger(__name__)

PRINCIPALS = (*SERVICES, CLI)
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192


@dataclass(frozen=True, order=True)
class Grant:
    """One ALLOW ACL: `principal` may do `operation` on the resource(s) `resource_type`/`pattern`/`name`."""

    principal: str  # the SCRAM user name, e.g. "streamml-features" (Kafka's principal is User:<name>)
    resource_type: str  # TOPIC, GROUP or TRANSACTIONAL_ID
    pattern: str  # LITERAL or PREFIXED
    name: str
    operation: str  # READ, WRITE, CREATE, ALTER, DESCRIBE_CONFIGS

    def line(self) -> str:
        star = "*" if self.pattern == "PREFIXED" else ""
        return f"User:{self.principal:<22} {self.operation:<16} {self.resource_type:<16} {self.name}{star}"


def user_name(prefix: str, who: str) -> str:
    """The SCRAM user (and Kafka principal User:<name>) of a service, or of the user's CLI ("cli")."""
    return f"{prefix}-{who}"


def pipeline_topics(catalogue: Catalogue, pipeline: str, raw_topic: str | None = None) -> list[TopicSpec]:
    """A pipeline's topics, its raw topic under the name its definition gives (if not the default)."""
    specs = catalogue.pipeline_topics(pipeline)
    if raw_topic:
        specs = [replace(s, name=raw_topic) if s.role == "raw" else s for s in specs]
    return specs


def plan(catalogue: Catalogue, pipelines: Iterable[tuple[str, str | None]] = ()) -> list[Grant]:
    """Every ACL of every StreamML principal for the global topics and these (pipeline, raw topic)s."""
    prefix = catalogue.prefix
    grants: set[Grant] = set()
    specs = list(catalogue.global_topics())
    for name, raw_topic in pipelines:
        specs += pipeline_topics(catalogue, name, raw_topic)
    for spec in specs:
        for who in spec.readers:
            grants.add(Grant(user_name(prefix, who), "TOPIC", "LITERAL", spec.name, "READ"))
        for who in spec.writers:
            grants.add(Grant(user_name(prefix, who), "TOPIC", "LITERAL", spec.name, "WRITE"))
        for who in {*spec.readers, *spec.writers}:
            grants.add(Grant(user_name(prefix, who), "TOPIC", "LITERAL", spec.name, "DESCRIBE_CONFIGS"))
        if not spec.name.startswith(f"{prefix}."):  # a raw topic named by its pipeline, outside our prefix
            grants.add(Grant(user_name(prefix, CLI), "TOPIC", "LITERAL", spec.name, "CREATE"))
        if spec.may_grow:
            grants.add(Grant(user_name(prefix, CLI), "TOPIC", "LITERAL", spec.name, "ALTER"))
    for who in PRINCIPALS:
        user = user_name(prefix, who)
        own = f"{prefix}-{who}"
        grants.add(Grant(user, "GROUP", "PREFIXED", own, "READ"))
        grants.add(Grant(user, "GROUP", "PREFIXED", f"{prefix}-reader-", "READ"))
        grants.add(Grant(user, "GROUP", "LITERAL", f"{prefix}-watermarks", "READ"))
        if who == CLI:
            grants.add(Grant(user, "TOPIC", "PREFIXED", f"{prefix}.", "CREATE"))
            continue
        grants.add(Grant(user, "TRANSACTIONAL_ID", "PREFIXED", own, "WRITE"))
        for op in ("CREATE", "READ", "WRITE", "DESCRIBE_CONFIGS"):
            grants.add(Grant(user, "TOPIC", "PREFIXED", own, op))
    return sorted(grants)


@dataclass(frozen=True)
class Changes:
    """What `apply` does (or, with dry_run, would do)."""

    users_created: list[str]
    added: list[Grant]
    removed: list[Grant]

    @property
    def empty(self) -> bool:
        return not (self.users_created or self.added or self.removed)


def diff(wanted: Sequence[Grant], current: Iterable[Grant]) -> tuple[list[Grant], list[Grant]]:
    """(to add, to remove): current grants of StreamML principals that the plan does not hold are removed."""
    ours = {g.principal for g in wanted}
    have = {g for g in current if g.principal in ours}
    want = set(wanted)
    return sorted(want - have), sorted(have - want)


def password_file(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / f"{user}.password"


def ensure_password(secrets_dir: Path, user: str) -> tuple[str, bool]:
    """The user's password from <secrets_dir>/<user>.password, created (random, mode 0600) if missing.

    Returns (password, created). The password is never logged or printed.
    """
    path = password_file(secrets_dir, user)
    if path.is_file():
        text = path.read_text().rstrip("\r\n")
        if not text:
            raise ValueError(f"{path} is empty: delete it to have a new password generated")
        return text, False
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(32)
    write_new_private_file(path, (password + "\n").encode())
    return password, True


# -- the cluster side ---------------------------------------------------------------------------------


def _binding(grant: Grant) -> AclBinding:
    return AclBinding(
        ResourceType[grant.resource_type],
        grant.name,
        ResourcePatternType[grant.pattern],
        f"User:{grant.principal}",
        "*",
        AclOperation[grant.operation],
        AclPermissionType.ALLOW,
    )


def _filter(grant: Grant) -> AclBindingFilter:
    """A filter that matches exactly this grant's ACL."""
    b = _binding(grant)
    return AclBindingFilter(
        b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, b.permission_type
    )


def _grant(binding: Any) -> Grant | None:  # an AclBinding (its stubs type restype as str | int too)
    """Our form of an ACL the broker holds; None for kinds we never write (DENY, host-bound, non-User)."""
    kind, _, name = binding.principal.partition(":")
    if kind != "User" or binding.host != "*" or binding.permission_type != AclPermissionType.ALLOW:
        return None
    return Grant(
        name, binding.restype.name, binding.resource_pattern_type.name, binding.name, binding.operation.name
    )


def current_grants(admin: Any, timeout_s: float = 30.0) -> list[Grant]:
    """Every ALLOW ACL on the cluster, in our form (needs DESCRIBE on the cluster: the operator's)."""
    everything = cast(Any, AclBindingFilter)(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ANY
    )
    bindings = admin.describe_acls(everything, request_timeout=timeout_s).result()
    return [g for b in bindings if (g := _grant(b)) is not None]


def apply(
    admin: Any,  # an AdminClient connected as the operator (its stubs do not know the SCRAM calls)
    wanted: Sequence[Grant],
    secrets_dir: Path,
    *,
    dry_run: bool = False,
    timeout_s: float = 30.0,
) -> Changes:
    """Reconcile the cluster's StreamML users and ACLs to `wanted` (idempotent).

    Every user's SCRAM credential is (re)set from <secrets_dir>/<user>.password, generated if missing: the
    same password again changes nothing for its clients, and a user deleted on the cluster comes back. (The
    credentials are not read first: confluent-kafka 2.16's describe_user_scram_credentials corrupted the
    heap of the calling process, "munmap_chunk(): invalid pointer", in our tests.) `users_created` lists the
    users whose password was generated by this run. With dry_run nothing changes on the cluster or on disk.
    """
    users = sorted({g.principal for g in wanted})
    created = [u for u in users if not password_file(secrets_dir, u).is_file()]
    if not dry_run:
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
        upserts = [
            UserScramCredentialUpsertion(u, info, ensure_password(secrets_dir, u)[0].encode()) for u in users
        ]
        for user, future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout_s).items():
            future.result()
            log.info("SCRAM credential set for %s", user)
    to_add, to_remove = diff(wanted, current_grants(admin, timeout_s))
    if not dry_run and to_add:
        for future in admin.create_acls([_binding(g) for g in to_add], request_timeout=timeout_s).values():
            future.result()
    if not dry_run and to_remove:
        filters = [_filter(g) for g in to_remove]
        for future in admin.delete_acls(filters, request_timeout=timeout_s).values():
            future.result()
    return Changes(created, to_add, to_remove)
