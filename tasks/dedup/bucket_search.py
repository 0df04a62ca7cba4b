"""Search one cluster bucket: all pairs within each of its clusters screened, written as links and doubts.

A bucket's rows come from `tasks/dedup/buckets.py` (unit length, rounded to float16). Each of its
clusters is screened all-pairs (an oversized one is split by k-means first, as in the in-memory search)
with a margin that covers the float16 rounding as well as the products' (`bucket_screen_margin`):

- a pair screened at or above threshold + margin is certainly a near-duplicate: it becomes a *link*;
- a pair within the margin of the threshold is a *doubt*: its exact similarity needs the float32 rows,
  which the resolution reads from the store (tasks/dedup/out_of_core.py), as the in-memory search verifies;
- everything else is certainly below the threshold.

`links/bucket-NNNNNN.parquet` holds one row per member of a local group joined by links (its canonical
position and the local group's smallest, `kind` 0) and one per doubt not already joined (the pair's
larger and smaller position, `kind` 1). The file appears whole or not at all, so a re-run after a crash
searches only the buckets without one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

import torch

from tasks.dedup.buckets import (
    BUCKET_ROW_DTYPE,
    BucketLayout,
    _damaged,
    _int_column,
    _record_of,
    _with_record,
    _write_table,
    open_parquet,
    read_bucket,
    unit_offsets,
)
from tasks.dedup.clusters import _SPLIT_FACTOR, _split
from tasks.dedup.compute import UnionFind, all_cpu_threads
from tasks.dedup.search import DEFAULT_BLOCK_ENTRIES, RowSource, SearchCounters, _Screen, _screen_sets, plan_search, row_validity, screen_margin

LINK, DOUBT = 0, 1

COUNTER_NAMES = ("rows", "comparisons", "candidates", "verified", "largest_leaf", "split_clusters")


@dataclasses.dataclass(frozen=True)
class BucketLinks:
    position: np.ndarray  # int64 [n]: a member of a local group
    link: np.ndarray  # int64 [n]: the smallest position of its local group
    doubt_first: np.ndarray  # int64 [m]: pairs (first < second) to verify exactly
    doubt_second: np.ndarray
    counters: dict[str, int]


def bucket_screen_margin(matmul_dtype: torch.dtype, dim: int) -> float:
    """A bound on |screened - exact| cosine for bucket rows: unit rows rounded to float16 (each off its exact
    direction by at most 2u after re-normalising, u = 2^-11, so a product by 4u + 4u^2), then the products'
    own margin in `matmul_dtype`."""
    unit_roundoff = float(np.finfo(np.dtype(BUCKET_ROW_DTYPE)).eps) / 2
    return 1.25 * (4 * unit_roundoff + 4 * unit_roundoff**2) + screen_margin(matmul_dtype, dim)


def links_done(layout: BucketLayout, bucket: int, storage_options: dict | None = None) -> bool:
    parquet = open_parquet(layout.links_url(bucket), storage_options)
    return parquet is not None and _record_of(layout.links_url(bucket), parquet.schema_arrow, layout) is not None


def search_bucket(layout: BucketLayout, bucket: int, storage_options: dict | None = None, *, block_entries: int = DEFAULT_BLOCK_ENTRIES) -> str:
    """Search the bucket and write its links (kept when already written for this layout)."""
    url = layout.links_url(bucket)
    if links_done(layout, bucket, storage_options):
        return url
    offsets = unit_offsets(layout, storage_options)
    rows = read_bucket(layout, bucket, offsets, storage_options)
    counters = SearchCounters()
    num_rows = rows.positions.shape[0]
    plan = plan_search(max(num_rows, 1), layout.dim, similarity_threshold=layout.similarity_threshold, method="exact",
                       matmul_dtype=layout.matmul_dtype, device="cpu")
    plan = dataclasses.replace(plan, method="clustered", num_clusters=layout.num_clusters, clusters_per_point=layout.clusters_per_point,
                               screen_margin=bucket_screen_margin(plan.matmul_dtype, layout.dim))
    inverse_norm, _ = row_validity(rows.embeddings)
    source = RowSource(rows.embeddings, np.arange(num_rows, dtype=np.int64), inverse_norm, plan)
    total_rows = int(offsets[-1])
    target = max(2, math.ceil(layout.clusters_per_point * total_rows / layout.num_clusters))
    components = UnionFind(num_rows)
    doubts_first: list[np.ndarray] = []
    doubts_second: list[np.ndarray] = []
    certain_threshold = plan.similarity_threshold + plan.screen_margin
    with all_cpu_threads():
        leaves: list[np.ndarray] = []
        for cluster, members in zip(rows.clusters, rows.members):
            if members.shape[0] > _SPLIT_FACTOR * target:
                counters.split_clusters += 1
                leaves.extend(_split(source.screen_rows, members, target, layout.clusters_per_point, layout.seed, (int(cluster),)))
            elif members.shape[0] >= 2:
                leaves.append(members)
        screen = _Screen(plan, block_entries, links_only=True)
        for block in _screen_sets(source, leaves, screen, counters):
            counters.candidates += int(block.first.shape[0])
            components.union(block.linked_first, block.linked_second)
            certain = block.screen_similarity >= certain_threshold
            components.union(block.first[certain], block.second[certain])
            doubts_first.append(block.first[~certain])
            doubts_second.append(block.second[~certain])
    roots = components.roots()
    grouped = np.flatnonzero(np.bincount(roots, minlength=num_rows)[roots] >= 2)
    doubt_first = np.concatenate(doubts_first) if doubts_first else np.zeros(0, np.int64)
    doubt_second = np.concatenate(doubts_second) if doubts_second else np.zeros(0, np.int64)
    apart = roots[doubt_first] != roots[doubt_second]  # doubts the links already settled need no exact check
    doubt_first, doubt_second = np.unique(np.stack([doubt_first[apart], doubt_second[apart]], axis=1), axis=0).T.reshape(2, -1)
    counters.verified = int(doubt_first.shape[0])
    record = {
        "layout": layout.fingerprint(),
        "bucket": bucket,
        "counters": {"rows": num_rows, "comparisons": counters.comparisons, "candidates": counters.candidates,
                     "verified": counters.verified, "largest_leaf": counters.largest_leaf, "split_clusters": counters.split_clusters},
    }
    # local rows are in ascending position order, so a pair's first is its smaller position
    table = pa.table({
        "position": pa.array(np.concatenate([rows.positions[grouped], rows.positions[doubt_second]])),
        "link": pa.array(np.concatenate([rows.positions[roots[grouped]], rows.positions[doubt_first]])),
        "kind": pa.array(np.r_[np.full(grouped.shape[0], LINK, np.int8), np.full(doubt_first.shape[0], DOUBT, np.int8)]),
    })
    return _write_table(url, _with_record(table, record), storage_options)


def read_links(layout: BucketLayout, bucket: int, num_positions: int, storage_options: dict | None = None) -> BucketLinks:
    """The bucket's links, validated."""
    url = layout.links_url(bucket)
    parquet = open_parquet(url, storage_options)
    record = None if parquet is None else _record_of(url, parquet.schema_arrow, layout)
    if record is None:
        raise _damaged(url, "missing or written for another run")
    found = record.get("counters")
    if not isinstance(found, dict) or any(not isinstance(found.get(name), int) for name in COUNTER_NAMES):
        raise _damaged(url, "counters are not counts")
    table = parquet.read()
    position = _int_column(url, table, "position", 0, num_positions)
    link = _int_column(url, table, "link", 0, num_positions)
    kind = _int_column(url, table, "kind", LINK, DOUBT + 1)
    if np.any(link > position) or np.any((kind == DOUBT) & (link == position)):
        raise _damaged(url, "a link points to a later position")
    doubt = kind == DOUBT
    return BucketLinks(position[~doubt], link[~doubt], link[doubt], position[doubt], {name: found[name] for name in COUNTER_NAMES})
