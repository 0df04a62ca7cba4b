"""Claim: clustered near-duplicate search finds >= 99% of the pairs exact search finds, far faster.

Synthetic unit embeddings with planted near-duplicate groups (stars and chains of 2-5 rows, cosine
0.99-1.0; see tests/support/dedup_data.py). Random directions are the hardest case for clustering:
no natural clusters, so boundaries cut through everything. Measured in one run:

1. exact search on a subset of whole groups, in float32 (the baseline) and in the automatic matmul dtype;
2. clustered search on the same subset, and on all rows;
3. recall = pairs found / pairs exact search finds on the subset (pairs with both rows in the subset),
   and on all rows against the planted groups' pairs (their members' exact similarities).

    .venv/bin/python benchmarks/bench_dedup.py                               # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_dedup.py --rows 1000000 --subset 100000 --skip-float32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.dedup.groups import DedupResult, deduplicate  # noqa: E402
from tests.support.dedup_data import PlantedDuplicates, planted_duplicates  # noqa: E402


def pair_set(result: DedupResult) -> set[tuple[str, str, str, str]]:
    pairs = result.pairs
    assert pairs is not None
    return set(zip(pairs["shard_a"], pairs["key_a"], pairs["shard_b"], pairs["key_b"]))


def planted_pairs(data: PlantedDuplicates, threshold: float) -> set[tuple[str, str, str, str]]:
    """Pairs inside planted groups at or above the threshold, by exact float64 cosine."""
    rows = np.flatnonzero(data.group >= 0)
    rows = rows[np.argsort(data.group[rows], kind="stable")]
    found = set()
    starts = np.flatnonzero(np.r_[True, data.group[rows][1:] != data.group[rows][:-1]])
    ends = np.append(starts[1:], rows.shape[0])
    for size in np.unique(ends - starts):
        groups = rows[starts[(ends - starts) == size][:, None] + np.arange(size)]
        members = data.embeddings[groups].astype(np.float64)
        members /= np.linalg.norm(members, axis=2, keepdims=True)
        similarity = members @ members.transpose(0, 2, 1)
        for group, first, second in zip(*np.nonzero(np.triu(similarity >= threshold, k=1))):
            a, b = groups[group, first], groups[group, second]
            (shard_a, key_a), (shard_b, key_b) = sorted([(data.shard[a], data.key[a]), (data.shard[b], data.key[b])])
            found.add((shard_a, key_a, shard_b, key_b))
    return found


def timed(label: str, **kwargs) -> tuple[DedupResult, float]:
    started = time.perf_counter()
    result = deduplicate(include_pairs=True, **kwargs)
    seconds = time.perf_counter() - started
    stats = result.stats
    stages = ", ".join(f"{stage} {value:.1f}s" for stage, value in stats.seconds.items() if stage != "total")
    clusters = f", {stats.num_clusters} clusters x{stats.clusters_per_point}, largest leaf {stats.largest_leaf}, {stats.split_clusters} split" if stats.num_clusters else ""
    print(
        f"{label:<34} {seconds:8.1f} s  {stats.method}/{stats.matmul_dtype}{clusters}; "
        f"{stats.comparisons:.3g} similarities, {len(result.pairs)} pairs, {stats.groups} groups  [{stages}]",
        flush=True,
    )
    return result, seconds


def recall(found: set, truth: set) -> float:
    return len(found & truth) / len(truth) if truth else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--subset", type=int, default=50_000, help="rows searched exactly for the recall reference")
    parser.add_argument("--duplicate-fraction", type=float, default=0.1)
    parser.add_argument("--similarity-threshold", type=float, default=0.99)
    parser.add_argument("--clusters-per-point", type=int, default=3)
    parser.add_argument("--num-clusters", type=int, default=None)
    parser.add_argument("--topics", type=int, default=0, help="rows around this many topic centres (0: uniform)")
    parser.add_argument("--topic-cosine", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-float32", action="store_true", help="skip the float32 exact baseline")
    args = parser.parse_args()

    print(f"load average at start: {os.getloadavg()}; cpus: {os.cpu_count()}", flush=True)
    started = time.perf_counter()
    data = planted_duplicates(
        args.rows,
        args.dim,
        duplicate_fraction=args.duplicate_fraction,
        leaf_similarity=(args.similarity_threshold, 1.0),
        chain_step_similarity=(args.similarity_threshold, (1 + args.similarity_threshold) / 2),
        topics=args.topics,
        topic_cosine=args.topic_cosine,
        seed=args.seed,
    )
    print(
        f"generated {args.rows} x {args.dim} float32 ({data.embeddings.nbytes / 2**30:.2f} GiB), "
        f"{int(data.group.max()) + 1} planted groups, {int((data.group >= 0).sum())} rows in groups, "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    # cut the subset between groups so it holds whole groups only
    cut = min(args.subset, args.rows)
    while 0 < cut < args.rows and data.group[cut] >= 0 and data.group[cut] == data.group[cut - 1]:
        cut += 1
    subset = slice(0, cut)
    common = dict(similarity_threshold=args.similarity_threshold, seed=args.seed)
    on_subset = dict(embeddings=data.embeddings[subset], key=data.key[subset], shard=data.shard[subset], **common)
    clustered = dict(method="clustered", clusters_per_point=args.clusters_per_point, num_clusters=args.num_clusters)

    float32_seconds = None
    if not args.skip_float32:
        baseline, float32_seconds = timed(f"exact float32, {cut} rows", method="exact", matmul_dtype="float32", **on_subset)
    exact, exact_seconds = timed(f"exact auto dtype, {cut} rows", method="exact", **on_subset)
    truth_subset = pair_set(exact)
    if not args.skip_float32:
        assert pair_set(baseline) == truth_subset, "exact search must not depend on the matmul dtype"
    small, small_seconds = timed(f"clustered, {cut} rows", **clustered, **on_subset)
    full, full_seconds = timed(f"clustered, {args.rows} rows", embeddings=data.embeddings, key=data.key, shard=data.shard, **clustered, **common)

    subset_keys = set(zip(data.shard[subset], data.key[subset]))
    full_pairs = pair_set(full)
    full_on_subset = {pair for pair in full_pairs if (pair[0], pair[1]) in subset_keys and (pair[2], pair[3]) in subset_keys}
    truth_all = planted_pairs(data, args.similarity_threshold)
    print()
    print(f"exact pairs on the subset: {len(truth_subset)} (planted pairs there: {len(planted_pairs_in(truth_all, subset_keys))})")
    print(f"recall, clustered on the subset vs exact:           {recall(pair_set(small), truth_subset):.5f}")
    print(f"recall, clustered on all rows vs exact on subset:   {recall(full_on_subset, truth_subset):.5f}")
    print(f"recall, clustered on all rows vs planted pairs:     {recall(full_pairs, truth_all):.5f} of {len(truth_all)}")
    print(f"precision, clustered on all rows vs planted pairs:  {len(full_pairs & truth_all) / max(1, len(full_pairs)):.5f}")
    if float32_seconds is not None:
        print(f"speed-up, exact auto dtype vs float32 on subset:    {float32_seconds / exact_seconds:.2f}x")
    print(f"speed-up, clustered vs exact on subset:             {exact_seconds / small_seconds:.2f}x")
    extrapolated = exact_seconds * (args.rows / cut) ** 2
    print(f"exact on all rows, extrapolated (N^2):              {extrapolated:.0f} s")
    print(f"speed-up, clustered vs exact on all rows (extrap.): {extrapolated / full_seconds:.1f}x")
    print(f"clustered on all {args.rows} rows: {full_seconds:.1f} s")
    print(f"load average at end: {os.getloadavg()}")


def planted_pairs_in(pairs: set, keys: set) -> set:
    return {pair for pair in pairs if (pair[0], pair[1]) in keys and (pair[2], pair[3]) in keys}


if __name__ == "__main__":
    main()
