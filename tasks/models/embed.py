"""CLIP image embeddings: build the resolved open_clip model once per process, embed in batches.

The counterpart of open_clip's `factory.py` + `transform.py`: `tasks.models.clip_resolve` decides which model and
weights, this module builds them with `open_clip.create_model` (open_clip's own checkpoint loading) and
feeds them with open_clip's own inference transform, so embeddings equal open_clip's
`encode_image(preprocess(image))`, L2-normalised.

Batches of `batch_size` images run under `torch.inference_mode`. For shards (`embed_shard`), the reader's
worker pool decodes each image and applies open_clip's transform up to its uint8 centre crop to it
(`feed_model_batches` with tasks/models/bounded_transform.py `pixel_step`), so the host side scales with
cores and sends a quarter of the float input's bytes, and a background thread stacks the crops into uint8
model batches two ahead of inference; on CUDA the batch is stacked in pinned memory and copied with
`non_blocking=True`. `ClipEmbedder.embed_pixels` then makes the batch the model's input where the model runs
(ToTensor's scaling and Normalize, `model_input`: bit for bit open_clip's `preprocess` on the CPU) and runs
it, under fp16 (or bf16) autocast on CUDA or the `forward` pass chosen (tasks/models/forward.py).
The same workers hash each image they decode (tasks/io/decode.py `hash_sample`: MD5 and SHA-1 of its bytes, PDQ
of its pixels), and `embed_shard` keeps those hashes in the entry, so a hash list is matched without decoding again.
`ClipEmbedder.times` says where an embedder's time went: waiting for model-ready input, or in the model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tasks.models.clip_resolve import ClipWeights, clip_identity, identity_record, read_model_config, weights_fingerprint
from tasks.models.forward import DEFAULT_FORWARD, check_forward_name, shared_forward
from tasks.errors import UserError
from tasks.io.locations import LocationLike, as_location, redacted
from tasks.models.bounded_transform import model_input, pixel_step
from tasks.models.remote_weights import local_weights
from tasks.io.prefetch import close_iterator, prefetched
from tasks.io.read import DecodeOptions, Sample, iter_batches
from tasks.io.samples import ImageHashes
from tasks.stop import raise_if_stopped
from tasks.store.entries import EmbeddingStore, embedding_table, shard_fingerprint

if TYPE_CHECKING:
    from tasks.filter.plan import EmbedStage

_PREFETCH_BATCHES = 2
# Autocast dtypes on CUDA by name; the CPU always runs float32 (the parity tests' setting).
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FeedTimes:
    """Where an embedder's time went, summed over its calls (seconds of wall time in the consuming thread)."""

    images: int = 0
    batches: int = 0
    input_wait_s: float = 0.0  # blocked waiting for the next model-ready batch (decode + transform behind)
    model_s: float = 0.0  # copy to the device, forward pass, embeddings back on the host (synchronises)


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """`preferred` if given (it must exist), else CUDA when available, else CPU."""
    if preferred is None or str(preferred) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError:
        raise UserError(f"device {preferred!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {preferred!r} was asked for but torch sees no CUDA GPU; use 'cpu' or run on a GPU machine.")
    return device


