"""The HTTP API of `mmrag serve`, against the real stack and workers (docs/web.md).

Every endpoint with its bad inputs; each hole a front end could open is first attacked:
another tenant's assets and previews through a valid key, a body naming another tenant,
hostile upload names, oversized bodies, slow clients. A server restart while an ingest
runs keeps its progress (it is the workflow's, asked each time).
"""

from __future__ import annotations

import base64
import io
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from starters.synthetic_corpus import write_corpus, write_pdf, write_video
from tests.conftest import WEB_ENV, ServerStack, WebServer, make_api_key
from tests.helpers import audit_events, png_bytes, wait_searchable


@dataclass
class Corpus:
    tenant: str
    key: str  # writer
    reader: str
    folder: Path
    ingest_id: str
    assets: dict[str, dict[str, Any]]  # file name -> registry row as the API lists it


def call(server: WebServer, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kw)


def wait_ingest(server: WebServer, key: str, ingest_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = call(server, key, "GET", f"/v1/ingest/{ingest_id}").json()
        if body["status"] != "running":
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.3)


def list_all(server: WebServer, key: str, **params: Any) -> list[dict[str, Any]]:
    rows, cursor = [], ""
    while True:
        page = call(server, key, "GET", "/v1/assets", params={**params, "cursor": cursor}).json()
        rows += page["assets"]
        cursor = page["next_cursor"]
        if not cursor:
            return rows


def ingest_folder(server: WebServer, tenant: str, folder: Path) -> Corpus:
    key, reader = make_api_key(tenant, "writer"), make_api_key(tenant, "reader")
    started = call(
        server, key, "POST", "/v1/ingest", json={"sources": [folder.as_uri()], "tags": {"k": "v"}}
    )
    assert started.status_code == 202, started.text
    done = wait_ingest(server, key, started.json()["id"])
    assert done["status"] == "done", done
    assets = {Path(a["display"]).name: a for a in list_all(server, key)}
    return Corpus(tenant, key, reader, folder, started.json()["id"], assets)


