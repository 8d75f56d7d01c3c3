"""How the CLI shows an object's URI to a person: as the path they would type.

``file://`` URIs are percent-encoded (``Path.as_uri``), so ``café 日本/a.jpg`` reads as
``caf%C3%A9%20%E6%97%A5%E6%9C%AC/a.jpg``; human output shows the local path instead. A
``gs://`` URI holds the object name as it is, so it stays (a ``%41`` in an object name
is three characters, not an ``A``). JSON output keeps every URI exact: scripts use them.

What a name cannot show safely stays escaped: control characters (an ESC in a file name
would drive the terminal) and bytes that are not UTF-8 come out as ``%XX``.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from rich.console import Console
from rich.table import Table
from rich.text import Text

from workflows.contracts import AssetOutcome


def display_uri(uri: str) -> str:
    """``uri`` for a terminal: a ``file://`` URI as its decoded local path, anything else
    as it is; unprintable characters percent-encoded either way."""
    text = uri
    if uri.startswith("file://"):
        path = urlsplit(uri).path
        text = unquote(path, errors="surrogateescape") if path else uri
    return printable(text)


def printable(text: str) -> str:
    """``text`` with control characters, bidi overrides and undecodable bytes as ``%XX``."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    raw = ch.encode("utf-8", errors="surrogateescape")
    return "".join(f"%{b:02X}" for b in raw)


def print_failures(
    failures: Sequence[AssetOutcome], count: int, console: Console, where: str
) -> None:
    """Each failed object with its reason (and its note, e.g. "still failing"), then how
    many more there were than the run kept and ``where`` to find them: wherever the CLI
    prints a count of failures, the reasons follow."""
    if failures:
        table = Table("object", "why it failed", show_lines=False)
        for f in failures:
            reason = f"{f.reason} ({f.note})" if f.note else f.reason
            table.add_row(Text(display_uri(f.uri)), Text(printable(reason)))
        console.print(table)
    if count > len(failures):
        console.print(f"... and {count - len(failures)} more ({where})", highlight=False)
