"""Near-duplicate groups over cached embeddings: which samples to keep and which duplicate which.

`deduplicate` takes embeddings [N, D] with each row's `key` and `shard`, finds every pair with cosine
similarity >= `similarity_threshold` (see tasks/dedup/search.py), joins pairs into groups (connected
components, so a chain a~b~c is one group even when a and c are not similar) and keeps one member of
each group:

- The survivor is the group's most central member: the highest mean cosine similarity to the group's
  members (computed as the similarity to the sum of their unit vectors). Means within 1e-6 of the best
  are ties, broken by the smallest (shard, key). So in a pair, among exact copies, or whenever the
  embeddings cannot tell members apart, the first by (shard, key) is kept; in a chain, the middle.
- Every other member is a duplicate of the survivor; `similarity` is its cosine similarity to the
  survivor, which is >= the threshold in a pair or a tight group but may be lower at the end of a chain.

Everything runs on a canonical order (rows sorted by (shard, key)), so the result does not depend on
the input order. Rows whose embedding is missing (NaN or inf) or all zeros are skipped, reported, and
never matched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tasks.dedup.search import (
    DEFAULT_BLOCK_ENTRIES,
    DEFAULT_CLUSTERS_PER_POINT,
    DEFAULT_SIMILARITY_THRESHOLD,
    MISSING_REASON,
    ZERO_REASON,
    CandidateBlock,
    MatmulDtype,
    Method,
    RowSource,
    SearchCounters,
    SearchPlan,
    check_embeddings,
    iter_candidates,
    plan_search,
    row_validity,
)
from tasks.dedup.compute import UnionFind, all_cpu_threads, cosine_rows
from tasks.errors import UserError

# Mean similarities closer than this to the group's best count as ties (then the smallest (shard, key) wins).
SURVIVOR_TIE_TOLERANCE = 1e-6
# Group members whose float64 rows are held at once while choosing survivors.
_SURVIVOR_ROWS = 8192

DUPLICATE_COLUMNS = ["key", "shard", "duplicate_of", "duplicate_of_shard", "similarity"]
KEPT_COLUMNS = ["key", "shard"]
SKIPPED_COLUMNS = ["key", "shard", "reason"]
PAIR_COLUMNS = ["key_a", "shard_a", "key_b", "shard_b", "similarity"]


@dataclass(frozen=True)
class DedupStats:
    """A run summary: what was searched, how, and what came out."""

    method: str
    rows: int
    compared_rows: int
    skipped_rows: int
    groups: int
    duplicates: int
    similarity_threshold: float
    num_clusters: int
    clusters_per_point: int
    matmul_dtype: str
    device: str
    comparisons: int
    candidates: int
    verified: int
    largest_leaf: int
    split_clusters: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DedupResult:
    """`duplicates` and `kept` partition the compared rows; `skipped` holds the rows that were not compared.

    All frames are sorted by (shard, key). `pairs` (only with `include_pairs=True`) lists every pair found,
    `(shard_a, key_a) < (shard_b, key_b)`: all pairs at or above the threshold with the exact method; with
    the clustered method those whose rows share a cluster (inside a flood of near-copies spread over many
    clusters, only part of its pairs, though its group is usually whole).
    """

    duplicates: pd.DataFrame
    kept: pd.DataFrame
    skipped: pd.DataFrame
    stats: DedupStats
    pairs: pd.DataFrame | None = None


def _identifier_column(values: object, name: str, num_rows: int) -> np.ndarray:
    try:
        column = pd.Series(values, copy=False)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be a sequence with one {name} per embedding row.") from exc
    if column.ndim != 1 or column.shape[0] != num_rows:
        raise UserError(
            f"{name} has {column.shape[0]} entries but embeddings have {num_rows} rows; pass one {name} per row."
        )
    if column.isna().any():
        first = int(np.flatnonzero(column.isna().to_numpy())[0])
        raise UserError(f"{name} is missing at row {first}; every embedding row needs a {name}.")
    return column.astype(str).to_numpy(dtype=object)


def _identifiers(key: object, shard: object, num_rows: int) -> pd.DataFrame:
    identifiers = pd.DataFrame(
        {"key": _identifier_column(key, "key", num_rows), "shard": _identifier_column(shard, "shard", num_rows)}
    )
    repeated = identifiers.duplicated(["shard", "key"])
    if repeated.any():
        row = identifiers[repeated].iloc[0]
        raise UserError(
            f"(shard, key) ({row['shard']!r}, {row['key']!r}) appears {int((identifiers == row).all(axis=1).sum())} "
            f"times; each embedding row must be a distinct sample (drop repeated rows first)."
        )
    return identifiers


def _verified(source: RowSource, block: CandidateBlock, plan: SearchPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block's pairs whose exact similarity is >= the threshold, with that similarity."""
    similarity = source.exact_similarity(block.first, block.second)
    passed = similarity >= plan.similarity_threshold
    return block.first[passed], block.second[passed], similarity[passed]


