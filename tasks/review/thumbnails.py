"""Thumbnails of the chosen samples, fetched by streaming only the input shards that hold them."""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Sequence

from PIL import Image, ImageFilter

from tasks.errors import UserError
from tasks.io.atomic import write_bytes_for_browser
from tasks.io.locations import Location
from tasks.io.read import DecodeOptions, decode_sample, iter_samples
from tasks.io.write import join_url
from tasks.review.records import ReviewSample

THUMBS_DIR = "thumbs"
THUMBNAIL_SIDE = 192
# A Gaussian radius of 12% of the thumbnail's longer side leaves colour blobs, nothing recognisable.
BLUR_RADIUS_FRACTION = 0.12
THUMBNAIL_JPEG_QUALITY = 85
_SHARD_READERS = 4  # shards streamed at once when fetching images (object-store latency, not CPU)


def make_thumbnail(image: Image.Image, blurred: bool) -> Image.Image:
    """At most THUMBNAIL_SIDE px on its longer side; Gaussian-blurred beyond recognition when `blurred`."""
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    if blurred:
        thumbnail = thumbnail.filter(ImageFilter.GaussianBlur(radius=BLUR_RADIUS_FRACTION * max(thumbnail.size)))
    return thumbnail


def thumbnail_name(index: int, sample: ReviewSample) -> str:
    # Keys and shard names are untrusted: the file name is derived from them, never made of them.
    digest = hashlib.sha256(f"{sample.shard}\x00{sample.key}".encode()).hexdigest()[:12]
    return posixpath.join(THUMBS_DIR, f"{index:04d}-{digest}{'-blurred' if sample.blurred else ''}.jpg")


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return buffer.getvalue()


def fetch_thumbnails(samples: Sequence[tuple[int, ReviewSample]], review: Location) -> None:
    """Stream each shard holding chosen samples until all of them are found; write their thumbnails (in place)
    under `review`. Shards are reached with the review location's storage options (the run's)."""
    review_url = review.url
    by_shard: dict[str, dict[str, tuple[int, ReviewSample]]] = defaultdict(dict)
    for index, sample in samples:
        by_shard[sample.shard][sample.key] = (index, sample)
    decode = DecodeOptions(reduced_jpeg_size=THUMBNAIL_SIDE)

    def fetch_shard(shard_url: str) -> None:
        wanted = dict(by_shard[shard_url])
        try:
            with closing(iter_samples(review.at(shard_url), decode=None)) as raw_samples:
                for raw in raw_samples:
                    if raw.key not in wanted or raw.error is not None:
                        continue
                    index, sample = wanted.pop(raw.key)
                    decoded = decode_sample(raw, decode)
                    if decoded.error is not None or decoded.image is None:
                        sample.problem = f"image could not be decoded: {decoded.error}"
                    else:
                        sample.caption = decoded.caption
                        name = thumbnail_name(index, sample)
                        write_bytes_for_browser(review.at(join_url(review_url, name)), _jpeg_bytes(make_thumbnail(decoded.image, sample.blurred)), "image/jpeg")
                        sample.thumbnail = name
                    if not wanted:
                        break  # the rest of the shard holds nothing to show
        except UserError as exc:
            for _, sample in wanted.values():
                sample.problem = f"shard could not be read: {exc}"
            return
        for _, sample in wanted.values():
            sample.problem = "sample not found in its shard; the shard changed after the run"

    with ThreadPoolExecutor(max_workers=max(1, min(_SHARD_READERS, len(by_shard)))) as pool:
        list(pool.map(fetch_shard, sorted(by_shard)))


def remove_stale_thumbnails(review: Location, keep: Sequence[str]) -> list[str]:
    """Delete thumbnails under `review` that the current sheet does not show."""
    fs, root = review.filesystem()
    fs.invalidate_cache()
    keep_paths = {posixpath.join(root.rstrip("/"), name) for name in keep}
    stale = [path for path in fs.glob(posixpath.join(root.rstrip("/"), THUMBS_DIR, "*.jpg")) if path not in keep_paths]
    for path in stale:
        fs.rm(path)
    return stale
