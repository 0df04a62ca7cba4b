"""The nsfw-filter flow's cost per partition as the number of partitions grows.

    python benchmarks/bench_scale.py [--partitions 20 200 2000] [--per-shard 2]

One-shard partitions of `--per-shard` small images each, a tiny 2-layer CLIP and the real LAION ViT-L/14
head, so nearly all the work is orchestration. Each size runs in a fresh process (the flow called
directly, threads runner, a real Prefect API started once beforehand, cold store and outputs). Printed per
size: wall time, CPU of the flow's process (user+sys, its children included) and its peak RSS; then the
marginal CPU per partition between consecutive sizes and the ratio of the last step's marginal to the
first's (1.0 when each partition costs the same however many there are; the goal is at most 1.25x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, SHARED_DIR

HEAD = SHARED_DIR / "models" / "laion_nsfw" / "vit_l_14.safetensors"

# Runs the flow once in this (fresh) process and prints the process's own CPU and peak RSS, children included.
RUN_ONCE = """
import json, resource, sys
from flows.nsfw_filter import nsfw_filter
result = nsfw_filter(**json.loads(sys.argv[1]))
own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"samples": result["samples"], "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
                  "peak_rss_mb": max(own.ru_maxrss, children.ru_maxrss) / 1024}))
"""


def build_inputs(root: Path, partitions: int, per_shard: int) -> Path:
    from tests.support.tars import shard_of_good_samples, tar_bytes

    input_dir = root / f"in-{partitions}"
    input_dir.mkdir(parents=True)
    for s in range(partitions):
        data = tar_bytes(shard_of_good_samples([f"{s:06d}/{j:02d}" for j in range(per_shard)], size=(64, 48)))
        (input_dir / f"part-{s:06d}.tar").write_bytes(data)
    return input_dir


def run_once(root: Path, input_dir: Path, config_path: Path, checkpoint_path: Path, api_url: str) -> dict:
    parameters = {
        "file_paths": str(input_dir),
        "output_path": str(root / f"out-{input_dir.name}"),
        "cache_path": str(root / f"cache-{input_dir.name}"),
        "clip_model": str(config_path),
        "clip_pretrained": str(checkpoint_path),
        "nsfw_weights": str(HEAD),
    }
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN_ONCE, json.dumps(parameters)], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "WARNING"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the flow failed on {input_dir.name}:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), wall_s=wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--per-shard", type=int, default=2)
    args = parser.parse_args()
    sizes = sorted(args.partitions)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.tiny_clip import make_tiny_clip

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        config_path, checkpoint_path = make_tiny_clip(root / "clip", embed_dim=768)
        with prefect_test_harness(server_startup_timeout=120):
            from prefect.settings import PREFECT_API_URL

            api_url = PREFECT_API_URL.value()
            print(f"one-shard partitions of {args.per_shard} images, tiny CLIP, threads runner, cold store; one fresh process each")
            print(f"{'partitions':>10} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'samples':>8}")
            measured = []
            for n in sizes:
                input_dir = build_inputs(root, n, args.per_shard)
                row = run_once(root, input_dir, config_path, checkpoint_path, api_url)
                measured.append((n, row))
                print(f"{n:>10} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f} {row['peak_rss_mb']:>12.0f} {row['samples']:>8}", flush=True)
                shutil.rmtree(input_dir, ignore_errors=True)
        marginals = []
        for (n0, a), (n1, b) in zip(measured, measured[1:]):
            marginal_ms = 1000 * (b["cpu_s"] - a["cpu_s"]) / (n1 - n0)
            marginals.append(marginal_ms)
            print(f"marginal CPU per partition {n0} -> {n1}: {marginal_ms:.0f} ms")
        if len(marginals) >= 2:
            print(f"last step's marginal / first step's: {marginals[-1] / marginals[0]:.2f}x (goal <= 1.25x)")
        if len(measured) >= 2:
            print(f"peak RSS {measured[-1][0]} / {measured[0][0]} partitions: {measured[-1][1]['peak_rss_mb'] / measured[0][1]['peak_rss_mb']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