def _link_block(components: UnionFind, source: RowSource, block: CandidateBlock, plan: SearchPlan) -> int:
    """Union the block's links and its candidates that pass; returns how many needed an exact similarity."""
    components.union(block.linked_first, block.linked_second)
    apart = components.find(block.first) != components.find(block.second)
    first, second, screened = block.first[apart], block.second[apart], block.screen_similarity[apart]
    # clearly above the threshold even after the worst screening error: no exact check needed to link
    certain = screened >= plan.similarity_threshold + plan.screen_margin
    components.union(first[certain], second[certain])
    doubtful = CandidateBlock(first[~certain], second[~certain], screened[~certain])
    linked_first, linked_second, _ = _verified(source, doubtful, plan)
    components.union(linked_first, linked_second)
    return int(doubtful.first.shape[0])


def _choose_survivors(rows: np.ndarray, group_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of float64 rows laid out back to back: each row's survivor (local index) and its similarity to it."""
    group_sizes = np.diff(np.append(group_starts, rows.shape[0]))
    group_of_row = np.repeat(np.arange(group_starts.shape[0]), group_sizes)
    unit_rows = rows / np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    group_sums = np.add.reduceat(unit_rows, group_starts, axis=0)
    mean_similarity = np.einsum("ij,ij->i", unit_rows, group_sums[group_of_row]) / group_sizes[group_of_row]
    best = np.maximum.reduceat(mean_similarity, group_starts)
    tied = mean_similarity >= best[group_of_row] - SURVIVOR_TIE_TOLERANCE
    local = np.arange(rows.shape[0])
    # rows are in canonical order inside a group, so the first tied row has the smallest (shard, key)
    survivor = np.minimum.reduceat(np.where(tied, local, rows.shape[0]), group_starts)[group_of_row]
    return survivor, cosine_rows(rows, rows[survivor])


def _choose_survivor_of_large_group(source: RowSource, positions: np.ndarray) -> tuple[int, np.ndarray]:
    """The same rule for one group too large to hold in float64 at once: streamed in passes."""
    chunks = [positions[start : start + _SURVIVOR_ROWS] for start in range(0, positions.shape[0], _SURVIVOR_ROWS)]
    group_sum = np.zeros(source.dim, dtype=np.float64)
    for chunk in chunks:
        rows = source.exact_rows(chunk)
        group_sum += (rows / np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]).sum(axis=0)
    mean_similarity = np.empty(positions.shape[0], dtype=np.float64)
    for index, chunk in enumerate(chunks):
        rows = source.exact_rows(chunk)
        unit_rows = rows / np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
        mean_similarity[index * _SURVIVOR_ROWS : index * _SURVIVOR_ROWS + chunk.shape[0]] = unit_rows @ group_sum
    mean_similarity /= positions.shape[0]
    survivor = int(np.flatnonzero(mean_similarity >= mean_similarity.max() - SURVIVOR_TIE_TOLERANCE)[0])
    survivor_row = source.exact_rows(positions[survivor : survivor + 1])
    similarity = np.concatenate(
        [cosine_rows(source.exact_rows(chunk), np.broadcast_to(survivor_row, (chunk.shape[0], source.dim))) for chunk in chunks]
    )
    return survivor, similarity


