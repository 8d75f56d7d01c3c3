"""Storage roots: the only places a worker reads, lists or deletes objects, per tenant.

A workflow input is hostile: any Temporal client can name any URI. Workers therefore
confine every object access to the roots configured for the run's tenant:

- ``MMRAG_STORAGE_ROOTS``: JSON ``{"tenant": ["file:///data/acme", "gs://bucket/acme/"],
  "*": [...]}`` (``*``: roots every tenant may use). This is how production is configured.
- ``<state_dir>/storage_roots.json``: the same shape, written only by someone with access
  to the stack's state directory: ``mmrag ingest ./photos`` on the machine running the
  embedded stack registers ``./photos`` for its tenant, so the local workflow stays one
  command. Workers re-read it when it changes.

A ``file://`` URI is confined after resolving it: a host part, a ``..`` segment, a relative
or ``~`` path, a symlink that leaves the root and anything that is not a regular file are
refused, and the same refusal is given whether or not the target exists (an Ask's error
never tells which files exist outside the roots). A ``gs://`` URI must name a root's bucket
and start with its prefix. Refusals are user errors: non-retryable, naming the setting.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from activities.runtime.errors import UnreadableObjectError

ALL_TENANTS = "*"
ROOTS_FILE = "storage_roots.json"
SETTING = "MMRAG_STORAGE_ROOTS"


class OutsideRootsError(UnreadableObjectError):
    """The URI is not inside the tenant's storage roots (or is not a plain object)."""


def _refusal(tenant: str, uri: str, why: str) -> OutsideRootsError:
    return OutsideRootsError(
        f"{uri} is refused for tenant {tenant!r}: {why}. Workers read and delete only inside "
        f"the tenant's storage roots: add the folder or bucket to {SETTING} (or to "
        f"{ROOTS_FILE} in the stack's state directory, which `mmrag ingest PATH` does on the "
        "stack's own machine)"
    )


def canonical_root(uri: str) -> str:
    """A root as stored: ``file:///real/dir`` (symlinks resolved) or ``gs://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"storage root {uri!r}: a file:// root has no host part")
        path = unquote(parsed.path)
        if not os.path.isabs(path):
            raise ValueError(f"storage root {uri!r} must be an absolute path")
        return Path(os.path.realpath(path)).as_uri()
    if parsed.scheme == "gs":
        if not parsed.netloc:
            raise ValueError(f"storage root {uri!r} names no bucket")
        prefix = parsed.path.lstrip("/")
        if ".." in prefix.split("/"):
            raise ValueError(f"storage root {uri!r} has a '..' segment")
        return f"gs://{parsed.netloc}/{prefix}"
    if "://" not in uri and os.path.isabs(uri):
        return canonical_root(Path(uri).as_uri())
    raise ValueError(f"storage root {uri!r}: use file:///absolute/dir or gs://bucket/prefix")


def parse_roots(text: str, origin: str) -> dict[str, tuple[str, ...]]:
    """``{"tenant": [root, ...]}`` from JSON; a malformed value names where it came from."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin} is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f'{origin} must be a JSON object {{"tenant": ["gs://b/p", ...]}}')
    roots: dict[str, tuple[str, ...]] = {}
    for tenant, uris in raw.items():
        if isinstance(uris, str):
            uris = [uris]
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise ValueError(f"{origin}: the roots of {tenant!r} must be a list of URIs")
        try:
            roots[str(tenant)] = tuple(canonical_root(u) for u in uris)
        except ValueError as e:
            raise ValueError(f"{origin}: {e}") from e
    return roots


