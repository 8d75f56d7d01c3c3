"""The decoder sandbox: PDFs and videos are decoded in a child process with hard limits.

Why a process: PDFium and FFmpeg are large C libraries fed bytes chosen by whoever uploads a
file. Inside the worker, a hostile PDF could allocate gigabytes (a deflate bomb in a content
stream), spin forever in a page's drawing operators, or crash the interpreter; the worker
would take the whole batch (and every other activity it runs) down with it. In a child
process the same file costs at most ``decode_time_limit_s`` of waiting and
``decode_memory_mb`` of address space (``RLIMIT_AS``), and a crash is just that file's
failure reason. Children are reused across files (starting one costs ~0.2 s) and replaced
after any failure that may have left them in an unknown state.

The child runs :func:`activities.media.iter_steps` and streams its steps back over a pipe:
a JSON header per step, then the raw RGB bytes of each image. No pickle crosses the pipe
(a compromised child must not be able to run code in the worker), and the parent checks
every size it is sent. Pipe back-pressure bounds what is buffered: the child decodes at
most about one frame ahead of its reader.

Protocol (each message is a 4-byte big-endian length and a payload):
parent -> child: ``{"path", "mime", "limits", "cursor"}``;
child -> parent: ``{"type": "step", "cursor", "note", "chunks": [{"locator", "text",
"snippet", "size": [w, h] | null}]}`` followed by one raw message per chunk with a size,
repeated; then ``{"type": "end"}`` or ``{"type": "error", "reason"}``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from activities.media import BadMediaError, MediaChunk, MediaLimits, Step

REPO_ROOT = Path(__file__).resolve().parent.parent
_MAX_HEADER = 4 * 1024 * 1024
_F_SETPIPE_SZ = 1031  # Linux: grow the pipe so the child can decode a frame ahead
_PIPE_BYTES = 1024 * 1024


class DecoderSandbox:
    """One decoder child process, started on first use and restarted after a failure."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "activities.sandbox", str(self.memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
            bufsize=0,
        )
        assert self._proc.stdout is not None
        try:
            import fcntl

            fcntl.fcntl(self._proc.stdout.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, OSError):
            pass  # not Linux, or above pipe-max-size: the default pipe only costs overlap
        return self._proc

    def interrupt(self) -> None:
        """Kill the child from another thread; the thread reading it sees EOF and cleans up."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill(self) -> None:
        """Stop the child now (it is in an unknown state); the next stream starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def stream(
        self,
        path: str,
        mime: str,
        limits: MediaLimits,
        cursor: dict[str, Any] | None,
        time_limit_s: float,
    ) -> Iterator[Step]:
        """Decode the file at ``path`` in the child; yields steps, raises ``BadMediaError``.

        ``time_limit_s`` bounds the total time spent waiting for the child on this file
        (time the consumer spends elsewhere does not count).
        """
        proc = self._ensure()
        request = {"path": path, "mime": mime, "limits": limits.to_dict(), "cursor": cursor or {}}
        try:
            _write_message(proc, json.dumps(request).encode())
        except OSError:
            self.kill()  # died while idle (e.g. its parent thread exited): start afresh once
            proc = self._ensure()
            _write_message(proc, json.dumps(request).encode())
        budget = [float(time_limit_s)]
        max_side = limits.render_max_side + 2
        clean = False
        try:
            while True:
                header = self._read_header(budget, mime, time_limit_s)
                kind = header.get("type")
                if kind == "end":
                    clean = True
                    return
                if kind == "error":
                    clean = True
                    raise BadMediaError(str(header.get("reason") or "decoding failed"))
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
                        raw = self._read_message(budget, mime, time_limit_s, width * height * 3)
                        if len(raw) != width * height * 3:
                            raise BadMediaError("decoder protocol error: short image")
                        from PIL import Image

                        image = Image.frombytes("RGB", (width, height), raw)
                    chunks.append(
                        MediaChunk(
                            str(spec.get("locator", "")),
                            image=image,
                            text=str(spec.get("text", "")),
                            snippet=str(spec.get("snippet", "")),
                        )
                    )
                yield Step(chunks, dict(header.get("cursor") or {}), str(header.get("note", "")))
        finally:
            if not clean:  # abandoned mid-stream, timed out, crashed or misbehaved
                self.kill()

    # -- reading with a time budget --------------------------------------------------------
    def _read_header(self, budget: list[float], mime: str, limit: float) -> dict[str, Any]:
        raw = self._read_message(budget, mime, limit, _MAX_HEADER)
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise BadMediaError("decoder protocol error: malformed header") from e
        if not isinstance(header, dict):
            raise BadMediaError("decoder protocol error: header is not an object")
        return header

    def _read_message(self, budget: list[float], mime: str, limit: float, max_len: int) -> bytes:
        length = int.from_bytes(self._read_exact(4, budget, mime, limit), "big")
        if length > max_len:
            raise BadMediaError(f"decoder protocol error: {length}-byte message")
        return self._read_exact(length, budget, mime, limit)

    def _read_exact(self, n: int, budget: list[float], mime: str, limit: float) -> bytes:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < n:
            started = time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, budget[0]))
            budget[0] -= time.monotonic() - started
            if not ready:
                self.kill()
                raise BadMediaError(
                    f"decoding took longer than {limit:.0f} s (MMRAG_DECODE_TIME_LIMIT_S): "
                    f"this {mime} is too complex or hostile; split or re-encode it, or raise "
                    "the limit"
                )
            data = os.read(fd, min(n - len(buf), _PIPE_BYTES))
            if not data:
                code = proc.wait()
                self.kill()
                raise BadMediaError(self._death_reason(code, mime))
            buf += data
        return bytes(buf)

    def _death_reason(self, code: int, mime: str) -> str:
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


