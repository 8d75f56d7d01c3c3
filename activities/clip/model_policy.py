"""Which models a re-index may load: an allow-list, checked where models are loaded.

open_clip loads whatever a model spec names: ``hf-hub:org/repo`` downloads and runs a
stranger's weights, ``local-dir:/path`` and checkpoint paths read any file the worker can.
A ``Reindex`` input comes from a Temporal client, so its model is checked against settings
an operator controls before anything is loaded: the worker's own ``MMRAG_CLIP_MODEL``, the
shipped tiny architectures, and ``MMRAG_REINDEX_MODELS``; a checkpoint must be the configured one,
the shipped one, or lie inside ``MMRAG_REINDEX_CHECKPOINT_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

from activities.clip import TINY_MODEL_DIR
from activities.clip.encoder import TINY_MODEL_NAME
from settings import Settings


class ModelNotAllowedError(ValueError):
    """A re-index named a model or checkpoint outside the allow-list."""


def allowed_models(settings: Settings) -> set[tuple[str, str]]:
    """``(model, pretrained)`` pairs; ``pretrained`` ``"*"`` allows any tag of that model."""
    shipped = {p.stem for p in TINY_MODEL_DIR.glob("mmrag-*.json")} | {TINY_MODEL_NAME}
    allowed = {(settings.clip_model, settings.clip_pretrained)} | {(m, "*") for m in shipped}
    for entry in settings.reindex_models.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if ":" in entry.split("/", 1)[0]:  # hf-hub:org/repo, local-dir:/path: one name
            allowed.add((entry, "*"))
        else:
            model, _, pretrained = entry.partition("/")
            allowed.add((model.strip(), pretrained.strip() or "*"))
    return allowed


def check_model(settings: Settings, model: str, pretrained: str, checkpoint: str) -> None:
    """Raise :class:`ModelNotAllowedError` unless the spec is on the allow-list."""
    allowed = allowed_models(settings)
    if (model, pretrained) not in allowed and (model, "*") not in allowed:
        names = ", ".join(sorted(f"{m}/{p}" if p != "*" else m for m, p in allowed))
        raise ModelNotAllowedError(
            f"model {model!r} (pretrained {pretrained!r}) is not allowed for a re-index: an "
            f"operator adds it to MMRAG_REINDEX_MODELS on the workers (allowed now: {names})"
        )
    if checkpoint:
        real = Path(os.path.realpath(checkpoint))
        configured = settings.resolved_checkpoint()
        dirs = [Path(os.path.realpath(TINY_MODEL_DIR))]
        if settings.reindex_checkpoint_dir:
            dirs.append(Path(os.path.realpath(settings.reindex_checkpoint_dir)))
        if not (
            (configured is not None and real == Path(os.path.realpath(configured)))
            or any(d in real.parents for d in dirs)
        ):
            raise ModelNotAllowedError(
                f"checkpoint {checkpoint!r} is outside MMRAG_REINDEX_CHECKPOINT_DIR: an "
                "operator puts checkpoints there (or sets it on the workers)"
            )