def build_clip_model(weights: ClipWeights, device: torch.device) -> tuple[torch.nn.Module, object]:
    """The open_clip model (eval, on `device`, fp32 weights) and its inference transform.

    The checkpoint is `weights.checkpoint_path`, checked against its fingerprint, or for weights resolved
    from a URL this machine's verified copy of it (`tasks.models.remote_weights.local_weights`).
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from tasks.models.bounded_transform import BoundedTransform

    if weights.checkpoint_url:
        # Weights given as a URL: this machine's verified copy, downloaded here once when the machine lacks it.
        checkpoint = str(local_weights(weights.checkpoint_location, weights.weights_fingerprint))
        shown = redacted(weights.checkpoint_url)
    else:
        checkpoint = shown = weights.checkpoint_path
        if not Path(checkpoint).is_file():
            raise UserError(f"CLIP checkpoint {checkpoint} no longer exists; restore it or resolve the weights again.")
        if weights_fingerprint(checkpoint) != weights.weights_fingerprint:
            raise UserError(f"CLIP checkpoint {checkpoint} changed since it was resolved; start the run again.")
    if weights.config_path and open_clip.get_model_config(weights.model_name) != read_model_config(Path(weights.config_path)):
        # open_clip's documented way to use a model-config file: register it under its file stem.
        open_clip.add_model_config(weights.config_path)
    built_config = dict(open_clip.get_model_config(weights.model_name) or {})
    if weights.quick_gelu:
        built_config["quick_gelu"] = True
    if json.loads(weights.model_config) != built_config:
        raise UserError(f"CLIP model config for {weights.model_name} changed since it was resolved; start the run again.")
    preprocess_cfg = weights.preprocess_cfg
    try:
        model = open_clip.create_model(
            weights.model_name,
            pretrained=checkpoint,
            force_quick_gelu=weights.quick_gelu,
            force_preprocess_cfg={key: value for key, value in preprocess_cfg.items() if key != "size"},
            device=device,
        )
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        hint = (
            "it is a TorchScript archive, which is not loaded without pickle; `nsfw-curator models fetch` stores weights as safetensors"
            if "TorchScript" in str(error)
            else "pass the checkpoint made for this model config"
        )
        raise UserError(f"CLIP checkpoint {shown} does not load into {weights.model_name} ({reason}); {hint}.") from None
    model.eval().requires_grad_(False)
    built_preprocess = {key: list(value) if isinstance(value, tuple) else value for key, value in model.visual.preprocess_cfg.items()}
    if isinstance(built_preprocess.get("size"), int):
        built_preprocess["size"] = [built_preprocess["size"]] * 2
    assert built_preprocess == preprocess_cfg, f"open_clip built preprocessing {built_preprocess}, identity says {preprocess_cfg}"
    # open_clip's own transform, resizing only what its centre crop keeps, so banners of any aspect ratio fit in memory
    return model, BoundedTransform(image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False))


class ClipEmbedder:
    """A loaded CLIP image tower: `embed_model_batches` turns model-ready batches into float32 [N, D] embeddings, L2-normalised."""

    def __init__(
        self, weights: ClipWeights, model: torch.nn.Module, transform, device: torch.device, batch_size: int = 32, autocast: str = "fp16",
        forward: str = DEFAULT_FORWARD,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"model_inference_batch_size must be at least 1, got {batch_size}.")
        if autocast not in AUTOCAST_DTYPES:
            raise UserError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}, not {autocast!r}.")
        self.weights = weights
        self.model = model
        self.transform = transform
        self.device = device
        self.batch_size = int(batch_size)
        self.embedding_dim = weights.embedding_dim
        self.autocast = autocast
        # On CUDA the named pass of tasks/models/forward.py in the autocast dtype; the CPU runs the fp32 model.
        self.forward = check_forward_name(forward)
        self._cuda_forward = shared_forward(model, device, forward, self.batch_size, AUTOCAST_DTYPES[autocast]) if device.type == "cuda" else None
        self.times = FeedTimes()

    @property
    def precision(self) -> str:
        return f"{self.autocast}-{self.forward}" if self.device.type == "cuda" else "fp32"

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embeddings of one batch, float32 [N, D], L2-normalised: uint8 crops of `pixel_step(self.transform)` [N, 3, H, W],
        normalised on the device after the copy, or a batch already the model's input."""
        pixels = model_input(self.transform, pixels.to(self.device, non_blocking=True))
        if self._cuda_forward is not None:
            features = self._cuda_forward(pixels)
        else:
            # One forward pass at a time per process: each already uses every core, and concurrent
            # partitions would only thrash; their decoding and writing still overlap this.
            with _CPU_INFERENCE:
                raise_if_stopped()  # threads queued here while the run is interrupted start no more batches
                features = self.model.encode_image(pixels)
        # .cpu() waits for the device, so the time around this call is the model's, copies included.
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def embed_model_batches(self, batches: Iterable[ModelBatch]) -> Iterator[tuple[ModelBatch, np.ndarray]]:
        """Each ready batch with its embeddings, float32 [len(batch.pixels), D]; the time waiting for a batch
        and the time in the model are added to `times`."""
        times = self.times
        batches = iter(batches)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            started = time.perf_counter()
            times.input_wait_s += started - waited
            if batch is None:
                return
            if batch.pixels is None:
                yield batch, np.zeros((0, self.embedding_dim), np.float32)
                continue
            embeddings = self.embed_pixels(batch.pixels)
            times.model_s += time.perf_counter() - started
            times.images += len(batch.pixels)
            times.batches += 1
            yield batch, embeddings


_model_lock = threading.Lock()
_CPU_INFERENCE = threading.Lock()
_loaded_model: dict[tuple[ClipWeights, str], tuple[torch.nn.Module, object]] = {}


def load_clip_embedder(
    weights: ClipWeights, device: str | torch.device | None = None, batch_size: int = 32, autocast: str = "fp16",
    forward: str = DEFAULT_FORWARD,
) -> ClipEmbedder:
    """A `ClipEmbedder` for `weights`; the model is built once per process and device and reused across partitions."""
    device = select_device(device)
    key = (weights, str(device))
    with _model_lock:
        if key not in _loaded_model:
            # One model per device (a worker using two GPUs keeps one on each): drop another model on
            # this device before building (ViT-L/14 holds 1.7 GB).
            for stale in [other for other in _loaded_model if other[1] == str(device)]:
                del _loaded_model[stale]
            _loaded_model[key] = build_clip_model(weights, device)
        model, transform = _loaded_model[key]
    return ClipEmbedder(weights, model, transform, device, batch_size, autocast, forward)


