"""Milvus RBAC for production: one Milvus user per worker role, the least it needs.

``mmrag milvus provision-rbac`` runs :func:`provision` as root (``MMRAG_MILVUS_TOKEN``) against
a Milvus with ``common.security.authorizationEnabled: true``. It mirrors the Postgres roles of
migrations/0003: only the users of ingest, re-index and forget may write.

============  ==========================  ===================================================
user / role   used by                     may
============  ==========================  ===================================================
mmrag_ingest  cpu worker                  read; insert/delete; create/drop collections and
                                          indexes, load; create/drop aliases
mmrag_encode  encode worker               read; insert/delete vectors in existing collections
mmrag_query   query worker, read-only     read: search, query, describe collections/aliases
              clients
============  ==========================  ===================================================

Privileges are granted on every collection (``*``): re-index creates a new collection per
index version, and Milvus 2.3 grants name whole collections only. Privilege names are those
Milvus 2.3.5 accepts (checked against the server: an unknown name or one given the wrong
object type is refused by ``grant_privilege``). Milvus 2.3.5 checks no privilege for
``AlterAlias``: any authenticated user may re-point an existing alias (tests prove it, so
docs/security-reference.md's claim stays true when Milvus is upgraded).

Provisioning converges: it creates what is missing, grants what is missing, revokes grants
and roles these users should not have, and leaves everything else alone, so running it again
changes nothing. Passwords come from the environment and are never printed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from activities.store.vectors import (
    VectorStoreAccessError,
    VectorStoreError,
    connect,
    guarded_client,
)

# -- what each role may do ------------------------------------------------------------------
READ_COLLECTION = (
    "Search",
    "Query",
    "IndexDetail",
    "GetLoadState",
    "GetLoadingProgress",
    "GetStatistics",
)
READ_GLOBAL = ("DescribeCollection", "ShowCollections", "DescribeAlias", "ListAliases")
WRITE_VECTORS = ("Insert", "Delete", "Upsert")
MANAGE_COLLECTION = ("CreateIndex", "Load", "Release", "Flush", "GetFlushState")
MANAGE_GLOBAL = ("CreateCollection", "DropCollection", "CreateAlias", "DropAlias")

ALL_OBJECTS = "*"


@dataclass(frozen=True)
class MilvusRole:
    """A Milvus role: privileges on every collection and global ones."""

    name: str
    collection: tuple[str, ...]
    global_: tuple[str, ...]

    def grants(self) -> set[tuple[str, str, str]]:
        """(object type, object name, privilege) triples this role must hold."""
        return {("Collection", ALL_OBJECTS, p) for p in self.collection} | {
            ("Global", ALL_OBJECTS, p) for p in self.global_
        }


@dataclass(frozen=True)
class MilvusUser:
    """A Milvus user of one role; its password comes from ``password_env``."""

    name: str
    role: str
    password_env: str
    used_by: str


ROLES: dict[str, MilvusRole] = {
    r.name: r
    for r in (
        MilvusRole("mmrag_query", READ_COLLECTION, READ_GLOBAL),
        MilvusRole("mmrag_encode", READ_COLLECTION + WRITE_VECTORS, READ_GLOBAL),
        MilvusRole(
            "mmrag_ingest",
            READ_COLLECTION + WRITE_VECTORS + MANAGE_COLLECTION,
            READ_GLOBAL + MANAGE_GLOBAL,
        ),
    )
}

USERS: tuple[MilvusUser, ...] = (
    MilvusUser(
        "mmrag_ingest",
        "mmrag_ingest",
        "MMRAG_MILVUS_INGEST_PASSWORD",
        "cpu worker: MMRAG_MILVUS_TOKEN_CPU (ingest, re-index, forget, Ask's retrieve)",
    ),
    MilvusUser(
        "mmrag_encode",
        "mmrag_encode",
        "MMRAG_MILVUS_ENCODE_PASSWORD",
        "encode worker: MMRAG_MILVUS_TOKEN_ENCODE (writes vectors, reads the alias's model)",
    ),
    MilvusUser(
        "mmrag_query",
        "mmrag_query",
        "MMRAG_MILVUS_QUERY_PASSWORD",
        "query worker: MMRAG_MILVUS_TOKEN_QUERY (Ask on mmrag-query: search, the alias's "
        "model); read-only clients: MMRAG_MILVUS_TOKEN",
    ),
)

DEFAULT_ROOT_TOKEN = "root:Milvus"  # Milvus's documented default; production must change it


class RbacError(RuntimeError):
    """Provisioning cannot go on; the message says what to do (and holds no password)."""


@dataclass
class ProvisionReport:
    """What :func:`provision` did, one line per change; empty ``changes``: nothing to do."""

    changes: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def passwords_from_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """user -> password for each user whose ``password_env`` is set and non-empty."""
    env = os.environ if env is None else env
    return {u.name: env[u.password_env] for u in USERS if env.get(u.password_env)}


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an admin call; Milvus's refusal becomes an RbacError that says what to do."""
    try:
        return fn(*args, **kwargs)
    except VectorStoreAccessError as e:
        raise RbacError(
            f"{what}: {e.reason}. Provisioning needs an admin user: run it with "
            "MMRAG_MILVUS_TOKEN set to root:<root password>"
        ) from None
    except VectorStoreError as e:
        raise RbacError(f"{what}: {e}") from None


