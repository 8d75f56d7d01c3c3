"""The decoder sandbox: images, PDFs and videos are decoded in a child process with hard limits.

Why a process: Pillow's codecs, PDFium and FFmpeg are large C libraries fed bytes chosen by
whoever uploads a file (or sends Ask a query image). Inside the worker, a hostile file could
allocate gigabytes (a deflate bomb in a content stream), spin for minutes (a progressive
JPEG with thousands of scans), or crash the interpreter; the worker would take the whole
batch, and every other activity it runs, down with it. In a child process the same file
costs at most its time limit (``MMRAG_IMAGE_DECODE_TIME_LIMIT_S`` for an image,
``MMRAG_DECODE_TIME_LIMIT_S`` for a PDF or video) and ``decode_memory_mb`` of address space,
and a crash is just that file's failure reason. Children are reused across files (starting
one costs ~0.3 s) and replaced after any failure that may have left them in an unknown
state.

What the child holds, and what it can reach (docs/media.md, "Decoder sandbox"):

- **Capabilities**: none (a root worker's child cannot override file permissions or trace
  other processes).
- **Environment**: an explicit allow-list (:data:`ENV_PASSTHROUGH`, ``LC_*``), a private
  empty ``HOME``/``TMPDIR``, and one thread per math library. Never the worker's
  environment: no LLM key, database URL, codec key, Milvus token or signing key.
- **Limits** (``setrlimit``): ``RLIMIT_AS`` (``decode_memory_mb``), ``RLIMIT_CPU`` (from the
  time limit of the file being decoded; see :func:`cpu_budget_s`), ``RLIMIT_NOFILE``
  (:data:`OPEN_FILES`), ``RLIMIT_FSIZE`` 0 (the child writes no file: its stderr is a pipe)
  and ``RLIMIT_CORE`` 0. A limit that cannot be set makes the child refuse to decode
  anything: the worker raises :class:`SandboxError` (retryable: the file is not at fault).
- **Network**: the child moves into new user and network namespaces (``unshare``) before it
  reads a byte, so it has no interface but a loopback that is down, and no capability over
  the worker (it cannot read ``/proc/<worker>/environ``). Where the kernel or a seccomp
  profile refuses namespaces the child keeps the worker's network; the worker logs a warning
  once, and ``MMRAG_DECODE_REQUIRE_ISOLATION=true`` turns that into a refusal to decode.
  The worker also marks itself non-dumpable, so a child that shares its user namespace
  still cannot read its memory or environment through ``/proc``.

The child runs :func:`activities.media.decode.iter_steps` and streams its steps back over a pipe:
a JSON header per step, then the raw RGB bytes of each image. No pickle crosses the pipe
(a compromised child must not be able to run code in the worker), and the parent checks
every size it is sent. Pipe back-pressure bounds what is buffered: the child decodes at
most about one frame ahead of its reader.

Protocol (each message is a 4-byte big-endian length and a payload):
child -> parent first: ``{"type": "ready", "network", "detail"}`` or ``{"type": "fatal",
"reason"}``;
parent -> child: ``{"path" | "data_len", "mime", "limits", "cursor", "cpu_s"}`` (when
``data_len``, the file's bytes follow as one raw message), or ``{"type": "probe"}``;
child -> parent: ``{"type": "step", "cursor", "note", "chunks": [{"locator", "text",
"snippet", "origin", "size": [w, h] | null}]}`` followed by one raw message per chunk with a size,
repeated; then ``{"type": "end", "cpu_s"}`` or ``{"type": "error", "reason", "cpu_s"}``
(``{"type": "fatal", "reason"}`` when a limit cannot be set, then the child exits).

One module of ~940 lines: the parent and the child speak the protocol above, and both halves
must change together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activities.media.formats import BadMediaError, MediaChunk, MediaLimits, Step
from activities.media.images import image_type

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# The directory that holds the ``activities`` package: the child imports it from there.
CODE_ROOT = Path(__file__).resolve().parents[2]
_MAX_HEADER = 4 * 1024 * 1024
_F_SETPIPE_SZ = 1031  # Linux: grow the pipe so the child can decode a frame ahead
_PIPE_BYTES = 1024 * 1024
STARTUP_TIMEOUT_S = 60.0  # importing the decoders on a loaded host; a hung start is refused
_STDERR_LINES = 20  # lines of a child's stderr relayed to the worker's log, then dropped

# The child's environment: these names pass through when set (nothing here is a secret),
# plus every LC_* locale name; everything else the worker holds stays out.
ENV_PASSTHROUGH = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONHOME", "LD_LIBRARY_PATH")
_CHILD_FIXED_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",  # the child writes no file (RLIMIT_FSIZE is 0)
    "PYTHONNOUSERSITE": "1",
}
OPEN_FILES = 64  # RLIMIT_NOFILE: stdio, the protocol pipe, the file being decoded
FILE_BYTES = 0  # RLIMIT_FSIZE: no file writes at all
CPU_LIFETIME_FILES = 4  # RLIMIT_CPU's hard limit, in per-file budgets; then a fresh child
IMAGE_TIME_SETTING = "MMRAG_IMAGE_DECODE_TIME_LIMIT_S"
STREAM_TIME_SETTING = "MMRAG_DECODE_TIME_LIMIT_S"
ISOLATED, SHARED = "isolated", "shared"

_warned_shared_network = False


class SandboxError(RuntimeError):
    """This worker cannot run the decoder sandbox, so it decodes nothing.

    Not the file's fault, so it is not a ``BadMediaError``: the activity fails (retryably,
    loudly) and the asset is left for a worker that can sandbox its decoders."""


@functools.cache
def decoder_threads() -> int:
    """Threads one decode may keep busy: FFmpeg's automatic count (one per CPU, at most 16)."""
    return max(1, min(os.cpu_count() or 1, 16))


