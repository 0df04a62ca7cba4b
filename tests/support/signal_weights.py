"""Signal weight files in their published formats, with random values, converted the product's way.

`published_aesthetic(path)` writes christophschuhmann/improved-aesthetic-predictor's state dict (`layers.0/2/4/6/7`,
768->1024->128->64->16->1) with torch.save; `published_q16(path)` a float16 numpy array pickled as Q16's
`save_prompts` does; `published_violence(path)` clip-retrieval's `.npy`. `converted_signals(folder)` converts all
three with `nsfw-curator models convert` (the function) and writes a LAION-style concepts YAML.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

AESTHETIC_SHAPES = [(1024, None), (128, 1024), (64, 128), (16, 64), (1, 16)]

CONCEPTS_YAML = """\
nsfw:
  concepts:
    sexual: 0.2
    nude: 0.20
    naked: 0.195
  action: obfuscate
special:
  concepts:
    little girl: 0.21
    young child: 0.21
    toddler: 0.21
"""


def published_aesthetic(path: Path, dim: int = 768, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for index, (rows, columns) in zip((0, 2, 4, 6, 7), AESTHETIC_SHAPES):
        columns = columns or dim
        state[f"layers.{index}.weight"] = torch.randn(rows, columns, generator=generator) / columns**0.5
        state[f"layers.{index}.bias"] = torch.randn(rows, generator=generator) * 0.1
    state["layers.7.bias"] = torch.tensor([5.0])  # scores about 5, as the published head's
    torch.save(state, path)
    return path


def published_q16(path: Path, dim: int = 768, seed: int = 1) -> Path:
    prompts = np.random.default_rng(seed).standard_normal((2, dim)).astype(np.float16)
    with open(path, "wb") as handle:
        pickle.dump(prompts, handle, protocol=3)
    return path


def published_violence(path: Path, dim: int = 768, seed: int = 2) -> Path:
    prompts = np.random.default_rng(seed).standard_normal((2, dim)).astype(np.float32)
    np.save(path, prompts / np.linalg.norm(prompts, axis=1, keepdims=True))
    return path


def converted_signals(folder: Path, dim: int = 768) -> dict[str, Path]:
    """{aesthetic, q16, violence}: converted safetensors files; {concepts}: a concepts YAML."""
    from tasks.signals.convert import convert_signal_weights

    folder.mkdir(parents=True, exist_ok=True)
    sources = {
        "aesthetic": published_aesthetic(folder / "sac+logos+ava1-l14-linearMSE.pth", dim),
        "q16": published_q16(folder / "prompts.p", dim),
        "violence": published_violence(folder / "violence_detection_vit_l_14.npy", dim),
    }
    converted = {}
    for name, source in sources.items():
        converted[name] = folder / f"{name}.safetensors"
        convert_signal_weights(source, converted[name])
    converted["concepts"] = folder / "safety_settings.yml"
    converted["concepts"].write_text(CONCEPTS_YAML)
    return converted


def signal_specs(files: dict[str, Path]) -> list[dict[str, str]]:
    """The `signals` parameter for every converted file."""
    kinds = {"aesthetic": "aesthetic", "q16": "prompts", "violence": "prompts", "concepts": "concepts"}
    return [{"name": name, "kind": kinds[name], "weights": str(path)} for name, path in files.items()]
