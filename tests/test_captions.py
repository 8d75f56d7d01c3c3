"""Captions from a vision model: what a photo shows, instead of its file name.

The first half calls the generate worker's caption activity against the real HTTP test LLM
(tests/llm_server.py answers a caption request with the main colour of the picture it was
actually sent): pixels are read next to the model, never a name or a path sent in their
place; an item outside the tenant's storage roots is refused; failures map to Temporal
retries as generation's do. The second half runs the ingest workflows on the real stack
with a caption model configured on the cpu and generate workers: captions land in the
lexical index, reach the prompt, and unchanged content is never captioned twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from temporalio.exceptions import ApplicationError

from activities.captions import CaptionActivities, content_hash
from activities.llm.client import LlmConfig
from settings import Settings
from starters.synthetic_corpus import write_video
from tests.llm_server import LlmTestServer, user_text
from workflows.activities.captions import CaptionInput, CaptionItem

API_KEY = "sk-caption-test-0123456789"


def picture(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (320, 240), colour).save(path)
    return path


def item(path: Path, media_type: str, chunk: str, asset_id: str = "") -> CaptionItem:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return CaptionItem(
        asset_id or f"a-{path.stem}", path.as_uri(), media_type, "", chunk, content_hash(sha, chunk)
    )


@pytest.fixture
def llm_server() -> Iterator[LlmTestServer]:
    with LlmTestServer(api_key=API_KEY) as server:
        yield server


def activities_for(root: Path, server: LlmTestServer | None) -> CaptionActivities:
    settings = Settings(
        storage_roots=json.dumps({"tenant-a": [root.as_uri()]}),
        state_dir=root / ".state",
        caption_model="vision-test",
    )
    config = LlmConfig(base_url=server.base_url, api_key=API_KEY) if server else LlmConfig()
    return CaptionActivities(settings, config)


def test_the_model_captions_the_pixels_it_is_sent(
    llm_server: LlmTestServer, tmp_path: Path
) -> None:
    red = picture(tmp_path / "IMG_2034.png", (220, 30, 30))
    video = write_video(tmp_path / "clip.mp4")
    changed = picture(tmp_path / "changed.png", (30, 60, 200))
    stale = item(changed, "image/png", "image")
    picture(changed, (30, 170, 60))  # rewritten after it was planned
    acts = activities_for(tmp_path, llm_server)
    try:
        result = acts.caption_media(
            CaptionInput(
                "tenant-a",
                "vision-test",
                [
                    item(red, "image/png", "image"),
                    item(video, "video/mp4", "frame:0.000"),
                    item(video, "video/mp4", "frame:99.000"),
                    stale,
                ],
            )
        )
    finally:
        acts.close()
    captions = {(c.asset_id, c.chunk): c.text for c in result.captions}
    assert captions == {
        ("a-IMG_2034", "image"): "A picture mostly red.",
        ("a-clip", "frame:0.000"): "A picture mostly white.",  # a blue square on white
    }
    assert result.skipped == {
        "a-clip:frame:99.000": "no such picture on decoding",
        "a-changed:image": "content changed since ingest",
    }
    requests = llm_server.caption_requests
    assert len(requests) == 2 and all(r["model"] == "vision-test" for r in requests)
    sent = llm_server.request_bodies_text()
    assert "data:image/jpeg;base64," in sent
    assert "IMG_2034" not in sent and str(tmp_path) not in sent  # pixels, never the name
    assert all(user_text(r) == "Describe this picture." for r in requests)


def test_a_planned_item_outside_the_tenants_roots_is_not_read(
    llm_server: LlmTestServer, tmp_path: Path
) -> None:
    """A caption item is data from a workflow history: it must not make the generate worker
    read a file outside the tenant's storage roots (nor send its pixels to a model)."""
    root, elsewhere = tmp_path / "tenant-a", tmp_path / "private"
    root.mkdir()
    elsewhere.mkdir()
    secret = picture(elsewhere / "secret.png", (220, 30, 30))
    acts = activities_for(root, llm_server)
    try:
        result = acts.caption_media(
            CaptionInput("tenant-a", "vision-test", [item(secret, "image/png", "image")])
        )
    finally:
        acts.close()
    assert result.captions == []
    assert "outside" in result.skipped["a-secret:image"]
    assert llm_server.caption_requests == []