def group_survivors(source: RowSource, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical positions of every duplicate, of its survivor, and their similarity (in position order)."""
    group_size = np.bincount(roots, minlength=roots.shape[0])
    members = np.flatnonzero(group_size[roots] >= 2)
    if not members.shape[0]:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    # group by root (the group's smallest position), canonical order inside each group
    members = members[np.argsort(roots[members], kind="stable")]
    starts = np.flatnonzero(np.r_[True, roots[members][1:] != roots[members][:-1]])
    ends = np.append(starts[1:], members.shape[0])
    survivor_of = np.empty(members.shape[0], dtype=np.int64)
    similarity = np.empty(members.shape[0], dtype=np.float64)
    group = 0
    while group < starts.shape[0]:
        if ends[group] - starts[group] > _SURVIVOR_ROWS:
            span = slice(starts[group], ends[group])
            survivor, similarity[span] = _choose_survivor_of_large_group(source, members[span])
            survivor_of[span] = members[starts[group] + survivor]
            group += 1
            continue
        # as many whole groups as fit in one float64 block
        last = int(np.searchsorted(ends, starts[group] + _SURVIVOR_ROWS, side="right"))
        last = max(last, group + 1)
        span = slice(starts[group], ends[last - 1])
        local_survivor, similarity[span] = _choose_survivors(source.exact_rows(members[span]), starts[group:last] - starts[group])
        survivor_of[span] = members[span][local_survivor]
        group = last
    duplicate = survivor_of != members
    order = np.argsort(members[duplicate], kind="stable")
    return members[duplicate][order], survivor_of[duplicate][order], similarity[duplicate][order]


def deduplicate(
    embeddings: np.ndarray,
    key: Sequence[str] | np.ndarray | pd.Series,
    shard: Sequence[str] | np.ndarray | pd.Series,
    *,
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    method: Method = "auto",
    clusters_per_point: int = DEFAULT_CLUSTERS_PER_POINT,
    num_clusters: int | None = None,
    exact_max_rows: int | None = None,
    matmul_dtype: MatmulDtype = "auto",
    device: str | None = None,
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
    seed: int = 0,
    include_pairs: bool = False,
) -> DedupResult:
    """Near-duplicate groups of `embeddings` (float32 [N, D]) and the one member of each group to keep.

    `method`: "exact" compares all pairs; "clustered" compares pairs within k-means clusters, each row in
    its `clusters_per_point` nearest of `num_clusters` (default about clusters_per_point * sqrt(N / 2));
    "auto" is exact up to `exact_max_rows` compared rows (50,000 on CPU, 400,000 on a GPU). `include_pairs`
    also returns every pair found (memory grows with the number of pairs). Otherwise memory beyond the
    caller's array is a few bytes of bookkeeping per row, `block_entries` similarities per block, the rows
    of the clusters being compared, and (exact only) one copy of the rows in the matmul dtype.
    """
    started = time.perf_counter()
    embeddings = check_embeddings(embeddings)
    num_rows = embeddings.shape[0]
    identifiers = _identifiers(key, shard, num_rows)
    inverse_norm, reason_code = row_validity(embeddings)
    # canonical order: valid rows sorted by (shard, key), so nothing depends on the input order
    canonical = identifiers.sort_values(["shard", "key"], kind="stable").index.to_numpy()
    valid_rows = canonical[reason_code[canonical] == 0]
    plan = plan_search(
        int(valid_rows.shape[0]),
        int(embeddings.shape[1]),
        similarity_threshold=similarity_threshold,
        method=method,
        clusters_per_point=clusters_per_point,
        num_clusters=num_clusters,
        exact_max_rows=exact_max_rows,
        matmul_dtype=matmul_dtype,
        device=device,
    )
    if int(block_entries) < 1:
        raise UserError(f"block_entries must be at least 1, got {block_entries!r}; the default is {DEFAULT_BLOCK_ENTRIES}.")
    source = RowSource(embeddings, valid_rows, inverse_norm, plan)
    counters = SearchCounters()
    counters.add_seconds("prepare", time.perf_counter() - started)

    with all_cpu_threads():
        roots, pairs_found = _search_components(source, counters, int(block_entries), seed, include_pairs)
        grouped = time.perf_counter()
        duplicate, survivor, duplicate_similarity = group_survivors(source, roots)
        counters.add_seconds("groups", time.perf_counter() - grouped)

    duplicate_rows, survivor_rows = valid_rows[duplicate], valid_rows[survivor]
    duplicates = pd.DataFrame(
        {
            "key": identifiers["key"].to_numpy()[duplicate_rows],
            "shard": identifiers["shard"].to_numpy()[duplicate_rows],
            "duplicate_of": identifiers["key"].to_numpy()[survivor_rows],
            "duplicate_of_shard": identifiers["shard"].to_numpy()[survivor_rows],
            "similarity": duplicate_similarity,
        },
        columns=DUPLICATE_COLUMNS,
    )
    is_kept = np.ones(len(source), dtype=bool)
    is_kept[duplicate] = False
    kept = identifiers.iloc[valid_rows[is_kept]][KEPT_COLUMNS].reset_index(drop=True)
    skipped_rows = canonical[reason_code[canonical] != 0]
    skipped = identifiers.iloc[skipped_rows][KEPT_COLUMNS].reset_index(drop=True)
    skipped["reason"] = np.where(reason_code[skipped_rows] == 1, MISSING_REASON, ZERO_REASON).astype(object)
    pairs = None
    if pairs_found is not None:
        first, second, similarity = pairs_found
        pairs = pd.DataFrame(
            {
                "key_a": identifiers["key"].to_numpy()[valid_rows[first]],
                "shard_a": identifiers["shard"].to_numpy()[valid_rows[first]],
                "key_b": identifiers["key"].to_numpy()[valid_rows[second]],
                "shard_b": identifiers["shard"].to_numpy()[valid_rows[second]],
                "similarity": similarity,
            },
            columns=PAIR_COLUMNS,
        )
    stats = DedupStats(
        method=plan.method,
        rows=num_rows,
        compared_rows=len(source),
        skipped_rows=int(skipped_rows.shape[0]),
        groups=int(np.unique(roots[survivor]).shape[0]) if survivor.shape[0] else 0,
        duplicates=int(duplicate.shape[0]),
        similarity_threshold=plan.similarity_threshold,
        num_clusters=plan.num_clusters,
        clusters_per_point=plan.clusters_per_point,
        matmul_dtype=str(plan.matmul_dtype).removeprefix("torch."),
        device=str(plan.device),
        comparisons=counters.comparisons,
        candidates=counters.candidates,
        verified=counters.verified,
        largest_leaf=counters.largest_leaf,
        split_clusters=counters.split_clusters,
        seconds={**counters.seconds, "total": time.perf_counter() - started},
    )
    return DedupResult(duplicates=duplicates, kept=kept, skipped=skipped, stats=stats, pairs=pairs)


def _search_components(
    source: RowSource, counters: SearchCounters, block_entries: int, seed: int, include_pairs: bool
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Each compared row's group root (its smallest canonical position) and, with `include_pairs`, every pair."""
    plan = source.plan
    components = UnionFind(len(source))
    pair_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    started = time.perf_counter()
    for block in iter_candidates(source, counters, block_entries=block_entries, seed=seed, links_only=not include_pairs):
        counters.candidates += int(block.first.shape[0])
        if include_pairs:
            pair_parts.append(_verified(source, block, plan))
            counters.verified += int(block.first.shape[0])
        else:
            counters.verified += _link_block(components, source, block, plan)
    pairs = None
    if include_pairs:
        pairs = _unique_pairs(pair_parts, len(source))
        components.union(pairs[0], pairs[1])
    # includes the partition stage, which is also reported on its own
    counters.add_seconds("search", time.perf_counter() - started)
    return components.roots(), pairs


def _unique_pairs(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_positions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verified pairs without repeats (the clustered search finds a pair once per shared cluster), sorted."""
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    first = np.concatenate([part[0] for part in parts])
    second = np.concatenate([part[1] for part in parts])
    similarity = np.concatenate([part[2] for part in parts])
    _, unique = np.unique(first * num_positions + second, return_index=True)
    return first[unique], second[unique], similarity[unique]
