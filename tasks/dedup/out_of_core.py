"""The out-of-core near-duplicate search: planning a run's buckets and resolving their links into groups.

A run is planned from the store entries' footers alone (`plan_layout`), searched bucket by bucket
(tasks/dedup/buckets.py, bucket_search.py), then resolved here (`resolve`):

- the float32 rows of every row in a link or a doubt are read from the store, shard by shard, into a
  local scratch file (never all in memory), with the keys of every row;
- every link and every doubt is decided by its exact float64 similarity on those rows, as in the in-memory
  search (groups.py `_verified`), and those that pass are joined in one union-find over canonical
  positions (int64 per compared row), so groups spanning buckets become one;
- the survivor rule is the in-memory one (groups.py `group_survivors`), run on the scratch rows;
- `kept.parquet` is written unit by unit; only the keys of compared rows (Arrow strings, a few bytes
  each) and the duplicates are held.

The work files under `_buckets/` sit in a shared output, so nothing that decides a removal is taken from
them: a pair joins a group only on the store's rows, and keys and skip reasons come from the store entries
(the units' keys files are not read). The work files decide which pairs are looked at, so a changed one can
cost recall, never precision; links that fail their check are reported in one warning.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.dedup.bucket_search import read_links
from tasks.dedup.buckets import PROJECTION_DIM, BucketLayout, num_buckets_for, plan_units, shard_rows, unit_offsets
from tasks.dedup.clusters import default_num_clusters
from tasks.dedup.compute import UnionFind, all_cpu_threads, cosine_rows, parallel_map
from tasks.dedup.groups import DUPLICATE_COLUMNS, SKIPPED_COLUMNS, DedupStats, group_survivors
from tasks.dedup.search import DEFAULT_CLUSTERS_PER_POINT, MISSING_REASON, ZERO_REASON, check_threshold, choose_matmul_dtype, row_validity
from tasks.errors import UserError
from tasks.io.atomic import atomic_output
from tasks.io.locations import Location, LocationLike, as_location, redacted
from tasks.io.write import join_url
from tasks.store.entries import METADATA_KEY, EmbeddingStore

WORK_FOLDER = "_buckets"
DEFAULT_BUCKET_ROWS = 250_000
DEFAULT_UNIT_ROWS = 20_000
# The in-memory search peaks at about this many bytes per row and dimension (5.2 GB at 1M x 768).
IN_MEMORY_BYTES_PER_VALUE = 7
# `auto` searches in memory while that peak stays under this share of the machine's memory.
IN_MEMORY_SHARE = 0.5
# Doubts verified at once (two [rows, D] float64 arrays).
_VERIFY_ROWS = 4096


class RefusedLinksWarning(UserWarning):
    """Links of the bucket files whose exact similarity on the store's rows is below the threshold."""


@dataclass(frozen=True)
class ShardKeys:
    """A shard's keyed rows as the store holds them, sorted by key: compared rows and skipped rows."""

    compared: pa.Array  # string: keys of the rows with a valid embedding, in canonical order
    skipped: list[str]  # keys of the rows without one
    skipped_reason: np.ndarray  # int8: 1 missing or non-finite, 2 all zeros (row_validity's codes)


@dataclass(frozen=True)
class EntrySizes:
    rows: list[int]
    dim: int


@dataclass(frozen=True)
class OutOfCoreResult:
    duplicates: pd.DataFrame
    skipped: pd.DataFrame
    kept_rows: int
    kept_url: str
    stats: DedupStats


def entry_sizes(store: EmbeddingStore, identity: str, shard_urls: list[str], fingerprints: list[str]) -> EntrySizes:
    """Rows of each shard's store entry and the embedding dimension, from the entries' footers."""
    rows, dims = [], set()
    for url, fingerprint in zip(shard_urls, fingerprints):
        entry = store.entry_url(identity, url, fingerprint)
        fs, path = store.location.at(entry).filesystem()
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            try:
                dims.add(int(json.loads(parquet.schema_arrow.metadata[METADATA_KEY])["embedding_dim"]))
            except (KeyError, TypeError, ValueError) as error:
                raise UserError(f"the store entry {redacted(entry)} has no readable embedding_dim; run the filter flow again to rewrite it.") from error
            rows.append(int(parquet.metadata.num_rows))
    if len(dims) > 1:
        raise UserError(f"the store entries of these shards have embeddings of several dimensions ({sorted(dims)}); pass one model's embeddings.")
    return EntrySizes(rows, dims.pop() if dims else 0)


