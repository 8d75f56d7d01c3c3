"""Storage roots: a Temporal client can make workers read or delete only inside the roots of
its tenant. Each test first states the attack the security review reproduced on main."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.store.objects import LocalStore, UnsupportedUriError, worker_uri
from activities.store.roots import (
    OutsideRootsError,
    StorageRoots,
    TenantRoots,
    canonical_root,
    parse_roots,
    register_local_root,
)
from starters.ask import ask
from starters.ingest import start_ingest
from starters.lifecycle import start_forget
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import grant_root, registry_rows
from workflows.contracts import AskInput, ForgetInput, IngestResult, asset_id_for

SECRET = "DATABASE_PASSWORD=hunter2-canary"


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside every test root (pytest's base temp): the 'server's own files'."""
    path = Path(tempfile.mkdtemp(prefix="mmrag-outside-"))
    (path / ".env").write_text(SECRET)
    (path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _roots(tenant: str, *folders: Path) -> TenantRoots:
    return TenantRoots(tenant, tuple(canonical_root(str(f)) for f in folders))


def _cause(error: BaseException) -> str:
    """The innermost failure message of a failed workflow."""
    while getattr(error, "cause", None) is not None:
        error = error.cause  # type: ignore[assignment]
    return str(error)


async def _ingest(client: Client, tenant: str, sources: list[str]) -> IngestResult:
    handle = await start_ingest(client, tenant, sources)
    return await asyncio.wait_for(handle.result(), timeout=180)


async def _forget(client: Client, inp: ForgetInput):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for((await start_forget(client, inp)).result(), timeout=60)


# -- the confinement rules, on the real filesystem -----------------------------------------
def test_traversal_host_and_relative_paths_are_refused(tmp_path: Path, outside: Path) -> None:
    roots = _roots("acme", tmp_path)
    store = LocalStore(roots)
    for uri in (
        f"{tmp_path.as_uri()}/../../{outside.name}/.env",
        f"file://other-host{outside}/.env",
        (outside / ".env").as_uri(),
        "file:///etc/passwd",
    ):
        with pytest.raises(OutsideRootsError, match="MMRAG_STORAGE_ROOTS"):
            store.read(uri, 1000)
    for raw in ("../../etc/passwd", "~/.ssh/id_rsa", "photos/a.jpg", "http://x/y"):
        with pytest.raises(UnsupportedUriError):
            worker_uri(raw)


def test_refusal_is_the_same_whether_or_not_the_file_exists(tmp_path: Path, outside: Path) -> None:
    """No oracle: an error must not tell which files exist outside the roots."""
    store = LocalStore(_roots("acme", tmp_path))
    messages = []
    for name in (".env", "no-such-file"):
        with pytest.raises(OutsideRootsError) as info:
            store.read((outside / name).as_uri(), 100)
        messages.append(str(info.value).replace(name, "X"))
    assert messages[0] == messages[1]


def test_symlink_out_of_the_root_is_refused_and_one_inside_is_fine(
    tmp_path: Path, outside: Path
) -> None:
    (tmp_path / "leak.txt").symlink_to(outside / ".env")
    (tmp_path / "real.txt").write_text("mine")
    (tmp_path / "alias.txt").symlink_to(tmp_path / "real.txt")
    store = LocalStore(_roots("acme", tmp_path))
    with pytest.raises(OutsideRootsError, match="symlink that leaves"):
        store.read((tmp_path / "leak.txt").as_uri(), 100)
    assert store.read((tmp_path / "alias.txt").as_uri(), 100) == b"mine"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: a worker thread hung for ever."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    store = LocalStore(_roots("acme", tmp_path))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            store.read(fifo.as_uri(), 100)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # unblock it before failing, so the test run does not hang
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert outcome and "not a regular file" in str(outcome[0])


def test_gcs_roots_are_bucket_and_prefix_bounded() -> None:
    roots = TenantRoots("acme", (canonical_root("gs://media/acme/"),))
    assert roots.confine_gcs("gs://media/acme/photo.jpg") == ("media", "acme/photo.jpg")
    for uri in (
        "gs://other-bucket/acme/photo.jpg",
        "gs://media/acme-evil/photo.jpg",
        "gs://media/acme/../other/x",
        "gs://media/",
    ):
        with pytest.raises(OutsideRootsError):
            roots.confine_gcs(uri)


def test_roots_setting_is_per_tenant_and_validated(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    setting = f'{{"a": ["{(tmp_path / "a").as_uri()}"], "*": ["gs://shared/x/"]}}'
    roots = StorageRoots.from_settings(setting, tmp_path / "state")
    assert roots.for_tenant("a").confine((tmp_path / "a" / "f.jpg").as_uri())
    with pytest.raises(OutsideRootsError):
        roots.for_tenant("b").confine((tmp_path / "a" / "f.jpg").as_uri())
    assert roots.for_tenant("b").confine("gs://shared/x/f.jpg")
    # The local file: what `mmrag ingest ./b` registers, picked up without a restart.
    assert register_local_root(tmp_path / "state", "b", str(tmp_path / "b"))
    assert not register_local_root(tmp_path / "state", "b", str(tmp_path / "b"))
    assert roots.for_tenant("b").confine((tmp_path / "b" / "f.jpg").as_uri())
    for bad in ('["x"]', '{"a": "relative/dir"}', '{"a": ["http://x"]}', "{"):
        with pytest.raises(ValueError, match="MMRAG_STORAGE_ROOTS"):
            parse_roots(bad, "MMRAG_STORAGE_ROOTS")


def test_listing_pages_a_nested_tree_exactly_once(tmp_path: Path, outside: Path) -> None:
    """Pages resume after their token; every file once, in order; refused entries reported."""
    expected = []
    for d in ("a", "a/b", "a-c", "z", "m/n/o"):
        for i in range(3):
            path = tmp_path / d / f"f{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            expected.append(path.as_uri())
    (tmp_path / "a" / ".hidden").write_text("x")
    (tmp_path / "m" / "leak.png").symlink_to(outside / ".env")
    os.mkfifo(tmp_path / "m" / "pipe.png")
    store = LocalStore(_roots("acme", tmp_path))
    seen: list[str] = []
    refused: dict[str, str] = {}
    token = ""
    for _ in range(100):
        page = store.list_page(tmp_path.as_uri(), token, 4)
        assert len(page.objects) + len(page.refused) <= 4
        seen.extend(o.uri for o in page.objects)
        refused.update(page.refused)
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    assert set(refused) == {(tmp_path / "m" / n).as_uri() for n in ("leak.png", "pipe.png")}
    assert "symlink that leaves" in refused[(tmp_path / "m" / "leak.png").as_uri()]


def test_a_page_token_whose_file_became_a_folder_resumes_inside_it(tmp_path: Path) -> None:
    """The token names the last path listed; if that file is replaced by a folder between
    pages, the next page lists the folder's files instead of failing the ingest."""
    for name in ("a", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    store = LocalStore(_roots("acme", tmp_path))
    first = store.list_page(tmp_path.as_uri(), "", 1)
    assert [o.uri for o in first.objects] == [(tmp_path / "a").as_uri()]
    (tmp_path / "a").unlink()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    rest = store.list_page(tmp_path.as_uri(), first.next_token, 10)
    assert [o.uri for o in rest.objects] == [
        (tmp_path / p).as_uri() for p in ("a/x.png", "b.png", "c.png")
    ]


# -- the attacks, through Temporal, against the real stack ---------------------------------
async def test_forget_never_deletes_a_file_a_failed_ingest_named(
    worker: Workers, client: Client, tenant: str, outside: Path, tmp_path: Path
) -> None:
    """Critical: ingest file:///srv/app/.env (fails, keeps a row), then Forget with
    delete_object unlinked it. Outside the roots the ingest is refused and nothing is kept;
    inside the roots a failed asset's object is never deleted."""
    secret = outside / ".env"
    with pytest.raises(WorkflowFailureError) as info:
        await _ingest(client, tenant, [secret.as_uri()])
    assert "MMRAG_STORAGE_ROOTS" in _cause(info.value)
    assert not [r for r in registry_rows(tenant) if r.uri == secret.as_uri()]
    result = await _forget(
        client, ForgetInput(tenant, uri_prefix=secret.as_uri(), delete_object=True)
    )
    assert result.objects_deleted == 0 and secret.read_text() == SECRET

    # Inside the root: a text file fails to ingest; Forget tombstones it, keeps the file.
    notes = tmp_path / "notes.txt"
    notes.write_text(SECRET)
    failed = await _ingest(client, tenant, [str(notes)])
    assert failed.failed == 1
    result = await _forget(
        client, ForgetInput(tenant, uri_prefix=notes.as_uri(), delete_object=True)
    )
    assert (result.forgotten, result.objects_deleted, result.objects_kept) == (1, 0, 1)
    assert notes.read_text() == SECRET


async def test_forget_deletes_only_the_ingested_generation(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "p", per_class=1, seed=7)
    done = await _ingest(client, tenant, [str(tmp_path / "p")])
    assert done.ingested == len(files)
    kept, deleted = files[0][0].resolve(), files[1][0].resolve()
    kept.write_bytes(kept.read_bytes() + b"\0")  # replaced since it was ingested
    for path in (kept, deleted):
        await _forget(
            client,
            ForgetInput(tenant, asset_id=asset_id_for(tenant, path.as_uri()), delete_object=True),
        )
    assert kept.exists() and not deleted.exists()


async def test_ingest_refuses_traversal_symlinks_fifos_and_foreign_buckets(
    worker: Workers, client: Client, tenant: str, tmp_path: Path, outside: Path
) -> None:
    folder = tmp_path / "drop"
    write_corpus(folder, per_class=1, seed=11)
    (folder / "leak.png").symlink_to(outside / "passwd")
    os.mkfifo(folder / "pipe.png")
    result = await _ingest(client, tenant, [str(folder)])  # finishes: no thread blocks
    reasons = {Path(f.uri).name: f.reason for f in result.failures}
    assert "symlink that leaves" in reasons["leak.png"]
    assert "not a regular file" in reasons["pipe.png"]
    assert result.ingested == 18

    for source in (
        f"{folder.as_uri()}/../../../{outside.name}/passwd",
        f"file://other-host{outside}/passwd",
        "gs://someone-elses-bucket/payroll/",
    ):
        with pytest.raises(WorkflowFailureError) as info:
            await _ingest(client, tenant, [source])
        assert "refused" in _cause(info.value), source


async def test_roots_are_per_tenant(
    worker: Workers, client: Client, test_stack: ServerStack
) -> None:
    """Tenant B names tenant A's folder: refused; A ingests it."""
    a, b = f"ra-{uuid.uuid4().hex[:6]}", f"rb-{uuid.uuid4().hex[:6]}"
    folder = Path(tempfile.mkdtemp(prefix="mmrag-tenant-a-"))
    try:
        write_corpus(folder, per_class=1, seed=5)
        grant_root(test_stack.state_dir, a, str(folder))
        with pytest.raises(WorkflowFailureError):
            await _ingest(client, b, [str(folder)])
        assert (await _ingest(client, a, [str(folder)])).ingested == 18
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_ask_image_uri_obeys_the_roots_and_is_no_existence_oracle(
    worker: Workers, client: Client, tenant: str, outside: Path, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "p", per_class=1, seed=3)
    await _ingest(client, tenant, [str(tmp_path / "p")])
    errors = []
    for name in ("passwd", "missing"):
        with pytest.raises(WorkflowFailureError) as info:
            await asyncio.wait_for(
                ask(client, AskInput(tenant=tenant, image_uri=(outside / name).as_uri())),
                timeout=90,
            )
        errors.append(_cause(info.value).replace(name, "X"))
    assert errors[0] == errors[1] and "MMRAG_STORAGE_ROOTS" in errors[0]
