"""Milvus RBAC against a real Milvus 2.3.5 with ``authorizationEnabled: true``.

One Milvus of its own (free ports, its own temp dir), started once for this module and
stopped by its pid at the end. Root's password is changed to a canary first; the tests prove
that the users `mmrag milvus provision-rbac` creates can do their job and nothing more, that
refusals say which privilege is missing and what to do, and that no password leaks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr
from pymilvus import MilvusClient

from activities.store.vectors import ChunkRow, VectorStore, VectorStoreAccessError
from settings import Settings
from stack.procs import pid_alive, read_pid_file
from stack.services import Stack, StackError, StackPorts
from starters.cli import main
from workers.milvus_rbac import (
    DEFAULT_ROOT_TOKEN,
    ROLES,
    USERS,
    RbacError,
    passwords_from_env,
    provision,
)
from workers.roles import MILVUS_ACCESS

ROOT_PASSWORD = f"rootCanary{uuid.uuid4().hex}"
PASSWORDS = {u.name: f"{u.name}-pw-{uuid.uuid4().hex[:12]}" for u in USERS}
SECRETS = [ROOT_PASSWORD, *PASSWORDS.values()]
DIM = 4
TENANT = "acme"


@dataclass
class AuthMilvus:
    uri: str
    root_token: str
    log_path: Path

    def token(self, user: str) -> str:
        return f"{user}:{PASSWORDS[user]}"

    def store(self, user: str) -> VectorStore:
        return VectorStore(self.uri, self.token(user))


@pytest.fixture(scope="module")
def milvus() -> Iterator[AuthMilvus]:
    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-rbac-"))
    stack = Stack(
        state_dir,
        StackPorts.free(),
        services=("milvus",),
        milvus_config={"authorization_enabled": True},
    )
    pid: int | None = None
    try:
        uri = stack.up()["milvus_uri"]
        pid = read_pid_file(stack.server("milvus").pid_path)
        root = MilvusClient(uri=uri, token=DEFAULT_ROOT_TOKEN)
        root.update_password("root", "Milvus", ROOT_PASSWORD)
        root.close()
        yield AuthMilvus(uri, f"root:{ROOT_PASSWORD}", stack.server("milvus").log_path)
        _drop_all(uri, f"root:{ROOT_PASSWORD}")  # a loaded collection makes SIGTERM slow
    finally:
        stack.down()
        assert pid is None or not pid_alive(pid), f"milvus (pid {pid}) is still running"
        shutil.rmtree(state_dir, ignore_errors=True)


def _drop_all(uri: str, token: str) -> None:
    client = MilvusClient(uri=uri, token=token)
    for name in client.list_collections():
        for alias in client.list_aliases(name).get("aliases", []):
            client.drop_alias(alias)
        client.drop_collection(name)
    client.close()


@pytest.fixture(scope="module")
def provisioned(milvus: AuthMilvus) -> AuthMilvus:
    report = provision(milvus.uri, milvus.root_token, PASSWORDS)
    assert "created role mmrag_query" in report.changes
    assert "created user mmrag_ingest from MMRAG_MILVUS_INGEST_PASSWORD" in report.changes
    assert not report.warnings
    return milvus


def rows(asset_ids: list[str], tenant: str = TENANT) -> tuple[list[ChunkRow], np.ndarray]:
    chunks = [ChunkRow(a, tenant, f"file:///{a}.png", "image", "image", 1) for a in asset_ids]
    vectors = np.eye(len(chunks), DIM, dtype=np.float32) + 0.01
    return chunks, vectors


@pytest.fixture(scope="module")
def collection(provisioned: AuthMilvus) -> str:
    """The index version the ingest user creates, behind the ``mmrag_rbac`` alias."""
    store = provisioned.store("mmrag_ingest")
    store.ensure_collection("mmrag_rbac_v1", DIM, model={"model": "tiny"})
    store.point_alias("mmrag_rbac", "mmrag_rbac_v1")
    chunks, vectors = rows(["a1", "a2"])
    assert store.replace_assets("mmrag_rbac_v1", TENANT, ["a1", "a2"], chunks, vectors) == 2
    assert store.count("mmrag_rbac_v1", TENANT) == 2
    return "mmrag_rbac_v1"


def test_each_worker_role_has_a_provisioned_user() -> None:
    users = {u.name: u for u in USERS}
    for role, access in MILVUS_ACCESS.items():
        assert access.user == "" or users[access.user].role in ROLES, role
    # The writer's privileges include the encoder's, which include the reader's.
    query, encode, ingest = (
        ROLES[n].grants() for n in ("mmrag_query", "mmrag_encode", "mmrag_ingest")
    )
    assert query < encode < ingest
    assert not {p for _, _, p in query} & {"Insert", "Delete", "Upsert", "DropCollection"}


def test_a_worker_role_uses_its_own_token() -> None:
    s = Settings(
        milvus_token=SecretStr("mmrag_query:q"),
        milvus_token_cpu=SecretStr("mmrag_ingest:i"),
        milvus_token_query=SecretStr("mmrag_query:r"),
    )
    assert s.for_milvus_role("cpu").milvus_token.get_secret_value() == "mmrag_ingest:i"
    assert s.for_milvus_role("query").milvus_token.get_secret_value() == "mmrag_query:r"
    assert s.for_milvus_role("encode") is s  # no token of its own: the default
    assert s.for_milvus_role("generate") is s
    assert "mmrag_ingest:i" not in repr(s.for_milvus_role("cpu"))


def test_provisioning_is_idempotent_and_repairs_drift(provisioned: AuthMilvus) -> None:
    again = provision(provisioned.uri, provisioned.root_token, PASSWORDS)
    assert again.changes == []
    assert len(again.unchanged) == len(ROLES) + len(USERS)

    root = MilvusClient(uri=provisioned.uri, token=provisioned.root_token)
    root.revoke_privilege("mmrag_query", "Collection", "Search", "*")
    root.grant_privilege("mmrag_query", "Collection", "Insert", "*")  # drift: a write
    root.grant_role("mmrag_query", "mmrag_ingest")
    root.close()
    repaired = provision(provisioned.uri, provisioned.root_token, PASSWORDS)
    assert sorted(repaired.changes) == [
        "granted mmrag_query Search on Collection",
        "revoked mmrag_query Insert on Collection *",
        "revoked role mmrag_ingest from user mmrag_query",
    ]
    assert provision(provisioned.uri, provisioned.root_token, PASSWORDS).changes == []


def test_cli_provisions_from_the_environment(
    provisioned: AuthMilvus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from settings import get_settings

    monkeypatch.setenv("MMRAG_MILVUS_URI", provisioned.uri)
    monkeypatch.setenv("MMRAG_MILVUS_TOKEN", provisioned.root_token)
    for user in USERS:
        monkeypatch.setenv(user.password_env, PASSWORDS[user.name])
    assert passwords_from_env() == PASSWORDS
    get_settings.cache_clear()
    try:
        assert main(["milvus", "provision-rbac"]) == 0
        out = capsys.readouterr()
        assert "Milvus RBAC is up to date" in out.out
        monkeypatch.setenv("MMRAG_MILVUS_TOKEN", "root:not-the-root-password")
        get_settings.cache_clear()
        assert main(["milvus", "provision-rbac"]) == 2
        out = capsys.readouterr()
        assert "Provisioning needs an admin user" in out.err
        assert "password is wrong" in out.err
    finally:
        get_settings.cache_clear()
    for secret in [*SECRETS, "not-the-root-password"]:
        assert secret not in out.out + out.err


def test_ingest_user_runs_ingest_reindex_and_forget(
    provisioned: AuthMilvus, collection: str
) -> None:
    store = provisioned.store("mmrag_ingest")
    # re-index: a new version, the alias swapped to it and back, the old one dropped
    store.ensure_collection("mmrag_rbac_v2", DIM, model={"model": "tiny"})
    chunks, vectors = rows(["a1"])
    store.replace_assets("mmrag_rbac_v2", TENANT, ["a1"], chunks, vectors)
    # re-index reconciliation's read (a query iterator); its content right after an insert
    # is not this test's concern (it can lag with pymilvus's client-side timestamp)
    assert isinstance(store.asset_generations("mmrag_rbac_v2", TENANT), dict)
    store.point_alias("mmrag_rbac", "mmrag_rbac_v2")
    assert store.alias_model("mmrag_rbac")[0] == "mmrag_rbac_v2"
    store.point_alias("mmrag_rbac", collection)
    store.drop("mmrag_rbac_v2")
    # forget
    store.replace_assets(collection, TENANT, [], *rows(["gone"]))
    store.delete_assets(collection, TENANT, ["gone"], strong=True)
    assert store.pks(collection, TENANT) == ["a1:image", "a2:image"]
    assert store.search("mmrag_rbac", [1.0, 0, 0, 0], TENANT, 1)[0]["asset_id"] == "a1"


def test_encode_user_writes_vectors_but_manages_nothing(
    provisioned: AuthMilvus, collection: str
) -> None:
    store = provisioned.store("mmrag_encode")
    assert store.alias_model("mmrag_rbac") == (collection, {"model": "tiny"})  # encode_query
    chunks, vectors = rows(["e1"])
    assert store.replace_chunks(collection, TENANT, chunks, vectors) == 1  # encode_batch
    store.delete_stale_chunks(collection, TENANT, "e1", [])
    store.delete_assets(collection, TENANT, ["e1"])
    for refused, privilege in [
        (lambda: store.ensure_collection("mmrag_rbac_v9", DIM), "CreateCollection"),
        (lambda: store.drop(collection), "DropCollection"),
        (lambda: store.client.create_alias(collection, "mmrag_rbac_other"), "CreateAlias"),
    ]:
        with pytest.raises(VectorStoreAccessError, match=f"'mmrag_encode' lacks the {privilege}"):
            refused()


def test_query_user_reads_and_is_refused_every_write(
    provisioned: AuthMilvus, collection: str
) -> None:
    store = provisioned.store("mmrag_query")
    # Ask's retrieve (search through the alias) and encode_query (the alias's model)
    hits = store.search("mmrag_rbac", [0, 1.0, 0, 0], TENANT, 2)
    assert [h["asset_id"] for h in hits][0] == "a2"
    assert store.alias_model("mmrag_rbac") == (collection, {"model": "tiny"})
    assert store.count(collection, TENANT) == 2
    assert store.pks(collection, TENANT) == ["a1:image", "a2:image"]
    refusals = {
        "Insert": lambda: store.replace_assets(collection, TENANT, [], *rows(["q1"])),
        "Delete": lambda: store.delete_assets(collection, TENANT, ["a1"]),
        "DropCollection": lambda: store.drop(collection),
        "CreateCollection": lambda: store.ensure_collection("mmrag_rbac_q", DIM),
    }
    for privilege, refused in refusals.items():
        with pytest.raises(VectorStoreAccessError) as info:
            refused()
        message = str(info.value)
        assert f"user 'mmrag_query' lacks the {privilege} privilege" in message
        assert "mmrag milvus provision-rbac" in message and "MMRAG_MILVUS_TOKEN" in message
    assert store.count(collection, TENANT) == 2  # nothing was written or deleted


def test_milvus_2_3_does_not_check_alter_alias(provisioned: AuthMilvus, collection: str) -> None:
    """A known gap, stated in docs/security-reference.md: Milvus 2.3.5 has no privilege for
    AlterAlias, so any authenticated user may re-point an existing alias. If this fails after
    a Milvus upgrade, the gap is closed: update docs/security-reference.md's Milvus RBAC
    section."""
    writer = provisioned.store("mmrag_ingest")
    writer.ensure_collection("mmrag_rbac_alt", DIM)
    try:
        provisioned.store("mmrag_query").client.alter_alias("mmrag_rbac_alt", "mmrag_rbac")
        assert writer.alias_model("mmrag_rbac")[0] == "mmrag_rbac_alt"
    finally:
        writer.client.alter_alias(collection, "mmrag_rbac")
        writer.drop("mmrag_rbac_alt")


def test_wrong_credentials_are_refused_clearly(provisioned: AuthMilvus) -> None:
    wrong = f"wrongPassword{uuid.uuid4().hex[:8]}"
    for token, who in [
        (f"mmrag_query:{wrong}", "user 'mmrag_query'"),
        (f"nobody:{wrong}", "user 'nobody'"),
        (f"root:{wrong}", "user 'root'"),
    ]:
        with pytest.raises(VectorStoreAccessError) as info:
            VectorStore(provisioned.uri, token)
        message = str(info.value)
        assert f"Milvus refused the credentials of {who}" in message
        assert "password is wrong" in message
        assert wrong not in message and wrong not in repr(info.value)


def test_a_changed_password_needs_reset_passwords(provisioned: AuthMilvus) -> None:
    changed = {**PASSWORDS, "mmrag_query": f"rotated-{uuid.uuid4().hex[:12]}"}
    with pytest.raises(RbacError, match="--reset-passwords") as info:
        provision(provisioned.uri, provisioned.root_token, changed)
    assert changed["mmrag_query"] not in str(info.value)
    try:
        report = provision(provisioned.uri, provisioned.root_token, changed, reset_passwords=True)
        assert (
            "reset the password of mmrag_query from MMRAG_MILVUS_QUERY_PASSWORD" in report.changes
        )
        assert "granted role mmrag_query to user mmrag_query" in report.changes
        store = VectorStore(provisioned.uri, f"mmrag_query:{changed['mmrag_query']}")
        assert store.alias_model("mmrag_rbac")[0]
    finally:
        provision(provisioned.uri, provisioned.root_token, PASSWORDS, reset_passwords=True)


def test_a_user_without_a_password_is_not_created(provisioned: AuthMilvus) -> None:
    report = provision(provisioned.uri, provisioned.root_token, {})
    assert report.changes == []  # existing users keep their passwords and roles
    root = MilvusClient(uri=provisioned.uri, token=provisioned.root_token)
    root.drop_user("mmrag_encode")
    root.close()
    try:
        report = provision(provisioned.uri, provisioned.root_token, {})
        assert report.warnings == [
            "user mmrag_encode not created: set MMRAG_MILVUS_ENCODE_PASSWORD (encode worker: "
            "MMRAG_MILVUS_TOKEN_ENCODE (writes vectors, reads the alias's model))"
        ]
    finally:
        provision(provisioned.uri, provisioned.root_token, PASSWORDS)


def test_provisioning_needs_an_admin(provisioned: AuthMilvus) -> None:
    with pytest.raises(RbacError, match="Provisioning needs an admin user") as info:
        provision(provisioned.uri, provisioned.token("mmrag_ingest"), PASSWORDS)
    assert "lacks the" in str(info.value)


def test_no_password_in_logs_or_errors(
    provisioned: AuthMilvus, collection: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every path that talks to Milvus with a secret, at DEBUG: pymilvus's own logs
    (it logs refused RPCs with tracebacks), our errors, and the Milvus server's log."""
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    provision(provisioned.uri, provisioned.root_token, PASSWORDS)
    for token in [provisioned.root_token + "x", provisioned.token("mmrag_query") + "x"]:
        try:
            VectorStore(provisioned.uri, token)
        except VectorStoreAccessError as e:
            errors += [str(e), repr(e)]
    try:
        provisioned.store("mmrag_query").drop(collection)
    except VectorStoreAccessError as e:
        errors += [str(e), repr(e)]
    try:
        provision(provisioned.uri, provisioned.token("mmrag_query"), PASSWORDS)
    except RbacError as e:
        errors += [str(e), repr(e)]
    assert len(errors) == 8
    server_log = provisioned.log_path.read_text(errors="replace")
    for secret in SECRETS:
        assert secret not in caplog.text
        assert not any(secret in e for e in errors)
        assert secret not in server_log, "the Milvus server logged a password"
    assert os.environ.get("MMRAG_MILVUS_TOKEN", "") not in SECRETS


def test_a_bad_milvus_config_override_is_refused(tmp_path: Path) -> None:
    """``config.set`` of the milvus wheel drops a value of the wrong type silently; the
    stack refuses it before anything starts (a typo must not leave authorization off)."""
    for override in ({"authorization_enabled": "true"}, {"authorisation_enabled": True}):
        stack = Stack(tmp_path, StackPorts.free(), services=("milvus",), milvus_config=override)
        with pytest.raises(StackError, match="config override"):
            stack.server("milvus").prepare()
