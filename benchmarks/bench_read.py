"""WebDataset reading: decode throughput, reduced-size JPEG decoding, and peak memory against shard count.

    python benchmarks/bench_read.py [throughput|reduced|memory|all] [--threads N] [--workdir DIR]

throughput  iter_batches against a bare `tarfile` + Pillow loop (same shards, same decode threads),
            full decode on both sides; goal >= 0.9. Wall time and process CPU time (the latter is
            not inflated by other processes on a shared machine).
reduced     JPEGs of 1024-2048 px: decode at reduced size (libjpeg DCT scaling via Pillow's draft)
            against full decode, one thread, CPU time; goal >= 2x. Also decode + open_clip's ViT
            transform (what each image costs before the model), and how far the model inputs move:
            pixel differences after the transform and the cosine of a small random-weight ViT's
            embeddings (random weights only approximate ViT-L/14).
memory      peak RSS of a fresh process reading 2 and 20 shards through iter_batches; goal <= 1.25x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
from _read_shards import write_shards
from PIL import Image

from tasks.io.read import REDUCED_JPEG_SIZE, DecodeOptions, iter_batches, iter_samples

THROUGHPUT_SIZES = [(640, 480), (512, 512), (800, 533), (480, 640), (1024, 683)]
LARGE_SIZES = [(1024, 768), (1024, 1024), (1280, 960), (1536, 1024), (2048, 1365), (2048, 1536)]
BATCH = 100


def best_of(fn, repeats: int = 3, clock=time.perf_counter) -> float:
    """Best time of `repeats` calls after a warm-up; `clock=time.process_time` counts CPU time only,
    which other processes on a shared machine do not inflate (use it for single-threaded work)."""
    fn()  # warm-up: page cache, imports, thread start-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def bare_tarfile_pillow(shard_urls: list[str], threads: int) -> int:
    """The baseline: stream each tar with tarfile and decode every .jpg with Pillow in a thread pool."""

    def decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    count = 0
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for shard_url in shard_urls:
            with open(shard_url, "rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as tar:
                for info in tar:
                    data = tar.extractfile(info).read()
                    if info.name.endswith(".jpg"):
                        pending.append(pool.submit(decode, data))
                    if len(pending) == BATCH:
                        count += sum(1 for future in pending if future.result() is not None)
                        pending = []
        count += sum(1 for future in pending if future.result() is not None)
    return count


def ours(shard_urls: list[str], threads: int, decode: DecodeOptions) -> int:
    count = 0
    for batch in iter_batches(shard_urls, task_batch_size=BATCH, decode=decode, threads=threads):
        count += sum(1 for sample in batch if sample.image is not None)
    return count


def throughput(workdir: Path, threads: int, repeats: int = 3) -> None:
    shard_urls = write_shards(workdir / "throughput", shard_count=6, samples_per_shard=100, sizes=THROUGHPUT_SIZES)
    contenders = {
        "bare tarfile + Pillow loop": lambda: bare_tarfile_pillow(shard_urls, threads),
        "iter_batches, full decode": lambda: ours(shard_urls, threads, DecodeOptions(reduced_jpeg_size=None)),
        "iter_batches, reduced decode": lambda: ours(shard_urls, threads, DecodeOptions(reduced_jpeg_size=REDUCED_JPEG_SIZE)),
    }
    counts = {name: run() for name, run in contenders.items()}  # warm-up, and all decode every image
    images = counts["bare tarfile + Pillow loop"]
    assert set(counts.values()) == {images}, counts
    wall = dict.fromkeys(contenders, float("inf"))
    cpu = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):  # interleaved, so load from other processes hits every contender alike
        for name, run in contenders.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            run()
            wall[name] = min(wall[name], time.perf_counter() - wall_start)
            cpu[name] = min(cpu[name], time.process_time() - cpu_start)
    base = "bare tarfile + Pillow loop"
    print(f"== throughput: {images} photo JPEGs of 480-1024 px in {len(shard_urls)} shards, threads={threads}, batches of {BATCH}")
    print(f"{'':>30} {'img/s (wall)':>13} {'ratio':>6} {'CPU ms/img':>11} {'CPU ratio':>10}")
    for name in contenders:
        print(f"{name:>30} {images / wall[name]:>13.1f} {wall[base] / wall[name]:>6.2f} "
              f"{1000 * cpu[name] / images:>11.2f} {cpu[base] / cpu[name]:>10.2f}")
    print("goal: full-decode ratio >= 0.9 (ratios are baseline time / our time; CPU time is immune to other load)")


def _tiny_vit():
    """A random-weight open_clip ViT with ViT-L/14's patch size and preprocessing (224 px, bicubic, centre crop)."""
    import open_clip
    import torch

    config = {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "patch_size": 14, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1},
    }
    config_dir = Path(tempfile.mkdtemp(prefix="tiny-vit-"))
    (config_dir / "bench-tiny-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("bench-tiny-vit", pretrained=None)
    return model.eval(), preprocess


def reduced(workdir: Path) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)  # CPU time then measures the work itself, not idle spinning of torch's threads
    shard_urls = write_shards(workdir / "large", shard_count=1, samples_per_shard=36, sizes=LARGE_SIZES)
    model, preprocess = _tiny_vit()
    std = torch.tensor(preprocess.transforms[-1].std).view(1, 3, 1, 1)

    def decode_only(options: DecodeOptions) -> list:
        return [sample.image for sample in iter_samples(shard_urls[0], options)]

    def decode_and_transform(options: DecodeOptions) -> torch.Tensor:
        # What every image costs before the model: decoding plus open_clip's resize/crop/normalise.
        return torch.stack([preprocess(image) for image in decode_only(options)])

    full = DecodeOptions(reduced_jpeg_size=None)
    images_full = decode_only(full)
    assert all(image is not None for image in images_full)
    count = len(images_full)
    t_decode_full = best_of(lambda: decode_only(full), repeats=4, clock=time.process_time)
    t_both_full = best_of(lambda: decode_and_transform(full), repeats=2, clock=time.process_time)
    print(f"== reduced-size JPEG decode: {count} photo JPEGs (q90) of {', '.join(f'{w}x{h}' for w, h in LARGE_SIZES)};")
    print("   one thread, CPU time, against full decode; then the decoded images after open_clip's ViT transform")
    print(f"full decode: {count / t_decode_full:.1f} img/s; full decode + transform: {count / t_both_full:.1f} img/s")
    print(f"{'decode':>32} {'decode x':>9} {'+transform x':>13} {'short side':>11} {'|pixel diff| mean/p99':>22}   cosine mean/min")

    with torch.inference_mode():
        inputs_full = decode_and_transform(full)
        embeddings_full = torch.nn.functional.normalize(model.encode_image(inputs_full), dim=-1)

        def row(label: str, decode_speedup: str, both_speedup: str, sides: str, inputs: torch.Tensor) -> None:
            diff = ((inputs - inputs_full) * std * 255.0).abs()  # back to 0-255 pixel units
            embeddings = torch.nn.functional.normalize(model.encode_image(inputs), dim=-1)
            cosine = (embeddings * embeddings_full).sum(-1)
            print(f"{label:>32} {decode_speedup:>9} {both_speedup:>13} {sides:>11} "
                  f"{diff.mean():>14.2f} / {np.percentile(diff.numpy(), 99):4.1f}   {cosine.mean():.6f} / {cosine.min():.6f}")

        for size in (224, 256, 336, 448):
            options = DecodeOptions(reduced_jpeg_size=size)
            t_decode = best_of(lambda: decode_only(options), repeats=4, clock=time.process_time)
            t_both = best_of(lambda: decode_and_transform(options), repeats=2, clock=time.process_time)
            short_sides = [min(image.size) for image in decode_only(options)]
            label = f"reduced_jpeg_size={size}" + (" (decode_mode=reduced)" if size == REDUCED_JPEG_SIZE else "")
            row(label, f"{t_decode_full / t_decode:.2f}x", f"{t_both_full / t_both:.2f}x",
                f"{min(short_sides)}-{max(short_sides)}", decode_and_transform(options))
        # Scale for the numbers above: the same photos saved once more as JPEG at quality 95, decoded in full.
        resaved = [Image.open(io.BytesIO(_jpeg(image, 95))).convert("RGB") for image in images_full]
        row("reference: re-saved at q95", "-", "-", "-", torch.stack([preprocess(image) for image in resaved]))
        between = embeddings_full @ embeddings_full.T
        between = between[~torch.eye(count, dtype=torch.bool)]
        print(f"{'reference: two different photos':>32} {'-':>9} {'-':>13} {'-':>11} {'-':>22}   {between.mean():.6f} / {between.min():.6f}")
    print("goal: decode speed-up >= 2x. Pixel differences are in 0-255 units after open_clip's 224 px bicubic")
    print("resize + centre crop; cosines come from a random-weight ViT with ViT-L/14's patch size and transform,")
    print("which only approximates ViT-L/14.")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


