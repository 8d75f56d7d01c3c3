"""Whether a worker that loads CLIP can have its weights, checked before it starts.

Without this, ``mmrag worker`` on a machine without network and without the weights
spends a minute in Hugging Face download retries and ends in a hundred-line traceback.
The check costs no download: the weights are either a local checkpoint
(``MMRAG_CLIP_CHECKPOINT``), already in open_clip's cache (the Hugging Face hub cache, or
``~/.cache/clip`` for URL weights), or downloadable, which is only tried when the hub is
not switched off (``HF_HUB_OFFLINE``) and answers a TCP connect within a few seconds.
Anything else is one line naming the settings to change and how to fetch the weights.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from settings import Settings

#: Roles whose worker loads the CLIP model at start.
ENCODER_ROLES = frozenset({"all", "encode", "query"})
#: How long the hub may take to accept a connection before it counts as unreachable.
CONNECT_TIMEOUT_S = 3.0


def missing_weights(settings: Settings, role: str) -> str:
    """``""`` when the worker for ``role`` can load its CLIP weights, else what to do."""
    if role not in ENCODER_ROLES:
        return ""
    model, tag = settings.clip_model, settings.clip_pretrained
    checkpoint = settings.resolved_checkpoint()
    if checkpoint is not None:
        if checkpoint.is_file():
            return ""
        return (
            f"MMRAG_CLIP_CHECKPOINT={checkpoint} does not exist: point it at a weights file "
            f"of the MMRAG_CLIP_MODEL={model} architecture, or leave it empty to use the "
            f"pretrained tag MMRAG_CLIP_PRETRAINED={tag!r}"
        )
    if not tag or os.path.isfile(tag):  # random weights (benchmarks), or a file path
        return ""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        return ""  # an unknown model or tag: the encoder's own check names the fix
    if _cached(cfg):
        return ""
    offline = _hub_offline()
    endpoint = _endpoint(cfg)
    if not offline and _reachable(endpoint):
        return ""  # open_clip downloads it once, into the cache
    why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached"
    return (
        f"the CLIP weights {model}/{tag} (MMRAG_CLIP_MODEL/MMRAG_CLIP_PRETRAINED) are not in "
        f"the local cache and {why}: fetch them once where there is network "
        f"(`python -c \"import open_clip; open_clip.create_model_and_transforms('{model}', "
        f"pretrained='{tag}')\"`, then copy the Hugging Face cache, HF_HOME), or set "
        "MMRAG_CLIP_CHECKPOINT to a local weights file (with MMRAG_CLIP_MODEL naming its "
        "architecture)"
    )


def _cached(cfg: dict[str, object]) -> bool:
    hub = str(cfg.get("hf_hub") or "")
    url = str(cfg.get("url") or "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_WEIGHTS_NAME
        from open_clip.pretrained import _get_safe_alternatives

        # The files open_clip's download_pretrained_from_hf would fetch, in its order.
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [*_get_safe_alternatives(filename), filename]
        return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    if url:
        return (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()
    return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint(cfg: dict[str, object]) -> str:
    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    return str(cfg.get("url") or "")


def _reachable(url: str) -> bool:
    """Whether ``url``'s host (or the HTTPS proxy, when one is set) accepts a connection."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parts = urlsplit(proxy or url)
    host = parts.hostname
    if not host:
        return True  # nothing to probe: let the download say
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False