def cpu_budget_s(time_limit_s: float) -> int:
    """RLIMIT_CPU seconds for one file: its wall-clock limit on every decoder thread, plus
    one. The parent's timer fires first for any honest decode; the CPU limit stops a child
    whose parent can no longer watch it."""
    return math.ceil(max(0.0, time_limit_s) * decoder_threads()) + 1


def child_environment(home: str) -> dict[str, str]:
    """The decoder child's whole environment (allow-list; see module docstring)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in ENV_PASSTHROUGH or name.startswith("LC_")
    }
    env.update(_CHILD_FIXED_ENV)
    env["HOME"] = env["TMPDIR"] = home
    env["PYTHONPATH"] = str(CODE_ROOT)
    return env


_hardened = False


def harden_worker() -> None:
    """Linux: make this process non-dumpable, once.

    Same-user processes (a decoder child that could not get its own user namespace, or
    anything else running as the worker's user) then cannot read ``/proc/<pid>/environ`` or
    ``/proc/<pid>/mem`` of the worker, which hold its secrets; and a crash writes no core
    dump full of them. Workers of every role may call it at start."""
    global _hardened
    if _hardened:
        return
    _hardened = True
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass  # not Linux


class _ChildTimeout(Exception):
    pass


class _ChildDied(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class DecoderSandbox:
    """One decoder child process, started on first use and restarted after a failure.

    ``time_limit_s`` is the longest per-file time limit this sandbox will be asked for; it
    sizes the child's lifetime CPU limit. ``open_files`` and ``require_isolation`` are for
    deployments and tests (see :data:`OPEN_FILES`, ``MMRAG_DECODE_REQUIRE_ISOLATION``).
    """

    def __init__(
        self,
        memory_mb: int,
        *,
        time_limit_s: float = 600.0,
        open_files: int = OPEN_FILES,
        require_isolation: bool = False,
    ) -> None:
        self.memory_mb = memory_mb
        self.open_files = open_files
        self.require_isolation = require_isolation
        self.cpu_per_file_s = cpu_budget_s(time_limit_s)
        self.cpu_lifetime_s = CPU_LIFETIME_FILES * self.cpu_per_file_s
        self.network = ""  # ISOLATED or SHARED, from the child's ready message
        self.network_detail = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._home: str | None = None
        self._inbox = _Inbox()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- starting and stopping the child ----------------------------------------------------
    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.kill()
        harden_worker()
        self._home = tempfile.mkdtemp(prefix="mmrag-decoder-")
        config = {
            "memory_mb": self.memory_mb,
            "cpu_s": self.cpu_lifetime_s,
            "open_files": self.open_files,
            "file_bytes": FILE_BYTES,
            "require_isolation": self.require_isolation,
        }
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", "activities.media.sandbox", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # relayed to the log: the child may write no file
            env=child_environment(self._home),
            cwd=self._home,
            bufsize=0,
        )
        assert proc.stdin is not None and proc.stdout is not None
        os.set_blocking(proc.stdin.fileno(), False)  # writes wait in select, within a budget
        try:
            import fcntl

            fcntl.fcntl(proc.stdout.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, OSError):
            pass  # not Linux, or above pipe-max-size: the default pipe only costs overlap
        threading.Thread(
            target=_relay_stderr, args=(proc,), name=f"decoder-{proc.pid}-stderr", daemon=True
        ).start()
        try:
            ready = self._header([STARTUP_TIMEOUT_S])
        except _ChildTimeout:
            self.kill()
            raise SandboxError(
                f"the decoder sandbox did not start within {STARTUP_TIMEOUT_S:.0f} s; "
                "nothing is decoded until it does (is the host overloaded?)"
            ) from None
        except (_ChildDied, BadMediaError) as e:
            self.kill()
            raise SandboxError(
                f"the decoder sandbox failed to start ({e}); see the worker log for the "
                "child's output"
            ) from None
        if ready.get("type") != "ready":
            self.kill()
            raise SandboxError(f"the decoder sandbox refuses to decode: {ready.get('reason')}")
        self.network = str(ready.get("network", ""))
        self.network_detail = str(ready.get("detail", ""))
        if self.network != ISOLATED:
            _warn_shared_network(self.network_detail)
        return proc

    def interrupt(self) -> None:
        """Kill the child from another thread; the thread reading it sees EOF and cleans up."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill(self) -> None:
        """Stop the child now (it is in an unknown state); the next stream starts a new one."""
        proc, self._proc = self._proc, None
        home, self._home = self._home, None
        self._inbox = _Inbox()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)

    # -- decoding -------------------------------------------------------------------------------
    def stream(
        self,
        source: str | bytes,
        mime: str,
        limits: MediaLimits,
        cursor: dict[str, Any] | None,
        time_limit_s: float,
        setting: str = STREAM_TIME_SETTING,
    ) -> Iterator[Step]:
        """Decode ``source`` (a file path, or the file's bytes) in the child; yields steps,
        raises ``BadMediaError`` (the file's fault) or ``SandboxError`` (the worker's).

        ``time_limit_s`` (named ``setting`` in failure reasons) bounds the total time spent
        sending the file to the child and waiting for it (time the consumer spends
        elsewhere does not count).
        """
        request: dict[str, Any] = {
            "mime": mime,
            "limits": _limits_dict(limits),
            "cursor": cursor or {},
            "cpu_s": min(cpu_budget_s(time_limit_s), self.cpu_per_file_s),
        }
        data = b""
        if isinstance(source, bytes):
            request["data_len"], data = len(source), source
        else:
            request["path"] = source
        budget = [float(time_limit_s)]
        max_side = limits.render_max_side + 2
        clean = False
        try:
            self._request(request, data, budget)
            while True:
                header = self._header(budget)
                kind = header.get("type")
                if kind in ("end", "error"):
                    clean = True
                    self._retire_if_spent(header.get("cpu_s"))
                    if kind == "end":
                        return
                    raise BadMediaError(str(header.get("reason") or "decoding failed"))
                if kind == "fatal":
                    raise SandboxError(f"the decoder sandbox stopped: {header.get('reason')}")
                if kind != "step":
                    raise BadMediaError(f"decoder protocol error: unexpected message {kind!r}")
                chunks = []
                for spec in header.get("chunks") or []:
                    image = None
                    size = spec.get("size")
                    if size:
                        width, height = (int(v) for v in size)
                        if not (0 < width <= max_side and 0 < height <= max_side):
                            raise BadMediaError(f"decoder protocol error: image size {size}")
                        from PIL import Image

                        with self._message(budget, width * height * 3) as raw:
                            if len(raw) != width * height * 3:
                                raise BadMediaError("decoder protocol error: short image")
                            image = Image.frombytes("RGB", (width, height), raw)
                    chunks.append(
                        MediaChunk(
                            str(spec.get("locator", "")),
                            image=image,
                            text=str(spec.get("text", "")),
                            snippet=str(spec.get("snippet", "")),
                            origin=str(spec.get("origin", "")),
                        )
                    )
                yield Step(chunks, dict(header.get("cursor") or {}), str(header.get("note", "")))
        except _ChildTimeout:
            raise BadMediaError(
                f"decoding took longer than {time_limit_s:g} s ({setting}): this {mime} is too "
                "complex or hostile; simplify or re-encode it, or raise the limit"
            ) from None
        except _ChildDied as died:
            raise BadMediaError(self._death_reason(died.code, mime, setting)) from None
        finally:
            if not clean:  # abandoned mid-stream, timed out, crashed or misbehaved
                self.kill()

    def decode_image(
        self,
        data: bytes,
        mime: str,
        limits: MediaLimits,
        time_limit_s: float,
        setting: str = IMAGE_TIME_SETTING,
    ) -> Image.Image:
        """One image from its bytes, decoded in the child as ``media.decode_image`` would
        (shrunk to ``limits.render_max_side``), without OCR (Ask's query images: their
        words would not change the query's vector); ``BadMediaError`` says why not."""
        chunk = self.decode_image_chunk(data, mime, _without_ocr(limits), time_limit_s, setting)
        assert chunk.image is not None
        return chunk.image

    def decode_image_chunk(
        self,
        data: bytes,
        mime: str,
        limits: MediaLimits,
        time_limit_s: float,
        setting: str = IMAGE_TIME_SETTING,
    ) -> MediaChunk:
        """An ingested image's chunk: its pixels and, when
        ``limits.ocr_enabled`` and it shows text, the words OCR read (``snippet``)."""
        mime = image_type(data, limits.max_object_bytes, mime)
        steps = list(self.stream(data, mime, limits, None, time_limit_s, setting))
        chunks = [chunk for step in steps for chunk in step.chunks if chunk.image is not None]
        if len(chunks) != 1:
            raise BadMediaError(f"decoder protocol error: {len(chunks)} images for one image")
        return chunks[0]

    def probe(self, connect: tuple[str, int] | None = None) -> dict[str, Any]:
        """What the child sees and reaches, reported from inside it: its environment and
        limits, whether it can read the worker's ``/proc/<pid>/environ`` and, given
        ``connect``, whether a TCP connection to that address succeeds. For tests and for
        checking a deployment's isolation; it decodes nothing."""
        self._request({"type": "probe", "connect": list(connect) if connect else None})
        try:
            report = self._header([STARTUP_TIMEOUT_S])
        except (_ChildTimeout, _ChildDied) as e:
            self.kill()
            raise SandboxError(f"the decoder sandbox did not answer a probe ({e!r})") from None
        if report.get("type") != "probe":
            self.kill()
            raise SandboxError(f"the decoder sandbox answered a probe with {report.get('type')}")
        return report

    def _retire_if_spent(self, cpu_s: object) -> None:
        """A child is replaced before its lifetime CPU limit could cut a file short."""
        used = float(cpu_s) if isinstance(cpu_s, int | float) else float("inf")
        if used + self.cpu_per_file_s > self.cpu_lifetime_s:
            self.kill()

    # -- the pipe, with a time budget -------------------------------------------------------
    def _request(
        self, request: dict[str, Any], data: bytes = b"", budget: list[float] | None = None
    ) -> None:
        budget = budget if budget is not None else [STARTUP_TIMEOUT_S]
        payload = _frame(json.dumps(request).encode()) + (_frame(data) if data else b"")
        proc = self._ensure()
        try:
            self._write_all(proc, payload, budget)
        except BrokenPipeError:
            # Died while idle (e.g. the thread that started it exited): start afresh once.
            self.kill()
            self._write_all(self._ensure(), payload, budget)

    def _write_all(
        self, proc: subprocess.Popen[bytes], payload: bytes, budget: list[float]
    ) -> None:
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        view = memoryview(payload)
        while view:
            started = time.monotonic()
            _, ready, _ = select.select([], [fd], [], max(0.0, budget[0]))
            budget[0] -= time.monotonic() - started
            if not ready:
                raise _ChildTimeout
            try:
                view = view[os.write(fd, view[:_PIPE_BYTES]) :]
            except BlockingIOError:
                continue

    def _header(self, budget: list[float]) -> dict[str, Any]:
        with self._message(budget, _MAX_HEADER) as raw:
            try:
                header = json.loads(bytes(raw))
            except ValueError as e:
                raise BadMediaError("decoder protocol error: malformed header") from e
        if not isinstance(header, dict):
            raise BadMediaError("decoder protocol error: header is not an object")
        return header

    def _message(self, budget: list[float], max_len: int) -> memoryview:
        """The next message's payload, valid until the next read (use it in ``with``)."""
        with self._read_exact(4, budget) as size:
            length = int.from_bytes(size, "big")
        if length > max_len:
            raise BadMediaError(f"decoder protocol error: {length}-byte message")
        return self._read_exact(length, budget)

    def _read_exact(self, n: int, budget: list[float]) -> memoryview:
        """The child's next ``n`` bytes, within the time budget."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        inbox = self._inbox
        inbox.make_room(n)
        while inbox.pending < n:
            started = time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, budget[0]))
            budget[0] -= time.monotonic() - started
            if not ready:
                self.kill()
                raise _ChildTimeout
            if not inbox.fill(fd):
                code = proc.wait()
                self.kill()
                raise _ChildDied(code)
        return inbox.take(n)

    def _death_reason(self, code: int, mime: str, setting: str) -> str:
        if code == -signal.SIGXCPU:
            return (
                f"decoding this {mime} used more CPU time than {setting} allows (the decoder "
                "was stopped by RLIMIT_CPU): the file is too complex or hostile; simplify or "
                "re-encode it, or raise the limit"
            )
        if code == -signal.SIGXFSZ:
            return (
                f"the decoder tried to write a file while decoding this {mime} (RLIMIT_FSIZE "
                "is 0): the file is hostile or exercises a decoder bug; re-export it"
            )
        how = (
            f"signal {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exit status {code}"
        )
        return (
            f"the decoder process died on this {mime} ({how}): the file is malformed in a "
            f"way that crashes the decoder, or needs more than {self.memory_mb} MB to decode "
            "(MMRAG_DECODE_MEMORY_MB); re-export or re-encode it"
        )


class _Inbox:
    """What a child has written and the worker has not yet taken, in one buffer reused for
    every answer: reading an image's 0.5 MB of pixels allocates nothing (fresh buffers of
    that size cost page faults on every image) and takes one or two reads, whatever the
    number of messages in it."""

    def __init__(self) -> None:
        self.buffer = bytearray(_PIPE_BYTES)
        self.start = self.end = 0

    @property
    def pending(self) -> int:
        return self.end - self.start

    def make_room(self, n: int) -> None:
        """Room for ``n`` bytes from ``start`` (taken views must be released by now)."""
        if self.start + n <= len(self.buffer):
            return
        pending = self.pending
        self.buffer[:pending] = self.buffer[self.start : self.end]
        self.start, self.end = 0, pending
        if n > len(self.buffer):
            self.buffer.extend(bytes(n - len(self.buffer)))

    def fill(self, fd: int) -> int:
        with memoryview(self.buffer) as view:
            got = os.readv(fd, [view[self.end :]])
        self.end += got
        return got

    def take(self, n: int) -> memoryview:
        view = memoryview(self.buffer)[self.start : self.start + n]
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        return view


class SandboxPool:
    """Decoder children shared by concurrent activities: one per file being decoded."""

    def __init__(
        self,
        memory_mb: int,
        *,
        time_limit_s: float = 600.0,
        open_files: int = OPEN_FILES,
        require_isolation: bool = False,
    ) -> None:
        self.memory_mb = memory_mb
        self._options: dict[str, Any] = {
            "time_limit_s": time_limit_s,
            "open_files": open_files,
            "require_isolation": require_isolation,
        }
        self._idle: list[DecoderSandbox] = []
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> SandboxPool:
        return cls(
            settings.decode_memory_mb,
            time_limit_s=max(settings.decode_time_limit_s, settings.image_decode_time_limit_s),
            require_isolation=settings.decode_require_isolation,
        )

    @contextmanager
    def lease(self) -> Iterator[DecoderSandbox]:
        with self._lock:
            sandbox = (
                self._idle.pop() if self._idle else DecoderSandbox(self.memory_mb, **self._options)
            )
        try:
            yield sandbox
        finally:
            with self._lock:
                self._idle.append(sandbox)

    def decode_image(
        self, data: bytes, mime: str, limits: MediaLimits, time_limit_s: float
    ) -> Image.Image:
        """:meth:`DecoderSandbox.decode_image` in a pooled child: one per calling thread."""
        with self.lease() as sandbox:
            return sandbox.decode_image(data, mime, limits, time_limit_s)

    def decode_image_chunk(
        self, data: bytes, mime: str, limits: MediaLimits, time_limit_s: float
    ) -> MediaChunk:
        """:meth:`DecoderSandbox.decode_image_chunk` in a pooled child."""
        with self.lease() as sandbox:
            return sandbox.decode_image_chunk(data, mime, limits, time_limit_s)

    def pids(self) -> list[int]:
        """The idle children's process ids (for benchmarks and diagnostics)."""
        with self._lock:
            return [box.pid for box in self._idle if box.pid is not None]

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sandbox in idle:
            sandbox.kill()


