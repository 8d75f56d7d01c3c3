"""The CLIP encoder behind the ``mmrag-gpu-encode`` task queue: loaded once per process.

Why one object per process: loading ViT-B-32 costs seconds and hundreds of MB; every encode
activity in the worker shares it through :func:`get_encoder`. Images are decoded and
preprocessed on CPU threads (``preprocess`` is thread-safe) and stacked into one forward
pass (``encode_images``), because per-image forwards waste the GPU.

Weights come from one of three places:

- production: ``open_clip.create_model_and_transforms(name, pretrained=tag)``, which
  downloads the tagged weights (e.g. ``ViT-B-32`` / ``laion2b_s34b_b79k``) once into the
  Hugging Face cache;
- a local checkpoint file (``checkpoint=``): the architecture is built without pretrained
  weights and the state dict is loaded from disk (air-gapped clusters, the tiny fixture);
- nothing (``pretrained=""`` and no checkpoint): random weights, for speed benchmarks only.

The tiny test model ``mmrag-tiny`` (activities/clip/tiny/, package data) is registered with
open_clip on demand, so ``ClipEncoder.load("mmrag-tiny", checkpoint=...)`` works offline.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from activities.clip import TINY_MODEL_DIR

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "mmrag-tiny"
# torch's CPU threads when the model runs on CUDA and MMRAG_TORCH_THREADS is 0 (auto). The
# forward pass runs on the GPU; torch's own CPU thread pool then only competes with the
# decode threads, which bound ingest there: on a 16-core H200 host, decode + encode ran at
# 841 img/s with 1 torch thread and 415 img/s with 16 (bench/encode_gpu.py).
CUDA_TORCH_THREADS = 1
TINY_CONFIG_PATH = TINY_MODEL_DIR / f"{TINY_MODEL_NAME}.json"
TINY_CHECKPOINT_PATH = TINY_MODEL_DIR / f"{TINY_MODEL_NAME}.pt"

_registry_lock = threading.Lock()


def _register_tiny_config(model_name: str = TINY_MODEL_NAME) -> None:
    """Make a shipped ``mmrag-*`` architecture (activities/clip/tiny/<name>.json) known
    to open_clip (idempotent, thread-safe)."""
    config = TINY_MODEL_DIR / f"{model_name}.json"
    with _registry_lock:
        if model_name in open_clip.list_models():
            return
        if not config.is_file():
            raise ValueError(
                f"model {model_name!r} needs its config at {config}, which is "
                "missing; reinstall mmrag (activities/clip/tiny/ is package data)"
            )
        open_clip.add_model_config(config)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but CUDA is not available on this machine; "
            "set MMRAG_DEVICE=cpu (or auto)"
        )
    return resolved


def _has_schema(model_name: str) -> bool:
    """``hf-hub:org/repo`` and ``local-dir:/path`` names carry their own config and weights."""
    return model_name.startswith(("hf-hub:", "local-dir:"))


def _check_model_name(model_name: str) -> None:
    if model_name.startswith("mmrag-"):
        _register_tiny_config(model_name)
        return
    if _has_schema(model_name):
        return
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=5)
        hint = f"did you mean one of {close}? " if close else ""
        raise ValueError(
            f"unknown CLIP model {model_name!r}; {hint}set MMRAG_CLIP_MODEL to an open_clip "
            f"architecture (open_clip.list_models(), e.g. 'ViT-B-32') or {TINY_MODEL_NAME!r}"
        )


def _check_pretrained(model_name: str, pretrained: str) -> None:
    if not pretrained or os.path.isfile(pretrained) or _has_schema(model_name):
        return
    if not open_clip.is_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for CLIP model {model_name!r}; "
            f"known tags: {tags or 'none (this architecture has no published weights)'}; "
            "or set MMRAG_CLIP_CHECKPOINT to a local weights file"
        )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init_warning(active: bool) -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning when we load the weights ourselves.

    open_clip logs it on the root logger whenever it is not the one loading weights; with a
    local checkpoint that is about to be loaded it would only mislead whoever reads the log.
    """
    if not active:
        yield
        return
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or open_clip's ``{"state_dict": ...}``, with ``module.`` stripped."""
    try:
        loaded: Any = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors: the file is not a torch checkpoint
        raise ValueError(
            f"CLIP checkpoint {checkpoint} could not be read as a torch state dict ({exc}); "
            "point MMRAG_CLIP_CHECKPOINT at a .pt file saved with torch.save(state_dict)"
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(
            f"CLIP checkpoint {checkpoint} holds {type(loaded).__name__}, not a state dict of "
            "tensors; save it with torch.save(model.state_dict(), path)"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in loaded.items()}


@dataclass(eq=False)
class ClipEncoder:
    """One open_clip model with its preprocess transform and tokenizer, ready to encode.

    Build it with :meth:`load` (or share one through :func:`get_encoder`). Vectors come back
    as float32 numpy arrays of shape ``(N, dim)``, L2-normalised, so that inner product
    equals cosine similarity in the vector store.
    """

    model_name: str
    pretrained: str
    dim: int
    device: torch.device
    dtype: torch.dtype
    model: Any = field(repr=False)  # an open_clip CLIP / CustomTextCLIP (untyped library)
    transform: Callable[[Image.Image], torch.Tensor] = field(repr=False)
    tokenizer: Callable[[list[str]], torch.Tensor] = field(repr=False)
    checkpoint: Path | None = None

    @classmethod
    def load(
        cls,
        model_name: str,
        pretrained: str = "",
        checkpoint: Path | None = None,
        device: str = "auto",
        torch_threads: int = 0,
    ) -> ClipEncoder:
        """Build the model on ``device`` in eval mode (fp16 weights on CUDA).

        ``checkpoint`` wins over ``pretrained``: the architecture is created without
        weights and the local state dict is loaded strictly. User errors (unknown model or
        tag, missing or unreadable checkpoint, unavailable device) raise ``ValueError``
        saying what to change; a failed weights download surfaces as open_clip's
        ``RuntimeError`` (worth retrying).
        """
        target = resolve_device(device)
        threads = torch_threads or (CUDA_TORCH_THREADS if target.type == "cuda" else 0)
        if threads > 0:
            torch.set_num_threads(threads)
        _check_model_name(model_name)
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if not checkpoint.is_file():
                raise ValueError(
                    f"CLIP checkpoint {checkpoint} does not exist; set MMRAG_CLIP_CHECKPOINT "
                    "to an existing weights file, or leave it empty to use "
                    "MMRAG_CLIP_PRETRAINED"
                )
            state_dict = _read_state_dict(checkpoint)
            pretrained_arg = None
        else:
            _check_pretrained(model_name, pretrained)
            state_dict = None
            pretrained_arg = pretrained or None
            if not pretrained:
                log.warning("CLIP %s has random weights: fine for benchmarks only", model_name)

        # "fp16" is open_clip's OpenAI-style mixed precision: matmul/conv weights in fp16,
        # LayerNorm in fp32 (LayerNormFp32). Running under fp16 autocast as well keeps any
        # remaining fp32 op consistent. On CPU, fp32: fp16 matmuls there are slow.
        precision = "fp16" if target.type == "cuda" else "fp32"
        with _quiet_random_init_warning(state_dict is not None):
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained_arg, precision=precision, device=target
            )
        if state_dict is not None:
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as exc:
                raise ValueError(
                    f"CLIP checkpoint {checkpoint} does not fit architecture {model_name!r}: "
                    f"{exc}; set MMRAG_CLIP_MODEL to the architecture it was trained with"
                ) from exc
        model.eval()
        model.requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(model_name)
        dtype = torch.float16 if target.type == "cuda" else torch.float32
        encoder = cls(
            model_name=model_name,
            pretrained=pretrained if checkpoint is None else "",
            dim=0,
            device=target,
            dtype=dtype,
            model=model,
            transform=transform,
            tokenizer=tokenizer,
            checkpoint=checkpoint,
        )
        # One tiny forward pass: learns the embedding width for any architecture (towers of
        # hf/timm models keep it in different places) and warms up kernels before traffic.
        encoder.dim = int(encoder.encode_texts(["warm-up"]).shape[1])
        log.info("loaded CLIP encoder %s", encoder.describe())
        return encoder

    def describe(self) -> str:
        """One line for logs and activity results: which weights produced these vectors."""
        source = str(self.checkpoint) if self.checkpoint else (self.pretrained or "random")
        return f"{self.model_name} ({source}) dim={self.dim} on {self.device} {self.dtype}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop one image into a CPU tensor (C, H, W).

        When the model's transform ends in the usual ToTensor + Normalize, only the PIL steps
        run here and the result stays uint8: a quarter of the bytes to stack, pin and copy
        to the device, and no float maths on decode threads (where each torch op would also
        spawn its own intra-op threads). :meth:`encode_images` normalises on the device.
        Other transforms run whole and give float32. Safe to call from many decode threads
        at once: the inference transform holds no mutable state.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self._pil_steps is None:
            return self.transform(image)
        array = np.array(self._pil_steps(image), dtype=np.uint8, copy=True)  # (H, W, C)
        return torch.from_numpy(array).permute(2, 0, 1)

    def preprocess_tensor(self, image: torch.Tensor) -> torch.Tensor | None:
        """:meth:`preprocess` for an RGB uint8 (3, H, W) tensor on any device (a JPEG the
        GPU decoded: activities/media/jpeg_gpu.py): the same resize and crop, run where
        the tensor is; ``None`` when the transform has a step that only takes pictures."""
        if self._tensor_steps is None:
            return None
        for step in self._tensor_steps:
            image = step(image)
        return image

    @cached_property
    def _tensor_steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
        if self._pil_steps is None:
            return None
        steps = []
        for step in getattr(self._pil_steps, "transforms", []):
            if isinstance(step, Resize | CenterCrop):
                steps.append(step)
            elif type(step).__name__ != "MaybeConvertMode":  # it passes tensors through
                return None
        return steps

    @cached_property
    def _pil_steps(self) -> Callable[[Image.Image], Image.Image] | None:
        steps = list(getattr(self.transform, "transforms", []))
        if (
            len(steps) < 2
            or not isinstance(steps[-2], ToTensor)
            or not isinstance(steps[-1], Normalize)
        ):
            return None
        return Compose(steps[:-2])

    @cached_property
    def _normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        normalize = self.transform.transforms[-1]  # type: ignore[attr-defined]
        mean = torch.tensor(normalize.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(normalize.std, dtype=torch.float32, device=self.device)
        return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def _host_batch(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Stack straight into page-locked memory on CUDA (one copy, async upload)."""
        if self.device.type != "cuda":
            return torch.stack(pixels)
        if any(p.device.type == "cuda" for p in pixels):  # GPU-decoded JPEGs among them
            return torch.stack([p.to(self.device, non_blocking=True) for p in pixels])
        first = pixels[0]
        out = torch.empty((len(pixels), *first.shape), dtype=first.dtype, pin_memory=True)
        return torch.stack(pixels, out=out)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

    def _to_numpy(self, features: torch.Tensor) -> np.ndarray:
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    def encode_images(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """Encode preprocessed images in one forward pass: float32 ``(N, dim)``, unit norm."""
        if not pixels:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self._host_batch(pixels)
        with torch.inference_mode(), self._autocast():
            batch = batch.to(self.device, non_blocking=True)
            if batch.dtype == torch.uint8:  # ToTensor + Normalize, on the device
                mean, std = self._normalization
                batch = (batch.float().div_(255.0) - mean).div_(std)
            features = self.model.encode_image(batch.to(self.dtype))
        return self._to_numpy(features)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Encode query texts (truncated to the model's context): float32 ``(N, dim)``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        with torch.inference_mode(), self._autocast():
            tokens = tokens.to(self.device, non_blocking=True)
            features = self.model.encode_text(tokens)
        return self._to_numpy(features)


_cache: dict[tuple[str, str, str, str, int], ClipEncoder] = {}
_cache_lock = threading.Lock()


def get_encoder(
    model_name: str,
    pretrained: str = "",
    checkpoint: Path | None = None,
    device: str = "auto",
    torch_threads: int = 0,
) -> ClipEncoder:
    """The process-wide encoder for these arguments, loaded on first use.

    The lock is held while loading, so two encode activities starting together wait for one
    load instead of building the model twice (and doubling GPU memory).
    """
    key = (
        model_name,
        pretrained,
        str(Path(checkpoint).resolve()) if checkpoint is not None else "",
        device,
        torch_threads,
    )
    with _cache_lock:
        encoder = _cache.get(key)
        if encoder is None:
            encoder = ClipEncoder.load(model_name, pretrained, checkpoint, device, torch_threads)
            _cache[key] = encoder
        return encoder


def random_weights(model_name: str, device: str = "auto", torch_threads: int = 0) -> ClipEncoder:
    """An encoder with the architecture's random init: for speed benchmarks, no download."""
    return ClipEncoder.load(model_name, "", None, device, torch_threads)


def tiny_encoder(device: str = "cpu", torch_threads: int = 0) -> ClipEncoder:
    """The committed tiny fixture model (offline demo and tests), shared per process."""
    return get_encoder(TINY_MODEL_NAME, "", TINY_CHECKPOINT_PATH, device, torch_threads)
