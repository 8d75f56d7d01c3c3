"""The search page: plain HTML, CSS and JavaScript shipped as package data (no build step).

``/`` serves ``static/index.html``; ``/static/`` the script and style sheet. The page talks
to the same ``/v1`` API as any client, with the API key the person pastes in (kept in the
tab's sessionStorage, sent in the ``Authorization`` header, never in a URL the server sees:
a key in the demo's link sits in the fragment, which browsers do not send).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The page may load only itself: no inline script, no other origin.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def mount_page(app: FastAPI) -> None:
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
