"""The CLIP embedding stage against a bare open_clip loop, and what the reduced-size JPEG decode changes.

    python benchmarks/bench_embed.py [throughput|divergence|all] [--images N] [--batch-size B] [--workdir DIR]

throughput  `embed_shard` (tar -> decode -> open_clip transform -> encode_image -> L2 -> Parquet entry)
            against a bare loop doing the same with tarfile + Pillow + open_clip's own transform +
            `encode_image` on the same shards, with the same random-weight ViT-B-32-sized model, batch
            size and torch threads. Full-size decode on both sides. Goal: ratio >= 0.85.
divergence  large photo JPEGs (1024-2048 px) embedded by the stage with decode_mode=reduced
            (reduced-size JPEG decoding) against the default exact decoding: cosine of the embeddings.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
import numpy as np
import torch
from _read_shards import write_shards
from PIL import Image

from tasks.models.clip_resolve import ClipWeights, resolve_clip
from tasks.models.embed import embed_shard, load_clip_embedder
from tasks.io.read import DecodeOptions
from tasks.store.entries import EmbeddingStore, embedding_matrix

WEB_SIZES = [(640, 480), (512, 512), (800, 533), (480, 640), (1024, 683)]
LARGE_SIZES = [(1024, 1024), (1280, 960), (1536, 1024), (2048, 1536)]
FULL_DECODE = DecodeOptions(reduced_jpeg_size=None)
REDUCED = DecodeOptions.for_model((224, 224), "reduced")  # what decode_mode=reduced picks for a 224 px model
# ViT-B/32's image tower (88M parameters) with a one-layer text tower: the text side is never run.
VIT_B_32_SIZED = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def vit_b_32_sized_model(workdir: Path) -> ClipWeights:
    """A random-weight ViT-B-32-sized open_clip model saved as config JSON + safetensors (made once per workdir)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model_dir = workdir / "model"
    config_path = model_dir / "bench-vit-b-32.json"
    checkpoint_path = model_dir / "bench-vit-b-32.safetensors"
    if not (checkpoint_path.is_file() and config_path.is_file() and json.loads(config_path.read_text()) == VIT_B_32_SIZED):
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        state_dict = {k: v.contiguous() for k, v in CLIP(**VIT_B_32_SIZED).state_dict().items()}
        save_file(state_dict, str(checkpoint_path))
        config_path.write_text(json.dumps(VIT_B_32_SIZED))
    return resolve_clip(str(config_path), str(checkpoint_path))


def bare_open_clip_loop(shard_urls: list[str], weights: ClipWeights, batch_size: int) -> np.ndarray:
    """The baseline: stream tars, decode JPEGs with Pillow, open_clip's transform, encode_image, normalise."""
    model, _, preprocess = _bare_model(weights)
    rows = []

    def run(images: list[Image.Image]) -> None:
        with torch.inference_mode():
            pixels = torch.stack([preprocess(image) for image in images])
            rows.append(torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy())

    images: list[Image.Image] = []
    for shard_url in shard_urls:
        with open(shard_url, "rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                data = tar.extractfile(info).read()
                if info.name.endswith(".jpg"):
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                    if len(images) == batch_size:
                        run(images)
                        images = []
    if images:
        run(images)
    return np.concatenate(rows)


_bare_cache: dict = {}


def _bare_model(weights: ClipWeights):
    import open_clip

    if weights not in _bare_cache:
        open_clip.add_model_config(weights.config_path)
        model, _, preprocess = open_clip.create_model_and_transforms(weights.model_name, pretrained=weights.checkpoint_path)
        _bare_cache[weights] = (model.eval(), None, preprocess)
    return _bare_cache[weights]


def stage(shard_urls: list[str], weights: ClipWeights, batch_size: int, decode: DecodeOptions, cache_dir: Path) -> np.ndarray:
    """The embedding stage as the flow runs it on a miss: embed_shard per shard, entries written to the store."""
    embedder = load_clip_embedder(weights, "cpu", batch_size)
    store = EmbeddingStore(cache_dir)
    urls = [embed_shard(shard_url, embedder, store, decode, task_batch_size=100) for shard_url in shard_urls]
    import pyarrow.parquet as pq

    return np.concatenate([embedding_matrix(pq.read_table(url)) for url in urls])


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def throughput(workdir: Path, image_count: int, batch_size: int, repeats: int) -> None:
    weights = vit_b_32_sized_model(workdir)
    shard_urls = write_shards(workdir / "web", shard_count=2, samples_per_shard=image_count // 2, sizes=WEB_SIZES)
    warmup_urls = write_shards(workdir / "warmup", shard_count=1, samples_per_shard=batch_size, sizes=WEB_SIZES)
    cache = Path(tempfile.mkdtemp(dir=workdir))
    # Warm-up (model load, page cache, thread start-up), then interleaved rounds so load from others hits both alike.
    bare_open_clip_loop(warmup_urls, weights, batch_size)
    stage(warmup_urls, weights, batch_size, FULL_DECODE, cache / "warmup")
    t_bare = t_stage = float("inf")
    for round_index in range(repeats):
        elapsed, bare = timed(lambda: bare_open_clip_loop(shard_urls, weights, batch_size))
        t_bare = min(t_bare, elapsed)
        elapsed, ours = timed(lambda: stage(shard_urls, weights, batch_size, FULL_DECODE, cache / str(round_index)))
        t_stage = min(t_stage, elapsed)
    shutil.rmtree(cache, ignore_errors=True)
    cosine = (bare * ours).sum(axis=1)
    print(f"== throughput: {len(bare)} JPEGs of 480-1024 px in {len(shard_urls)} shards, random ViT-B-32-sized model,")
    print(f"   batch size {batch_size}, torch threads {torch.get_num_threads()}, full-size decode on both sides, best of {repeats}")
    print(f"bare open_clip loop     {len(bare) / t_bare:7.1f} img/s")
    print(f"embedding stage         {len(ours) / t_stage:7.1f} img/s   ratio {t_bare / t_stage:.2f} (goal >= 0.85)")
    print(f"stage vs bare embeddings: cosine min {cosine.min():.7f}")


def divergence(workdir: Path, batch_size: int) -> None:
    weights = vit_b_32_sized_model(workdir)
    shard_urls = write_shards(workdir / "large", shard_count=1, samples_per_shard=16, sizes=LARGE_SIZES)
    with tempfile.TemporaryDirectory(dir=workdir) as cache:
        full = stage(shard_urls, weights, batch_size, FULL_DECODE, Path(cache) / "full")
        reduced = stage(shard_urls, weights, batch_size, REDUCED, Path(cache) / "reduced")
    cosine = (full * reduced).sum(axis=1)
    print(f"== divergence: {len(full)} photo JPEGs of {', '.join(f'{w}x{h}' for w, h in LARGE_SIZES)}, decode_mode=reduced")
    print(f"   (reduced_jpeg_size={REDUCED.reduced_jpeg_size}) against exact decoding, random ViT-B-32-sized model")
    print(f"cosine mean {cosine.mean():.6f}  min {cosine.min():.6f}  (1 - cosine: mean {1 - cosine.mean():.2e}, max {1 - cosine.min():.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all", choices=["throughput", "divergence", "all"])
    parser.add_argument("--images", type=int, default=64, help="images in the throughput run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per side (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="model_inference_batch_size (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nsfw-curator-bench-embed")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.which in ("throughput", "all"):
        throughput(args.workdir, args.images, args.batch_size, args.repeats)
    if args.which in ("divergence", "all"):
        divergence(args.workdir, args.batch_size)


if __name__ == "__main__":
    main()
