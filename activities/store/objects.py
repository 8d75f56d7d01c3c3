"""Object storage behind one small interface: Google Cloud Storage and the local filesystem.

Both list page by page, report a *generation* (GCS object generation; for files, the
modification time in nanoseconds and size) so unchanged objects are skipped, and read
byte ranges so cheap checks never download a whole object.
"""

from __future__ import annotations

import os
import stat
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from activities.runtime.errors import UnreadableObjectError
from activities.store.roots import (
    NotARegularFileError,
    OutsideRootsError,
    TenantRoots,
    open_regular_file,
)
from workflows.contracts import ObjectRef


class ObjectMissingError(UnreadableObjectError):
    """The object does not exist (any more): a user error, never worth retrying."""


class UnsupportedUriError(UnreadableObjectError, ValueError):
    """A URI scheme mmrag cannot read."""


@dataclass
class Page:
    objects: list[ObjectRef]
    next_token: str  # "" when this was the last page
    # Entries of a listing that are not objects mmrag may read: (uri, why). A symlink that
    # leaves the storage roots, a FIFO, a socket. Reported, never read.
    refused: list[tuple[str, str]] = field(default_factory=list)


class ObjectStore(Protocol):
    def list_page(self, uri: str, page_token: str, page_size: int) -> Page: ...

    def stat(self, uri: str) -> ObjectRef: ...

    def read(self, uri: str, max_bytes: int, generation: str = "") -> bytes: ...

    def read_head(self, uri: str, n: int) -> bytes: ...

    def delete(self, uri: str, generation: str) -> bool: ...


def normalize_uri(path_or_uri: str) -> str:
    """Turn a local path (relative, absolute or ``~``) into a ``file://`` URI; keep other URIs.

    For starters, on the user's own machine. Workers use :func:`worker_uri`, which never
    expands ``~`` or resolves against the worker's working directory."""
    if "://" in path_or_uri:
        scheme = path_or_uri.split("://", 1)[0]
        if scheme not in ("file", "gs"):
            raise UnsupportedUriError(
                f"unsupported URI scheme {scheme!r} in {path_or_uri!r}: use a local path, "
                "file:// or gs://bucket/prefix"
            )
        return path_or_uri
    return Path(path_or_uri).expanduser().resolve().as_uri()


def worker_uri(uri: str) -> str:
    """A URI from a workflow input: ``file://``, ``gs://`` or an absolute path, nothing else."""
    if "://" not in uri and uri.startswith("/"):
        return Path(uri).as_uri()
    if uri.startswith(("file://", "gs://")):
        return uri
    raise UnsupportedUriError(
        f"unsupported source {uri!r}: give an absolute file:// URI or gs://bucket/prefix "
        "(relative and ~ paths mean nothing on a worker)"
    )


def store_for(uri: str, roots: TenantRoots) -> ObjectStore:
    """The store for ``uri``, confined to ``roots``: every call checks its URI against them."""
    if uri.startswith("gs://"):
        return GcsStore(roots)
    if uri.startswith("file://"):
        return LocalStore(roots)
    raise UnsupportedUriError(f"unsupported URI {uri!r}: use file:// or gs://bucket/prefix")


def _components(path: Path, root: Path) -> tuple[str, ...]:
    return path.relative_to(root).parts