MEMORY_BATCH = 16


def _peak_child(shard_urls: list[str], threads: int) -> None:
    """Runs in a fresh process: read the shards as the flow does, print samples read and peak RSS."""
    samples = 0
    decode = DecodeOptions(reduced_jpeg_size=None)  # full-size images: the most memory per batch
    for batch in iter_batches(shard_urls, task_batch_size=MEMORY_BATCH, threads=threads, decode=decode):
        samples += len(batch)
        time.sleep(0.05)  # the model's turn, slower than decoding as in real runs: the prefetch queue stays full
    print(json.dumps({"samples": samples, "peak_mib": _peak_rss_kib() / 1024}))


def _peak_rss_kib() -> int:
    # VmHWM belongs to this program's memory map; ru_maxrss would carry over the parent's peak through fork/exec.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory(workdir: Path, threads: int, runs: int = 3) -> None:
    shard_urls = write_shards(workdir / "memory", shard_count=20, samples_per_shard=96, sizes=THROUGHPUT_SIZES)
    peaks: dict[int, list[float]] = {2: [], 20: []}
    samples: dict[int, int] = {}
    for _ in range(runs):  # glibc's heap makes one process's peak vary by +-20%; compare the worst of a few
        for count in peaks:
            command = [sys.executable, __file__, "_peak", "--threads", str(threads), "--shards", *shard_urls[:count]]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            peaks[count].append(result["peak_mib"])
            samples[count] = result["samples"]
    print("== peak memory of a fresh process reading shards of 96 photo JPEGs of 480-1024 px, full decode")
    print(f"   (task_batch_size={MEMORY_BATCH}, prefetch=2, threads={threads}, the caller spends 0.05 s per batch; {runs} runs each)")
    for count, values in peaks.items():
        runs_text = ", ".join(f"{value:.0f}" for value in values)
        print(f"{count:>3} shards  {samples[count]:>5} samples  peak RSS of each run {runs_text} MiB; worst {max(values):.0f} MiB")
    print(f"ratio of worst peaks, 20/2 shards: {max(peaks[20]) / max(peaks[2]):.3f} (goal <= 1.25)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("claim", nargs="?", default="all", choices=["throughput", "reduced", "memory", "all", "_peak"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsfw-curator-bench-read")
    parser.add_argument("--shards", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.claim == "_peak":
        _peak_child(args.shards, args.threads)
        return
    if args.claim in ("throughput", "all"):
        throughput(args.workdir, args.threads)
    if args.claim in ("reduced", "all"):
        reduced(args.workdir)
    if args.claim in ("memory", "all"):
        memory(args.workdir, args.threads)


if __name__ == "__main__":
    main()
