"""Tiny random-weight open_clip models for tests: a model-config JSON and a checkpoint written to disk.

`make_tiny_clip(tmp_path)` -> (config_path, checkpoint_path); pass `str(config_path)` as `clip_model` and
`str(checkpoint_path)` as `clip_pretrained`. Builds in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}


def tiny_clip_config(
    embed_dim: int = 768,
    image_size: int = 64,
    patch_size: int = 32,
    width: int = 64,
    layers: int = 2,
) -> dict:
    """An open_clip model config (ViT image tower, one-layer text tower)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size},
        "text_cfg": dict(TINY_TEXT_CFG),
    }


def save_clip_checkpoint(config: dict, checkpoint_path: Path, seed: int = 0) -> Path:
    """Build the model with random weights (seeded) and save its state dict (.safetensors, else torch.save)."""
    from open_clip.model import CLIP

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(**config)
    finally:
        torch.random.set_rng_state(generator_state)
    state_dict = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(checkpoint_path))
    else:
        torch.save(state_dict, checkpoint_path)
    return checkpoint_path


def make_tiny_clip(
    directory: str | Path,
    embed_dim: int = 768,
    name: str = "tiny-clip",
    seed: int = 0,
    checkpoint_format: str = "safetensors",
    **config_overrides,
) -> tuple[Path, Path]:
    """Write `{directory}/{name}.json` and `{directory}/{name}-s{seed}.{checkpoint_format}`; embed_dim 768 or 512 fit the LAION heads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(embed_dim=embed_dim, **config_overrides)
    config_path = directory / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    checkpoint_path = save_clip_checkpoint(config, directory / f"{name}-s{seed}.{checkpoint_format}", seed=seed)
    return config_path, checkpoint_path


def open_clip_reference(config_path: Path, checkpoint_path: Path, images: list) -> "np.ndarray":
    """The embeddings open_clip itself gives: its transform, encode_image, L2 normalisation, one image at a time."""
    import open_clip

    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(config_path.stem, pretrained=str(checkpoint_path))
    model.eval()
    with torch.no_grad():
        rows = [model.encode_image(preprocess(image).unsqueeze(0)) for image in images]
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1).numpy()
