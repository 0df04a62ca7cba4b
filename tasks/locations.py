"""Where things live by default: model weights and the embedding store.

One place for these defaults; the flow's parameter model and the CLI read them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIR_ENV = "NSFW_CURATOR_MODEL_DIR"
CACHE_PATH_ENV = "NSFW_CURATOR_CACHE_PATH"


def default_model_dir() -> str:
    """`$NSFW_CURATOR_MODEL_DIR`, else `~/.cache/nsfw-curator/models`."""
    return os.environ.get(MODEL_DIR_ENV) or str(Path.home() / ".cache" / "nsfw-curator" / "models")


def default_cache_path() -> str:
    """`$NSFW_CURATOR_CACHE_PATH`, else `~/.cache/nsfw-curator/embeddings` (use `s3://...` in production)."""
    return os.environ.get(CACHE_PATH_ENV) or str(Path.home() / ".cache" / "nsfw-curator" / "embeddings")


def clip_weights_dir(model_dir: str | os.PathLike, clip_model: str) -> Path:
    """CLIP checkpoints for a model name: `{model_dir}/clip/{clip_model}/{pretrained_tag}.{safetensors,bin,pt}`."""
    return Path(model_dir) / "clip" / clip_model


def nsfw_weights_path(model_dir: str | os.PathLike, clip_model: str) -> Path:
    """The NSFW head for a CLIP model: `{model_dir}/nsfw/{clip_model}.safetensors`."""
    return Path(model_dir) / "nsfw" / f"{clip_model}.safetensors"
