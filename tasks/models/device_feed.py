"""The host pipeline of `decode_mode="gpu"`: tars -> header checks and byte batches (CPU) -> decode and transform (device).

    shard-reader thread      tasks/io/read.py `iter_batches(decode=None)`: the tar streamed, samples under the budget
    -> host thread           tasks/io/device_jpeg.py `for_device`: header checks, caption and metadata, MD5 and SHA-1;
                             JPEGs kept as bytes, every other image handed to the exact CPU path's decoders at once
    -> device thread         tasks/models/device_decode.py: the batch's JPEGs decoded, hashed (PDQ) and cropped on the
                             device (on its own CUDA stream); an image the device refuses sent to the CPU path's decoders
    -> the model             `ModelBatch`es of uint8 crops on the device, normalised with the model (tasks/models/embed.py)

Every sample keeps exactly one row, in tar order: device-decoded, CPU-decoded (a fallback, its reason counted in
`DeviceFeedCounts`) or an error with the CPU path's own sentence. A model batch holds at most `batch_size` images;
memory is the reader's budget, host batches of at most `batch_size` images and the reader's batch budget of raw bytes
(`ReadLimits.batch_bytes`; two waiting, one on the device, one being filled), and on the device one decoder call's pixels
(tasks/models/device_decode.py `DECODED_BYTES_PER_CALL`) plus the crops of three model batches.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from tasks.io.decode import DecodeOptions, hash_sample
from tasks.io.decode_dispatch import BatchDecoder, PendingSample
from tasks.io.device_jpeg import FALLBACK_DEVICE_REFUSED, DeviceJpeg, for_device
from tasks.io.limits import DEFAULT_BATCH_BYTES
from tasks.io.locations import LocationLike
from tasks.io.prefetch import close_iterator, prefetched
from tasks.io.read import default_threads, iter_batches
from tasks.io.samples import ImageHashes, Sample
from tasks.models.device_decode import device_inputs
from tasks.models.device_transform import DeviceTransform

_PREFETCH_BATCHES = 2


@dataclass
class DeviceFeedCounts:
    """How a gpu-mode reading decoded its images: on the device, or on the CPU path and why (thread-safe counts)."""

    on_device: int = 0
    fallbacks: Counter = field(default_factory=Counter)  # FALLBACK_* reason -> images decoded on the CPU path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, on_device: int = 0, fallback: str | None = None) -> None:
        with self._lock:
            self.on_device += on_device
            if fallback is not None:
                self.fallbacks[fallback] += 1

    def record(self) -> dict:
        """The counts as an entry's metadata holds them."""
        with self._lock:
            return {"on_device": self.on_device, "fallbacks": dict(sorted(self.fallbacks.items()))}


@dataclass
class _Row:
    """One sample of a host batch: its JPEG for the device, its CPU decoding, or neither (an error, nothing to decode)."""

    sample: Sample
    jpeg: DeviceJpeg | None = None
    on_cpu: PendingSample | None = None
    pixels: torch.Tensor | None = None  # uint8 [3, S, S], set once decoded