@functools.lru_cache(maxsize=16)
def _without_ocr(limits: MediaLimits) -> MediaLimits:
    return dataclasses.replace(limits, ocr_enabled=False)


@functools.lru_cache(maxsize=16)
def _limits_dict(limits: MediaLimits) -> dict[str, Any]:
    """``limits.to_dict()`` once per limits (``asdict`` deep-copies: ~0.1 ms an image)."""
    return limits.to_dict()


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _warn_shared_network(detail: str) -> None:
    global _warned_shared_network
    if not _warned_shared_network:
        _warned_shared_network = True
        log.warning(
            "decoder sandbox: the decoder child shares this worker's network (%s); set "
            "MMRAG_DECODE_REQUIRE_ISOLATION=true to refuse decoding instead "
            "(docs/media.md: Decoder sandbox)",
            detail,
        )


def _relay_stderr(proc: subprocess.Popen[bytes]) -> None:
    """The child's stderr into the worker's log: its first lines, each cut short (a hostile
    file can make FFmpeg print without end, and its words come from that file)."""
    pipe = proc.stderr
    if pipe is None:
        return
    lines = 0
    try:
        for raw in pipe:
            lines += 1
            if lines <= _STDERR_LINES:
                text = raw.decode("utf-8", "replace").rstrip()
                log.warning("decoder %d: %r", proc.pid, text[:300])
            elif lines == _STDERR_LINES + 1:
                log.warning("decoder %d: further output dropped", proc.pid)
    except (OSError, ValueError):
        pass  # closed by kill()
    finally:
        pipe.close()


