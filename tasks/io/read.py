"""Stream WebDataset shards into samples: key, raw members, decoded RGB image, caption, metadata, error.

Shards are read through fsspec as a tar *stream* (one member in memory at a time) and grouped by the
WebDataset key rule: the key is the member path up to the first dot of the file name
(`dir/a.seg.png` -> key `dir/a`, extension `seg.png`); a new sample starts whenever the key changes. A
member's format is the last component of its extension, and `image_extension` picks the image of a sample.
Every key in the input comes out as exactly one `Sample` per contiguous run of members; a sample that
cannot be scored carries a one-sentence `error` (and its raw members where they were read), and a
damaged tar ends with one shard-level record (`key=None`) for the part that could not be read.

Resource budget: no sample can cost its neighbours their rows. Each limit below, when exceeded, makes
only that sample an error (one sentence) and reading goes on with the next sample:
- a sample's members hold at most `ReadLimits.sample_bytes` (each member counted with its 512-byte tar
  header); members past the limit are skipped unread, so a zip bomb costs time, never memory;
- an image is checked from its header before any pixel is decoded: at most `DecodeOptions.max_pixels`
  pixels; any aspect ratio is scored (the model's transform resizes only what its centre crop keeps,
  tasks/models/bounded_transform.py, so a 1x100000 banner never becomes 224 x 22,400,000 pixels);
- a JPEG holds at most `MAX_JPEG_SCANS` scans and `MAX_JPEG_SEGMENTS` marker segments, counted by walking its
  markers before any pixel is decoded (each scan re-walks the whole image, so a "scan bomb" of thousands of
  tiny scans would decode for hours);
- in a worker process (tasks/io/decode_workers.py), checking, decoding and transforming one image takes at
  most `DecodeOptions.decode_deadline_s`: past it the worker is killed and replaced. Decoding in threads has
  no deadline (a thread cannot be killed); the header limits above bound it there;
- a `.json` member is parsed only up to `MAX_JSON_BYTES`, `MAX_JSON_DEPTH` levels of nesting and numbers of
  `MAX_JSON_NUMBER_CHARS` characters.
A batch closes early, before `task_batch_size`, when its samples' raw bytes plus what decoding them makes
(the RGB image predicted from the header, the parsed caption and metadata) would exceed
`ReadLimits.batch_bytes`, so memory in flight is bounded whatever the samples hold.

The reader is a chain of stages, each a module with one job, as in webdataset's tariterators
(`url_opener -> tar_file_expander -> group_by_keys -> decode`):
    open_shard -> tar_members          tasks/io/tar_stream.py   the shard's tar members, one at a time, then its damage
    -> group_into_samples              tasks/io/grouping.py     WebDataset samples under the sample budget
    -> decode_sample                   tasks/io/decode.py       header checks, pixels, caption, metadata
and for `iter_batches`, batches closed by count or bytes (tasks/io/limits.py), each sample decoded by
tasks/io/decode_dispatch.py in threads or worker processes. Sample, the format rules and the error text are
tasks/io/samples.py; the JPEG scan walk tasks/io/jpeg_scans.py; the JSON limits tasks/io/metadata.py. This
module holds the entry points and names every public name of those stages that callers import from here.
"""


from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing

from PIL import Image

from tasks.errors import UserError
from tasks.io.decode import (
    DECODE_MODES,
    DEFAULT_DECODE_DEADLINE_S,
    DEFAULT_DECODE_MODE,
    DEFAULT_MAX_PIXELS,
    REDUCED_JPEG_SIZE,
    DecodeOptions,
    finish_decoding,
    open_sample_image,
)
from tasks.io.decode_dispatch import BatchDecoder, PendingSample
from tasks.io.grouping import group_into_samples
from tasks.io.jpeg_scans import MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS
from tasks.io.limits import DEFAULT_BATCH_BYTES, DEFAULT_SAMPLE_BYTES, ReadLimits
from tasks.io.locations import Location, LocationLike, as_location
from tasks.io.metadata import MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_JSON_NUMBER_CHARS
from tasks.io.prefetch import prefetched
from tasks.io.samples import (
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    Sample,
    image_extension,
    image_members,
    member_format,
    member_of_format,
)
from tasks.io.tar_stream import open_shard, tar_members

__all__ = [
    "DECODE_MODES",
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_DECODE_DEADLINE_S",
    "DEFAULT_DECODE_MODE",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SAMPLE_BYTES",
    "IMAGE_EXTENSIONS",
    "MAX_JPEG_SCANS",
    "MAX_JPEG_SEGMENTS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_JSON_NUMBER_CHARS",
    "REDUCED_JPEG_SIZE",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "DecodeOptions",
    "ReadLimits",
    "Sample",
    "decode_sample",
    "image_extension",
    "image_members",
    "iter_batches",
    "iter_samples",
    "member_format",
    "member_of_format",
]