def feed_device_batches(
    shards: Sequence[LocationLike],
    pixel_transform: Callable,
    device_transform: DeviceTransform,
    batch_size: int,
    decode_options: DecodeOptions,
    device: torch.device,
    counts: DeviceFeedCounts | None = None,
    task_batch_size: int = 100,
    threads: int | None = None,
    worker_processes: bool = True,
    local_copies: Mapping[str, str] | None = None,
):
    """Model batches of uint8 crops on `device` for the shards, decoded as the module docstring says (`ModelBatch`es).

    `pixel_transform` is the CPU path's transform to the same uint8 crop (fallbacks); `device_transform` the
    device's (tasks/models/device_transform.py); `counts` is filled as images are decoded.
    """
    from tasks.models.embed import ModelBatch, error_of

    counts = counts if counts is not None else DeviceFeedCounts()
    cpu_options = dataclasses.replace(decode_options, on_device=False)  # what the CPU path does with a fallback

    def on_device(rows: list[_Row], decoder: BatchDecoder, refused: BatchDecoder) -> None:
        """The rows decoded: JPEGs on the device (those it refuses by the CPU path's decoders, `refused`: this thread's
        own, with the worker processes' deadline), the others by the CPU path's decoders the host thread fed."""
        jpeg_rows = [row for row in rows if row.jpeg is not None]
        for row, decoded in zip(jpeg_rows, device_inputs([row.jpeg for row in jpeg_rows], device_transform, device)):
            sample = row.sample
            if decoded is None:
                counts.add(fallback=FALLBACK_DEVICE_REFUSED)
                row.on_cpu = refused.submit(refused.check(sample))
                continue
            counts.add(on_device=1)
            row.pixels = decoded.pixels
            hashes = sample.image_hashes
            if hashes is not None:
                sample.image_hashes = ImageHashes(hashes.md5, hashes.sha1, *decoded.pdq)
        for row in rows:
            if row.on_cpu is not None:
                sample = row.sample = (refused if row.jpeg is not None else decoder).finished(row.on_cpu)
                row.pixels = _as_tensor(sample.model_input) if error_of(sample) is None else None

    def device_batches() -> Iterator[ModelBatch]:
        workers = threads or default_threads()
        decoder = BatchDecoder(cpu_options, pixel_transform, workers, worker_processes)  # fed by the host thread
        refused = BatchDecoder(cpu_options, pixel_transform, workers, worker_processes)  # fed by this one (the same worker processes)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        host = prefetched(host_batches(shards, device_transform.fits, batch_size, cpu_options, decoder, counts, task_batch_size, local_copies),
                          _PREFETCH_BATCHES, "device-host")
        try:
            for rows in host:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    on_device(rows, decoder, refused)
                    batch = _model_batch(rows, device, ModelBatch, error_of)
                if stream is not None:
                    stream.synchronize()  # the model runs on the default stream: the batch is whole before it gets it
                    if batch.pixels is not None:
                        batch.pixels.record_stream(torch.cuda.default_stream(device))  # freed only once the model has read it
                yield batch
        finally:
            close_iterator(host)
            decoder.close()
            refused.close()

    return prefetched(device_batches(), _PREFETCH_BATCHES, "device-decode")


def host_batches(
    shards: Sequence[LocationLike],
    fits: Callable[[int, int], bool],
    batch_size: int,
    cpu_options: DecodeOptions,
    decoder: BatchDecoder,
    counts: DeviceFeedCounts,
    task_batch_size: int = 100,
    local_copies: Mapping[str, str] | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> Iterator[list[_Row]]:
    """The host's whole share of the gpu mode: the tars streamed, each header checked, JPEG bytes batched for the device
    (`batch_size` images a batch, fewer when the batch's raw members pass `batch_bytes`) and every other image handed to
    `decoder` (the exact CPU path) as it is met."""
    samples = iter_batches(shards, task_batch_size, decode=None, local_copies=local_copies)
    rows: list[_Row] = []
    images = held = 0
    try:
        for batch in samples:
            for sample in batch:
                target = for_device(sample, cpu_options, fits)
                if isinstance(target, str):
                    counts.add(fallback=target)
                    rows.append(_Row(sample, on_cpu=decoder.submit(decoder.check(sample))))
                else:
                    hash_sample(sample)  # MD5 and SHA-1 of the bytes; PDQ comes from the device's pixels
                    rows.append(_Row(sample, jpeg=target))
                images += target is not None
                held += sum(len(data) for data in sample.members.values())
                # a batch closes at `batch_size` images, or once its raw bytes (error rows' included) pass the reader's budget
                if images == batch_size or held >= batch_bytes:
                    yield rows
                    rows, images, held = [], 0, 0
        if rows:
            yield rows
    finally:
        close_iterator(samples)


def _as_tensor(model_input: object) -> torch.Tensor:
    return model_input if isinstance(model_input, torch.Tensor) else torch.from_numpy(model_input)


def _model_batch(rows: list[_Row], device: torch.device, model_batch: type, error_of: Callable[[Sample], str | None]):
    """The rows as one ModelBatch: (key, error) and hashes of every row, the crops of those with pixels stacked on `device`."""
    crops = [row.pixels for row in rows if row.pixels is not None]
    pixels = None
    if crops:
        pixels = torch.empty((len(crops), *crops[0].shape), dtype=torch.uint8, device=device)
        for index, crop in enumerate(crops):
            pixels[index].copy_(crop, non_blocking=crop.device.type == "cpu" and crop.is_pinned())
    keyed = [(row.sample.key, None if row.pixels is not None else error_of(row.sample) or "no image in sample") for row in rows]
    return model_batch(keyed, pixels, [row.sample.image_hashes for row in rows])
