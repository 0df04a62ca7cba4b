"""Search one cluster bucket: all pairs within each of its clusters, verified exactly, written as links.

A bucket's rows come from `tasks/dedup/buckets.py`. Each of its clusters is screened all-pairs (an
oversized one is split by k-means first, as in the in-memory search) and candidates are verified in
float64 exactly as there (tasks/dedup/search.py, groups.py). The bucket's groups are written to
`links/bucket-NNNNNN.parquet` as one row per member of a local group: its canonical position, the
position it is linked to (the local group's smallest) and its float32 row, which the resolution needs
to choose survivors without reading the dataset again. The file appears whole or not at all, so a
re-run after a crash searches only the buckets without one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

from tasks.dedup.buckets import (
    BucketLayout,
    _damaged,
    _embedding_column,
    _int_column,
    _record_of,
    _with_record,
    _write_table,
    check_unit_rows,
    embeddings_of,
    open_parquet,
    read_bucket,
    unit_offsets,
)
from tasks.dedup.clusters import _SPLIT_FACTOR, _split
from tasks.dedup.compute import UnionFind, all_cpu_threads
from tasks.dedup.groups import _link_block
from tasks.dedup.search import DEFAULT_BLOCK_ENTRIES, RowSource, SearchCounters, _Screen, _screen_sets, plan_search, row_validity

COUNTER_NAMES = ("rows", "comparisons", "candidates", "verified", "largest_leaf", "split_clusters")


@dataclasses.dataclass(frozen=True)
class BucketLinks:
    position: np.ndarray  # int64 [n]: a member of a local group
    link: np.ndarray  # int64 [n]: the smallest position of its local group
    embeddings: np.ndarray  # float32 [n, D]
    counters: dict[str, int]


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
    plan = dataclasses.replace(
        plan_search(max(num_rows, 1), layout.dim, similarity_threshold=layout.similarity_threshold, method="exact",
                    matmul_dtype=layout.matmul_dtype, device="cpu"),
        method="clustered", num_clusters=layout.num_clusters, clusters_per_point=layout.clusters_per_point,
    )
    inverse_norm, _ = row_validity(rows.embeddings)
    source = RowSource(rows.embeddings, np.arange(num_rows, dtype=np.int64), inverse_norm, plan)
    total_rows = int(offsets[-1])
    target = max(2, math.ceil(layout.clusters_per_point * total_rows / layout.num_clusters))
    components = UnionFind(num_rows)
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
            counters.verified += _link_block(components, source, block, plan)
    roots = components.roots()
    grouped = np.flatnonzero(np.bincount(roots, minlength=num_rows)[roots] >= 2)
    record = {
        "layout": layout.fingerprint(),
        "bucket": bucket,
        "counters": {"rows": num_rows, "comparisons": counters.comparisons, "candidates": counters.candidates,
                     "verified": counters.verified, "largest_leaf": counters.largest_leaf, "split_clusters": counters.split_clusters},
    }
    table = pa.table({
        "position": pa.array(rows.positions[grouped]),
        "link": pa.array(rows.positions[roots[grouped]]),
        "embedding": _embedding_column(rows.embeddings[grouped]),
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
    embeddings = embeddings_of(url, table, layout.dim)
    check_unit_rows(url, embeddings)
    if np.any(link > position):
        raise _damaged(url, "a link points to a later position")
    return BucketLinks(position, link, embeddings, {name: found[name] for name in COUNTER_NAMES})
