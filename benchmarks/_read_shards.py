"""Benchmark shards for the reader: real photos (scikit-image mosaics) as JPEG samples with caption and metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import _common  # noqa: F401 - puts the repository on sys.path
from tests.support.tars import Member, encode, large_photo, write_tar


def photo_crops(count: int, sizes: list[tuple[int, int]], seed: int = 0):
    """`count` RGB photo crops cycling through `sizes`, cut at random places from photo mosaics."""
    rng = np.random.default_rng(seed)
    mosaics = [large_photo(2600, 2200, seed=s) for s in range(3)]
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        mosaic = mosaics[index % len(mosaics)]
        x = int(rng.integers(0, mosaic.width - width + 1))
        y = int(rng.integers(0, mosaic.height - height + 1))
        crop = mosaic.crop((x, y, x + width, y + height))
        yield crop if index % 2 == 0 else crop.transpose(0)  # mirror every other crop for variety


def write_shards(
    directory: Path, shard_count: int, samples_per_shard: int, sizes: list[tuple[int, int]], quality: int = 90
) -> list[str]:
    """Shards `directory/part-000000.tar`...; reuses those already written with the same layout."""
    directory.mkdir(parents=True, exist_ok=True)
    layout = directory / "layout.json"
    wanted = {"shards": shard_count, "samples": samples_per_shard, "sizes": sizes, "quality": quality}
    urls = [str(directory / f"part-{index:06d}.tar") for index in range(shard_count)]
    if layout.exists() and json.loads(layout.read_text()) == json.loads(json.dumps(wanted)):
        return urls
    # Encode a pool of images once and reuse it across shards: the reader cannot tell, and setup stays quick.
    pool = [encode(image, "JPEG", quality=quality) for image in photo_crops(min(samples_per_shard, 64), sizes)]
    for index, url in enumerate(urls):
        members = []
        for sample in range(samples_per_shard):
            key = f"{index:06d}{sample:06d}"
            members += [
                Member(f"{key}.jpg", pool[(index * 7 + sample) % len(pool)]),
                Member(f"{key}.txt", f"photo {key}".encode()),
                Member(f"{key}.json", json.dumps({"key": key, "shard": index}).encode()),
            ]
        write_tar(url, members)
    layout.write_text(json.dumps(wanted))
    return urls
