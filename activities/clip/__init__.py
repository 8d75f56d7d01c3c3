"""The CLIP encoder (open_clip): loading a model, which models a deployment may load, and
the small model shipped with the package for offline tests and demos."""