def decode_sample(sample: Sample, options: DecodeOptions) -> Sample:
    """Fill `image`, `caption` and `metadata` of a sample without error (in place; returned for map())."""
    return finish_decoding(sample, open_sample_image(sample, options))


def _raw_samples(shard: Location, limits: ReadLimits, local_copy: str | None) -> Iterator[Sample]:
    """Samples with raw members and structural errors only (no decoding), streaming the tar.

    `local_copy` is a verified copy of the shard on this machine's disk (tasks/io/spool.py), read instead of
    storage; the samples are still the shard's (its URL names them and their errors).
    """
    with open_shard(shard, local_copy) as fileobj:
        yield from group_into_samples(tar_members(fileobj), shard.url, limits.sample_bytes)


def iter_samples(
    shard: LocationLike,
    decode: DecodeOptions | None = DecodeOptions(),
    limits: ReadLimits = ReadLimits(),
    local_copy: str | None = None,
) -> Iterator[Sample]:
    """Every sample of one shard, in tar order; `decode=None` yields raw members only (no image decoding).
    `local_copy`: the shard's verified copy on this machine, read instead of storage."""
    for sample in _raw_samples(as_location(shard), limits, local_copy):
        yield sample if decode is None else decode_sample(sample, decode)


def default_threads() -> int:
    """Decoding workers when the caller names none: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def iter_batches(
    shards: Sequence[LocationLike] | LocationLike,
    task_batch_size: int = 100,
    decode: DecodeOptions | None = DecodeOptions(),
    threads: int | None = None,
    prefetch: int = 2,
    limits: ReadLimits = ReadLimits(),
    transform: Callable[[Image.Image], object] | None = None,
    worker_processes: bool = True,
    local_copies: Mapping[str, str] | None = None,
) -> Iterator[list[Sample]]:
    """Batches of `task_batch_size` samples from the shards in order (a batch may span shards).

    `local_copies` maps a shard URL to its verified copy on this machine (read instead of storage).

    A background thread streams the tars, checks each image's header and hands the decoding to a pool
    of `threads` workers (default: the CPUs this process may use); up to `prefetch` batches wait ready
    while the caller works on the current one. With a `transform` (e.g. open_clip's preprocess) each
    worker also applies it to the image it decoded: samples come with `model_input` set and no `image`,
    so decoding and preprocessing together scale with the workers. Each sample also comes with its
    `image_hashes` (MD5 and SHA-1 of its image member, PDQ of the pixels decoded; tasks/io/decode_dispatch.py),
    computed by the worker that decoded it; `decode=None` leaves them None. With a picklable transform and more
    than one worker, the workers are processes (tasks/io/decode_workers.py; `worker_processes=False`
    keeps them threads), so the interpreter lock does not cap the rate. A batch closes early when its next sample would take it
    over `limits.batch_bytes` (a sample alone may exceed it), so memory is bounded by about
    (prefetch + 2) batches of at most that size, whatever the number of shards or what they hold.
    """
    if isinstance(task_batch_size, bool) or not isinstance(task_batch_size, int) or task_batch_size < 1:
        raise UserError(f"task_batch_size must be a whole number of at least 1, not {task_batch_size!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a whole number of at least 1 or None, not {threads!r}.")
    assert isinstance(prefetch, int) and prefetch >= 1, "prefetch counts batches and must be >= 1"
    shard_locations = [as_location(shards)] if isinstance(shards, (str, Location, os.PathLike)) else [as_location(shard) for shard in shards]
    decoder = BatchDecoder(decode, transform, threads or default_threads(), worker_processes)
    pending_batches = _pending_batches(
        _samples_of_shards(shard_locations, limits, local_copies), decoder, task_batch_size, limits.batch_bytes
    )
    try:
        with closing(prefetched(pending_batches, prefetch, "shard-reader")) as ready:
            for batch in ready:
                yield [decoder.finished(entry) for entry in batch]
    finally:
        decoder.close()


def _samples_of_shards(shards: Sequence[Location], limits: ReadLimits, local_copies: Mapping[str, str] | None) -> Iterator[Sample]:
    """Every shard's raw samples, shard after shard."""
    for shard in shards:
        yield from _raw_samples(shard, limits, (local_copies or {}).get(shard.url))


def _pending_batches(samples: Iterator[Sample], decoder: BatchDecoder, task_batch_size: int, batch_bytes: int) -> Iterator[list[PendingSample]]:
    """Batches of `task_batch_size` entries, closed early before a sample would take one over `batch_bytes`; a sample's
    decoding starts once its batch has room for it."""
    batch: list[PendingSample] = []
    held = 0
    for sample in samples:
        checked = decoder.check(sample)
        if batch and held + checked.held_bytes > batch_bytes:
            yield batch
            batch, held = [], 0
        batch.append(decoder.submit(checked))
        held += checked.held_bytes
        if len(batch) == task_batch_size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch
