"""The one exception the embedded stack raises for problems a person has to fix."""

from __future__ import annotations


class StackError(RuntimeError):
    """A service could not be started, checked or stopped.

    The message is written for the person at the terminal: it names the service, the port or
    path involved and what to change. Callers (the CLI, test fixtures) print it as is.
    """