def _can_log_in(uri: str, user: str, password: str) -> bool:
    try:
        client = connect(uri, f"{user}:{password}")
    except VectorStoreAccessError:
        return False
    client.close()
    return True


def provision(
    uri: str,
    admin_token: str,
    passwords: Mapping[str, str],
    reset_passwords: bool = False,
) -> ProvisionReport:
    """Create or repair mmrag's Milvus roles and users; see the module docstring.

    A user is created only when its password is given (``passwords``); an existing user
    whose password differs is refused unless ``reset_passwords`` (drop and re-create it:
    its open connections fail until they reconnect with the new password).
    """
    report = ProvisionReport()
    admin: Any = _call("connecting as the admin user", guarded_client, uri, admin_token)
    try:
        if admin_token == DEFAULT_ROOT_TOKEN:
            report.warnings.append(
                "root still has Milvus's default password: change it "
                "(MilvusClient.update_password('root', 'Milvus', <new>)) and keep it out of "
                "the workers' environment"
            )
        existing_roles = set(_call("listing roles", admin.list_roles))
        for role in ROLES.values():
            if role.name not in existing_roles:
                _call(f"creating role {role.name}", admin.create_role, role.name)
                report.changes.append(f"created role {role.name}")
            described = _call(f"reading role {role.name}", admin.describe_role, role.name)
            held = {
                (g["object_type"], g["object_name"], g["privilege"])
                for g in described.get("privileges", [])
                if g.get("db_name", "default") in ("default", "")
            }
            wanted = role.grants()
            for object_type, object_name, privilege in sorted(wanted - held):
                _call(
                    f"granting {privilege} on {object_type} {object_name} to {role.name}",
                    admin.grant_privilege,
                    role.name,
                    object_type,
                    privilege,
                    object_name,
                )
                report.changes.append(f"granted {role.name} {privilege} on {object_type}")
            for object_type, object_name, privilege in sorted(held - wanted):
                _call(
                    f"revoking {privilege} on {object_type} {object_name} from {role.name}",
                    admin.revoke_privilege,
                    role.name,
                    object_type,
                    privilege,
                    object_name,
                )
                report.changes.append(
                    f"revoked {role.name} {privilege} on {object_type} {object_name}"
                )
            if wanted == held:
                report.unchanged.append(f"role {role.name}: {len(wanted)} privileges")

        existing_users = set(_call("listing users", admin.list_users))
        for user in USERS:
            password = passwords.get(user.name, "")
            if user.name not in existing_users:
                if not password:
                    report.warnings.append(
                        f"user {user.name} not created: set {user.password_env} ({user.used_by})"
                    )
                    continue
                _call(f"creating user {user.name}", admin.create_user, user.name, password)
                report.changes.append(f"created user {user.name} from {user.password_env}")
            elif password and not _can_log_in(uri, user.name, password):
                if not reset_passwords:
                    raise RbacError(
                        f"user {user.name} exists with a password other than "
                        f"{user.password_env}: fix the variable, or run again with "
                        "--reset-passwords to drop and re-create the user with it"
                    )
                _call(f"dropping user {user.name}", admin.drop_user, user.name)
                _call(f"re-creating user {user.name}", admin.create_user, user.name, password)
                report.changes.append(f"reset the password of {user.name} from {user.password_env}")
            described = _call(f"reading user {user.name}", admin.describe_user, user.name)
            roles = set(described.get("roles", ()))
            if user.role not in roles:
                _call(
                    f"granting {user.role} to {user.name}", admin.grant_role, user.name, user.role
                )
                report.changes.append(f"granted role {user.role} to user {user.name}")
            for other in sorted(roles - {user.role, "public"}):
                _call(f"revoking {other} from {user.name}", admin.revoke_role, user.name, other)
                report.changes.append(f"revoked role {other} from user {user.name}")
            if roles == {user.role}:
                report.unchanged.append(f"user {user.name}: role {user.role}")
    finally:
        admin.close()
    return report
