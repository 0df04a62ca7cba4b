"""The embedding stage on a CUDA GPU: tars -> decode -> open_clip transform -> ViT-L-14 -> embedding store.

    python benchmarks/bench_gpu.py [--images 2048] [--batch-sizes 64,128,256,512] [--autocast fp16,bf16]
                                   [--decode exact,reduced] [--seconds-per-config 10] [--out results.json]

Runs the flow's own code (`tasks.models.embed.load_clip_embedder` + `embed_shard`, `tasks.io.read`,
`tasks.store.entries`) on synthetic photo-like JPEGs of 1024-2048 px, with a ViT-L-14 of random weights
(the speed of a model does not depend on its weights). For every decode mode, autocast dtype and model
batch size it prints images/s through the whole stage, the model alone on ready tensors (the ceiling),
GPU utilisation sampled while the stage runs, and where the consuming thread's time went: waiting for
model-ready input (the host pipeline is the bound), in the model (copy, forward, result back), or elsewhere
(store writes, shard start and end). On a machine without CUDA it says so in one line and exits 0.

Each configuration embeds up to --images images, stopping early at a shard boundary once it has run
--seconds-per-config seconds, so a full run stays within minutes however slow the host pipeline is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._photos import write_photo_shards
from tasks.io.read import DECODE_MODES, DecodeOptions
from tasks.models.clip_resolve import ClipWeights, resolve_clip
from tasks.models.embed import embed_shard, load_clip_embedder
from tasks.store.entries import EmbeddingStore


def decode_modes(weights: ClipWeights) -> dict[str, DecodeOptions]:
    """The decode settings a run can choose (the flows' `decode_mode`), by name."""
    return {mode: DecodeOptions.for_model(weights.image_size, mode) for mode in DECODE_MODES}


class UtilisationSampler:
    """GPU utilisation (percent of time a kernel ran) sampled every `interval` s in a background thread.

    Uses torch.cuda.utilization (NVML through pynvml) and falls back to nvidia-smi; `mean()` is None
    when neither is available.
    """

    def __init__(self, device: torch.device, interval: float = 0.25) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.interval = interval
        self.samples: list[float] = []
        self.source: str | None = self._probe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-utilisation", daemon=True)

    def _read(self, source: str) -> float | None:
        try:
            if source == "nvml":
                return float(torch.cuda.utilization(self.index))
            out = subprocess.run(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5, check=True,
            )
            return float(out.stdout.strip().splitlines()[0])
        except Exception:  # noqa: BLE001 - no NVML, no nvidia-smi, or an unexpected answer: no sample
            return None

    def _probe(self) -> str | None:
        for source in ("nvml", "nvidia-smi"):
            if self._read(source) is not None:
                return source
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read(self.source)
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> "UtilisationSampler":
        if self.source is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


@dataclass
class StageResult:
    """One configuration's run of the embedding stage."""

    decode: str
    autocast: str
    batch_size: int
    images: int = 0
    wall_s: float = 0.0
    input_wait_s: float = 0.0
    model_s: float = 0.0
    gpu_utilisation: float | None = None
    model_only_images_per_s: float | None = None
    peak_gpu_mib: float | None = None
    entries: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0


def run_stage(
    shard_urls: list[str],
    weights: ClipWeights,
    store_dir: Path,
    decode: DecodeOptions,
    device: torch.device,
    batch_size: int,
    autocast: str = "fp16",
    seconds: float = float("inf"),
    result: StageResult | None = None,
) -> StageResult:
    """Embed the shards into a fresh store as an embedding task does, one shard after another, stopping
    after the shard that passes `seconds`; the wall time and the embedder's own time accounting."""
    result = result or StageResult("custom", autocast, batch_size)
    embedder = load_clip_embedder(weights, device, batch_size, autocast)
    store = EmbeddingStore(store_dir)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for shard_url in shard_urls:
        result.entries.append(embed_shard(shard_url, embedder, store, decode))
        if time.perf_counter() - started >= seconds:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.peak_gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
    result.wall_s = time.perf_counter() - started
    result.images = embedder.times.images
    result.input_wait_s = embedder.times.input_wait_s
    result.model_s = embedder.times.model_s
    return result


def model_only_rate(weights: ClipWeights, device: torch.device, batch_size: int, autocast: str, images: int = 1024) -> float:
    """Images/s of the model alone on ready pinned tensors, through the same `embed_pixels` the stage uses."""
    embedder = load_clip_embedder(weights, device, batch_size, autocast)
    height, width = weights.image_size
    pixels = torch.randn(batch_size, 3, height, width).pin_memory()
    for _ in range(2):  # warm-up: kernels chosen and loaded for this shape
        embedder.embed_pixels(pixels)
    batches = max(2, images // batch_size)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        embedder.embed_pixels(pixels)  # returns host arrays, so every batch has finished on the device
    return batches * batch_size / (time.perf_counter() - started)


def random_vit_l_14(directory: Path) -> ClipWeights:
    """ViT-L-14 (open_clip's config, OpenAI preprocessing) with seeded random weights, saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    checkpoint = directory / "vit-l-14-random.safetensors"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-L-14", pretrained=None)
        save_file({name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}, str(checkpoint))
        del model
    return resolve_clip("ViT-L-14", str(checkpoint), directory)


def markdown(results: list[StageResult], header: str) -> str:
    lines = [
        header,
        "",
        "| decode | autocast | batch | images | images/s | model alone images/s | stage / model alone | GPU util % | waiting for input | in model | other | peak GPU MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        util = f"{r.gpu_utilisation:.0f}" if r.gpu_utilisation is not None else "n/a"
        ceiling = f"{r.model_only_images_per_s:.0f}" if r.model_only_images_per_s else "n/a"
        ratio = f"{r.images_per_s / r.model_only_images_per_s:.2f}" if r.model_only_images_per_s else "n/a"
        other = max(0.0, r.wall_s - r.input_wait_s - r.model_s)
        peak = f"{r.peak_gpu_mib:.0f}" if r.peak_gpu_mib is not None else "n/a"
        lines.append(
            f"| {r.decode} | {r.autocast} | {r.batch_size} | {r.images} | {r.images_per_s:.1f} | {ceiling} | {ratio} | {util} | "
            f"{100 * r.input_wait_s / r.wall_s:.0f}% | {100 * r.model_s / r.wall_s:.0f}% | {100 * other / r.wall_s:.0f}% | {peak} |"
        )
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="images per configuration at most")
    parser.add_argument("--shard-images", type=int, default=1024, help="samples per shard; at least the largest batch size")
    parser.add_argument("--batch-sizes", default="64,128,256,512")
    parser.add_argument("--autocast", default="fp16,bf16")
    parser.add_argument("--decode", default="exact,reduced")
    parser.add_argument("--seconds-per-config", type=float, default=10.0, help="stop a configuration at the next shard end after this")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=None, help="where shards and weights go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON (.json) or a markdown table (other names)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA GPU on this machine; nothing to measure.")
        return 0
    if args.shard_images < max(map(int, _names(args.batch_sizes))):
        parser.error("--shard-images must be at least the largest batch size: a model batch never spans two shards")
    device = torch.device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        setup = time.perf_counter()
        shard_urls = write_photo_shards(workdir / "shards", args.images, args.shard_images)
        weights = random_vit_l_14(workdir)
        modes = decode_modes(weights)
        unknown = [name for name in _names(args.decode) if name not in modes]
        if unknown:
            parser.error(f"unknown decode mode(s) {unknown}; choose from {list(modes)}")
        # Warm-up: model built and moved, kernels loaded, the page cache holding the shards.
        run_stage(shard_urls[:1], weights, workdir / "store-warmup", modes[_names(args.decode)[0]], device, 64)
        print(f"setup {time.perf_counter() - setup:.0f} s: {len(shard_urls)} shards of {args.shard_images} JPEGs (1024-2048 px), "
              f"ViT-L-14 random weights on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"{len(os.sched_getaffinity(0))} CPUs (host pipeline workers), torch CPU threads {torch.get_num_threads()}", flush=True)

        ceilings = {}
        for autocast in _names(args.autocast):
            for batch_size in map(int, _names(args.batch_sizes)):
                ceilings[autocast, batch_size] = model_only_rate(weights, device, batch_size, autocast)
                print(f"model alone: {autocast} batch {batch_size}: {ceilings[autocast, batch_size]:.0f} images/s", flush=True)

        results: list[StageResult] = []
        for decode in _names(args.decode):
            for autocast in _names(args.autocast):
                for batch_size in map(int, _names(args.batch_sizes)):
                    result = StageResult(decode, autocast, batch_size, model_only_images_per_s=ceilings[autocast, batch_size])
                    store_dir = workdir / f"store-{decode}-{autocast}-{batch_size}"
                    with UtilisationSampler(device) as sampler:
                        run_stage(shard_urls, weights, store_dir, modes[decode], device, batch_size, autocast, args.seconds_per_config, result)
                    result.gpu_utilisation = sampler.mean()
                    shutil.rmtree(store_dir, ignore_errors=True)
                    results.append(result)
                    print(f"stage: {decode} {autocast} batch {batch_size}: {result.images_per_s:.1f} images/s, "
                          f"waiting for input {100 * result.input_wait_s / result.wall_s:.0f}% of {result.wall_s:.1f} s", flush=True)
        sampler_source = UtilisationSampler(device).source or "unavailable (no NVML, no nvidia-smi)"
        table = markdown(results, f"GPU utilisation from {sampler_source}; 'waiting for input' is the host pipeline's share of the wall time.")
        print()
        print(table)
        if args.out:
            if args.out.suffix == ".json":
                payload = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
                           "results": [dict(asdict(r), images_per_s=r.images_per_s, entries=len(r.entries)) for r in results]}
                args.out.write_text(json.dumps(payload, indent=2))
            else:
                args.out.write_text(table + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