@dataclass(frozen=True)
class TenantRoots:
    """The roots one tenant may use, and the checks that confine a URI to them."""

    tenant: str
    roots: tuple[str, ...]

    def _file_roots(self) -> list[Path]:
        return [Path(unquote(urlparse(r).path)) for r in self.roots if r.startswith("file://")]

    def confine_path(self, uri: str) -> Path:
        """The real path of a ``file://`` URI inside a root (not checked to exist)."""
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise _refusal(self.tenant, uri, "not a file:// URI")
        if parsed.netloc not in ("", "localhost"):
            raise _refusal(self.tenant, uri, "a file:// URI with a host part")
        raw = unquote(parsed.path)
        if not os.path.isabs(raw) or ".." in raw.split("/") or "\x00" in raw:
            raise _refusal(self.tenant, uri, "a relative path or a '..' segment")
        real = Path(os.path.realpath(raw))
        for root in self._file_roots():
            if real == root or root in real.parents:
                return real
        lexical = Path(raw)
        inside = any(lexical == r or r in lexical.parents for r in self._file_roots())
        why = "a symlink that leaves the storage roots" if inside else "outside the storage roots"
        raise _refusal(self.tenant, uri, why)

    def confine_gcs(self, uri: str) -> tuple[str, str]:
        """``(bucket, name)`` of a ``gs://`` URI inside a root."""
        parsed = urlparse(uri)
        bucket, name = parsed.netloc, parsed.path.lstrip("/")
        if parsed.scheme != "gs" or not bucket:
            raise _refusal(self.tenant, uri, "not a gs://bucket/name URI")
        if ".." in name.split("/"):
            raise _refusal(self.tenant, uri, "a '..' segment")
        for root in self.roots:
            if not root.startswith("gs://"):
                continue
            root_bucket, _, prefix = root[len("gs://") :].partition("/")
            if bucket == root_bucket and _under_prefix(name, prefix):
                return bucket, name
        raise _refusal(self.tenant, uri, "outside the storage roots")

    def confine(self, uri: str) -> str:
        """The URI if it lies inside a root; raises :class:`OutsideRootsError` otherwise."""
        if uri.startswith("gs://"):
            self.confine_gcs(uri)
        else:
            self.confine_path(uri)
        return uri


def _under_prefix(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` itself or below it as a folder (``a/b`` is not under ``a/bc``)."""
    if not prefix:
        return True
    if prefix.endswith("/"):
        return name.startswith(prefix) or name == prefix.rstrip("/")
    return name == prefix or name.startswith(prefix + "/")


def open_regular_file(path: Path) -> int:
    """An fd for reading ``path``, refusing symlinks (in the last component), FIFOs, devices
    and directories without ever blocking on them."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFileError(f"{path.as_uri()}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


class NotARegularFileError(OutsideRootsError):
    """A FIFO, socket, device or directory where an object was expected."""


class StorageRoots:
    """Every tenant's roots: the setting, plus the stack's local roots file (re-read when it
    changes, so `mmrag ingest ./photos` needs no worker restart)."""

    def __init__(self, configured: dict[str, tuple[str, ...]], local_file: Path | None) -> None:
        self._configured = configured
        self._local_file = local_file
        self._lock = threading.Lock()
        self._local: dict[str, tuple[str, ...]] = {}
        self._local_stamp: tuple[int, int] | None = None

    @classmethod
    def from_settings(cls, setting: str, state_dir: Path) -> StorageRoots:
        return cls(parse_roots(setting, SETTING), state_dir / ROOTS_FILE)

    def _local_roots(self) -> dict[str, tuple[str, ...]]:
        if self._local_file is None:
            return {}
        try:
            st = self._local_file.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._local_stamp:
                self._local = parse_roots(self._local_file.read_text(), str(self._local_file))
                self._local_stamp = stamp
            return self._local

    def for_tenant(self, tenant: str) -> TenantRoots:
        local = self._local_roots()
        roots: list[str] = []
        for source in (self._configured, local):
            for key in (tenant, ALL_TENANTS):
                roots.extend(r for r in source.get(key, ()) if r not in roots)
        return TenantRoots(tenant, tuple(roots))


def register_local_root(state_dir: Path, tenant: str, uri: str) -> bool:
    """Add ``uri`` (a folder, file or ``gs://`` prefix) to the stack's local roots file for
    ``tenant``; True when it was not there yet. For the person who runs the stack: the file
    lives in its state directory, which no Temporal client can write."""
    root = canonical_root(uri)
    if root.startswith("file://"):
        path = Path(unquote(urlparse(root).path))
        if path.is_file():
            root = path.parent.as_uri()
    path = state_dir / ROOTS_FILE
    current = parse_roots(path.read_text(), str(path)) if path.exists() else {}
    if any(_contains(existing, root) for existing in current.get(tenant, ())):
        return False
    current[tenant] = (*current.get(tenant, ()), root)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({t: list(r) for t, r in current.items()}, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return True


def _contains(root: str, uri: str) -> bool:
    if root.startswith("gs://") and uri.startswith("gs://"):
        r_bucket, _, r_prefix = root[5:].partition("/")
        u_bucket, _, u_prefix = uri[5:].partition("/")
        return r_bucket == u_bucket and _under_prefix(u_prefix, r_prefix)
    if root.startswith("file://") and uri.startswith("file://"):
        r, u = Path(unquote(urlparse(root).path)), Path(unquote(urlparse(uri).path))
        return u == r or r in u.parents
    return False