class LocalStore:
    """A directory tree as an object store, confined to the tenant's roots.

    Listing is a depth-first walk in name order that resumes after the page token (the last
    path returned) without visiting the subtrees before it: a page costs the directories on
    the way to it, not the whole tree, so listing a large tree stays linear."""

    def __init__(self, roots: TenantRoots) -> None:
        self.roots = roots

    def _ref(self, path: Path, st: os.stat_result | None = None) -> ObjectRef:
        st = st or path.stat()
        return ObjectRef(
            uri=path.as_uri(),
            generation=f"{st.st_mtime_ns}-{st.st_size}",
            size=st.st_size,
            created_at=int(st.st_mtime),
        )

    def list_page(self, uri: str, page_token: str, page_size: int) -> Page:
        root = self.roots.confine_path(uri)
        if root.is_file():
            return Page([self.stat(uri)], "") if not page_token else Page([], "")
        if not root.is_dir():
            raise ObjectMissingError(f"{uri}: no such file or directory")
        try:
            after = _components(Path(page_token), root) if page_token else ()
        except ValueError as e:
            raise ObjectMissingError(f"{uri}: page token {page_token!r} is not below it") from e
        page = Page([], "")
        last: Path | None = None
        for path, entry in self._walk(root, root, after):
            if last is not None and len(page.objects) + len(page.refused) >= page_size:
                page.next_token = str(last)
                break
            last = path
            self._list_entry(path, entry, page)
        return page

    def _walk(self, root: Path, folder: Path, after: tuple[str, ...]):  # type: ignore[no-untyped-def]
        """(path, DirEntry) of every non-hidden file below ``folder`` after ``after``, in
        component order; symlinked folders are listed as entries, never descended."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(
                    (e for e in it if not e.name.startswith(".")), key=lambda e: e.name
                )
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        depth = len(_components(folder, root))
        # Entries named before the cursor's component here are skipped by bisection, not one
        # by one: a page deep into a flat folder of 100k files costs its scan and sort only.
        start = (
            bisect_left(entries, after[depth], key=lambda e: e.name) if len(after) > depth else 0
        )
        for entry in entries[start:]:
            path = Path(entry.path)
            parts = _components(path, root)
            if after and parts < after[: depth + 1]:
                continue  # the whole entry (and its subtree) comes before the cursor
            if entry.is_dir(follow_symlinks=False):
                inner = after if after and parts == after[: depth + 1] else ()
                yield from self._walk(root, path, inner)
            elif not after or parts > after:
                yield path, entry

    def _list_entry(self, path: Path, entry: os.DirEntry[str], page: Page) -> None:
        uri = path.as_uri()
        try:
            if entry.is_symlink():
                real = self.roots.confine_path(uri)
                st = real.stat()
            else:
                st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise NotARegularFileError(f"{uri}: not a regular file (a FIFO, socket or device)")
        except OutsideRootsError as e:
            page.refused.append((uri, str(e)))
            return
        except FileNotFoundError:
            return  # deleted between listing and stat, or a dangling symlink
        page.objects.append(self._ref(path, st))

    def stat(self, uri: str) -> ObjectRef:
        path = self.roots.confine_path(uri)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ObjectMissingError(f"{uri}: no such file") from e
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFileError(f"{uri}: not a regular file")
        ref = self._ref(path, st)
        ref.uri = uri
        return ref

    def read(self, uri: str, max_bytes: int, generation: str = "") -> bytes:
        path = self.roots.confine_path(uri)
        try:
            fd = open_regular_file(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise ObjectMissingError(f"{uri}: no such file") from e
        except OSError as e:  # ELOOP: the last component became a symlink after the check
            raise NotARegularFileError(f"{uri}: not a regular file ({e.strerror})") from e
        with os.fdopen(fd, "rb") as f:
            return f.read(max_bytes + 1)

    def read_head(self, uri: str, n: int) -> bytes:
        return self.read(uri, n - 1)[:n]

    def delete(self, uri: str, generation: str) -> bool:
        """Remove the file if it is still the recorded generation; False when it is gone or
        was replaced since (deletes are retried, and a newer file is not ours to delete)."""
        path = self.roots.confine_path(uri)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFileError(f"{uri}: not a regular file")
        if f"{st.st_mtime_ns}-{st.st_size}" != generation:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True


class GcsStore:
    """Google Cloud Storage (or its emulator when ``STORAGE_EMULATOR_HOST`` is set), confined
    to the tenant's roots (bucket and prefix)."""

    def __init__(self, roots: TenantRoots) -> None:
        self.roots = roots
        self._client = _gcs_client()

    def _split(self, uri: str) -> tuple[str, str]:
        return self.roots.confine_gcs(uri)

    @staticmethod
    def _ref(bucket: str, blob: object) -> ObjectRef:
        created = getattr(blob, "updated", None) or getattr(blob, "time_created", None)
        return ObjectRef(
            uri=f"gs://{bucket}/{blob.name}",  # type: ignore[attr-defined]
            generation=str(blob.generation),  # type: ignore[attr-defined]
            size=int(blob.size or 0),  # type: ignore[attr-defined]
            content_type=blob.content_type or "",  # type: ignore[attr-defined]
            created_at=int(created.timestamp()) if created else 0,
        )

    def list_page(self, uri: str, page_token: str, page_size: int) -> Page:
        bucket, prefix = self._split(uri)
        if prefix and not prefix.endswith("/") and not page_token:
            blob = self._client.bucket(bucket).get_blob(prefix)
            if blob is not None:
                return Page([self._ref(bucket, blob)], "")
        iterator = self._client.list_blobs(
            bucket, prefix=prefix or None, max_results=page_size, page_token=page_token or None
        )
        page = next(iterator.pages, None)
        if page is None:
            return Page([], "")
        refs = [self._ref(bucket, b) for b in page if not b.name.endswith("/")]
        return Page(refs, iterator.next_page_token or "")

    def stat(self, uri: str) -> ObjectRef:
        bucket, name = self._split(uri)
        blob = self._client.bucket(bucket).get_blob(name)
        if blob is None:
            raise ObjectMissingError(f"{uri}: no such object")
        return self._ref(bucket, blob)

    def read(self, uri: str, max_bytes: int, generation: str = "") -> bytes:
        from google.api_core.exceptions import NotFound

        bucket, name = self._split(uri)
        blob = self._client.bucket(bucket).blob(
            name, generation=int(generation) if generation.isdigit() else None
        )
        try:
            return blob.download_as_bytes(start=0, end=max_bytes)
        except NotFound as e:
            raise ObjectMissingError(f"{uri}: no such object (generation {generation})") from e

    def read_head(self, uri: str, n: int) -> bytes:
        return self.read(uri, n - 1)[:n]

    def delete(self, uri: str, generation: str) -> bool:
        """Delete exactly the recorded generation; False when it is gone or was overwritten."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        bucket, name = self._split(uri)
        if not generation.isdigit():
            return False
        try:
            self._client.bucket(bucket).blob(name).delete(if_generation_match=int(generation))
        except (NotFound, PreconditionFailed):
            return False
        return True


@lru_cache(maxsize=1)
def _gcs_client():  # type: ignore[no-untyped-def]
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("MMRAG_GCS_PROJECT") or "mmrag-emulator",
            credentials=AnonymousCredentials(),
        )
    return storage.Client(project=os.environ.get("MMRAG_GCS_PROJECT") or None)
