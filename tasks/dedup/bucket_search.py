"""Search one cluster bucket: all pairs within each of its clusters screened, written as links and doubts.

A bucket's rows come from `tasks/dedup/buckets.py` (unit length, rounded to float16). Each of its
clusters is screened all-pairs (an oversized one is split by k-means first, as in the in-memory search)
with a margin that covers the float16 rounding as well as the products' (`bucket_screen_margin`):

- a pair screened at or above threshold + margin is certainly a near-duplicate: it becomes a *link*;
- a pair within the margin of the threshold is a *doubt*: its exact similarity needs the float32 rows,
  which the resolution reads from the store (tasks/dedup/out_of_core.py), as the in-memory search verifies;
- everything else is certainly below the threshold.

`links/bucket-NNNNNN.parquet` holds one row per pair, its larger and smaller canonical position: the links
(`kind` 0), a spanning forest of the certain pairs (one fewer than members per local group, each a pair the
resolution checks again on the store's rows, so a link added to the file cannot join rows below the
threshold), and each doubt not already joined by them (`kind` 1). The file appears whole or not at all,
so a re-run after a crash searches only the buckets without one.
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
from tasks.dedup.clusters import SPLIT_FACTOR, split_cluster
from tasks.dedup.compute import UnionFind, all_cpu_threads
from tasks.dedup.search import DEFAULT_BLOCK_ENTRIES, BlockScreen, RowSource, SearchCounters, plan_search, row_validity, screen_margin, screen_sets

LINK, DOUBT = 0, 1
# What a links file's rows mean, in its record: files of another meaning are searched again.
LINKS_FORMAT = "spanning pairs"

COUNTER_NAMES = ("rows", "comparisons", "candidates", "verified", "largest_leaf", "split_clusters")


@dataclasses.dataclass(frozen=True)
class BucketLinks:
    link_first: np.ndarray  # int64 [n]: pairs (first < second) screened certainly at or above the threshold
    link_second: np.ndarray
    doubt_first: np.ndarray  # int64 [m]: pairs (first < second) to verify exactly
    doubt_second: np.ndarray
    counters: dict[str, int]


def bucket_screen_margin(matmul_dtype: torch.dtype, dim: int) -> float:
    """A bound on |screened - exact| cosine for bucket rows: unit rows rounded to float16 (each off its exact
    direction by at most 2u after re-normalising, u = 2^-11, so a product by 4u + 4u^2), then the products'
    own margin in `matmul_dtype`."""
    unit_roundoff = float(np.finfo(np.dtype(BUCKET_ROW_DTYPE)).eps) / 2
    return 1.25 * (4 * unit_roundoff + 4 * unit_roundoff**2) + screen_margin(matmul_dtype, dim)


def _links_record(url: str, parquet, layout: BucketLayout) -> dict | None:
    """The links file's record when it was written for this layout in this format, else None."""
    record = None if parquet is None else _record_of(url, parquet.schema_arrow, layout)
    return record if record is not None and record.get("format") == LINKS_FORMAT else None


def links_done(layout: BucketLayout, bucket: int) -> bool:
    url = layout.links_url(bucket)
    return _links_record(url, open_parquet(layout.at(url)), layout) is not None


def search_bucket(layout: BucketLayout, bucket: int, *, block_entries: int = DEFAULT_BLOCK_ENTRIES) -> str:
    """Search the bucket and write its links (kept when already written for this layout)."""
    url = layout.links_url(bucket)
    if links_done(layout, bucket):
        return url
    offsets = unit_offsets(layout)
    rows = read_bucket(layout, bucket, offsets)
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
    links_first: list[np.ndarray] = []
    links_second: list[np.ndarray] = []
    doubts_first: list[np.ndarray] = []
    doubts_second: list[np.ndarray] = []
    certain_threshold = plan.similarity_threshold + plan.screen_margin
    with all_cpu_threads():
        leaves: list[np.ndarray] = []
        for cluster, members in zip(rows.clusters, rows.members):
            if members.shape[0] > SPLIT_FACTOR * target:
                counters.split_clusters += 1
                leaves.extend(split_cluster(source.screen_rows, members, target, layout.clusters_per_point, layout.seed, (int(cluster),)))
            elif members.shape[0] >= 2:
                leaves.append(members)
        screen = BlockScreen(plan, block_entries, links_only=True)
        for block in screen_sets(source, leaves, screen, counters):
            counters.candidates += int(block.first.shape[0])
            certain = block.screen_similarity >= certain_threshold
            for first, second in ((block.linked_first, block.linked_second), (block.first[certain], block.second[certain])):
                joined = components.union_edges(first, second)  # only the pairs that join: a spanning forest
                links_first.append(first[joined])
                links_second.append(second[joined])
            doubts_first.append(block.first[~certain])
            doubts_second.append(block.second[~certain])
    roots = components.roots()
    link_first = np.concatenate(links_first) if links_first else np.zeros(0, np.int64)
    link_second = np.concatenate(links_second) if links_second else np.zeros(0, np.int64)
    doubt_first = np.concatenate(doubts_first) if doubts_first else np.zeros(0, np.int64)
    doubt_second = np.concatenate(doubts_second) if doubts_second else np.zeros(0, np.int64)
    apart = roots[doubt_first] != roots[doubt_second]  # doubts the links already settled need no exact check
    doubt_first, doubt_second = np.unique(np.stack([doubt_first[apart], doubt_second[apart]], axis=1), axis=0).T.reshape(2, -1)
    counters.verified = int(doubt_first.shape[0])
    record = {
        "layout": layout.fingerprint(),
        "format": LINKS_FORMAT,
        "bucket": bucket,
        "counters": {"rows": num_rows, "comparisons": counters.comparisons, "candidates": counters.candidates,
                     "verified": counters.verified, "largest_leaf": counters.largest_leaf, "split_clusters": counters.split_clusters},
    }
    first = rows.positions[np.concatenate([link_first, doubt_first])]
    second = rows.positions[np.concatenate([link_second, doubt_second])]
    table = pa.table({
        "position": pa.array(np.maximum(first, second)),
        "link": pa.array(np.minimum(first, second)),
        "kind": pa.array(np.r_[np.full(link_first.shape[0], LINK, np.int8), np.full(doubt_first.shape[0], DOUBT, np.int8)]),
    })
    return _write_table(layout.at(url), _with_record(table, record))


def read_links(layout: BucketLayout, bucket: int, num_positions: int) -> BucketLinks:
    """The bucket's links and doubts, validated (their similarities are the resolution's to check)."""
    url = layout.links_url(bucket)
    parquet = open_parquet(layout.at(url))
    record = _links_record(url, parquet, layout)
    if record is None:
        raise _damaged(url, "missing or written for another run")
    found = record.get("counters")
    if not isinstance(found, dict) or any(not isinstance(found.get(name), int) for name in COUNTER_NAMES):
        raise _damaged(url, "counters are not counts")
    table = parquet.read()
    position = _int_column(url, table, "position", 0, num_positions)
    link = _int_column(url, table, "link", 0, num_positions)
    kind = _int_column(url, table, "kind", LINK, DOUBT + 1)
    if np.any(link >= position):
        raise _damaged(url, "a pair's first position is not below its second")
    doubt = kind == DOUBT
    return BucketLinks(link[~doubt], position[~doubt], link[doubt], position[doubt], {name: found[name] for name in COUNTER_NAMES})
