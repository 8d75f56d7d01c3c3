"""Reads of the real servers' state that tests assert on, and media generators."""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from activities.store import registry
from activities.store.orm import Asset, AuditEvent
from activities.store.vectors import VectorStore, get_store
from settings import get_settings


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


def audit_private(event: AuditEvent) -> dict[str, str]:
    """An audit row's sealed URI / reason / note ({} when it has none or was forgotten):
    rows never hold them in clear (activities/store/audit_privacy.py)."""
    from activities.store import audit_privacy

    with Session(engine()) as session:
        return audit_privacy.open_private(session, event) or {}


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
        "doc.pdf": "corrupt PDF",
        "oversized.bmp": "too large",
    }


def wait_searchable(tenant: str, expected: int, timeout: float = 15.0) -> None:
    """Asks read with Bounded consistency (fast); wait until fresh writes are visible to it."""
    import time

    deadline = time.monotonic() + timeout
    while (seen := store().count(collection(), tenant, strong=False)) < expected:
        assert time.monotonic() < deadline, f"{seen}/{expected} rows visible after {timeout}s"
        time.sleep(0.2)


# -- media breadth (issue 5): every common image form, PDFs and videos ------------------------
RED = (220, 30, 30)
BLUE = (30, 60, 220)


def png_16bit_rgb(size: tuple[int, int], rgb16: tuple[int, int, int]) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write 16-bit colour PNGs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    width, height = size
    row = b"\x00" + struct.pack(">HHH", *rgb16) * width
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def write_image_forms(directory: Path) -> dict[str, tuple[int, int, int]]:
    """One file per image form cameras, scanners and editors produce.

    Returns file name -> the RGB colour its centre pixel must decode to (within JPEG
    tolerance). ``rotated.jpg`` is stored landscape with EXIF orientation 6 (rotate 90°
    clockwise to display): it must decode portrait, red on top.
    """
    from PIL import features

    directory.mkdir(parents=True, exist_ok=True)
    forms: dict[str, tuple[int, int, int]] = {}

    def save(name: str, image: Image.Image, fmt: str, colour: tuple[int, int, int], **kw) -> None:  # type: ignore[no-untyped-def]
        image.save(directory / name, fmt, **kw)
        forms[name] = colour

    red = Image.new("RGB", (48, 48), RED)
    save("plain.jpg", red, "JPEG", RED, quality=95)
    save("plain.png", red, "PNG", RED)
    save("plain.webp", red, "WEBP", RED, quality=95)
    save("plain.bmp", red, "BMP", RED)
    save("plain.tiff", red, "TIFF", RED, compression="tiff_lzw")
    if features.check("avif"):
        save("plain.avif", red, "AVIF", RED, quality=95)
    # Animated GIF: the first frame (red) is what is indexed, not the second (blue).
    adaptive = Image.Palette.ADAPTIVE
    frames = [
        red.convert("P", palette=adaptive),
        Image.new("RGB", (48, 48), BLUE).convert("P", palette=adaptive),
    ]
    frames[0].save(directory / "first-frame.gif", "GIF", save_all=True, append_images=frames[1:])
    forms["first-frame.gif"] = RED
    cmyk = Image.new("CMYK", (48, 48), (0, 255, 255, 0))  # pure red in CMYK
    save("cmyk.jpg", cmyk, "JPEG", (255, 0, 0), quality=95)
    save("cmyk.tiff", cmyk, "TIFF", (255, 0, 0))
    # Palette with a transparent index: transparent pixels must become white, not black.
    palette = Image.new("P", (48, 48), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.paste(1, (12, 12, 36, 36))
    save("palette.png", palette, "PNG", RED, transparency=0)
    forms["palette-corner.png"] = (255, 255, 255)
    palette.save(directory / "palette-corner.png", "PNG", transparency=1)  # red is see-through
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    rgba.paste((*RED, 255), (12, 12, 36, 36))
    save("alpha.png", rgba, "PNG", RED)
    save("la.png", Image.new("LA", (48, 48), (0, 0)), "PNG", (255, 255, 255))
    grey16 = Image.new("I;16", (48, 48), 32896)  # half of 65535 -> mid grey, not white
    save("grey16.png", grey16, "PNG", (128, 128, 128))
    save("grey16.tiff", grey16, "TIFF", (128, 128, 128))
    (directory / "rgb16.png").write_bytes(png_16bit_rgb((48, 48), (56540, 7710, 7710)))
    forms["rgb16.png"] = RED
    save("bilevel.tiff", Image.new("1", (48, 48), 1), "TIFF", (255, 255, 255))
    # EXIF orientation 6: stored 64x32 (red left, blue right), displayed 32x64 red on top.
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(directory / "rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    forms["rotated.jpg"] = RED  # sampled at the top-centre, see decoded_colour
    return forms


def decoded_colour(name: str, image: Image.Image) -> tuple[int, int, int]:
    """The pixel a form's expected colour refers to (top-centre for rotated.jpg)."""
    width, height = image.size
    x, y = (width // 2, height // 4) if name == "rotated.jpg" else (width // 2, height // 2)
    r, g, b = image.convert("RGB").getpixel((x, y))  # type: ignore[misc]
    return (r, g, b)


def close_colour(a: tuple[int, int, int], b: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def temporal_cli_execute(
    address: str,
    workflow_type: str,
    payload: dict,  # type: ignore[type-arg]
    workflow_id: str,
    token: str,
) -> subprocess.CompletedProcess[str]:
    """`temporal workflow execute ... --headers 'mmrag_auth="<token>"'`, as another backend
    (and the README) runs a workflow by name with JSON input; the completed process."""
    import json

    from settings import REPO_ROOT

    return subprocess.run(
        [
            str(REPO_ROOT / ".venv" / "bin" / "temporal"),
            "workflow",
            "execute",
            "--address",
            address,
            "--type",
            workflow_type,
            "--task-queue",
            "mmrag",
            "--workflow-id",
            workflow_id,
            "--input",
            json.dumps(payload),
            "--headers",
            f"mmrag_auth={json.dumps(token)}",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def temporal_execute(
    address: str,
    workflow_type: str,
    payload: dict,  # type: ignore[type-arg]
    workflow_id: str,
    token: str | None = None,
) -> dict:  # type: ignore[type-arg]
    """Run a workflow through the `temporal` CLI and return its JSON result; ``token``
    defaults to an operator credential of the test stack's signing key."""
    import json

    out = temporal_cli_execute(
        address, workflow_type, payload, workflow_id, operator_token() if token is None else token
    )
    if out.returncode:
        raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, out.stderr)
    return dict(json.loads(out.stdout)["result"])


def operator_token(ttl_s: float = 900) -> str:
    """An operator credential signed with the test stack's key (state_dir/auth)."""
    return issued_token(["*"], "operator", ttl_s)


def issued_token(tenants: list[str], role: str, ttl_s: float = 900, subject: str = "") -> str:
    """A credential signed with the test stack's key, as `mmrag token issue` prints it."""
    from settings import get_settings
    from workers.auth import issue_token, signing_key_from_settings

    key = signing_key_from_settings(get_settings())
    assert key is not None, "the test stack has no signing key (Stack.up creates it)"
    return issue_token(key[0], key[1], tenants, role, ttl_s, subject=subject)


# -- faults (issue 8) -------------------------------------------------------------------------
@contextmanager
def assets_locked(tenant: str) -> Iterator[None]:
    """Hold row locks on a tenant's registry rows: an activity that writes them blocks
    (a deterministic "mid-activity" for killing its worker) until the block exits."""
    with Session(engine()) as session, session.begin():
        session.execute(select(Asset.asset_id).where(Asset.tenant == tenant).with_for_update())
        yield


def grant_root(state_dir: Path, tenant: str, uri: str) -> None:
    """Make ``uri`` (a bucket, prefix or folder) a storage root of ``tenant`` on the test
    stack, the way `mmrag ingest` does on the stack's machine (workers re-read the file)."""
    from activities.store.roots import register_local_root

    register_local_root(state_dir, tenant, uri)


# -- replay (issue 14): today's workflow code must replay every recorded history --------------
HISTORIES = Path(__file__).parent / "fixtures" / "histories"


def workflow_classes() -> list[type]:
    """Every workflow type the workers run (the cpu role registers them all)."""
    from workflows.ask import Ask
    from workflows.forget import Forget
    from workflows.ingest import IngestAsset, IngestBatch
    from workflows.reindex import Reindex
    from workflows.watch import WatchPrefix

    return [IngestBatch, IngestAsset, Ask, Reindex, Forget, WatchPrefix]


def replayer(verify_keys: dict[str, Any] | None = None) -> Replayer:
    """A replayer as the workers are built: the credential interceptor in front, holding
    ``verify_keys`` (default: none at all, i.e. every key rotated out)."""
    from workers.auth import AuthInterceptor, AuthPolicy
    from workers.temporal_client import data_converter

    return Replayer(
        workflows=workflow_classes(),
        data_converter=data_converter(),
        interceptors=[AuthInterceptor(AuthPolicy(verify_keys or {}))],
    )


def current_verify_keys() -> dict[str, Any]:
    """The verification keys the workers hold now (the test stack's)."""
    from workers.auth import load_verify_keys

    return load_verify_keys(get_settings().state_dir / "auth" / "verify_keys.json")


def without_credentials(history: WorkflowHistory) -> WorkflowHistory:
    """``history`` with the ``mmrag_auth`` header taken out of every event: a committed
    fixture carries no bearer credential, even an expired one under a throwaway key. An
    accepted run replays without it (workers/auth.py trusts a history with no refusal)."""
    from workers.auth import HEADER

    def strip(node: object) -> None:
        if isinstance(node, dict):
            header = node.get("header")
            if isinstance(header, dict):
                header.get("fields", {}).pop(HEADER, None)
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    as_dict = history.to_json_dict()
    strip(as_dict)
    return WorkflowHistory.from_json(history.workflow_id, as_dict)


def committed_history(path: Path) -> WorkflowHistory:
    """A history under tests/fixtures/histories. The workflow id is not part of a history,
    but a workflow may use it (WatchPrefix names its pass after it), so recordings keep it
    beside the events as ``workflowId`` (which the history parser ignores); the oldest
    ones, recorded without it, replay under their file name."""
    as_dict = json.loads(path.read_text())
    return WorkflowHistory.from_json(as_dict.get("workflowId", path.stem), as_dict)


async def assert_replays(history: WorkflowHistory, record_as: str = "") -> None:
    """Replay a finished run on today's code with the workers' keys and with every key
    rotated out. With ``MMRAG_RECORD_HISTORIES=1`` and ``record_as`` it is also written to
    tests/fixtures/histories/ (credential removed, and replayed so first) unless that file
    exists: a committed history is the contract of the code that recorded it, never
    overwritten; record newer code under the next ``_vN`` name."""
    import os

    await replayer(current_verify_keys()).replay_workflow(history)
    committed = without_credentials(history)
    await replayer().replay_workflow(committed)
    path = HISTORIES / record_as
    if record_as and os.environ.get("MMRAG_RECORD_HISTORIES") == "1" and not path.exists():
        recorded = {"workflowId": committed.workflow_id, **committed.to_json_dict()}
        path.write_text(json.dumps(recorded, indent=2) + "\n")
        await replayer().replay_workflow(committed_history(path))
