"""Object storage behind one small interface: Google Cloud Storage and the local filesystem.

Both list page by page, report a *generation* (GCS object generation; for files, the
modification time in nanoseconds and size) so unchanged objects are skipped, and read
byte ranges so cheap checks never download a whole object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from workflows.contracts import ObjectRef


class ObjectMissingError(Exception):
    """The object does not exist (any more): a user error, never worth retrying."""


class UnsupportedUriError(ValueError):
    """A URI scheme mmrag cannot read."""


@dataclass
class Page:
    objects: list[ObjectRef]
    next_token: str  # "" when this was the last page


class ObjectStore(Protocol):
    def list_page(self, uri: str, page_token: str, page_size: int) -> Page: ...

    def stat(self, uri: str) -> ObjectRef: ...

    def read(self, uri: str, max_bytes: int, generation: str = "") -> bytes: ...

    def read_head(self, uri: str, n: int) -> bytes: ...

    def delete(self, uri: str) -> bool: ...


def normalize_uri(path_or_uri: str) -> str:
    """Turn a local path (relative or absolute) into a ``file://`` URI; keep other URIs."""
    if "://" in path_or_uri:
        scheme = path_or_uri.split("://", 1)[0]
        if scheme not in ("file", "gs"):
            raise UnsupportedUriError(
                f"unsupported URI scheme {scheme!r} in {path_or_uri!r}: use a local path, "
                "file:// or gs://bucket/prefix"
            )
        return path_or_uri
    return Path(path_or_uri).expanduser().resolve().as_uri()


def store_for(uri: str) -> ObjectStore:
    if uri.startswith("gs://"):
        return _gcs_store()
    if uri.startswith("file://"):
        return LocalStore()
    raise UnsupportedUriError(f"unsupported URI {uri!r}: use file:// or gs://bucket/prefix")


class LocalStore:
    """A directory tree as an object store; pages are slices of a sorted recursive walk."""

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(unquote(urlparse(uri).path))

    def _ref(self, path: Path) -> ObjectRef:
        st = path.stat()
        return ObjectRef(
            uri=path.as_uri(),
            generation=f"{st.st_mtime_ns}-{st.st_size}",
            size=st.st_size,
            created_at=int(st.st_mtime),
        )

    def list_page(self, uri: str, page_token: str, page_size: int) -> Page:
        root = self._path(uri)
        if root.is_file():
            return Page([self._ref(root)], "") if not page_token else Page([], "")
        if not root.is_dir():
            raise ObjectMissingError(f"{uri}: no such file or directory")
        # A sorted walk makes the page token (the last path returned) a stable cursor.
        paths = sorted(
            str(Path(dirpath) / name)
            for dirpath, _dirs, files in os.walk(root)
            for name in files
            if not name.startswith(".")
        )
        start = 0
        if page_token:
            import bisect

            start = bisect.bisect_right(paths, page_token)
        chunk = paths[start : start + page_size]
        refs = []
        for p in chunk:
            try:
                refs.append(self._ref(Path(p)))
            except FileNotFoundError:
                continue  # deleted between walk and stat
        more = start + page_size < len(paths)
        return Page(refs, chunk[-1] if more and chunk else "")

    def stat(self, uri: str) -> ObjectRef:
        path = self._path(uri)
        if not path.is_file():
            raise ObjectMissingError(f"{uri}: no such file")
        return self._ref(path)

    def read(self, uri: str, max_bytes: int, generation: str = "") -> bytes:
        path = self._path(uri)
        try:
            with path.open("rb") as f:
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ObjectMissingError(f"{uri}: no such file") from e
        return data

    def read_head(self, uri: str, n: int) -> bytes:
        return self.read(uri, n - 1)[:n]

    def delete(self, uri: str) -> bool:
        """Remove the file; False when it was already gone (deletes are retried)."""
        try:
            self._path(uri).unlink()
        except FileNotFoundError:
            return False
        return True


class GcsStore:
    """Google Cloud Storage (or its emulator when ``STORAGE_EMULATOR_HOST`` is set)."""

    def __init__(self) -> None:
        from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            self._client = storage.Client(
                project=os.environ.get("MMRAG_GCS_PROJECT") or "mmrag-emulator",
                credentials=AnonymousCredentials(),
            )
        else:
            self._client = storage.Client(project=os.environ.get("MMRAG_GCS_PROJECT") or None)

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

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

    def delete(self, uri: str) -> bool:
        from google.api_core.exceptions import NotFound

        bucket, name = self._split(uri)
        try:
            self._client.bucket(bucket).blob(name).delete()
        except NotFound:
            return False
        return True


@lru_cache(maxsize=1)
def _gcs_store() -> GcsStore:
    return GcsStore()
