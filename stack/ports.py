"""Which ports the embedded stack listens on, and the probes that keep two stacks apart.

Two stacks must be able to run on one machine at once: the developer's own (`mmrag stack
up`, default ports) and the test suite's (``StackPorts.free()``). Every port a service opens
is therefore set explicitly, including the ones Milvus opens for itself, so nothing falls
back to a fixed default (Milvus's 2379/2380 etcd ports and its 9091 metrics port would
otherwise collide).
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from stack.errors import StackError

LOOPBACK = "127.0.0.1"
ANY = "0.0.0.0"  # what a server binding "all interfaces" takes; probed for Milvus

#: Milvus's ports other than the SDK port, as offsets from ``StackPorts.milvus_extra_base``.
#: (key, what it is). The keys ending in ``_port`` are ``milvus-server``'s own config keys;
#: ``etcd_peer_port`` and ``metrics_port`` are set through the embedded etcd config file
#: (``ETCD_CONFIG_PATH``) and the ``METRICS_PORT`` environment variable.
MILVUS_EXTRA_PORTS: tuple[tuple[str, str], ...] = (
    ("etcd_port", "embedded etcd client port (127.0.0.1; Milvus's default 2379)"),
    ("etcd_peer_port", "embedded etcd peer port (127.0.0.1; Milvus's default 2380)"),
    ("metrics_port", "metrics and /healthz HTTP port (Milvus's default 9091)"),
    ("proxy_internal_port", "proxy internal gRPC port"),
    ("root_coord_port", "root coordinator gRPC port"),
    ("query_coord_port", "query coordinator gRPC port"),
    ("query_node_port", "query node gRPC port"),
    ("index_coord_port", "index coordinator gRPC port"),
    ("index_node_port", "index node gRPC port"),
    ("data_coord_port", "data coordinator gRPC port"),
    ("data_node_port", "data node gRPC port"),
)
MILVUS_EXTRA_COUNT = len(MILVUS_EXTRA_PORTS)

#: Environment variables read by ``StackPorts.from_env``: MMRAG_STACK_<FIELD>.
ENV_PREFIX = "MMRAG_STACK_"


@dataclass(frozen=True)
class StackPorts:
    """Every port of the embedded stack; all servers listen on 127.0.0.1 unless noted.

    ``milvus_extra_base`` is the first of ``MILVUS_EXTRA_COUNT`` (11) consecutive ports that
    Milvus also needs: base+0 etcd client, +1 etcd peer, +2 metrics/healthz (replaces 9091),
    +3 proxy internal, +4 root coord, +5 query coord, +6 query node, +7 index coord,
    +8 index node, +9 data coord, +10 data node. Milvus 2.3.5 binds its SDK port and its
    gRPC component ports on all interfaces (it has no bind-address setting); the etcd
    ports are bound to 127.0.0.1.
    """

    temporal: int = 7233
    temporal_ui: int = 8233
    milvus: int = 19530
    milvus_extra_base: int = 19600
    postgres: int = 5432
    gcs: int = 9023

    def milvus_extra(self) -> dict[str, int]:
        """Milvus's own port keys -> port numbers, laid out from ``milvus_extra_base``."""
        return {key: self.milvus_extra_base + i for i, (key, _) in enumerate(MILVUS_EXTRA_PORTS)}

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> StackPorts:
        """Build from a saved dict, ignoring unknown keys so old files still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(str(v)) for k, v in data.items() if k in known})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StackPorts:
        """Defaults overridden by ``MMRAG_STACK_TEMPORAL``, ``MMRAG_STACK_MILVUS``, ... ."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw:
                try:
                    values[f.name] = int(raw)
                except ValueError as e:
                    raise StackError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a port") from e
        return cls(**values)

    @classmethod
    def requested(cls, environ: dict[str, str] | None = None) -> StackPorts | None:
        """Ports from ``MMRAG_STACK_*`` when any is set, else None: a ``Stack`` given None
        reuses the ports its state directory recorded (or the defaults)."""
        env = dict(os.environ) if environ is None else environ
        return cls.from_env(env) if any(k.startswith(ENV_PREFIX) for k in env) else None

    @classmethod
    def free(cls) -> StackPorts:
        """Ports that are free now, for a test stack beside the developer's own.

        They are picked at random *below* the kernel's ephemeral range rather than asked of
        the kernel with bind(port 0): the kernel hands ports from the ephemeral range to
        every outgoing connection and to the Temporal dev server's internal services, so a
        port taken from that range could be gone again before the server that needs it
        starts. Below the range only an explicit bind can take it.
        """
        low, high = _pick_range()
        rng = random.SystemRandom()
        taken: set[int] = set()

        def usable(port: int) -> bool:
            return port not in taken and port_bindable(ANY, port, reuse=False)

        for _ in range(2000):
            base = rng.randint(low, high - MILVUS_EXTRA_COUNT)
            block = range(base, base + MILVUS_EXTRA_COUNT)
            if all(usable(p) for p in block):
                taken.update(block)
                break
        else:
            raise StackError(f"no {MILVUS_EXTRA_COUNT} consecutive free ports in {low}-{high}")

        def one() -> int:
            for _ in range(2000):
                port = rng.randint(low, high)
                if usable(port):
                    taken.add(port)
                    return port
            raise StackError(f"no free port in {low}-{high}")

        return cls(
            temporal=one(),
            temporal_ui=one(),
            milvus=one(),
            milvus_extra_base=base,
            postgres=one(),
            gcs=one(),
        )


def _pick_range() -> tuple[int, int]:
    """The port range ``StackPorts.free`` draws from: 20000 up to the ephemeral range."""
    ephemeral_low = 32768
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        ephemeral_low = int(text[0])
    except (OSError, ValueError, IndexError):
        pass
    low = 20000
    high = ephemeral_low - 1
    if high - low < 1000:  # an unusual ephemeral range: fall back to a range above it
        low, high = 61000, 65000
    return low, high


def port_bindable(host: str, port: int, *, reuse: bool = True) -> bool:
    """Whether a server could bind ``host:port`` now.

    With ``reuse`` the probe sets SO_REUSEADDR as servers do, so connections of a server
    that just stopped (TIME_WAIT) do not count as "taken"; a listening socket still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def tcp_answers(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def listeners(port: int) -> list[int]:
    """Pids of the processes listening on ``port`` (empty when they cannot be seen)."""
    try:
        import psutil

        conns = psutil.net_connections(kind="tcp")
    except Exception:  # only used to make an error message better; never fatal
        return []
    pids = {
        c.pid
        for c in conns
        if c.status == "LISTEN" and c.laddr and c.laddr.port == port and c.pid is not None
    }
    return sorted(pids)