def default_in_memory_max_rows(dim: int, memory_bytes: int | None = None) -> int:
    """The most rows `auto` searches in memory: the in-memory peak within `IN_MEMORY_SHARE` of the memory."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(IN_MEMORY_SHARE * memory_bytes / (IN_MEMORY_BYTES_PER_VALUE * max(1, dim)))


def plan_layout(
    work: LocationLike,
    identity: str,
    shard_urls: list[str],
    fingerprints: list[str],
    sizes: EntrySizes,
    *,
    similarity_threshold: float,
    bucket_rows: int = DEFAULT_BUCKET_ROWS,
    unit_rows: int = DEFAULT_UNIT_ROWS,
    clusters_per_point: int = DEFAULT_CLUSTERS_PER_POINT,
    num_clusters: int | None = None,
    seed: int = 0,
) -> BucketLayout:
    """The buckets of a run over `shard_urls` (any order; the layout sorts them), its files under `work`."""
    if bucket_rows < 2:
        raise UserError(f"bucket_rows must be at least 2, got {bucket_rows!r}; the default is {DEFAULT_BUCKET_ROWS}.")
    order = sorted(range(len(shard_urls)), key=shard_urls.__getitem__)
    rows = [sizes.rows[index] for index in order]
    total = sum(rows)
    clusters = num_clusters or default_num_clusters(total, clusters_per_point)
    per_point = min(clusters_per_point, clusters)
    return BucketLayout(
        work=as_location(work),
        identity=identity,
        shard_urls=tuple(shard_urls[index] for index in order),
        shard_fingerprints=tuple(fingerprints[index] for index in order),
        units=plan_units(rows, unit_rows),
        dim=sizes.dim,
        num_clusters=clusters,
        clusters_per_point=per_point,
        num_buckets=num_buckets_for(total, per_point, clusters, bucket_rows),
        similarity_threshold=check_threshold(similarity_threshold),
        matmul_dtype=str(choose_matmul_dtype("auto", torch.device("cpu"))).removeprefix("torch."),
        seed=seed,
        projection_dim=min(PROJECTION_DIM, sizes.dim),
    )


class _ScratchRows:
    """Float32 rows of chosen positions in a local file (slot by slot), read back as `RowSource.exact_rows` does."""

    def __init__(self, handle, slot: np.ndarray, dim: int) -> None:
        self.handle, self.slot, self._dim = handle, slot, dim

    @property
    def dim(self) -> int:
        return self._dim

    def exact_rows(self, positions: np.ndarray) -> np.ndarray:
        """Rows at canonical positions as float64: one read per run of consecutive slots."""
        index = self.slot[positions]
        order = np.argsort(index, kind="stable")
        wanted = index[order]
        rows = np.empty((index.shape[0], self._dim), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(wanted) > 1) + 1
        row_bytes = self._dim * 4
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, wanted.shape[0]]):
            low, high = int(wanted[start]), int(wanted[stop - 1]) + 1
            data = os.pread(self.handle.fileno(), (high - low) * row_bytes, low * row_bytes)
            rows[order[start:stop]] = np.frombuffer(data, dtype=np.float32).reshape(high - low, self._dim)[wanted[start:stop] - low]
        return rows.astype(np.float64)

    def exact_similarity(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        similarity = np.empty(first.shape[0], dtype=np.float64)
        for start in range(0, first.shape[0], _VERIFY_ROWS):
            similarity[start : start + _VERIFY_ROWS] = cosine_rows(self.exact_rows(first[start : start + _VERIFY_ROWS]),
                                                                   self.exact_rows(second[start : start + _VERIFY_ROWS]))
        return similarity


def _write_rows(handle, slot_index: np.ndarray, rows: np.ndarray) -> None:
    """Write `rows` at their slots, one write per run of consecutive slots."""
    order = np.argsort(slot_index, kind="stable")
    slot_index, rows = slot_index[order], rows[order]
    breaks = np.flatnonzero(np.diff(slot_index) != 1) + 1
    row_bytes = rows.shape[1] * 4
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, slot_index.shape[0]]):
        os.pwrite(handle.fileno(), np.ascontiguousarray(rows[start:stop], dtype=np.float32).tobytes(), int(slot_index[start]) * row_bytes)


def _copy_store_rows(store: EmbeddingStore, layout: BucketLayout, offsets: np.ndarray, slot: np.ndarray, handle) -> list[ShardKeys]:
    """The store's float32 rows at every position with a slot, written at their slots, and every shard's keys
    (shard by shard; the next shards are read and decoded by other threads meanwhile)."""
    def read_shard(shard: int) -> tuple[ShardKeys, np.ndarray]:
        keys, embeddings = shard_rows(store, layout, shard)
        reason = row_validity(embeddings)[1]
        compared = reason == 0
        names = pa.array(keys, pa.string())
        found = ShardKeys(names.filter(pa.array(compared)), names.filter(pa.array(~compared)).to_pylist(), reason[~compared].astype(np.int8))
        return found, embeddings[compared]

    shard_keys: list[ShardKeys] = []
    with closing(parallel_map(read_shard, range(len(layout.shard_urls)), torch.device("cpu"))) as read:
        for unit, (start, stop) in enumerate(layout.units):
            position = int(offsets[unit])
            for _ in range(start, stop):
                keys, embeddings = next(read)
                shard_keys.append(keys)
                slots = slot[position : position + embeddings.shape[0]]
                chosen = slots >= 0
                if chosen.any():
                    _write_rows(handle, slots[chosen], embeddings[chosen])
                position += embeddings.shape[0]
            if position != offsets[unit + 1]:
                raise UserError(f"the store entries of unit {unit} changed since its rows were assigned; delete "
                                f"{redacted(layout.work_url)} and run again.")
    return shard_keys


def _distinct_pairs(parts: list[np.ndarray]) -> np.ndarray:
    """Pairs [n, 2] without repeats (a pair may be in several buckets), sorted."""
    return np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 2), np.int64)


def _strings(values) -> pd.Series:
    """A string column typed as the in-memory search's (so even empty frames are written alike)."""
    return pd.Series(np.asarray(values, dtype=object), dtype="str")


