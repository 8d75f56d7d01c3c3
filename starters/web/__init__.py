"""The web app and HTTP API of ``mmrag serve`` (docs/web.md).

- ``app.py``: the app factory and the uvicorn server;
- ``routes.py``: the ``/v1`` API; ``errors.py``: JSON errors; ``limits.py``: sizes, deadlines;
- ``keys.py``: API keys; ``credentials.py``: a key's workflow credential; ``audit.py``;
- ``state.py``: what the server holds; ``uploads.py``; ``previews.py``;
- ``page.py`` and ``static/``: the search page.
"""