# -- the child -----------------------------------------------------------------------------
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


class _Refusal(Exception):
    """The child cannot confine itself as configured: it decodes nothing."""


def _cut_network() -> tuple[str, str]:
    """Move into new user + network namespaces (only a loopback that is down remains); else
    just a network namespace (root with CAP_SYS_ADMIN where user namespaces are off); else
    a user namespace first, then a network namespace from inside it (where a seccomp
    profile allows each flag alone).

    Must run while the process has one thread. Returns (ISOLATED | SHARED, words)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError) as e:
        return SHARED, f"no unshare on this platform ({e})"

    def unshare(flags: int) -> str:
        return "" if libc.unshare(flags) == 0 else os.strerror(ctypes.get_errno())

    both = unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
    if not both:
        return ISOLATED, "new user and network namespaces"
    net = unshare(_CLONE_NEWNET)
    if not net:
        return ISOLATED, "a new network namespace"
    user = unshare(_CLONE_NEWUSER)
    if not user:
        net = unshare(_CLONE_NEWNET)
        if not net:
            return ISOLATED, "new user and network namespaces (one at a time)"
        return SHARED, f"a new user namespace, but no network namespace ({net})"
    return SHARED, f"unshare refused: user+network: {both}; network: {net}; user: {user}"


def _drop_capabilities() -> None:
    """Linux: empty every capability set, so a child of a root worker cannot override file
    permissions or read other processes' memory (CAP_DAC_OVERRIDE, CAP_SYS_PTRACE...).
    Dropping is always allowed; a process that has none already loses nothing."""
    try:
        import ctypes

        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this pid
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: x2 words, all 0
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.capset(header, data) != 0:
            raise _Refusal(f"cannot drop capabilities ({os.strerror(ctypes.get_errno())})")
    except (OSError, AttributeError):
        pass  # not Linux


def _keep_freed_memory() -> None:
    """glibc: keep freed memory for the next file instead of returning it to the kernel
    after every image. Without this, each image's 0.5-1 MB buffers were fresh mappings,
    and their page faults made a decode ~40% slower in the child than in the worker
    (bench/decode_sandbox.py). RLIMIT_AS still bounds the total."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD (its largest dynamic value)
    except (OSError, AttributeError):
        pass  # not glibc: the decoder is only slower


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the worker dies, even in the middle of a decode."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(0)


