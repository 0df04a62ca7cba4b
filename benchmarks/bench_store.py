"""Warm re-run (every shard hits the embedding store) against the cold run that filled it.

    python benchmarks/bench_store.py [--shards N] [--images-per-shard M] [--s3] [--workdir DIR]

Each run is a fresh process (as a re-run is: no in-process fingerprint memo, no model loaded) doing what
the flow does per partition: `resolve_clip` (weights fingerprint from its sidecar), then `embed_partition`,
which fingerprints every shard, reads the entries that exist and embeds (loading CLIP) only on a miss.
Times cover that work, not Python start-up. The model is a random-weight ViT-B-32-sized open_clip model.
`--s3` puts shards and store on a moto S3 server on 127.0.0.1. Goal: warm at least 10x faster than cold.
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

from _common import start_moto  # also puts the repository on sys.path
from _read_shards import write_shards

WEB_SIZES = [(640, 480), (512, 512), (800, 533), (480, 640), (1024, 683)]


def child(config_path: str, checkpoint_path: str, cache_path: str, shard_urls: list[str]) -> None:
    """One run of the embedding step; prints its timing as JSON."""
    start = time.perf_counter()
    import open_clip  # noqa: F401 - imported by any run that resolves weights; counted with the imports

    if any(url.startswith("s3://") for url in shard_urls):
        import s3fs  # noqa: F401 - fsspec would import it on first use

    from tasks.models.clip_resolve import resolve_clip
    from tasks.filter.plan import EmbedStage
    from tasks.models.embed import embed_partition
    from tasks.io.read import DecodeOptions
    from tasks.store.entries import EmbeddingStore

    imported = time.perf_counter()
    weights = resolve_clip(config_path, checkpoint_path)
    entry_urls = embed_partition(shard_urls, EmbedStage.of(weights, EmbeddingStore(cache_path), DecodeOptions()), device="cpu")
    done = time.perf_counter()
    print(json.dumps({"seconds": done - imported, "import_seconds": imported - start, "entries": len(entry_urls)}))


def run_child(args: list[str], env: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--images-per-shard", type=int, default=16)
    parser.add_argument("--s3", action="store_true", help="shards and store on a moto S3 server")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsfw-curator-bench-embed")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config_path, checkpoint_path, cache_path, *shard_urls = args.child
        child(config_path, checkpoint_path, cache_path, shard_urls)
        return

    from bench_embed import vit_b_32_sized_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = vit_b_32_sized_model(args.workdir)
    shard_urls = write_shards(args.workdir / "store-shards", args.shards, args.images_per_shard, WEB_SIZES)
    env = dict(os.environ)
    server = None
    if args.s3:
        import s3fs

        server, s3_env = start_moto()
        env.update(s3_env)
        os.environ.update(s3_env)
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        for url in shard_urls:
            fs.put_file(url, f"bench/shards/{Path(url).name}")
        shard_urls = [f"s3://bench/shards/{Path(url).name}" for url in shard_urls]
        cache_path = "s3://bench/cache"
    else:
        cache_path = tempfile.mkdtemp(dir=args.workdir, prefix="store-")
    try:
        common = [weights.config_path, weights.checkpoint_path, cache_path, *shard_urls]
        cold = run_child(common, env)
        warm = run_child(common, env)
        images = args.shards * args.images_per_shard
        where = "S3 (moto on 127.0.0.1)" if args.s3 else "local disk"
        print(f"== store: {images} JPEGs in {args.shards} shards on {where}, random ViT-B-32-sized model, fresh process per run")
        print(f"cold run (embeds, loads CLIP)   {cold['seconds']:8.2f} s")
        print(f"warm run (all hits, no CLIP)    {warm['seconds']:8.3f} s   {cold['seconds'] / warm['seconds']:.0f}x faster (goal >= 10x)")
        whole_cold, whole_warm = cold["seconds"] + cold["import_seconds"], warm["seconds"] + warm["import_seconds"]
        print(f"not counted above: imports of torch, open_clip and tasks, {warm['import_seconds']:.1f} s per process;")
        print(f"with them: cold {whole_cold:.1f} s, warm {whole_warm:.1f} s, {whole_cold / whole_warm:.1f}x")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        else:
            shutil.rmtree(cache_path, ignore_errors=True)


if __name__ == "__main__":
    main()
