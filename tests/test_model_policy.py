"""Re-index loads only models on the allow-list: a Reindex input comes from any Temporal
client, and open_clip would download ``hf-hub:`` weights or read any checkpoint path."""

from __future__ import annotations

from pathlib import Path

import pytest

from activities.clip import TINY_MODEL_DIR
from activities.clip.model_policy import ModelNotAllowedError, check_model
from settings import Settings


def _settings(**kw: str) -> Settings:
    return Settings(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k", **kw)  # type: ignore[arg-type]


def test_hub_local_dir_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    s = _settings()
    for model, checkpoint in (
        ("hf-hub:attacker/evil-clip", ""),
        ("local-dir:/etc", ""),
        ("ViT-L-14", ""),
        ("mmrag-tiny", "/etc/passwd"),
        ("mmrag-tiny", str(tmp_path / "x.pt")),
    ):
        with pytest.raises(ModelNotAllowedError, match="MMRAG_REINDEX"):
            check_model(s, model, "", checkpoint)


def test_configured_shipped_and_listed_models_are_allowed(tmp_path: Path) -> None:
    s = _settings(
        reindex_models="ViT-L-14/openai, hf-hub:org/good-clip",
        reindex_checkpoint_dir=str(tmp_path),
    )
    check_model(s, "ViT-B-32", "laion2b_s34b_b79k", "")
    check_model(s, "mmrag-tiny-wide", "", str(TINY_MODEL_DIR / "mmrag-tiny.pt"))
    check_model(s, "ViT-L-14", "openai", "")
    check_model(s, "hf-hub:org/good-clip", "", "")
    check_model(s, "mmrag-tiny", "", str(tmp_path / "ckpt" / "m.pt"))
    with pytest.raises(ModelNotAllowedError):
        check_model(s, "ViT-L-14", "laion400m_e32", "")
    with pytest.raises(ModelNotAllowedError):  # a symlink out of the directory
        (tmp_path / "link.pt").symlink_to("/etc/passwd")
        check_model(s, "mmrag-tiny", "", str(tmp_path / "link.pt"))


async def test_a_reindex_with_a_hub_model_fails_at_once(worker, client) -> None:  # type: ignore[no-untyped-def]
    """Through Temporal: refused before anything is downloaded, not retried."""
    import asyncio

    from temporalio.client import WorkflowFailureError

    from starters.lifecycle import start_reindex
    from workflows.contracts import ReindexInput

    handle = await start_reindex(
        client, ReindexInput(mode="full", model="hf-hub:attacker/evil-clip")
    )
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), timeout=120)
    cause = info.value.cause
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause  # type: ignore[union-attr]
    assert "MMRAG_REINDEX_MODELS" in str(cause)