def _apply_limits(config: dict[str, Any]) -> dict[str, list[int]]:
    """Every rlimit of the module docstring, each verified; raises ``_Refusal`` if one fails."""
    try:
        import resource
    except ImportError as e:
        raise _Refusal(f"no setrlimit on this platform ({e})") from e
    wanted = [
        ("RLIMIT_CORE", 0),
        ("RLIMIT_FSIZE", int(config["file_bytes"])),
        ("RLIMIT_NOFILE", int(config["open_files"])),
        ("RLIMIT_CPU", int(config["cpu_s"])),  # hard; the soft limit is set per file
    ]
    if int(config["memory_mb"]) > 0:  # 0: no address-space limit (MMRAG_DECODE_MEMORY_MB)
        wanted.append(("RLIMIT_AS", int(config["memory_mb"]) * 1024 * 1024))
    applied = {}
    for name, value in wanted:
        try:
            which = getattr(resource, name)
            resource.setrlimit(which, (value, value))
            if resource.getrlimit(which) != (value, value):
                raise OSError(f"it reads back as {resource.getrlimit(which)}")
        except (AttributeError, ValueError, OverflowError, OSError) as e:
            raise _Refusal(
                f"cannot set {name} to {value} ({e}); decoding is refused until it can be set "
                "(run the worker where its hard limits allow it)"
            ) from e
        applied[name] = [value, value]
    return applied