def test_failures_map_to_retries_as_generation_does(
    llm_server: LlmTestServer, tmp_path: Path
) -> None:
    red = picture(tmp_path / "red.png", (220, 30, 30))
    inp = CaptionInput("tenant-a", "vision-test", [item(red, "image/png", "image")])
    unconfigured = activities_for(tmp_path, None)
    with pytest.raises(ApplicationError, match="OPENAI_BASE_URL") as err:
        unconfigured.caption_media(inp)
    assert err.value.non_retryable and err.value.type == "CaptionsUnavailable"
    acts = activities_for(tmp_path, llm_server)
    try:
        llm_server.set_mode("status", status=400)
        with pytest.raises(ApplicationError) as err:
            acts.caption_media(inp)
        assert err.value.non_retryable and err.value.type == "PermanentLlmError"
        llm_server.set_mode("throttle", count=1, retry_after=1)
        with pytest.raises(ApplicationError) as err:
            acts.caption_media(inp)
        assert not err.value.non_retryable and err.value.type == "TransientLlmError"
        llm_server.set_mode("ok")
        assert [c.text for c in acts.caption_media(inp).captions] == ["A picture mostly red."]
    finally:
        acts.close()
        unconfigured.close()
    assert API_KEY not in str(err.value)


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioning(worker: Any, test_stack: Any, llm: LlmTestServer) -> Iterator[Any]:
    """The shared cpu and generate workers, replaced for this module by ones with a caption
    model configured, then put back as they were."""
    from tests.conftest import shared_worker_env

    env = shared_worker_env(llm)
    worker.cpu.stop(timeout=10)
    worker.generate.stop(timeout=10)
    caption_env = {"MMRAG_CAPTION_MODEL": "vision-test"}
    worker.cpu = test_stack.start_worker("cpu", **env["cpu"], **caption_env)
    worker.generate = test_stack.start_worker("generate", **env["generate"], **caption_env)
    try:
        yield worker
    finally:
        worker.cpu.stop(timeout=10)
        worker.generate.stop(timeout=10)
        worker.cpu = test_stack.start_worker("cpu", **env["cpu"])
        worker.generate = test_stack.start_worker("generate", **env["generate"])


def lexical_captions(tenant: str) -> dict[str, tuple[str, str]]:
    import sqlalchemy as sa

    from activities.store.lexical import lexical_chunks as t
    from tests.helpers import engine

    with engine().connect() as conn:
        rows = conn.execute(
            sa.select(t.c.uri, t.c.chunk, t.c.caption, t.c.content_hash).where(t.c.tenant == tenant)
        )
        return {f"{Path(r.uri).name}|{r.chunk}": (r.caption, r.content_hash) for r in rows}


async def _ingest(client: Any, tenant: str, sources: list[str]) -> Any:
    from starters.ingest import start_ingest

    handle = await start_ingest(client, tenant, sources)
    return await asyncio.wait_for(handle.result(), timeout=240)


async def test_ingest_captions_pictures_once_and_the_prompt_reads_them(
    captioning: Any, client: Any, llm: LlmTestServer, tenant: str, tmp_path: Path
) -> None:
    from starters.ask import ask
    from tests.helpers import milvus_pks, wait_searchable
    from workflows.contracts import AskInput

    first = tmp_path / "first"
    first.mkdir()
    picture(first / "IMG_0001.png", (220, 30, 30))
    picture(first / "IMG_0002.png", (30, 60, 200))
    llm.reset()
    result = await _ingest(client, tenant, [str(first)])
    assert (result.ingested, result.failed) == (2, 0), result.failures
    rows = lexical_captions(tenant)
    assert rows["IMG_0001.png|image"][0] == "A picture mostly red."
    assert rows["IMG_0002.png|image"][0] == "A picture mostly blue."
    assert all(len(h) == 64 for _, h in rows.values())
    assert len(llm.caption_requests) == 2

    # The same bytes under another name, and the same folder again: no new caption request.
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(first / "IMG_0001.png", second / "IMG_0003.png")
    result = await _ingest(client, tenant, [str(second), str(first)])
    assert (result.ingested, result.unchanged, result.failed) == (1, 2, 0), result.failures
    assert lexical_captions(tenant)["IMG_0003.png|image"][0] == "A picture mostly red."
    assert len(llm.caption_requests) == 2, "unchanged content was captioned again"

    # The prompt says what the picture shows, from its caption; never its file name as one.
    wait_searchable(tenant, len(milvus_pks(tenant)))
    answer = await asyncio.wait_for(
        ask(client, AskInput(tenant, text="Which picture is mostly blue?", top_k=3)), timeout=60
    )
    assert any(s.uri.endswith("IMG_0002.png") for s in answer.sources)
    prompt = user_text(llm.answer_requests[-1])
    assert "A picture mostly blue." in prompt
    assert "Caption: IMG 0002" not in prompt and "Caption: IMG_0002" not in prompt

    # New content under the same name is captioned anew.
    picture(first / "IMG_0002.png", (30, 170, 60))
    result = await _ingest(client, tenant, [str(first)])
    assert (result.ingested, result.unchanged) == (1, 1), result.failures
    assert lexical_captions(tenant)["IMG_0002.png|image"][0] == "A picture mostly green."
    assert len(llm.caption_requests) == 3
