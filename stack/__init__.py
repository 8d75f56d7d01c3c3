"""The embedded stack: local Temporal, Milvus, PostgreSQL and GCS emulator servers.

``from stack.services import Stack, StackPorts, StackError, read_endpoints`` (also importable
from ``stack``). See ``stack.services`` for the state directory layout.
"""

from stack.errors import StackError
from stack.ports import StackPorts
from stack.services import DEFAULT_SERVICES, Stack, read_endpoints

__all__ = ["DEFAULT_SERVICES", "Stack", "StackError", "StackPorts", "read_endpoints"]
