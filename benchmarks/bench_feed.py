"""The host pipeline: how fast tars become model-ready tensors, against a DataLoader, and how it scales with cores.

    python benchmarks/bench_feed.py [--images 128] [--cores 1,2] [--batch-size 64] [--repeats 3] [--image-size 512|photo] [--workdir DIR]

Both sides read the same WebDataset shards of photo-like JPEGs, decode every pixel
(decode_mode=exact) and apply open_clip's ViT-L-14 inference transform (224 px, bicubic, centre crop,
OpenAI normalisation); the model is a stand-in that costs nothing, so the figure is the rate at which the
host could feed a GPU. `--image-size` picks the JPEGs: `512`, as img2dataset writes them (512 px, resized
with their aspect ratio kept or padded to a square), or `photo`, camera photos of 1024-2048 px; by default
both, measured one after the other.

ours        `tasks.models.embed.feed_model_batches`, what the embedding stage runs: a reader thread
            streams the tars, a pool of as many worker processes as cores decodes and transforms up to
            the uint8 centre crop (one thread on one core; the embedder normalises the batch on its
            device), batches are stacked in a background thread. Also run with decode_mode=reduced, for that option's speed.
DataLoader  clip-retrieval's design: `torch.utils.data.DataLoader` over a webdataset pipeline
            (`decode("pilrgb")`, the same transform) with num_workers = cores, shards split among workers.

Every measurement runs in a fresh process pinned to the first N CPUs (os.sched_setaffinity), with torch
using N threads; contenders alternate, best of --repeats. Goals: ours >= 1.0x the DataLoader at every core
count and image size, and ours on 2 cores >= 1.7x ours on 1 at 512 px.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZES = ("512", "photo")


def vit_l_14_transform():
    """open_clip's inference transform for ViT-L-14 with the OpenAI weights (PreprocessCfg's defaults at 224 px)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(size=(224, 224)), is_train=False)


def feed_ours(shard_urls: list[str], batch_size: int, workers: int, decode_mode: str = "exact", worker_processes: bool = True) -> int:
    from tasks.io.read import DecodeOptions
    from tasks.models.bounded_transform import BoundedTransform, pixel_step
    from tasks.models.embed import feed_model_batches

    images = 0
    # what embed_shard runs: the workers send uint8 crops, which the embedder normalises on its device
    transform = pixel_step(BoundedTransform(vit_l_14_transform()))
    batches = feed_model_batches(shard_urls, transform, batch_size, DecodeOptions.for_model((224, 224), decode_mode), threads=workers,
                                 worker_processes=worker_processes)
    for batch in batches:  # the stand-in model: takes the batch, costs nothing
        images += 0 if batch.pixels is None else len(batch.pixels)
    return images


