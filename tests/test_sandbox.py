"""The decoder sandbox's confinement: what the process decoding a hostile file can see, use
and reach.

Each test starts the sandbox through its own spawn path and decodes a real file, then looks
at the child from outside (``/proc/<pid>/environ``, ``limits``, ``status``, ``ns/net``: what
the kernel gave it, whatever the child says) and from inside (``DecoderSandbox.probe``: what
code running in the child sees). Before the sandbox was confined, the first three failed:
the planted canaries were in the child's environment, its CPU, open-file, file-size and
core limits were unlimited, and it shared the worker's network namespace. No server needed.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from activities.media.formats import PDF, BadMediaError, MediaLimits
from activities.media.sandbox import (
    ENV_PASSTHROUGH,
    IMAGE_TIME_SETTING,
    ISOLATED,
    OPEN_FILES,
    SHARED,
    DecoderSandbox,
    SandboxError,
    cpu_budget_s,
)
from starters.synthetic_corpus import write_pdf
from tests.helpers import png_bytes

LIMITS = MediaLimits(max_object_bytes=2_000_000, max_image_pixels=4_000_000)
MEMORY_MB = 1024
# Secrets a worker may hold in its environment (settings/__init__.py, the LLM client, cloud
# SDKs). Each test plants fresh values and looks for them wherever the child could show them.
SECRET_NAMES = (
    "OPENAI_API_KEY",
    "MMRAG_DATABASE_URL",
    "MMRAG_DATABASE_URL_CPU",
    "MMRAG_DATABASE_URL_QUERY",
    "MMRAG_CODEC_KEY",
    "MMRAG_CODEC_SERVER_TOKEN",
    "MMRAG_MILVUS_TOKEN",
    "MMRAG_MILVUS_TOKEN_ENCODE",
    "MMRAG_AUTH_SIGNING_KEY",
    "MMRAG_AUTH_TOKEN",
    "MMRAG_EVENTS_TOKEN",
    "TEMPORAL_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def many_scan_jpeg(side: int = 6000, scans: int = 1500) -> bytes:
    """A progressive JPEG, ``side`` px square (36 Mpx by default: under the default
    MMRAG_MAX_IMAGE_PIXELS), whose last AC scan is repeated ``scans`` times.

    Each copy is 59 bytes (end-of-block runs only), but the decoder walks every block of
    the image for each scan: 3,000 copies (318 KB) took 60 s to decode in-process on the
    2-core test machine; the default 1,500 make a 230 KB file, small enough to send inline
    as Ask's query image. libjpeg accepts the repeats with a warning; Pillow sets no scan
    limit."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segments: list[tuple[int, bytes]] = []
    i = 2  # after SOI
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:  # EOI
            break
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:  # a scan: its entropy-coded data runs to the next real marker
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:  # stuffing or RSTn
                    end += 2
                    continue
                break
        segments.append((marker, data[i:end]))
        i = end
    last_ac = max(
        n
        for n, (marker, seg) in enumerate(segments)
        if marker == 0xDA and seg[5 + 2 * seg[4]] > 0  # spectral start > 0: an AC scan
    )
    body = [seg for _, seg in segments]
    body[last_ac] *= scans
    return b"\xff\xd8" + b"".join(body) + b"\xff\xd9"


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Canary secrets in this (the worker's) environment, which a child process inherits."""
    values = {name: f"canary-{secrets.token_hex(12)}" for name in SECRET_NAMES}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def sandbox(planted: dict[str, str]) -> Iterator[DecoderSandbox]:
    box = DecoderSandbox(memory_mb=MEMORY_MB)
    yield box
    box.kill()


def _decode_a_pdf(box: DecoderSandbox, tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "report.pdf")
    steps = list(box.stream(str(pdf), PDF, LIMITS, None, 30))  # to the end: the child stays
    assert steps and all(step.chunks for step in steps)


def _proc(pid: int | None, name: str) -> str:
    assert pid is not None
    return Path(f"/proc/{pid}/{name}").read_text(errors="replace")


def _namespaces_allowed() -> bool:
    """Whether this host lets a plain child process do what the sandbox's child tries."""
    code = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "sys.exit(0 if libc.unshare(0x10000000 | 0x40000000) == 0 "
        "or libc.unshare(0x40000000) == 0 else 1)"
    )
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_decoder_child_holds_none_of_the_worker_secrets(
    sandbox: DecoderSandbox, planted: dict[str, str], tmp_path: Path
) -> None:
    _decode_a_pdf(sandbox, tmp_path)
    # From outside: the environment the kernel started the child with.
    environ = Path(f"/proc/{sandbox.pid}/environ").read_bytes()
    for name, value in planted.items():
        assert value.encode() not in environ, f"{name} reached the decoder child"
    names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0") if entry}
    allowed = set(ENV_PASSTHROUGH) | {
        "HOME",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONNOUSERSITE",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
    }
    assert {n for n in names if not n.startswith("LC_")} <= allowed
    # From inside: what code running in the child sees, including through /proc.
    seen = sandbox.probe()
    assert not any(value in json.dumps(seen) for value in planted.values())
    home = Path(seen["environ"]["HOME"])
    assert home != Path.home() and seen["cwd"] == str(home) == seen["environ"]["TMPDIR"]
    assert home.is_dir() and not any(home.iterdir()), "HOME is the child's own empty folder"
    assert seen["parent_environ"].startswith("denied"), "the worker's /proc environ is readable"
    capabilities = dict(
        line.split(":\t") for line in _proc(sandbox.pid, "status").splitlines() if ":\t" in line
    )
    assert int(capabilities["CapEff"], 16) == int(capabilities["CapPrm"], 16) == 0
    sandbox.kill()
    assert not home.exists(), "the child's HOME goes with it"


