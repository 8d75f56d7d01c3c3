"""The CLIP encoder (open_clip): loading a model, which models a deployment may load, and
the small model shipped with the package for offline tests and demos."""

from pathlib import Path

# mmrag-tiny (tiny/README.md): its open_clip configs and weights, installed as package data.
TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny"
