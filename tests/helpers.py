"""Reads of the real servers' state that tests assert on, and media generators."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from activities import registry
from activities.models import Asset, AuditEvent
from activities.vectors import VectorStore, get_store
from workers.settings import get_settings


def engine():  # type: ignore[no-untyped-def]
    return registry.get_engine(get_settings().database_endpoint())


def store() -> VectorStore:
    s = get_settings()
    return get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())


def collection() -> str:
    index = registry.active_index(engine())
    assert index is not None, "no active index version"
    return index.collection


def milvus_pks(tenant: str) -> list[str]:
    return store().pks(collection(), tenant)


def registry_rows(tenant: str) -> list[Asset]:
    with Session(engine()) as session:
        return list(session.scalars(select(Asset).where(Asset.tenant == tenant)))


def audit_counts(tenant: str) -> dict[str, int]:
    with Session(engine()) as session:
        rows = session.execute(
            select(AuditEvent.action, func.count())
            .where(AuditEvent.tenant == tenant)
            .group_by(AuditEvent.action)
        )
        return {action: n for action, n in rows}


def audit_events(tenant: str) -> list[AuditEvent]:
    with Session(engine()) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.tenant == tenant)))


def png_bytes(
    size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small PNG whose header declares a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (width * 3)
    body = zlib.compress(row * 4, 9)  # a few rows; the declared size is what matters
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def write_bad_corpus(directory: Path, oversized_bytes: int) -> dict[str, str]:
    """One file per kind of bad input; returns file name -> words the failure must contain."""
    directory.mkdir(parents=True, exist_ok=True)
    good = png_bytes((64, 64))
    (directory / "empty.png").write_bytes(b"")
    (directory / "truncated.png").write_bytes(good[: len(good) // 2])
    (directory / "random.jpg").write_bytes(random.Random(1).randbytes(4096))
    (directory / "bomb.png").write_bytes(png_bomb())
    (directory / "notes.txt").write_text("this is not an image\n" * 20)
    (directory / "doc.pdf").write_bytes(b"%PDF-1.4\n% a pdf\n")
    big = Image.effect_noise((1400, 1400), 100).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, "BMP")
    assert len(buf.getvalue()) > oversized_bytes
    (directory / "oversized.bmp").write_bytes(buf.getvalue())
    return {
        "empty.png": "empty file",
        "truncated.png": "corrupt or truncated",
        "random.jpg": "unrecognised content",
        "bomb.png": "decompression bomb",
        "notes.txt": "unrecognised content",
        "doc.pdf": "unsupported media type application/pdf",
        "oversized.bmp": "too large",
    }


def wait_searchable(tenant: str, expected: int, timeout: float = 15.0) -> None:
    """Asks read with Bounded consistency (fast); wait until fresh writes are visible to it."""
    import time

    deadline = time.monotonic() + timeout
    while (seen := store().count(collection(), tenant, strong=False)) < expected:
        assert time.monotonic() < deadline, f"{seen}/{expected} rows visible after {timeout}s"
        time.sleep(0.2)
