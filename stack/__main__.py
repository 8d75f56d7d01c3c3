"""``python -m stack up|down|status [--state-dir DIR] [--free-ports] [--with-gcs]``.

A way to drive the stack without the ``mmrag`` CLI (and its heavier imports), for
debugging the servers themselves. Ports come from MMRAG_STACK_* variables or ports.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from stack.errors import StackError
from stack.ports import StackPorts
from stack.services import DEFAULT_SERVICES, Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=Path(".mmrag"))
    parser.add_argument("--free-ports", action="store_true", help="pick free ports (up only)")
    parser.add_argument("--with-gcs", action="store_true", help="also run the GCS emulator")
    parser.add_argument("--timeout", type=float, default=90)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ports = StackPorts.free() if args.free_ports else None
    if ports is None and any(k.startswith("MMRAG_STACK_") for k in os.environ):
        ports = StackPorts.from_env()
    services = (*DEFAULT_SERVICES, "gcs") if args.with_gcs else DEFAULT_SERVICES
    stack = Stack(args.state_dir, ports, services=services)
    try:
        if args.action == "up":
            print(json.dumps(stack.up(timeout=args.timeout), indent=2))
        elif args.action == "down":
            stack.down()
        else:
            status = stack.status()
            print(json.dumps(status, indent=2))
            return 0 if all(s["running"] for s in status.values()) else 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