@pytest.fixture(scope="module")
def corpus(web: WebServer, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Tenant A: 18 images, a 3-page PDF and a 4 s video, ingested through the API."""
    folder = tmp_path_factory.mktemp("web-a")
    write_corpus(folder, per_class=1, seed=16)
    write_pdf(folder / "report.pdf")
    write_video(folder / "clip.mp4")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    corpus = ingest_folder(web, "web-a", folder)
    wait_searchable(corpus.tenant, sum(a["chunks"] for a in corpus.assets.values()))
    return corpus


@pytest.fixture(scope="module")
def other(web: WebServer, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Tenant B, with an image of its own."""
    folder = tmp_path_factory.mktemp("web-b")
    write_corpus(folder, per_class=1, seed=99)
    for path in list(folder.iterdir())[2:]:
        path.unlink()
    return ingest_folder(web, "web-b", folder)


# -- ask --------------------------------------------------------------------------------------
def test_ask_returns_sources_with_previews_and_a_cited_answer(web: WebServer, corpus: Corpus):
    r = call(web, corpus.reader, "POST", "/v1/ask", json={"text": "a red circle", "top_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer_kind"] == "generated" and "[S1]" in body["answer"]
    assert len(body["sources"]) == 4
    assert {s["asset_id"] for s in body["sources"]} <= {
        a["asset_id"] for a in corpus.assets.values()
    }
    first = body["sources"][0]
    assert first["preview"].startswith(f"/v1/assets/{first['asset_id']}/preview?locator=")
    assert body["workflow_id"].startswith(f"ask/{corpus.tenant}/")
    assert body["web_ui"].startswith("http://127.0.0.1:") and body["run_id"] in body["web_ui"]

    quick = call(web, corpus.reader, "POST", "/v1/ask", json={"text": "a red circle", "top_k": 4})
    retrieval = call(
        web,
        corpus.reader,
        "POST",
        "/v1/ask",
        json={"text": "a red circle", "top_k": 4, "generate": False},
    ).json()
    assert retrieval["answer_kind"] == "extractive"
    assert [s["asset_id"] for s in retrieval["sources"]] == [
        s["asset_id"] for s in quick.json()["sources"]
    ]


def test_an_image_query_finds_that_image_first(web: WebServer, corpus: Corpus):
    path = corpus.folder / "green-triangle-000.png"
    image = base64.b64encode(path.read_bytes()).decode()
    body = call(
        web, corpus.reader, "POST", "/v1/ask", json={"image_base64": image, "generate": False}
    ).json()
    assert body["sources"][0]["asset_id"] == corpus.assets[path.name]["asset_id"]


def test_ask_filters_by_media_type_and_shows_pages_and_frames(web: WebServer, corpus: Corpus):
    for media_type, prefix in (("application/pdf", "page:"), ("video/mp4", "frame:")):
        body = call(
            web,
            corpus.reader,
            "POST",
            "/v1/ask",
            json={
                "text": "a red circle",
                "generate": False,
                "filters": {"media_types": [media_type]},
            },
        ).json()
        assert body["sources"] and all(s["chunk"].startswith(prefix) for s in body["sources"])


def test_ask_bad_inputs_are_one_line_json_errors(web: WebServer, corpus: Corpus):
    cases = [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "JSON"),
        ({"json": {"text": "x", "colour": "red"}}, 400, "unknown field 'colour'"),
        ({"json": {"text": "x", "top_k": "many"}}, 400, "top_k"),
        ({"json": {"text": ""}}, 400, "ask something"),
        ({"json": {"text": "x", "filters": {"tags": {"a=b": "c"}}}}, 400, "tag"),
        ({"json": {"image_base64": "A" * 400_000}}, 413, "image_base64"),
        ({"json": {"text": "x" * 600_000}}, 413, "MMRAG_WEB_MAX_BODY_BYTES"),
    ]
    for kw, status, words in cases:
        r = call(web, corpus.reader, "POST", "/v1/ask", **kw)
        assert r.status_code == status, (kw.get("json"), r.text[:300])
        error = r.json()["error"]
        assert words in error and "\n" not in error, error


def test_keys_wrong_missing_revoked_and_roles(web: WebServer, corpus: Corpus):
    from starters.cli import main

    ask = {"json": {"text": "a red circle", "generate": False}}
    assert httpx.post(web.url + "/v1/ask", timeout=30, **ask).status_code == 401
    wrong = corpus.reader[:-4] + ("AAAA" if not corpus.reader.endswith("AAAA") else "BBBB")
    r = call(web, wrong, "POST", "/v1/ask", **ask)
    assert r.status_code == 401 and "unknown or revoked" in r.json()["error"]
    assert call(web, "not-a-key", "GET", "/v1/me").status_code == 401
    # A reader may ask and browse, not ingest or forget.
    r = call(web, corpus.reader, "POST", "/v1/ingest", json={"sources": ["/tmp"]})
    assert r.status_code == 403 and "writer" in r.json()["error"]
    r = call(web, corpus.reader, "POST", "/v1/forget", json={"asset_id": "0" * 32})
    assert r.status_code == 403
    # Revoked with the CLI: refused once the server's cache (MMRAG_WEB_KEY_CACHE_S) lapses.
    key = make_api_key(corpus.tenant, "reader")
    assert call(web, key, "GET", "/v1/me").json()["tenant"] == corpus.tenant
    assert main(["apikey", "revoke", key]) == 0
    time.sleep(float(WEB_ENV["MMRAG_WEB_KEY_CACHE_S"]) + 0.5)
    assert call(web, key, "GET", "/v1/me").status_code == 401


def test_apikey_cli_creates_lists_and_stores_only_a_digest(capsys: pytest.CaptureFixture[str]):
    from sqlalchemy import text

    from starters.cli import main
    from tests.helpers import engine

    assert main(["apikey", "create", "--tenant", "web-cli", "--role", "writer"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("mmrag_")
    key_id = key.split("_")[1]
    assert main(["apikey", "list", "--tenant", "web-cli"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "writer" in listed and key.split("_", 2)[2] not in listed
    with engine().connect() as conn:
        stored = " ".join(str(v) for v in conn.execute(text("SELECT * FROM api_keys")).all())
    assert key.split("_", 2)[2] not in stored
    assert main(["apikey", "create", "--tenant", "web-cli", "--role", "operator"]) == 2


# -- tenants ----------------------------------------------------------------------------------
def test_a_key_never_reaches_another_tenants_assets_previews_or_ingests(
    web: WebServer, corpus: Corpus, other: Corpus
):
    a_image = corpus.assets["red-circle-000.png"]
    # B's listing holds only B's assets.
    b_ids = {a["asset_id"] for a in list_all(web, other.key)}
    assert b_ids and not b_ids & {a["asset_id"] for a in corpus.assets.values()}
    # A's preview through B's key: not found, the same answer as for an id that exists nowhere.
    path = f"/v1/assets/{a_image['asset_id']}/preview?locator=image"
    stolen = call(web, other.reader, "GET", path)
    nowhere = call(web, other.reader, "GET", "/v1/assets/" + "0" * 32 + "/preview")
    assert stolen.status_code == nowhere.status_code == 404
    assert stolen.json() == nowhere.json()
    assert call(web, corpus.reader, "GET", path).status_code == 200
    # B's key asking for A's ingest.
    r = call(web, other.reader, "GET", f"/v1/ingest/{corpus.ingest_id}")
    assert r.status_code == 404
    # A body that names A, sent with B's key.
    r = call(web, other.key, "POST", "/v1/ask", json={"tenant": corpus.tenant, "text": "x"})
    assert r.status_code == 403 and corpus.tenant in r.json()["error"]
    r = call(web, other.key, "POST", "/v1/forget", json={"tenant": corpus.tenant, "tags": {}})
    assert r.status_code == 403
    # Every attempt is audited: in B's trail, and in A's where it reached for A's data.
    b_refusals = [e for e in audit_events(other.tenant) if e.action == "web_refused"]
    assert {e.details["what"] for e in b_refusals} >= {"preview", "ingest status", "AskInput"}
    a_refusals = [e for e in audit_events(corpus.tenant) if e.action == "web_refused"]
    assert any(
        e.asset_id == a_image["asset_id"] and e.details["key_tenant"] == other.tenant
        for e in a_refusals
    )
    assert all(e.actor.startswith("apikey:") for e in a_refusals + b_refusals)
    assert other.key not in str([e.details for e in b_refusals])


# -- assets and previews ----------------------------------------------------------------------
def test_assets_are_paged_and_filtered(web: WebServer, corpus: Corpus):
    every = list_all(web, corpus.reader, limit=5)
    assert len(every) == len({a["asset_id"] for a in every}) == 20  # 18 images, PDF, video
    assert [a["asset_id"] for a in every] == sorted(a["asset_id"] for a in every)
    pdfs = list_all(web, corpus.reader, media_type="application/pdf")
    assert [Path(a["display"]).name for a in pdfs] == ["report.pdf"]
    failed = list_all(web, corpus.reader, status="failed")
    assert [Path(a["display"]).name for a in failed] == ["broken.png"] and failed[0]["reason"]
    assert list_all(web, corpus.reader, tag="k=v") and not list_all(web, corpus.reader, tag="k=w")
    assert not list_all(web, corpus.reader, created_after=int(time.time()) + 86400)
    for params in ({"media_type": "image/jpg"}, {"status": "all"}, {"tag": "novalue"}):
        r = call(web, corpus.reader, "GET", "/v1/assets", params=params)
        assert r.status_code == 400 and "\n" not in r.json()["error"]
    assert call(web, corpus.reader, "GET", "/v1/assets", params={"limit": 0}).status_code == 400


def test_previews_of_an_image_a_pdf_page_and_a_video_frame(web: WebServer, corpus: Corpus):
    cases = [
        ("red-circle-000.png", "image"),
        ("report.pdf", "page:2"),
        ("report.pdf", "page:2:text"),
        ("clip.mp4", "frame:0.000"),
    ]
    for name, locator in cases:
        path = f"/v1/assets/{corpus.assets[name]['asset_id']}/preview"
        r = call(web, corpus.reader, "GET", path, params={"locator": locator, "size": 96})
        assert r.status_code == 200, (name, locator, r.text)
        assert r.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(r.content))
        assert max(image.size) <= 96
        again = call(
            web,
            corpus.reader,
            "GET",
            path,
            params={"locator": locator, "size": 96},
            headers={"If-None-Match": r.headers["etag"]},
        )
        assert again.status_code == 304
    # A video's frame from the Ask's own sources renders.
    body = call(
        web,
        corpus.reader,
        "POST",
        "/v1/ask",
        json={
            "text": "a green triangle",
            "generate": False,
            "filters": {"media_types": ["video/mp4"]},
        },
    ).json()
    assert call(web, corpus.reader, "GET", body["sources"][0]["preview"]).status_code == 200
    pdf = f"/v1/assets/{corpus.assets['report.pdf']['asset_id']}/preview"
    for locator, status in (("frame:1.0", 400), ("page:99", 422), ("image", 400)):
        r = call(web, corpus.reader, "GET", pdf, params={"locator": locator})
        assert r.status_code == status, (locator, r.text)
    r = call(web, corpus.reader, "GET", pdf, params={"size": 4000})
    assert r.status_code == 400


# -- ingest -----------------------------------------------------------------------------------
def test_upload_stores_hostile_names_safely_and_ingests_them(
    web: WebServer, test_stack: ServerStack, tenant: str
):
    key = make_api_key(tenant, "writer")
    red = png_bytes((48, 48), (200, 20, 20))
    files = [
        ("files", ("../../../../etc/cron.d/evil.png", red, "image/png")),
        ("files", ("..\\..\\windows\\x.png", red, "image/png")),
        ("files", ("\x1b[31mred\u202egnp.exe", red, "image/png")),
        ("files", (".hidden", red, "image/png")),
    ]
    r = call(web, key, "POST", "/v1/ingest/uploads", files=files, data={"tags": ["via=upload"]})
    assert r.status_code == 202, r.text
    done = wait_ingest(web, key, r.json()["id"])
    assert done["result"]["ingested"] == 4, done
    names = sorted(Path(a["display"]).name for a in list_all(web, key))
    assert names == sorted(["evil.png", "x.png", "31mred_gnp.exe", "hidden"])
    uploads = test_stack.state_dir / "uploads"
    stored = [p for p in uploads.rglob("*") if p.is_file()]
    assert all(uploads in p.resolve().parents for p in stored)
    assert not Path("/etc/cron.d/evil.png").exists()
    assert all(a["tags"] == {"via": "upload"} for a in list_all(web, key))
    # Another tenant's key never sees them.
    assert not list_all(web, make_api_key(tenant + "-x", "reader"))


def test_oversized_uploads_are_refused_and_leave_nothing(
    web: WebServer, test_stack: ServerStack, tenant: str
):
    key = make_api_key(tenant, "writer")
    before = set((test_stack.state_dir / "uploads").rglob("*"))
    big = b"\x89PNG\r\n\x1a\n" + b"0" * 1_100_000  # over MMRAG_WEB_MAX_FILE_BYTES
    r = call(web, key, "POST", "/v1/ingest/uploads", files=[("files", ("big.png", big))])
    assert r.status_code == 413 and "MMRAG_WEB_MAX_FILE_BYTES" in r.json()["error"]
    huge = [("files", (f"{i}.png", b"0" * 900_000)) for i in range(4)]  # over the request limit
    r = call(web, key, "POST", "/v1/ingest/uploads", files=huge)
    assert r.status_code == 413 and "MMRAG_WEB_MAX_UPLOAD_BYTES" in r.json()["error"]
    left = set((test_stack.state_dir / "uploads").rglob("*")) - before
    assert not [p for p in left if p.is_file()]
    r = call(web, key, "POST", "/v1/ingest/uploads", data={"tags": ["a=b"]})
    assert r.status_code == 400 and "files" in r.json()["error"]


def test_ingest_by_uri_refuses_what_lies_outside_the_roots(web: WebServer, tenant: str):
    key = make_api_key(tenant, "writer")
    r = call(web, key, "POST", "/v1/ingest", json={"sources": ["relative/path"]})
    assert r.status_code == 400 and "absolute" in r.json()["error"]
    r = call(web, key, "POST", "/v1/ingest", json={"sources": []})
    assert r.status_code == 400
    r = call(web, key, "POST", "/v1/ingest", json={"sources": ["file:///etc/passwd"]})
    done = wait_ingest(web, key, r.json()["id"])
    # The workers refuse the run (OutsideStorageRoots); the API gives their one line.
    assert done["status"] == "failed" and "storage roots" in done["error"], done
    assert "\n" not in done["error"]
    assert call(web, key, "GET", "/v1/ingest/not-an-id").status_code == 404


def test_a_server_restart_while_an_ingest_runs_keeps_its_progress(
    test_stack: ServerStack, worker: Any, tmp_path: Path, tenant: str
):
    write_corpus(tmp_path, per_class=4, seed=5)  # 72 images
    key = make_api_key(tenant, "writer")
    first = WebServer.start(test_stack)
    try:
        started = call(first, key, "POST", "/v1/ingest", json={"sources": [tmp_path.as_uri()]})
        assert started.status_code == 202
    finally:
        first.stop(kill=True)  # no graceful shutdown: the server simply dies
    second = WebServer.start(test_stack)
    try:
        seen = call(second, key, "GET", f"/v1/ingest/{started.json()['id']}").json()
        assert seen["status"] in ("running", "done")
        assert seen["progress"] is not None or seen["result"] is not None
        done = wait_ingest(second, key, started.json()["id"])
        assert done["status"] == "done" and done["result"]["ingested"] == 72
        assert done["web_ui"].endswith("/history")
    finally:
        second.stop()


# -- forget -----------------------------------------------------------------------------------
def test_forget_removes_an_asset_and_its_preview(web: WebServer, tmp_path: Path, tenant: str):
    write_corpus(tmp_path, per_class=1, seed=3)
    mine = ingest_folder(web, tenant, tmp_path)
    target = mine.assets["blue-square-000.png"]["asset_id"]
    r = call(web, mine.key, "POST", "/v1/forget", json={"asset_id": target, "reason": "T-1"})
    assert r.status_code == 200 and r.json()["forgotten"] == 1, r.text
    assert call(web, mine.reader, "GET", f"/v1/assets/{target}/preview").status_code == 404
    assert target not in {a["asset_id"] for a in list_all(web, mine.reader)}
    r = call(web, mine.key, "POST", "/v1/forget", json={})
    assert r.status_code == 400 and "what to forget" in r.json()["error"]


# -- the server itself ------------------------------------------------------------------------
def test_openapi_docs_and_json_errors_for_unknown_paths(web: WebServer):
    spec = httpx.get(web.url + "/v1/openapi.json", timeout=10).json()
    assert {
        "/v1/ask",
        "/v1/ingest",
        "/v1/ingest/uploads",
        "/v1/ingest/{ingest_id}",
        "/v1/forget",
        "/v1/assets",
        "/v1/assets/{asset_id}/preview",
    } <= set(spec["paths"])
    assert "swagger" in httpx.get(web.url + "/docs", timeout=10).text.lower()
    r = httpx.get(web.url + "/v2/ask", timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "no such endpoint: see /docs"}
    page = httpx.get(web.url + "/", timeout=10)
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers


def _raw(server: WebServer) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def test_a_client_that_trickles_its_headers_is_cut_off(web: WebServer):
    sock = _raw(web)
    with sock:
        sock.sendall(b"GET /v1/me HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(25):  # one byte a second: far past MMRAG_WEB_REQUEST_TIMEOUT_S
            try:
                sock.sendall(b"X")
                sock.settimeout(1)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed


def test_a_body_that_never_arrives_is_answered_408(web: WebServer, corpus: Corpus):
    sock = _raw(web)
    with sock:
        sock.sendall(
            b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + corpus.reader.encode() + b"\r\n"
            b'Content-Length: 100\r\n\r\n{"text": '
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


@pytest.fixture(autouse=True)
def _server_alive(web: WebServer) -> Iterator[None]:
    yield
    assert web.proc.poll() is None, web.log()[-3000:]
