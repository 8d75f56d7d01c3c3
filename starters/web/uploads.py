"""Uploaded files, stored in the tenant's own upload folder before an ingest reads them.

A file name comes from the client and is hostile: ``../../etc/cron.d/x``, ``C:\\x``, a NUL,
an ESC that drives a terminal, a bidi override that hides the real extension, a name of
4 KB. Only its last component survives, NFKC-normalised, reduced to letters, digits and
``._-`` (anything else becomes ``_``), without leading dots, at most 100 characters; it is
stored under a fresh random folder, opened with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so
an upload never overwrites, follows a link or leaves its tenant's folder. What the bytes
are is decided by the workers, which sniff them; the name is only for people.

Each tenant's folder (``MMRAG_WEB_UPLOAD_DIR/<tenant>``, by default under the stack's state
directory) is registered as a storage root of that tenant only, on the stack's machine, as
``mmrag ingest ./photos`` does; elsewhere ``MMRAG_STORAGE_ROOTS`` must name it.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import uuid
from pathlib import Path
from typing import BinaryIO

from activities.store.roots import register_local_root

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 100
_CHUNK = 1024 * 1024


class UploadTooLarge(ValueError):
    """One file is over ``MMRAG_WEB_MAX_FILE_BYTES``."""


def safe_name(name: str) -> str:
    """The part of a client's file name that may be stored (never empty)."""
    last = re.split(r"[/\\]", name or "")[-1]
    text = unicodedata.normalize("NFKC", last)
    text = _UNSAFE.sub("_", text).lstrip(".")
    text = re.sub(r"_{2,}", "_", text)[:MAX_NAME].strip("_")
    return text or "upload"


def tenant_folder_name(tenant: str) -> str:
    """A folder name for ``tenant`` (any string): readable, and distinct for distinct tenants."""
    readable = safe_name(tenant)[:40]
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def upload_root(base: Path, tenant: str) -> Path:
    """The tenant's upload folder (created 0700)."""
    folder = base / tenant_folder_name(tenant)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def register_upload_root(state_dir: Path, base: Path, tenant: str) -> None:
    """Make the tenant's upload folder a storage root of that tenant, when the embedded
    stack's state lives here (elsewhere the workers' MMRAG_STORAGE_ROOTS must name it)."""
    if (state_dir / "endpoints.json").exists():
        register_local_root(state_dir, tenant, upload_root(base, tenant).as_uri())


def new_batch(base: Path, tenant: str) -> Path:
    """A fresh folder for one request's files: the ingest's single source."""
    folder = upload_root(base, tenant) / uuid.uuid4().hex
    folder.mkdir(mode=0o700)
    return folder


def store_file(folder: Path, name: str, source: BinaryIO, max_bytes: int) -> Path:
    """Copy ``source`` into ``folder`` under a safe form of ``name``; over ``max_bytes`` the
    partial file is removed and :class:`UploadTooLarge` raised."""
    stem = safe_name(name)
    path = folder / stem
    n = 1
    while path.exists():
        path = folder / f"{n}-{stem}"
        n += 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise UploadTooLarge(
                        f"{stem} is over the {max_bytes}-byte limit for one file "
                        "(MMRAG_WEB_MAX_FILE_BYTES)"
                    )
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if folder.resolve() not in path.resolve().parents:  # cannot happen: the name has no '/'
        path.unlink(missing_ok=True)
        raise ValueError("an upload left its folder")
    return path