def unload_clip_models() -> None:
    """Drop the process's loaded CLIP model (to free its memory; the next `load_clip_embedder` builds it again)."""
    with _model_lock:
        _loaded_model.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class ModelBatch:
    """The transformed images of up to `batch_size` samples (the model's input once `model_input` has run), with every sample read since the previous batch."""

    rows: list[tuple[str | None, str | None]]  # (key, error) of each sample in tar order; error None = it is in `pixels`
    pixels: torch.Tensor | None  # [samples without error, 3, H, W] (uint8 crops from `pixel_step`), pinned for a CUDA model; None when every row is an error
    hashes: list[ImageHashes | None]  # each row's image hashes (None: no image member), in the order of `rows`


def feed_model_batches(
    shards: Sequence[LocationLike],
    transform,
    batch_size: int,
    decode_options: DecodeOptions,
    task_batch_size: int = 100,
    pin_memory: bool = False,
    threads: int | None = None,
    worker_processes: bool = True,
    local_copies: Mapping[str, str] | None = None,
) -> Iterator[ModelBatch]:
    """The host pipeline: tars -> (decode + `transform` in a pool of `threads` workers) -> model batches.

    Each worker decodes a sample and applies `transform` to it (`iter_batches`), so the rate of transformed
    images grows with the workers (default: the CPUs this process may use). The embedding stage passes
    `pixel_step(embedder.transform)` (tasks/models/bounded_transform.py): uint8 crops [3, H, W], which
    `ClipEmbedder.embed_pixels` normalises on its device; any other transform's outputs are stacked as they
    are, as the model's input. A background thread stacks them into batches of `batch_size` across reading
    batches (in pinned memory for a CUDA model, which then copies them without blocking), up to two
    batches ahead. Memory is bounded by the reader's budget plus four model batches (one being filled,
    two waiting, one with the caller).
    """

    def assemble() -> Iterator[ModelBatch]:
        samples = iter_batches(shards, task_batch_size, decode=decode_options, threads=threads,
                               transform=transform, worker_processes=worker_processes, local_copies=local_copies)
        rows: list[tuple[str | None, str | None]] = []
        hashes: list[ImageHashes | None] = []
        inputs: list[torch.Tensor] = []
        try:
            for batch in samples:
                for sample in batch:
                    error = error_of(sample)
                    rows.append((sample.key, error))
                    hashes.append(sample.image_hashes)
                    if error is None:
                        inputs.append(sample.model_input)
                        if len(inputs) == batch_size:
                            yield ModelBatch(rows, _stacked(inputs, pin_memory), hashes)
                            rows, hashes, inputs = [], [], []
                del batch
            if rows:
                yield ModelBatch(rows, _stacked(inputs, pin_memory) if inputs else None, hashes)
        finally:
            close_iterator(samples)

    return prefetched(assemble(), _PREFETCH_BATCHES, "model-batches")


