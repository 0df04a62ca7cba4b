"""Host CPU per image of decode_mode="gpu": what the CPU still does when the device decodes the JPEGs.

    python benchmarks/bench_device_host.py [--images 200] [--repeats 3] [--image-size 512|photo] [--workdir DIR]

The gpu mode's host side (tasks/models/device_feed.py `host_batches`: the tar streamed, every header checked as
the CPU path checks it, caption and metadata parsed, MD5 and SHA-1 of the bytes, JPEG bytes batched) runs with a
null consumer in place of the device, on the same shards as two baselines measured in the same run:

floor       the tar streamed into samples alone (tasks/io/read.py `iter_batches(decode=None)`);
exact       the CPU path's whole work per image: decode and open_clip's ViT-L-14 transform to the uint8 crop
            (`feed_model_batches`, decode_mode=exact, in threads so this process's CPU time holds it all).

Shards: img2dataset-style JPEGs of 512 px (`512`) and photos of 1024-2048 px (`photo`). CPU time is the process's
(every thread), best of --repeats. Goal: the gpu mode's host side <= 1 ms per image on both, so 16 cores feed
over 10,000 images/s.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._photos import IMG2DATASET_512_SIZES, LARGE_SIZES, write_photo_shards

IMAGE_SIZES = {"512": IMG2DATASET_512_SIZES, "photo": LARGE_SIZES}
VIT_L_14 = {"size": [224, 224], "interpolation": "bicubic", "resize_mode": "shortest"}


def _timed(run) -> tuple[int, float]:
    """(images, CPU seconds of this process) of one call."""
    started = time.process_time()
    images = run()
    return images, time.process_time() - started


def floor(shard_urls: list[str]) -> int:
    from tasks.io.read import iter_batches

    return sum(len(batch) for batch in iter_batches(shard_urls, 100, decode=None))


def gpu_mode_host(shard_urls: list[str], batch_size: int = 256) -> int:
    from tasks.io.decode import DecodeOptions
    from tasks.io.decode_dispatch import BatchDecoder
    from tasks.models.bounded_transform import BoundedTransform, pixel_step
    from tasks.models.device_feed import DeviceFeedCounts, host_batches
    from tasks.models.device_transform import DeviceTransform
    from open_clip.transform import PreprocessCfg, image_transform_v2

    options = DecodeOptions.for_model((224, 224), "exact")
    decoder = BatchDecoder(options, pixel_step(BoundedTransform(image_transform_v2(PreprocessCfg(size=(224, 224)), is_train=False))), 1, False)
    counts = DeviceFeedCounts()
    images = 0
    try:
        for rows in host_batches(shard_urls, DeviceTransform.of(VIT_L_14).fits, batch_size, options, decoder, counts):
            images += sum(row.jpeg is not None for row in rows)  # the null consumer: the device would take these bytes
    finally:
        decoder.close()
    assert not counts.fallbacks, counts.fallbacks
    return images


def exact_cpu(shard_urls: list[str], batch_size: int = 32) -> int:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from tasks.io.decode import DecodeOptions
    from tasks.models.bounded_transform import BoundedTransform, pixel_step
    from tasks.models.embed import feed_model_batches

    transform = pixel_step(BoundedTransform(image_transform_v2(PreprocessCfg(size=(224, 224)), is_train=False)))
    batches = feed_model_batches(shard_urls, transform, batch_size, DecodeOptions.for_model((224, 224), "exact"), threads=1, worker_processes=False)
    return sum(0 if batch.pixels is None else len(batch.pixels) for batch in batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images per shard kind (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default: %(default)s)")
    parser.add_argument("--image-size", choices=tuple(IMAGE_SIZES), action="append", help="shard kind; repeat for both (default: both)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsfw-curator-bench-device-host")
    args = parser.parse_args(argv)

    import tasks.models.embed  # noqa: F401 - imports are not part of the measured time

    for kind in args.image_size or tuple(IMAGE_SIZES):
        shard_urls = write_photo_shards(args.workdir / kind, args.images, 50, IMAGE_SIZES[kind])
        mean_bytes = sum(Path(url).stat().st_size for url in shard_urls) / args.images
        print(f"== {args.images} JPEGs ({kind}: {IMAGE_SIZES[kind][0]} ...), about {mean_bytes / 1024:.0f} KiB per sample; "
              f"CPU ms per image, best of {args.repeats}", flush=True)
        best: dict[str, float] = {}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits every contender alike
            for name, run in (("floor", floor), ("gpu-host", gpu_mode_host), ("exact", exact_cpu)):
                images, seconds = _timed(lambda: run(shard_urls))
                assert images == args.images, (name, images)
                per_image = 1000 * seconds / images
                best[name] = min(best.get(name, float("inf")), per_image)
                print(f"  {name}: {per_image:.3f} ms/img", flush=True)
        data = [Path(url).read_bytes() for url in shard_urls]
        started = time.process_time()
        for blob in data:  # MD5 and SHA-1 of as many bytes as the images hold (part of the gpu-host figure)
            hashlib.md5(blob, usedforsecurity=False).digest(), hashlib.sha1(blob, usedforsecurity=False).digest()
        hashing = 1000 * (time.process_time() - started) / args.images
        print(f"{kind}: gpu mode host side {best['gpu-host']:.3f} ms/img ({best['gpu-host'] / best['exact']:.3f}x the exact CPU path's "
              f"{best['exact']:.2f} ms/img; tar streaming alone {best['floor']:.3f}; MD5 + SHA-1 about {hashing:.3f}); "
              f"16 cores could feed {16_000 / best['gpu-host']:,.0f} images/s. Goal <= 1 ms.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