def _cpu_used() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _budget_cpu(seconds: int) -> None:
    """Lower RLIMIT_CPU's soft limit to what this file may use on top of what is spent."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = min(hard, math.ceil(_cpu_used()) + max(1, seconds))
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError) as e:
        raise _Refusal(f"cannot set RLIMIT_CPU to {soft} ({e})") from e


def _read_exact_fd(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        data = os.read(fd, n - len(buf))
        if not data:
            return None
        buf += data
    return bytes(buf)


def _read_message_fd(fd: int) -> bytes | None:
    size = _read_exact_fd(fd, 4)
    return None if size is None else _read_exact_fd(fd, int.from_bytes(size, "big"))


class _Output:
    """The protocol's end of the child's stdout: each ``send`` (a message and the raw
    messages that follow it) is one ``writev`` (no copy of the pixels), or, while ``hold``
    is set, waits for ``flush``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hold = False
        self._held: list[bytes | memoryview] = []

    def send(self, *payloads: bytes) -> None:
        for payload in payloads:
            self._held += [len(payload).to_bytes(4, "big"), payload]
        if not self.hold:
            self.flush()

    def send_json(self, message: dict[str, Any]) -> None:
        self.send(json.dumps(message).encode())

    def drop(self) -> None:
        """Forget held steps: the answer is an error after all."""
        self._held = []

    def flush(self) -> None:
        parts, self._held, self.hold = self._held, [], False
        while parts:
            written = os.writev(self.fd, parts[:512])  # IOV_MAX is 1024 on Linux
            while parts and written >= len(parts[0]):
                written -= len(parts.pop(0))
            if written:
                parts[0] = memoryview(parts[0])[written:]


