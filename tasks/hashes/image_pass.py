"""Image hashes for a shard embedded before images were hashed: its images decoded once, the columns added to its entry.

The embedding pass hashes every image it decodes and keeps the hashes in the shard's store entry
(tasks/store/entries.py, `HASH_COLUMNS`). An entry written before that has none (`entry_hashes` is None for
it); for such a shard:

- `hash_shard(shard, decode)` reads the shard through the product's reader (`iter_samples`), so the sample
  budget, the header limits (pixels, JPEG scans) and the JSON limits apply exactly as in the embedding pass,
  decodes each image once with the `DecodeOptions` the entry's embedding used (its identity names them) and
  hashes it as that pass does (`tasks.io.decode.hash_sample`): the same pixels, so the same PDQ. It decodes
  in the calling thread, so there is no per-image deadline (as when the reader decodes in threads).
- `with_hashes(table, hashes)` gives the entry's table with the hash columns added; the caller (the filter
  stage) writes it with `EmbeddingStore.write`, which signs the new columns when a store key is set.

Nothing here logs or prints a hash.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pyarrow as pa

from tasks.io.decode import DecodeOptions, hash_sample
from tasks.io.locations import Location
from tasks.io.read import decode_sample, iter_samples
from tasks.io.samples import ImageHashes
from tasks.store.entries import keys_mismatch, with_hash_columns


def hash_shard(
    shard: Location, decode: DecodeOptions, local_copy: str | None = None, undecodable: Collection[str] = ()
) -> list[tuple[str | None, ImageHashes | None]]:
    """(key, hashes) of every sample of the shard in tar order, as the embedding pass computes them with `decode`.

    `local_copy` is the shard's verified copy on this machine (tasks/io/spool.py), read instead of storage.
    `undecodable` are the keys whose entry rows carry an error (a decoder crash, a deadline, a corrupt image): their
    bytes are hashed (MD5, SHA-1) but their pixels are not decoded again here, where no worker process or deadline
    guards the decoder. A sample without an image member, and the shard-level record of a damaged tar (key None), get None.
    """
    hashes = []
    for sample in iter_samples(shard, decode=None, local_copy=local_copy):
        if sample.key is not None and sample.error is None and sample.key not in undecodable:
            sample = decode_sample(sample, decode)
        hashes.append((sample.key, hash_sample(sample).image_hashes))
        sample.image = None  # each decoded image is dropped as soon as it is hashed: only the hashes are kept
    return hashes


def with_hashes(table: pa.Table, hashes: Sequence[tuple[str | None, ImageHashes | None]]) -> pa.Table:
    """The entry's table with its hash columns set from `hash_shard`'s result (ValueError unless its keys are the entry's, in order)."""
    problem = keys_mismatch(table.column("key").to_pylist(), [key for key, _ in hashes])
    if problem is not None:
        raise ValueError(f"the hashes are not of this entry's samples: {problem}")
    return with_hash_columns(table, [row_hashes for _, row_hashes in hashes])
