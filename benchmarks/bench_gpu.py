"""The embedding stage on a CUDA GPU, end to end: which forward pass, which batch size, each decode mode, two kinds of shard.

    python benchmarks/bench_gpu.py --quick                                  # under 8 minutes on one H100/H200
    python benchmarks/bench_gpu.py                                          # more batch sizes, longer stage runs
    python benchmarks/bench_gpu.py --device cpu --tiny --compile-backend aot_eager   # the script's own check, any machine

Runs the flow's own code (`tasks.models.embed.load_clip_embedder` + `embed_shard`, `tasks.io.read`,
`tasks.store.entries`, `tasks.models.forward`) with a ViT-L-14 of random weights (the speed of a model does
not depend on its weights) on synthetic photo-like JPEGs of two kinds: img2dataset-style 512 px images
(the shorter side 512, or padded to 512 x 512) and 1-2 MP photos (1024-2048 px). Every figure is printed, flushed, on
its own line the moment it is measured, `section | subject | figure: value`, so a run cut short keeps what it
measured:

cosine       each forward pass of tasks/models/forward.py against the fp32 model on the CPU, on the same
             preprocessed images of both kinds: mean and min over the images (the bar is autocast's min).
model alone  images/s of each forward pass at each batch size on a ready batch of uint8 crops, doing what
             `embed_pixels` does (copy to the device, normalise there, forward, back to the host), and the ratio to
             autocast at the same batch; peak device memory while it ran (the fp32 model included).
             half-compiled runs only at the largest batch size with --quick: each shape is a compilation.
choice       the fastest pass whose min cosine is within 1e-4 of autocast's, and its best batch size; autocast
             stays when nothing is 5% faster.
fidelity     per shard kind, the gpu decode mode's embeddings (nvJPEG and torch's resize on the device) against the
             exact mode's (Pillow on the CPU) of the same images, same model and precision: mean and min cosine.
stage        per shard kind and decode mode (every name in tasks.io.read.DECODE_MODES), the whole stage with
             autocast (before) and with the chosen pass (after), at the chosen batch size: images/s, the
             model's own images/s inside the stage, GPU busy % (NVML or nvidia-smi), time waiting for
             model-ready input, host CPU ms per image (this process and its decoding worker processes), peak
             device memory.

A table of the stage runs closes the output. Without CUDA, `--device cuda` (the default) prints one line and
exits 0; `--device cpu --tiny` runs every step with a tiny model and a few small images (the passes in
bfloat16, the stage in fp32 as the embedder runs on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks._photos import IMG2DATASET_512_SIZES, LARGE_SIZES, write_photo_shards
from benchmarks.bench_feed import _process_cpu_seconds
from tasks.io import decode_workers
from tasks.io.read import DECODE_MODES, DecodeOptions, iter_samples
from tasks.models.bounded_transform import model_input
from tasks.models.clip_resolve import ClipWeights, resolve_clip
from tasks.models.embed import AUTOCAST_DTYPES, FeedTimes, embed_shard, load_clip_embedder
from tasks.models.forward import FORWARD_PASSES, Forward, build_forward
from tasks.store.entries import EmbeddingStore

SHARD_KINDS = {  # name -> image sizes (width, height), at full size and for --tiny
    "512px": (IMG2DATASET_512_SIZES, [(128, 96), (96, 128)]),
    "photos": (LARGE_SIZES, [(320, 240), (256, 256)]),
}
COSINE_SLACK = 1e-4  # how far below autocast's min cosine a faster pass may be and still keep the embeddings
PAYS = 1.05  # a pass replaces autocast only when this much faster: below it, run-to-run noise


def decode_modes(weights: ClipWeights) -> dict[str, DecodeOptions]:
    """The decode settings a run can choose (the flows' `decode_mode`), by name."""
    return {mode: DecodeOptions.for_model(weights.image_size, mode) for mode in DECODE_MODES}


def report(section: str, subject: str, figure: str, value: str, record: list[dict] | None = None) -> None:
    """One measured figure, printed at once on its own line (and kept for --out)."""
    print(f"{section} | {subject} | {figure}: {value}", flush=True)
    if record is not None:
        record.append({"section": section, "subject": subject, "figure": figure, "value": value})


class UtilisationSampler:
    """GPU utilisation (percent of time a kernel ran) sampled every `interval` s in a background thread.

    Uses torch.cuda.utilization (NVML through pynvml) and falls back to nvidia-smi; `mean()` is None
    when neither is available, and on a CPU device.
    """

    def __init__(self, device: torch.device, interval: float = 0.25) -> None:
        on_gpu = device.type == "cuda"
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        self.interval = interval
        self.samples: list[float] = []
        self.source: str | None = self._probe() if on_gpu else None
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
    forward: str
    batch_size: int
    kind: str = "photos"
    precision: str = ""
    images: int = 0
    wall_s: float = 0.0
    input_wait_s: float = 0.0
    model_s: float = 0.0
    host_cpu_s: float = 0.0
    gpu_utilisation: float | None = None
    peak_gpu_mib: float | None = None
    entries: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    @property
    def model_images_per_s(self) -> float:
        return self.images / self.model_s if self.model_s else 0.0

    @property
    def host_cpu_ms_per_image(self) -> float:
        return 1000 * self.host_cpu_s / self.images if self.images else 0.0


def host_cpu_seconds() -> dict[int | str, float]:
    """CPU seconds so far of this process (every thread) and of each live decoding worker process, by pid."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    seconds: dict[int | str, float] = {"self": own.ru_utime + own.ru_stime}
    for pid in decode_workers.worker_pids():
        try:
            seconds[pid] = _process_cpu_seconds(pid)
        except (OSError, IndexError, ValueError):  # a worker replaced meanwhile: its time is lost, not invented
            pass
    return seconds


def cpu_seconds_between(before: dict[int | str, float], after: dict[int | str, float]) -> float:
    # a worker started in between counts from zero
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


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
    forward: str = "autocast",
) -> StageResult:
    """Embed the shards into a fresh store as an embedding task does, one shard after another, stopping
    after the shard that passes `seconds`: the wall time, the embedder's own time accounting, host CPU time,
    GPU busy % and peak device memory."""
    result = result or StageResult("custom", forward, batch_size)
    embedder = load_clip_embedder(weights, device, batch_size, autocast, forward)
    result.precision = embedder.precision
    height, width = weights.image_size
    embedder.embed_pixels(torch.zeros(batch_size, 3, height, width))  # a compiled pass compiles here, not in the timed run
    embedder.times = FeedTimes()
    store = EmbeddingStore(store_dir)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with UtilisationSampler(device) as sampler:
        cpu_before = host_cpu_seconds()
        started = time.perf_counter()
        for shard_url in shard_urls:
            result.entries.append(embed_shard(shard_url, embedder, store, decode))
            if time.perf_counter() - started >= seconds:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.wall_s = time.perf_counter() - started
        result.host_cpu_s = cpu_seconds_between(cpu_before, host_cpu_seconds())
    if device.type == "cuda":
        result.peak_gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
    result.gpu_utilisation = sampler.mean()
    result.images = embedder.times.images
    result.input_wait_s = embedder.times.input_wait_s
    result.model_s = embedder.times.model_s
    return result


def gpu_mode_against_exact(kind: str, shard_url: str, weights: ClipWeights, store_dir: Path, modes: dict[str, DecodeOptions], device: torch.device,
                           batch_size: int, autocast: str, record: list[dict]) -> tuple[float, float, int]:
    """Mean and min cosine, over one shard's images, between the gpu mode's embeddings (decoded and resized on the device)
    and the exact mode's (Pillow on the CPU), the same model and precision on the same device."""
    from tasks.models.clip_resolve import clip_identity
    from tasks.store.entries import embedding_matrix

    embedder = load_clip_embedder(weights, device, batch_size, autocast)
    store = EmbeddingStore(store_dir)
    try:
        tables = {}
        for mode in ("exact", "gpu"):
            embed_shard(shard_url, embedder, store, modes[mode])
            tables[mode] = store.read_table(clip_identity(weights, modes[mode].identity()), shard_url)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    exact, gpu = (torch.from_numpy(embedding_matrix(tables[mode])) for mode in ("exact", "gpu"))
    assert tables["exact"].column("key").to_pylist() == tables["gpu"].column("key").to_pylist()
    scored = ~(exact.isnan().any(dim=1) | gpu.isnan().any(dim=1))
    mean, minimum = cosine_to_fp32(gpu[scored], exact[scored])
    hashes = [(a, b) for a, b in zip(tables["exact"].column("pdq").to_pylist(), tables["gpu"].column("pdq").to_pylist()) if a and b]
    distances = [bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1") for a, b in hashes]
    if distances:
        report("fidelity", f"{kind} gpu mode PDQ", f"bits from exact decoding's PDQ, mean and max of {len(distances)} images",
               f"{sum(distances) / len(distances):.2f} {max(distances)}", record)
    return mean, minimum, int(scored.sum())


def embed_like_the_stage(forward: Forward, transform, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What `ClipEmbedder.embed_pixels` does with a batch: to the device, normalised there (uint8 crops), forward,
    L2-normalised float32 on the host."""
    return F.normalize(forward(model_input(transform, pixels.to(device, non_blocking=True))).float(), dim=-1).cpu()


def ready_batch(transform, batch_size: int, image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A random batch as the host pipeline hands it to the embedder (pinned for a GPU): uint8 crops when the transform
    normalises on the device, else the float model input."""
    crops = torch.randint(0, 256, (batch_size, 3, *image_size), dtype=torch.uint8)
    batch = crops if model_input(transform, crops).dtype != torch.uint8 else torch.randn(batch_size, 3, *image_size)
    return batch.pin_memory() if device.type == "cuda" else batch


def model_alone_rate(forward: Forward, transform, pixels: torch.Tensor, device: torch.device, seconds: float) -> float:
    """Images/s of `forward` on a ready batch, repeated for at least `seconds` (after two warm-up batches)."""
    for _ in range(2):  # warm-up: kernels chosen and loaded for this shape (and a compiled pass compiled)
        embed_like_the_stage(forward, transform, pixels, device)
    batches, started = 0, time.perf_counter()
    while batches < 2 or time.perf_counter() - started < seconds:
        embed_like_the_stage(forward, transform, pixels, device)  # returns on the host, so every batch has finished on the device
        batches += 1
    return batches * len(pixels) / (time.perf_counter() - started)


def cosine_to_fp32(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean and min over the rows of the cosine between two sets of L2-normalised embeddings."""
    cosines = (embeddings.double() * reference.double()).sum(dim=1)
    return float(cosines.mean()), float(cosines.min())


def preprocessed_images(shard_urls: list[str], decode: DecodeOptions, transform, count: int) -> torch.Tensor:
    """The first `count` images of the shards through the model's transform, [count, 3, H, W] float32."""
    images = (sample.image for url in shard_urls for sample in iter_samples(url, decode) if sample.image is not None)
    return torch.stack([transform(image) for image in islice(images, count)])


def fp32_cpu_reference(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The fp32 CPU embeddings of `pixels` (the parity tests' setting), from a CPU copy of the image tower."""
    tower = model.visual if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model.visual).to("cpu", torch.float32)
    with torch.inference_mode():
        return F.normalize(tower(pixels).float(), dim=-1)


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


def tiny_clip(directory: Path) -> ClipWeights:
    """The tests' tiny open_clip model (two heads, so nn.MultiheadAttention may take its fast path as ViT-L-14's 16 do)."""
    from tests.support.tiny_clip import make_tiny_clip

    config_path, checkpoint_path = make_tiny_clip(directory / "clip", width=128, name="bench-tiny-clip")
    return resolve_clip(str(config_path), str(checkpoint_path), directory)


def _free_device_memory(device: torch.device) -> None:
    torch.compiler.reset()  # compiled graphs keep their tower alive otherwise
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_passes(
    model: torch.nn.Module, transform, pixels_for_cosine: torch.Tensor, reference: torch.Tensor, image_size: tuple[int, int], device: torch.device,
    dtype: torch.dtype, names: list[str], batch_sizes: list[int], seconds: float, compile_backend: str, record: list[dict],
    compiled_batch_sizes: list[int] | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[tuple[str, int], float]]:
    """Cosine (at the first batch size measured) and model-alone images/s of each pass at each batch size, each printed
    as made; "half-compiled" only at `compiled_batch_sizes` (default: all), since each shape costs a compilation."""
    cosines: dict[str, tuple[float, float]] = {}
    rates: dict[tuple[str, int], float] = {}
    for name in names:
        for batch_size in batch_sizes if name != "half-compiled" or compiled_batch_sizes is None else compiled_batch_sizes:
            subject = f"{name} batch {batch_size}"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                forward = build_forward(model, device, name, batch_size, dtype, compile_backend=compile_backend)
                if name not in cosines:
                    embeddings = torch.cat([embed_like_the_stage(forward, transform, piece, device) for piece in pixels_for_cosine.split(batch_size)])
                    cosines[name] = cosine_to_fp32(embeddings, reference)
                    report("cosine", name, f"vs fp32 CPU, mean and min of {len(reference)} images", f"{cosines[name][0]:.6f} {cosines[name][1]:.6f}", record)
                rate = model_alone_rate(forward, transform, ready_batch(transform, batch_size, image_size, device), device, seconds)
            except Exception as error:  # noqa: BLE001 - one pass failing on this machine must not cost the run its other figures
                reason = " ".join(str(error).split())[:200]
                report("model alone", subject, "images/s", f"failed ({type(error).__name__}: {reason})", record)
                forward = None
                _free_device_memory(device)
                continue
            rates[name, batch_size] = rate
            versus = f" ({rate / rates['autocast', batch_size]:.2f}x autocast)" if ("autocast", batch_size) in rates else ""
            report("model alone", subject, "images/s", f"{rate:.1f}{versus}", record)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "n/a (no GPU)"
            report("model alone", subject, "peak device MiB", peak, record)
            forward = None  # its tower freed before the next pass is built
            _free_device_memory(device)
    return cosines, rates


def choose_pass(cosines: dict[str, tuple[float, float]], rates: dict[tuple[str, int], float]) -> tuple[str, int, str]:
    """The fastest pass (and its batch size) that keeps autocast's embeddings, or autocast when nothing pays; and why."""
    bar = cosines["autocast"][1] - COSINE_SLACK
    keeping = {key: rate for key, rate in rates.items() if key[0] in cosines and cosines[key[0]][1] >= bar}
    autocast_key = max((key for key in rates if key[0] == "autocast"), key=rates.__getitem__)
    best = max(keeping, key=keeping.__getitem__)
    gain = rates[best] / rates[autocast_key]
    if best[0] != "autocast" and gain < PAYS:
        return autocast_key[0], autocast_key[1], f"no pass is {PAYS:.2f}x autocast's best ({best[0]} batch {best[1]}: {gain:.2f}x)"
    dropped = sorted({name for name, _ in rates if name in cosines and cosines[name][1] < bar})
    why = "no pass that keeps the embeddings is faster" if best[0] == "autocast" else f"{gain:.2f}x autocast's best (batch {autocast_key[1]})"
    return best[0], best[1], why + (f"; below the cosine bar: {', '.join(dropped)}" if dropped else "")


def markdown(results: list[StageResult], header: str) -> str:
    lines = [
        header,
        "",
        "| shards | decode | forward | precision | batch | images | images/s | model in stage images/s | GPU busy % | waiting for input | host CPU ms/image | peak GPU MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        busy = f"{r.gpu_utilisation:.0f}" if r.gpu_utilisation is not None else "n/a"
        peak = f"{r.peak_gpu_mib:.0f}" if r.peak_gpu_mib is not None else "n/a"
        lines.append(
            f"| {r.kind} | {r.decode} | {r.forward} | {r.precision} | {r.batch_size} | {r.images} | {r.images_per_s:.1f} | {r.model_images_per_s:.0f} | {busy} | "
            f"{100 * r.input_wait_s / r.wall_s:.0f}% | {r.host_cpu_ms_per_image:.1f} | {peak} |"
        )
    return "\n".join(lines)


def report_stage(result: StageResult, record: list[dict]) -> None:
    subject = f"{result.kind} {result.decode} {result.forward} ({result.precision}) batch {result.batch_size}"
    report("stage", subject, "images/s", f"{result.images_per_s:.1f} ({result.images} images in {result.wall_s:.1f} s)", record)
    report("stage", subject, "model in stage images/s", f"{result.model_images_per_s:.1f}", record)
    busy = f"{result.gpu_utilisation:.0f}" if result.gpu_utilisation is not None else "n/a (no GPU or no NVML)"
    report("stage", subject, "GPU busy %", busy, record)
    wait_ms = 1000 * result.input_wait_s / result.images if result.images else 0.0
    report("stage", subject, "input wait", f"{100 * result.input_wait_s / result.wall_s:.0f}% of the wall time, {wait_ms:.2f} ms/image", record)
    report("stage", subject, "host CPU ms/image", f"{result.host_cpu_ms_per_image:.1f}", record)
    peak = f"{result.peak_gpu_mib:.0f}" if result.peak_gpu_mib is not None else "n/a (no GPU)"
    report("stage", subject, "peak device MiB", peak, record)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _settings(args: argparse.Namespace) -> None:
    """Fill the options left unset from --quick / --tiny / the full run."""
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    defaults = {
        #            images 512px, images photos, per shard, batch sizes,           stage s, model s, cosine images
        "full": (32768, 8192, 1024, "32,64,128,256,512", 20.0, 4.0, 64),
        "quick": (16384, 4096, 1024, "32,256", 8.0, 2.0, 32),
        "tiny": (8, 8, 4, "4", float("inf"), 0.2, 8),
    }[profile]
    for name, value in zip(("images_512px", "images_photos", "shard_images", "batch_sizes", "stage_seconds", "model_seconds", "cosine_images"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.autocast = args.autocast or ("fp16" if args.device.startswith("cuda") else "bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sized to finish in under 8 minutes on one H100/H200")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few small images: the script's own check, on any device")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images-512px", type=int, default=None, help="512 px images written (a stage stops at the first shard end after --stage-seconds)")
    parser.add_argument("--images-photos", type=int, default=None, help="1-2 MP photos written")
    parser.add_argument("--shard-images", type=int, default=None, help="samples per shard")
    parser.add_argument("--batch-sizes", default=None, help="model batch sizes, comma-separated")
    parser.add_argument("--forward", default=",".join(FORWARD_PASSES), help="forward passes to measure; autocast is always the baseline")
    parser.add_argument("--autocast", default=None, choices=sorted(AUTOCAST_DTYPES), help="the reduced dtype (default fp16 on CUDA, bf16 on a CPU)")
    parser.add_argument("--decode", default=",".join(DECODE_MODES))
    parser.add_argument("--stage-seconds", type=float, default=None, help="stop a stage run at the first shard end after this")
    parser.add_argument("--model-seconds", type=float, default=None, help="timed seconds per forward pass and batch size")
    parser.add_argument("--cosine-images", type=int, default=None, help="images (half of each kind) for the cosine against fp32")
    parser.add_argument("--compiled-batch-sizes", default=None, help="batch sizes half-compiled is compiled for (default: the largest with --quick, else all)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of half-compiled (aot_eager: capture only, for a CPU check)")
    parser.add_argument("--workdir", type=Path, default=None, help="where shards and weights go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON (.json) or the stage table as markdown (other names)")
    args = parser.parse_args(argv)
    _settings(args)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA GPU on this machine; nothing to measure (--device cpu --tiny checks the script).", flush=True)
        return 0
    forwards = ["autocast"] + [name for name in _names(args.forward) if name != "autocast"]
    unknown = [name for name in forwards if name not in FORWARD_PASSES]
    if unknown:
        parser.error(f"unknown forward pass(es) {unknown}; choose from {list(FORWARD_PASSES)}")
    batch_sizes = [int(size) for size in _names(args.batch_sizes)]
    compiled_batch_sizes = [int(size) for size in _names(args.compiled_batch_sizes)] if args.compiled_batch_sizes else (
        [max(batch_sizes)] if args.quick else batch_sizes)
    if args.shard_images < max(batch_sizes) and not args.tiny:
        parser.error("--shard-images must be at least the largest batch size: a model batch never spans two shards")
    device = torch.device(args.device)
    dtype = AUTOCAST_DTYPES[args.autocast]
    record: list[dict] = []
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        setup = time.perf_counter()
        counts = {"512px": args.images_512px, "photos": args.images_photos}
        shards = {kind: write_photo_shards(workdir / f"shards-{kind}", counts[kind], args.shard_images, sizes=SHARD_KINDS[kind][1 if args.tiny else 0])
                  for kind in SHARD_KINDS}
        weights = tiny_clip(workdir) if args.tiny else random_vit_l_14(workdir)
        modes = decode_modes(weights)
        unknown = [name for name in _names(args.decode) if name not in modes]
        if unknown:
            parser.error(f"unknown decode mode(s) {unknown}; choose from {list(modes)}")
        # Warm-up: model built and moved, decoding workers started (the shards just written are in the page cache).
        first_mode = modes[_names(args.decode)[0]]
        run_stage(shards["512px"][:1], weights, workdir / "store-warmup", first_mode, device, batch_sizes[0], args.autocast)
        shutil.rmtree(workdir / "store-warmup", ignore_errors=True)
        loaded = load_clip_embedder(weights, device, batch_sizes[0], args.autocast)  # the stage's own model, not a second copy
        model, transform = loaded.model, loaded.transform
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"setup | {time.perf_counter() - setup:.0f} s | {', '.join(f'{kind}: {counts[kind]} images in {len(urls)} shards' for kind, urls in shards.items())}; "
              f"{weights.model_name} random weights on {where}, torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs, "
              f"{args.autocast} for the reduced-precision passes", flush=True)

        per_kind = max(1, args.cosine_images // len(SHARD_KINDS))
        cosine_pixels = torch.cat([preprocessed_images(urls, first_mode, transform, per_kind) for urls in shards.values()])
        reference = fp32_cpu_reference(model, cosine_pixels)
        cosines, rates = measure_passes(model, transform, cosine_pixels, reference, weights.image_size, device, dtype, forwards, batch_sizes,
                                        args.model_seconds, args.compile_backend, record, compiled_batch_sizes)
        chosen, chosen_batch, why = choose_pass(cosines, rates)
        report("choice", "forward pass", f"{chosen} batch {chosen_batch}", why, record)
        del model, loaded

        if "gpu" in _names(args.decode) and "exact" in modes:
            for kind, urls in shards.items():
                mean, minimum, count = gpu_mode_against_exact(kind, urls[0], weights, workdir / f"store-fidelity-{kind}", modes, device, chosen_batch, args.autocast,
                                                       record)
                report("fidelity", f"{kind} gpu mode", f"cosine to exact decoding, mean and min of {count} images",
                       f"{mean:.6f} {minimum:.6f}", record)

        results: list[StageResult] = []
        # every autocast run first: a chosen pass's tower, once built, stays with the model and would count in their peak
        for forward in dict.fromkeys(["autocast", chosen]):
            for kind, urls in shards.items():
                for decode in _names(args.decode):
                    result = StageResult(decode, forward, chosen_batch, kind)
                    store_dir = workdir / f"store-{kind}-{decode}-{forward}"
                    try:
                        run_stage(urls, weights, store_dir, modes[decode], device, chosen_batch, args.autocast, args.stage_seconds, result, forward)
                    except Exception as error:  # noqa: BLE001 - one decode mode failing here must not cost the run the others
                        reason = " ".join(str(error).split())[:200]
                        report("stage", f"{kind} {decode} {forward} batch {chosen_batch}", "images/s", f"failed ({type(error).__name__}: {reason})", record)
                        continue
                    finally:
                        shutil.rmtree(store_dir, ignore_errors=True)
                    results.append(result)
                    report_stage(result, record)
        sampler_source = UtilisationSampler(device).source or "unavailable (no GPU, no NVML, no nvidia-smi)"
        table = markdown(results, f"GPU busy % from {sampler_source}; 'waiting for input' is the host pipeline's share of the wall time.")
        print(flush=True)
        print(table, flush=True)
        if args.out:
            if args.out.suffix == ".json":
                payload = {"device": where, "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)), "figures": record,
                           "stages": [dict(asdict(r), images_per_s=r.images_per_s, entries=len(r.entries)) for r in results]}
                args.out.write_text(json.dumps(payload, indent=2))
            else:
                args.out.write_text(table + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