def _probe(request: dict[str, Any], network: str) -> dict[str, Any]:
    import resource
    import socket

    report: dict[str, Any] = {
        "type": "probe",
        "environ": dict(os.environ),
        "network": network,
        "cwd": os.getcwd(),
        "rlimits": {
            name: list(resource.getrlimit(getattr(resource, name)))
            for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE")
        },
    }
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            f.read(1)
        report["parent_environ"] = "readable"
    except OSError as e:
        report["parent_environ"] = f"denied: {e.strerror}"
    target = request.get("connect")
    if target:
        try:
            socket.create_connection((str(target[0]), int(target[1])), timeout=2).close()
            report["connect"] = "connected"
        except OSError as e:
            report["connect"] = f"failed: {e.strerror or e}"
    return report


def _main(config: dict[str, Any]) -> None:
    """Confine this process, then answer decode requests on stdin/stdout until stdin closes."""
    network, detail = _cut_network()  # first: unshare needs a single-threaded process
    _die_with_parent()
    _keep_freed_memory()
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    out = _Output(os.dup(1))
    os.dup2(2, 1)
    # Load every decoder library (and FFmpeg's lazily mapped codecs) before the limits
    # apply: they are for decoding, not for mapping shared objects.
    import av
    import pypdfium2  # noqa: F401
    from PIL import Image

    import activities.media.ocr  # noqa: F401  (OCR runs Tesseract as a child of this one)
    import activities.media.pdf  # noqa: F401
    import activities.media.video  # noqa: F401
    from activities.media.decode import iter_steps

    Image.init()
    av.codec.Codec("h264", "r")
    try:
        _drop_capabilities()
        if config.get("require_isolation") and network != ISOLATED:
            raise _Refusal(
                f"the decoder cannot drop the network ({detail}) and "
                "MMRAG_DECODE_REQUIRE_ISOLATION is set; allow user namespaces for the worker "
                "(docs/media.md: Decoder sandbox) or unset it"
            )
        _apply_limits(config)
    except _Refusal as e:
        out.send_json({"type": "fatal", "reason": str(e)})
        return
    out.send_json({"type": "ready", "network": network, "detail": detail})
    memory_mb = int(config["memory_mb"])
    while True:
        raw = _read_message_fd(0)
        if raw is None:
            return
        request = json.loads(raw)
        if request.get("type") == "probe":
            out.send_json(_probe(request, network))
            continue
        source: bytes | str = request.get("path", "")
        if request.get("data_len") is not None:
            data = _read_message_fd(0)
            if data is None:
                return
            source = data
        try:
            _budget_cpu(int(request.get("cpu_s") or 1))
        except _Refusal as e:
            out.send_json({"type": "fatal", "reason": str(e)})
            return
        # An image's answer (one step) goes out in one write with its end: one wake-up of
        # the worker's thread instead of four. A PDF or video streams step by step.
        out.hold = request.get("data_len") is not None
        try:
            limits = MediaLimits.from_dict(request.get("limits") or {})
            for step in iter_steps(source, request["mime"], limits, request["cursor"]):
                specs, images = [], []
                for chunk in step.chunks:
                    size_wh = None
                    if chunk.image is not None:
                        image = chunk.image
                        image = image if image.mode == "RGB" else image.convert("RGB")
                        size_wh = list(image.size)
                        images.append(image.tobytes())
                    specs.append(
                        {
                            "locator": chunk.locator,
                            "text": chunk.text,
                            "snippet": chunk.snippet,
                            "origin": chunk.origin,
                            "size": size_wh,
                        }
                    )
                header = {"type": "step", "cursor": step.cursor, "note": step.note, "chunks": specs}
                out.send(json.dumps(header).encode(), *images)
            out.send_json({"type": "end", "cpu_s": _cpu_used()})
        except BadMediaError as e:
            out.drop()
            out.send_json({"type": "error", "reason": str(e), "cpu_s": _cpu_used()})
        except MemoryError:
            out.drop()
            reason = (
                f"{request.get('mime')} needs more than {memory_mb} MB to decode "
                "(MMRAG_DECODE_MEMORY_MB); split or re-encode it, or raise the limit"
            )
            out.send_json({"type": "error", "reason": reason, "cpu_s": _cpu_used()})
        out.flush()
        del source


if __name__ == "__main__":
    try:
        _main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    except BrokenPipeError:  # the worker went away mid-answer
        os._exit(0)