def _stacked(inputs: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    out = torch.empty((len(inputs), *inputs[0].shape), dtype=inputs[0].dtype, pin_memory=pin_memory)
    if out.dtype in (torch.uint8, torch.float32, torch.float16, torch.float64) and all(item.is_contiguous() and item.device.type == "cpu" for item in inputs):
        # numpy copies in this thread alone; torch.stack would wake a team of threads to copy 10-40 MB
        np.stack([item.numpy() for item in inputs], out=out.numpy())
        return out
    return torch.stack(inputs, out=out)


def embed_shard(
    shard: LocationLike,
    embedder: ClipEmbedder,
    store: EmbeddingStore,
    decode_options: DecodeOptions,
    task_batch_size: int = 100,
    fingerprint: str | None = None,
    threads: int | None = None,
    local_copy: str | None = None,
) -> str:
    """Embed every decodable image of one shard and write its store entry; returns the entry URL.

    `fingerprint` is the shard's `shard_fingerprint` when the caller already has it (one request fewer on S3);
    `local_copy` the shard's verified copy on this machine (tasks/io/spool.py), read instead of storage.

    One row per sample, including samples that failed to decode (null embedding, `error` set) and
    shard-level damage (key None), each with its image hashes (`embedding_table`'s hash columns). Images are
    released as soon as they are preprocessed and hashed.
    """
    shard = as_location(shard)
    shard_url = shard.url
    fingerprint = fingerprint or shard_fingerprint(shard)
    identity = clip_identity(embedder.weights, decode_options.identity())
    keys: list[str | None] = []
    errors: list[str | None] = []
    hashes: list[ImageHashes | None] = []
    embedded_rows: list[np.ndarray] = []
    local_copies = {shard_url: local_copy} if local_copy is not None else None
    device_counts = None
    if decode_options.on_device:
        from tasks.models.device_feed import DeviceFeedCounts, feed_device_batches
        from tasks.models.device_transform import DeviceTransform

        device_counts = DeviceFeedCounts()
        batches = feed_device_batches([shard], _pixel_transform(embedder), DeviceTransform.of(embedder.weights.preprocess_cfg), embedder.batch_size,
                                      decode_options, embedder.device, device_counts, task_batch_size, threads, local_copies=local_copies)
    else:
        batches = feed_model_batches([shard], pixel_step(embedder.transform), embedder.batch_size, decode_options, task_batch_size,
                                     embedder.device.type == "cuda", threads, local_copies=local_copies)
    with closing(batches):
        for batch, batch_embeddings in embedder.embed_model_batches(batches):
            full = np.full((len(batch.rows), embedder.embedding_dim), np.nan, dtype=np.float32)
            good = np.array([error is None for _, error in batch.rows], dtype=bool)
            assert int(good.sum()) == batch_embeddings.shape[0], "embeddings do not match the decoded samples"
            full[good] = batch_embeddings
            embedded_rows.append(full)
            keys.extend(key for key, _ in batch.rows)
            errors.extend(error for _, error in batch.rows)
            hashes.extend(batch.hashes)
    embeddings = np.concatenate(embedded_rows) if embedded_rows else np.zeros((0, embedder.embedding_dim), np.float32)
    table = embedding_table(keys, shard_url, embeddings, errors, hashes=hashes)
    metadata = dict(identity_record(embedder.weights, decode_options.identity()), precision=embedder.precision)
    if device_counts is not None:
        metadata["device_decode"] = device_counts.record()  # how many images the device decoded, and why the others went to the CPU
    return store.write(identity, shard_url, table, shard_fingerprint=fingerprint, metadata=metadata)


def _pixel_transform(embedder: ClipEmbedder) -> Callable:
    """The CPU path's per-image step to the uint8 crop, for the images the gpu mode decodes on the CPU."""
    from tasks.models.bounded_transform import PixelTransform

    pixels = pixel_step(embedder.transform)
    if not isinstance(pixels, PixelTransform):
        raise UserError(f"decode_mode 'gpu' needs open_clip's own inference transform, and {embedder.weights.model_name} has {embedder.transform!r}; use decode_mode 'exact'.")
    return pixels


def error_of(sample: Sample) -> str | None:
    """Why a sample has no model input (its error, or that it holds no image), or None when it has one."""
    if sample.error is not None:
        return str(sample.error)
    if sample.image is None and sample.model_input is None:
        return "no image in sample"
    return None


def embed_partition(
    shard_urls: Sequence[str],
    stage: "EmbedStage",
    device: str | torch.device | None = None,
    shard_fingerprints: Sequence[str] | None = None,
    shards_in_store: Sequence[bool] | None = None,
    local_copies: Sequence[str | None] | None = None,
) -> list[str]:
    """Entry URLs for a partition's shards (reached as `stage.shard(url)`); embeds (loading CLIP only then) the
    shards the store misses, with the stage's weights, decoding, store and batch sizes.

    `shard_fingerprints`, when given, are the shards' fingerprints already computed by the caller (in order);
    `shards_in_store`, when given, is what the caller's own store lookup found for each shard, so the store
    is not asked again (whoever reads an entry validates it and re-embeds an unusable one); `local_copies`,
    when given, the shards' verified copies on this machine (None: read from storage).
    """
    weights, store, identity = stage.clip_weights, stage.store, stage.embedding_identity
    entry_urls = []
    embedder: ClipEmbedder | None = None
    for index, shard_url in enumerate(shard_urls):
        raise_if_stopped()
        shard = stage.shard(shard_url)
        fingerprint = shard_fingerprints[index] if shard_fingerprints is not None else shard_fingerprint(shard)
        if shards_in_store[index] if shards_in_store is not None else store.has(identity, shard_url, fingerprint, embedding_dim=weights.embedding_dim):
            entry_urls.append(store.entry_url(identity, shard_url, fingerprint))
            continue
        if embedder is None:
            embedder = load_clip_embedder(weights, device, stage.model_inference_batch_size, forward=stage.forward_pass)
        local_copy = local_copies[index] if local_copies is not None else None
        entry_urls.append(embed_shard(shard, embedder, store, stage.decode, stage.task_batch_size, fingerprint, local_copy=local_copy))
    return entry_urls
