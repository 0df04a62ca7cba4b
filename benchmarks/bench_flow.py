"""The nsfw-filter flow's overhead and memory.

    python benchmarks/bench_flow.py [--shards 50] [--per-shard 8] [--memory-shards 2 20]

1. Wall time of the flow (threads runner, a real Prefect API) against calling the same plain functions
   in a loop on the same data (goal: at most 1.3x on 50 small shards). Both start cold: empty store,
   empty outputs. The API server is started before timing (a long-running server in production).
   Measured with a random-weight ViT-B-32-sized CLIP and the real LAION ViT-B/32 head (the smallest real
   configuration), and with a tiny 2-layer CLIP, where the work per shard is almost nothing and the
   difference is Prefect's fixed cost per task run (printed per task).
2. Peak RSS of a whole `nsfw-curator filter` process for 2 and for 20 shards (goal: at most 1.25x),
   with the tiny CLIP and the real LAION ViT-L/14 head.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, SHARED_DIR

HEADS = {768: SHARED_DIR / "models" / "laion_nsfw" / "vit_l_14.safetensors", 512: SHARED_DIR / "models" / "laion_nsfw" / "vit_b_32.safetensors"}
HEAD = HEADS[768]


def build_inputs(root: Path, shards: int, per_shard: int) -> Path:
    from tests.support.tars import shard_of_good_samples, write_tar

    input_dir = root / f"in-{shards}"
    for s in range(shards):
        write_tar(input_dir / f"part-{s:06d}.tar", shard_of_good_samples([f"{s:04d}/{j:04d}" for j in range(per_shard)], size=(160, 120)))
    return input_dir


def plain_loop(input_dir: Path, root: Path, config_path: Path, checkpoint_path: Path, head: Path = HEAD) -> None:
    from flows.nsfw_filter import preflight
    from tasks.models.embed import embed_partition
    from tasks.filter.stage import filter_partition
    from tasks.io.write import RunSummary

    run = preflight({"file_paths": str(input_dir), "output_path": str(root / "out-loop"), "clip_model": str(config_path),
                     "clip_pretrained": str(checkpoint_path), "nsfw_weights": str(head), "cache_path": str(root / "cache-loop"), "images_per_tar": 100})
    embed, scoring = run.embed, run.filter
    results = []
    for partition in run.partitions:
        entry_urls = embed_partition(partition.shard_urls, embed)
        results.append(filter_partition(partition, scoring, entry_urls))
    RunSummary.from_partitions(results, scoring.score_threshold, run.models(), run.output_path).write(run.output)


def flow_run(input_dir: Path, root: Path, config_path: Path, checkpoint_path: Path, head: Path = HEAD) -> None:
    from flows.nsfw_filter import nsfw_filter

    nsfw_filter(file_paths=str(input_dir), output_path=str(root / "out-flow"), clip_model=str(config_path), clip_pretrained=str(checkpoint_path),
                nsfw_weights=str(head), cache_path=str(root / "cache-flow"), images_per_tar=100)


def compare(label: str, input_dir: Path, root: Path, config_path: Path, checkpoint_path: Path, head: Path, shards: int, repeats: int) -> None:
    plain_loop(input_dir, root, config_path, checkpoint_path, head)  # warm-up: imports, model build, page cache
    flow_run(input_dir, root, config_path, checkpoint_path, head)
    loop_times, flow_times = [], []
    for _ in range(repeats):
        for name in ("out-loop", "cache-loop", "out-flow", "cache-flow"):
            shutil.rmtree(root / name, ignore_errors=True)
        start = time.perf_counter()
        plain_loop(input_dir, root, config_path, checkpoint_path, head)
        loop_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        flow_run(input_dir, root, config_path, checkpoint_path, head)
        flow_times.append(time.perf_counter() - start)
    loop, flow = min(loop_times), min(flow_times)
    per_task_ms = 1000 * (flow - loop) / (2 * shards)
    print(f"  {label}: plain loop {loop:.2f} s, flow {flow:.2f} s, flow/loop {flow / loop:.2f}x "
          f"(goal <= 1.3x); {per_task_ms:+.0f} ms per task run")


def peak_rss_mb(input_dir: Path, root: Path, config_path: Path, checkpoint_path: Path, api_url: str) -> float:
    out = root / f"out-mem-{input_dir.name}"
    command = [sys.executable, "-m", "flows.cli", "filter", "--file-paths", str(input_dir), "--output-path", str(out), "--clip-model", str(config_path),
               "--clip-pretrained", str(checkpoint_path), "--nsfw-weights", str(HEAD), "--cache-path", str(root / f"cache-mem-{input_dir.name}")]
    script = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                          env={**os.environ, "PREFECT_API_URL": api_url})
    return int(done.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--memory-shards", type=int, nargs=2, default=[2, 20])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=["vit-b-32", "tiny"], default=["vit-b-32", "tiny"])
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.tiny_clip import make_tiny_clip

    root = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    try:
        config_path, checkpoint_path = make_tiny_clip(root / "clip", embed_dim=768)
        input_dir = build_inputs(root, args.shards, args.per_shard)
        with prefect_test_harness(server_startup_timeout=120):
            from prefect.settings import PREFECT_API_URL

            api_url = PREFECT_API_URL.value()
            print(f"wall time, {args.shards} shards x {args.per_shard} images, cold store (best of {args.repeats}):")
            if "vit-b-32" in args.models:
                b32 = make_tiny_clip(root / "clip", embed_dim=512, name="vit-b-32-sized", image_size=224, layers=12, width=768, patch_size=32)
                compare("ViT-B-32-sized CLIP", input_dir, root, *b32, HEADS[512], args.shards, args.repeats)
            if "tiny" in args.models:
                compare("tiny CLIP", input_dir, root, config_path, checkpoint_path, HEADS[768], args.shards, args.repeats)
            small, large = (build_inputs(root, n, args.per_shard) for n in args.memory_shards)
            rss_small = peak_rss_mb(small, root, config_path, checkpoint_path, api_url)
            rss_large = peak_rss_mb(large, root, config_path, checkpoint_path, api_url)
            print(f"peak RSS of `nsfw-curator filter`: {args.memory_shards[0]} shards {rss_small:.0f} MB, "
                  f"{args.memory_shards[1]} shards {rss_large:.0f} MB, ratio {rss_large / rss_small:.2f}x (goal <= 1.25x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