def test_the_decoder_child_runs_under_cpu_file_and_memory_limits(
    sandbox: DecoderSandbox, tmp_path: Path
) -> None:
    _decode_a_pdf(sandbox, tmp_path)
    limits = {
        line[:26].strip(): line[26:].split()[:2]
        for line in _proc(sandbox.pid, "limits").splitlines()[1:]
    }
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max file size"] == ["0", "0"], "the child may write no file"
    assert limits["Max open files"] == [str(OPEN_FILES)] * 2
    assert limits["Max address space"] == [str(MEMORY_MB * 1024 * 1024)] * 2
    soft, hard = (int(v) for v in limits["Max cpu time"])
    assert hard == sandbox.cpu_lifetime_s
    # The soft limit was set for the PDF just decoded: its budget on top of what was spent.
    stat = _proc(sandbox.pid, "stat").rsplit(")", 1)[1].split()
    spent_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    assert cpu_budget_s(30) < soft <= cpu_budget_s(30) + spent_s + 1 < hard
    seen = sandbox.probe()
    assert seen["rlimits"]["RLIMIT_FSIZE"] == [0, 0]


def test_the_decoder_child_cannot_reach_the_network(
    sandbox: DecoderSandbox, tmp_path: Path
) -> None:
    """Loopback included: the embedded Postgres trusts every connection from 127.0.0.1."""
    allowed = _namespaces_allowed()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        _decode_a_pdf(sandbox, tmp_path)
        if allowed:
            own_namespace = os.readlink(f"/proc/{sandbox.pid}/ns/net")
            assert own_namespace != os.readlink("/proc/self/ns/net")
        seen = sandbox.probe(server.getsockname())
    if allowed:
        assert (seen["network"], sandbox.network) == (ISOLATED, ISOLATED)
        assert seen["connect"].startswith("failed"), seen["connect"]
        strict = DecoderSandbox(memory_mb=MEMORY_MB, require_isolation=True)
        try:
            _decode_a_pdf(strict, tmp_path)
        finally:
            strict.kill()
    else:  # the host refuses namespaces: the sandbox says so, and the strict mode refuses
        assert (seen["network"], sandbox.network) == (SHARED, SHARED)
        strict = DecoderSandbox(memory_mb=MEMORY_MB, require_isolation=True)
        with pytest.raises(SandboxError, match="MMRAG_DECODE_REQUIRE_ISOLATION"):
            _decode_a_pdf(strict, tmp_path)


def test_a_limit_that_cannot_be_set_refuses_every_decode_loudly(tmp_path: Path) -> None:
    """Here: more open files than the kernel allows any process (fs.nr_open), the error a
    non-root worker gets for any limit above its hard limit."""
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    box = DecoderSandbox(memory_mb=MEMORY_MB, open_files=nr_open + 1)
    try:
        with pytest.raises(SandboxError, match="cannot set RLIMIT_NOFILE") as refused:
            _decode_a_pdf(box, tmp_path)
        assert not isinstance(refused.value, BadMediaError), "the file is not at fault"
        with pytest.raises(SandboxError, match="cannot set RLIMIT_NOFILE"):
            box.decode_image(png_bytes(), "", LIMITS, 10)
        assert box.pid is None, "no child is left running"
    finally:
        box.kill()


def test_an_image_over_its_time_limit_fails_and_the_next_gets_a_fresh_child() -> None:
    box = DecoderSandbox(memory_mb=MEMORY_MB)
    try:
        assert box.decode_image(png_bytes((40, 20)), "", LIMITS, 10).size == (40, 20)
        first = box.pid
        slow = many_scan_jpeg()
        assert len(slow) < 256 * 1024  # small enough to send inline as Ask's query image
        with pytest.raises(BadMediaError, match=rf"longer than 1 s \({IMAGE_TIME_SETTING}\)"):
            box.decode_image(slow, "", MediaLimits(), 1)
        assert box.pid is None, "the child busy with it was killed"
        assert box.decode_image(png_bytes(), "", LIMITS, 10).getpixel((5, 5)) == (200, 30, 30)
        assert box.pid not in (None, first)
    finally:
        box.kill()