class SandboxPool:
    """Decoder children shared by concurrent activities: one per file being decoded."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self._idle: list[DecoderSandbox] = []
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[DecoderSandbox]:
        with self._lock:
            sandbox = self._idle.pop() if self._idle else DecoderSandbox(self.memory_mb)
        try:
            yield sandbox
        finally:
            with self._lock:
                self._idle.append(sandbox)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sandbox in idle:
            sandbox.kill()


def _write_message(proc: subprocess.Popen[bytes], payload: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(len(payload).to_bytes(4, "big") + payload)
    proc.stdin.flush()


# -- the child -----------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the worker dies, even in the middle of a decode."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(0)


def _limit_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX: the time limit still holds


def _read_exact_fd(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        data = os.read(fd, n - len(buf))
        if not data:
            return None
        buf += data
    return bytes(buf)


def _send(fd: int, payload: bytes) -> None:
    data = memoryview(len(payload).to_bytes(4, "big") + payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _serve(memory_mb: int) -> None:
    """Answer decode requests on stdin/stdout until stdin closes."""
    _die_with_parent()
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    # Load every decoder library (and FFmpeg's lazily mapped codecs) before the memory
    # limit applies: the limit is for decoding, not for mapping shared objects.
    import av
    import pypdfium2  # noqa: F401

    from activities.media import iter_steps

    av.codec.Codec("h264", "r")
    _limit_memory(memory_mb)
    while True:
        size = _read_exact_fd(0, 4)
        if size is None:
            return
        raw = _read_exact_fd(0, int.from_bytes(size, "big"))
        if raw is None:
            return
        request = json.loads(raw)
        limits = MediaLimits.from_dict(request.get("limits") or {})
        try:
            for step in iter_steps(request["path"], request["mime"], limits, request["cursor"]):
                specs, images = [], []
                for chunk in step.chunks:
                    size_wh = None
                    if chunk.image is not None:
                        image = chunk.image.convert("RGB")
                        size_wh = list(image.size)
                        images.append(image.tobytes())
                    specs.append(
                        {
                            "locator": chunk.locator,
                            "text": chunk.text,
                            "snippet": chunk.snippet,
                            "size": size_wh,
                        }
                    )
                header = {"type": "step", "cursor": step.cursor, "note": step.note, "chunks": specs}
                _send(out, json.dumps(header).encode())
                for payload in images:
                    _send(out, payload)
            _send(out, b'{"type": "end"}')
        except BadMediaError as e:
            _send(out, json.dumps({"type": "error", "reason": str(e)}).encode())
        except MemoryError:
            _send(
                out,
                json.dumps(
                    {
                        "type": "error",
                        "reason": f"{request.get('mime')} needs more than {memory_mb} MB to "
                        "decode (MMRAG_DECODE_MEMORY_MB); split or re-encode it, or raise the "
                        "limit",
                    }
                ).encode(),
            )


if __name__ == "__main__":
    try:
        _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    except BrokenPipeError:  # the worker went away mid-answer
        os._exit(0)
