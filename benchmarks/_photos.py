"""Synthetic photo-like JPEG shards for the host-pipeline and GPU benchmarks (numpy and Pillow only).

Each image is smooth colour fields (bicubic upscaling of a coarse random grid), a lighting gradient,
mid-frequency texture and sensor-like grain, saved as JPEG at quality 90: the sizes, entropy and decode
cost of camera photos of 1024-2048 px, without any dataset download.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

LARGE_SIZES = [(1024, 768), (1024, 1024), (1280, 960), (1536, 1024), (2048, 1365), (2048, 1536)]
# img2dataset's 512 px output: padded to a square (resize_mode=border) or the shorter side at 512 (keep_ratio).
IMG2DATASET_512_SIZES = [(512, 512), (683, 512), (512, 683), (512, 512), (768, 512), (512, 640)]
_DISTINCT_IMAGES = 24  # encoded once, reused under new keys: the reader cannot tell, and setup stays quick


def _field(rng: np.random.Generator, width: int, height: int, cells: int, amplitude: float) -> np.ndarray:
    coarse = rng.uniform(-amplitude, amplitude, (max(2, cells * height // width), cells, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with the structure of a photo: large shapes, shading, texture and grain."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(60, 190, 3).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 40 * (xs / width - 0.5)[..., None] + 30 * (ys / height - 0.5)[..., None]
    pixels = base + light + _field(rng, width, height, 8, 70) + _field(rng, width, height, 64, 25)
    pixels += rng.normal(0, 4, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_photo_shards(directory: Path, images: int, per_shard: int, sizes: list[tuple[int, int]] = LARGE_SIZES) -> list[str]:
    """WebDataset shards `directory/part-NNNNNN.tar` holding `images` samples (.jpg, .txt, .json); reused when present."""
    directory.mkdir(parents=True, exist_ok=True)
    layout = directory / "layout.json"
    wanted = {"images": images, "per_shard": per_shard, "sizes": [list(size) for size in sizes], "distinct": _DISTINCT_IMAGES}
    shard_count = -(-images // per_shard)
    urls = [str(directory / f"part-{index:06d}.tar") for index in range(shard_count)]
    if layout.exists() and json.loads(layout.read_text()) == wanted:
        return urls
    pool = [jpeg_bytes(photo_like(*sizes[i % len(sizes)], seed=i)) for i in range(min(images, _DISTINCT_IMAGES))]
    for index, url in enumerate(urls):
        with tarfile.open(url, "w") as tar:
            for sample in range(index * per_shard, min(images, (index + 1) * per_shard)):
                key = f"{sample:09d}"
                _add(tar, f"{key}.jpg", pool[sample % len(pool)])
                _add(tar, f"{key}.txt", f"photo {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    layout.write_text(json.dumps(wanted))
    return urls