def resolve(store: EmbeddingStore, layout: BucketLayout, output: Location) -> OutOfCoreResult:
    """Groups across all buckets (links and doubts verified on the store's rows), their survivors, and
    `kept.parquet` (written here, unit by unit); keys from the store entries."""
    started = time.perf_counter()
    offsets = unit_offsets(layout)
    num_positions = int(offsets[-1])
    totals = {"comparisons": 0, "candidates": 0, "verified": 0, "largest_leaf": 0, "split_clusters": 0}
    link_parts: list[np.ndarray] = []
    doubt_parts: list[np.ndarray] = []
    for bucket in range(layout.num_buckets):
        links = read_links(layout, bucket, num_positions)
        link_parts.append(np.stack([links.link_first, links.link_second], axis=1))
        doubt_parts.append(np.stack([links.doubt_first, links.doubt_second], axis=1))
        for name in totals:
            totals[name] = max(totals[name], links.counters[name]) if name == "largest_leaf" else totals[name] + links.counters[name]
    link, doubt = _distinct_pairs(link_parts), _distinct_pairs(doubt_parts)
    del link_parts, doubt_parts
    needed = np.zeros(num_positions, dtype=bool)
    needed[link.reshape(-1)] = True
    needed[doubt.reshape(-1)] = True
    slot = np.full(num_positions, -1, dtype=np.int64)
    slot[needed] = np.arange(int(needed.sum()))
    components = UnionFind(num_positions)
    with tempfile.TemporaryFile() as scratch:
        scratch.truncate(int(needed.sum()) * layout.dim * 4)
        del needed
        shard_keys = _copy_store_rows(store, layout, offsets, slot, scratch)
        rows = _ScratchRows(scratch, slot, layout.dim)
        with all_cpu_threads():
            # links are read from a shared output's work files: each joins its pair only on the store's rows
            confirmed = rows.exact_similarity(link[:, 0], link[:, 1]) >= layout.similarity_threshold
            components.union(link[confirmed, 0], link[confirmed, 1])
            doubt = doubt[components.find(doubt[:, 0]) != components.find(doubt[:, 1])]
            passed = rows.exact_similarity(doubt[:, 0], doubt[:, 1]) >= layout.similarity_threshold
            components.union(doubt[passed, 0], doubt[passed, 1])
            totals["verified"] = int(doubt.shape[0])
            roots = components.roots()
            del components
            duplicate, survivor, similarity = group_survivors(rows, roots)
    del slot
    refused = int((~confirmed).sum())
    if refused:
        warnings.warn(f"{refused} of {link.shape[0]} links in {redacted(join_url(layout.work_url, 'links'))} failed their exact check on "
                      f"the store's rows and joined nothing; a links file there was changed or is damaged.", RefusedLinksWarning, stacklevel=2)
    groups = int(np.unique(roots[survivor]).shape[0]) if survivor.shape[0] else 0
    del roots

    # identifiers: the compared rows' keys (Arrow strings) and shard indices, in canonical order, from the store
    shard_names = np.array(layout.shard_urls, dtype=object)
    all_keys = pa.chunked_array([keys.compared for keys in shard_keys], type=pa.string()).combine_chunks()
    all_shards = np.repeat(np.arange(len(shard_keys), dtype=np.int32), [len(keys.compared) for keys in shard_keys])
    is_duplicate = np.zeros(num_positions, dtype=bool)
    is_duplicate[duplicate] = True
    kept_url = join_url(output.url, "kept.parquet")
    kept_schema = pa.schema([("key", pa.string()), ("shard", pa.string())])
    kept_rows = 0
    with atomic_output(output.at(kept_url)) as handle, pq.ParquetWriter(handle, kept_schema) as kept_writer:
        for unit in range(len(layout.units)):
            kept = np.flatnonzero(~is_duplicate[offsets[unit] : offsets[unit + 1]]) + offsets[unit]
            kept_writer.write_table(pa.table({"key": all_keys.take(pa.array(kept)),
                                              "shard": pa.array(shard_names[all_shards[kept]], pa.string())}, schema=kept_schema))
            kept_rows += int(kept.shape[0])
    del is_duplicate
    duplicates = pd.DataFrame({
        "key": _strings(all_keys.take(pa.array(duplicate)).to_pylist()),
        "shard": _strings(shard_names[all_shards[duplicate]]),
        "duplicate_of": _strings(all_keys.take(pa.array(survivor)).to_pylist()),
        "duplicate_of_shard": _strings(shard_names[all_shards[survivor]]),
        "similarity": similarity,
    }, columns=DUPLICATE_COLUMNS)
    skipped_shards = np.repeat(np.arange(len(shard_keys), dtype=np.int32), [len(keys.skipped) for keys in shard_keys])
    skipped_reason = np.concatenate([keys.skipped_reason for keys in shard_keys]) if shard_keys else np.zeros(0, np.int8)
    skipped = pd.DataFrame({
        "key": _strings([key for keys in shard_keys for key in keys.skipped]),
        "shard": _strings(shard_names[skipped_shards]),
        "reason": np.where(skipped_reason == 1, MISSING_REASON, ZERO_REASON).astype(object),
    }, columns=SKIPPED_COLUMNS)
    stats = DedupStats(
        method="out-of-core",
        rows=num_positions + int(skipped_shards.shape[0]),
        compared_rows=num_positions,
        skipped_rows=int(skipped_shards.shape[0]),
        groups=groups,
        duplicates=int(duplicate.shape[0]),
        similarity_threshold=layout.similarity_threshold,
        num_clusters=layout.num_clusters,
        clusters_per_point=layout.clusters_per_point,
        matmul_dtype=layout.matmul_dtype,
        device="cpu",
        seconds={"resolve": time.perf_counter() - started},
        **totals,
    )
    return OutOfCoreResult(duplicates=duplicates, skipped=skipped, kept_rows=kept_rows, kept_url=kept_url, stats=stats)


def remove_work(layout: BucketLayout) -> None:
    """Delete the run's bucket files once its outputs are written."""
    fs, path = layout.work.filesystem()
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