def feed_dataloader(shard_urls: list[str], batch_size: int, workers: int) -> int:
    import torch
    import webdataset as wds

    dataset = wds.WebDataset(shard_urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg").map_tuple(vit_l_14_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    images = 0
    for (pixels,) in loader:
        images += len(pixels)
    return images


def _child(which: str, shard_urls: list[str], batch_size: int, cores: int) -> None:
    """In a fresh process pinned to `cores` CPUs: one timed run, printed as JSON."""
    import torch

    torch.set_num_threads(cores)
    import webdataset  # noqa: F401 - imports are not part of the measured time
    import tasks.models.embed  # noqa: F401

    vit_l_14_transform()
    feed = {"ours": feed_ours, "dataloader": feed_dataloader, "ours-reduced": lambda *a: feed_ours(*a, decode_mode="reduced"),
            "ours-threads": lambda *a: feed_ours(*a, worker_processes=False)}[which]
    if which != "dataloader":
        feed(shard_urls[:1], batch_size, cores)  # starts the decoding processes, which a run keeps for all its partitions
    from tasks.io import decode_workers

    # decoding processes are children of the forkserver, not of this process: their CPU time is read while they live
    started, cpu_started = time.perf_counter(), _cpu_seconds() + _workers_cpu_seconds()
    images = feed(shard_urls, batch_size, cores)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() + _workers_cpu_seconds() - cpu_started
    worker_peaks = [_peak_rss_mib(pid) for pid in decode_workers.worker_pids()]
    decode_workers.shutdown_pools()
    print(json.dumps({"images": images, "seconds": seconds, "cpu_seconds": cpu, "peak_mib": _peak_rss_mib(),
                      "worker_peak_mib": max(worker_peaks, default=0.0)}))


def _cpu_seconds() -> float:
    """CPU time of this process's threads and of its ended child processes (a DataLoader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _workers_cpu_seconds() -> float:
    from tasks.io import decode_workers

    return sum(_process_cpu_seconds(pid) for pid in decode_workers.worker_pids())


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak resident memory (this one's by default; a DataLoader's worker processes are not counted)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(which: str, shard_urls: list[str], batch_size: int, cpus: list[int]) -> dict:
    code = (
        "import json, sys; from benchmarks.bench_feed import _child; "
        f"_child({which!r}, json.loads(sys.argv[1]), {batch_size}, {len(cpus)})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(shard_urls)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images per run (default: %(default)s)")
    parser.add_argument("--shard-images", type=int, default=16, help="samples per shard (default: %(default)s)")
    parser.add_argument("--cores", default="1,2", help="core counts to compare (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="model batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender and core count (default: %(default)s)")
    parser.add_argument("--image-size", choices=IMAGE_SIZES, action="append",
                        help="JPEGs of 512 px (img2dataset's) or photos of 1024-2048 px; repeat for both (default: both, one after the other)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsfw-curator-bench-feed")
    args = parser.parse_args(argv)
    for image_size in args.image_size or IMAGE_SIZES:
        measure_image_size(args, image_size)
    return 0


def measure_image_size(args: argparse.Namespace, image_size: str) -> None:
    """Every contender on every core count over shards of one `--image-size`, and the summary tables."""
    from benchmarks._photos import IMG2DATASET_512_SIZES, LARGE_SIZES, write_photo_shards

    available = sorted(os.sched_getaffinity(0))
    core_counts = [int(n) for n in args.cores.split(",") if int(n) <= len(available)]
    sizes, described = (IMG2DATASET_512_SIZES, "img2dataset-style JPEGs of 512 px") if image_size == "512" else (LARGE_SIZES, "photo-like JPEGs of 1024-2048 px")
    shard_urls = write_photo_shards(args.workdir / f"shards-{image_size}", args.images, args.shard_images, sizes)
    print(f"== {args.images} {described} in {len(shard_urls)} shards, exact decode + open_clip ViT-L-14 "
          f"transform, model batch {args.batch_size}, best of {args.repeats}; {len(available)} CPUs here", flush=True)
    measure("ours", shard_urls[:1], args.batch_size, available[:1])  # warm-up: page cache, imports
    best: dict[tuple[str, int], float] = {}
    peak: dict[int, float] = {}
    worker_peak: dict[int, float] = {}
    cpu_ms: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every contender alike
        for cores in core_counts:
            for which in ("ours", "ours-threads", "dataloader", "ours-reduced"):
                result = measure(which, shard_urls, args.batch_size, available[:cores])
                assert result["images"] == args.images, result
                rate = result["images"] / result["seconds"]
                print(f"  {which} on {cores} cores: {rate:.1f} img/s", flush=True)  # so a run cut short still shows what it measured
                best[which, cores] = max(best.get((which, cores), 0.0), rate)
                cpu_ms[which, cores] = min(cpu_ms.get((which, cores), float("inf")), 1000 * result["cpu_seconds"] / result["images"])
                if which == "ours":
                    peak[cores] = max(peak.get(cores, 0.0), result["peak_mib"])
                    worker_peak[cores] = max(worker_peak.get(cores, 0.0), result["worker_peak_mib"])
    print(f"{'cores':>5} {'ours img/s':>11} {'DataLoader img/s':>17} {'ours / DataLoader':>18} {'ours vs 1 core':>15} "
          f"{'CPU ms/img ours':>16} {'CPU ms/img DataLoader':>22} {'ours peak RSS MiB':>18}")
    for cores in core_counts:
        ours, theirs = best["ours", cores], best["dataloader", cores]
        scaling = f"{ours / best['ours', core_counts[0]]:.2f}x" if core_counts[0] == 1 else "-"
        print(f"{cores:>5} {ours:>11.1f} {theirs:>17.1f} {ours / theirs:>17.2f}x {scaling:>15} "
              f"{cpu_ms['ours', cores]:>16.1f} {cpu_ms['dataloader', cores]:>22.1f} {peak[cores]:>18.0f}")
    print("goals: ours / DataLoader >= 1.0 at every core count and image size; ours on 2 cores >= 1.7x ours on 1 at 512 px")
    for cores in core_counts:
        print(f"ours on {cores} cores: peak RSS of each decoding process {worker_peak[cores]:.0f} MiB (beside the {peak[cores]:.0f} MiB of the main one)")
    for cores in core_counts:
        threads = best["ours-threads", cores]
        scaling = f", {threads / best['ours-threads', core_counts[0]]:.2f}x its 1-core rate" if core_counts[0] == 1 else ""
        print(f"decoding in threads instead of processes (the earlier design), {cores} cores: {threads:.1f} img/s{scaling}; "
              f"processes are {best['ours', cores] / threads:.2f}x; CPU {cpu_ms['ours-threads', cores]:.1f} ms/img")
    for cores in core_counts:
        print(f"decode_mode=reduced, {cores} cores: {best['ours-reduced', cores]:.1f} img/s, {best['ours-reduced', cores] / best['ours', cores]:.2f}x "
              f"exact; CPU {cpu_ms['ours-reduced', cores]:.1f} ms/img, {cpu_ms['ours', cores] / cpu_ms['ours-reduced', cores]:.2f}x less than exact")
    print(f"load average while measured: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (other processes take cores from both sides;")
    print("CPU ms per image, best of the runs, is not inflated by them: equal at 1 and N cores means no cost of parallelism)")


if __name__ == "__main__":
    sys.exit(main())
