"""The parameters of a small nsfw-filter run over local folders under one root, as a deployment's run posts them."""

from __future__ import annotations

from pathlib import Path


def local_filter_parameters(root: Path, tiny_clip: tuple[Path, Path], laion_dir: Path, **overrides: object) -> dict:
    """Inputs in `root/in`, outputs, store and models beside them; the tiny CLIP and the real ViT-L/14 head."""
    config_path, checkpoint_path = tiny_clip
    return {
        "file_paths": str(root / "in"),
        "output_path": str(root / "out"),
        "cache_path": str(root / "cache"),
        "model_dir": str(root / "models"),
        "clip_model": str(config_path),
        "clip_pretrained": str(checkpoint_path),
        "nsfw_weights": str(laion_dir / "vit_l_14.safetensors"),
        "task_batch_size": 4,
        **overrides,
    }
