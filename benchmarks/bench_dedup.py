"""Claims: the dedup flow removes near-duplicates of millions of stored embeddings within bounded memory
(`--mode flow`, the default), and clustered search finds >= 99% of the pairs exact search finds, far
faster (`--mode search`).

`--mode flow`: synthetic 768-d embeddings with planted near-duplicate groups are written as embedding-store
entries of a dataset, chunk by chunk (never all in memory), then the `image-dedup` flow runs end to end in
a fresh process (out-of-core unless `--method` says otherwise) against a temporary Prefect server. Printed:
wall and peak RSS of that process; RSS against the size of all embeddings (what the in-memory search holds
at least); recall against exact search on a subset of whole groups (searched in memory in this run, the
baseline) and against the planted pairs; precision (every output group lies inside one planted group).
A pair counts as found when both rows end up in one output group.

    .venv/bin/python benchmarks/bench_dedup.py --rows 5000000 --work-dir /var/tmp/dedup-bench   # ~32 minutes: 11 writing data, 20 the flow
    .venv/bin/python benchmarks/bench_dedup.py --rows 300000 --subset 50000                       # ~2 minutes

`--mode search`, in one process on in-memory arrays:

Synthetic unit embeddings with planted near-duplicate groups (stars and chains of 2-5 rows, cosine
0.99-1.0; see tests/support/dedup_data.py). Random directions are the hardest case for clustering:
no natural clusters, so boundaries cut through everything. Measured in one run:

1. exact search on a subset of whole groups, in float32 (the baseline) and in the automatic matmul dtype;
2. clustered search on the same subset, and on all rows;
3. recall = pairs found / pairs exact search finds on the subset (pairs with both rows in the subset),
   and on all rows against the planted groups' pairs (their members' exact similarities).

    .venv/bin/python benchmarks/bench_dedup.py --mode search                               # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_dedup.py --mode search --rows 1000000 --subset 100000 --skip-float32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.dedup.groups import DedupResult, deduplicate  # noqa: E402
from tests.support.dedup_data import PlantedDuplicates, planted_duplicates, write_planted_store  # noqa: E402

IDENTITY = "synthetic-768"
# The flow in its own process, so its peak RSS is its own; prints one JSON line.
_FLOW_SCRIPT = """
import json, resource, sys, time
from flows.dedup import image_dedup
parameters = json.loads(sys.argv[1])
started = time.perf_counter()
result = image_dedup(**parameters)
print("RESULT " + json.dumps({"wall": time.perf_counter() - started, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **result}))
"""


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


def synthetic_data(args: argparse.Namespace, rows: int, seed: int) -> PlantedDuplicates:
    """Planted near-duplicates as the command line asks: pairs from the threshold up to 1, chains in steps above it."""
    return planted_duplicates(
        rows,
        args.dim,
        duplicate_fraction=args.duplicate_fraction,
        leaf_similarity=(args.similarity_threshold, 1.0),
        chain_step_similarity=(args.similarity_threshold, (1 + args.similarity_threshold) / 2),
        topics=args.topics,
        topic_cosine=args.topic_cosine,
        seed=seed,
    )


def chunk_data(args: argparse.Namespace, chunk: int, rows: int) -> PlantedDuplicates:
    """One chunk of the synthetic dataset: its own seed, keys and shard names (groups never cross chunks)."""
    data = synthetic_data(args, rows, seed=args.seed * 100_003 + chunk)
    prefix = f"c{chunk:04d}-"
    return PlantedDuplicates(embeddings=data.embeddings, group=data.group, key=np.array([prefix + k for k in data.key], dtype=object),
                             shard=np.array([prefix + s for s in data.shard], dtype=object))


def flow_main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-dedup-"))
    shutil.rmtree(work, ignore_errors=True)
    from tasks.store.entries import EmbeddingStore

    store = EmbeddingStore(str(work / "cache"))
    truth: set = set()
    subset_truth: set | None = None
    subset_keys: set = set()
    started = time.perf_counter()
    for chunk, start in enumerate(range(0, args.rows, args.chunk_rows)):
        data = chunk_data(args, chunk, min(args.chunk_rows, args.rows - start))
        write_planted_store(data, str(work / "in"), store, IDENTITY, members=False)
        truth |= planted_pairs(data, args.similarity_threshold)
        if chunk == 0:
            # the baseline: exact search in memory on a subset of whole groups
            cut = min(args.subset, data.group.shape[0])
            while 0 < cut < data.group.shape[0] and data.group[cut] >= 0 and data.group[cut] == data.group[cut - 1]:
                cut += 1
            exact_started = time.perf_counter()
            exact = deduplicate(data.embeddings[:cut], data.key[:cut], data.shard[:cut], similarity_threshold=args.similarity_threshold,
                                method="exact", include_pairs=True)
            exact_seconds = time.perf_counter() - exact_started
            prefix = str(work / "in") + "/"
            subset_truth = {(prefix + a, ka, prefix + b, kb) for a, ka, b, kb in pair_set(exact)}
            subset_keys = {(prefix + s, k) for s, k in zip(data.shard[:cut], data.key[:cut])}
        del data
        print(f"  wrote {min(start + args.chunk_rows, args.rows)} rows ({time.perf_counter() - started:.0f} s)", flush=True)
    truth = {(str(work / "in") + "/" + a, ka, str(work / "in") + "/" + b, kb) for a, ka, b, kb in truth}
    print(f"dataset: {args.rows} x {args.dim} in {len(list((work / 'in').glob('*.tar')))} shards, written in {time.perf_counter() - started:.0f} s; "
          f"{len(truth)} planted pairs; exact search on {len(subset_keys)} rows: {len(subset_truth)} pairs in {exact_seconds:.1f} s", flush=True)

    parameters = dict(file_paths=str(work / "in"), output_path=str(work / "dedup"), cache_path=str(work / "cache"), embedding_identity=IDENTITY,
                      similarity_threshold=args.similarity_threshold, method=args.method, bucket_rows=args.bucket_rows)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        completed = subprocess.run([sys.executable, "-c", _FLOW_SCRIPT, json.dumps(parameters)], env=env, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        print(completed.stdout[-5000:], completed.stderr[-5000:])
        raise SystemExit("the flow failed")
    measured = json.loads(lines[-1].removeprefix("RESULT "))
    summary = json.loads((work / "dedup" / "summary.json").read_text())

    import pandas as pd

    duplicates = pd.read_parquet(work / "dedup" / "duplicates.parquet")
    group_of = {(s, k): (ss, sk) for s, k, ss, sk in zip(duplicates["shard"], duplicates["key"], duplicates["duplicate_of_shard"], duplicates["duplicate_of"])}
    group_of.update({survivor: survivor for survivor in set(group_of.values())})

    def found(pairs: set) -> set:
        return {p for p in pairs if (p[0], p[1]) in group_of and group_of[(p[0], p[1])] == group_of.get((p[2], p[3]))}

    planted_group: dict = {}
    for a, ka, b, kb in truth:
        planted_group.setdefault((a, ka), set()).add((b, kb))
        planted_group.setdefault((b, kb), set()).add((a, ka))
    # precision: a duplicate and its survivor are joined by planted pairs (a chain may need several steps)
    wrong = 0
    for (s, k), survivor in group_of.items():
        if (s, k) == survivor:
            continue
        seen, frontier = {(s, k)}, [(s, k)]
        while frontier and survivor not in seen:
            frontier = [n for node in frontier for n in planted_group.get(node, ()) if n not in seen]
            seen.update(frontier)
        wrong += survivor not in seen
    embeddings_bytes = args.rows * args.dim * 4
    stats = summary["stats"]
    print()
    print(f"flow ({stats['method']}, {stats['num_clusters']} clusters x{stats['clusters_per_point']}, {stats['matmul_dtype']}): "
          f"wall {measured['wall']:.0f} s, peak RSS {measured['peak_rss'] / 2**30:.2f} GiB; {measured['duplicates']} duplicates in {measured['groups']} groups")
    print("stages: " + ", ".join(f"{stage} {value:.0f} s" for stage, value in stats["seconds"].items()))
    print(f"peak RSS / size of all embeddings ({embeddings_bytes / 2**30:.2f} GiB):  {measured['peak_rss'] / embeddings_bytes:.3f}")
    print(f"recall vs exact search on the subset ({len(subset_truth)} pairs):  {len(found(subset_truth)) / max(1, len(subset_truth)):.5f}")
    print(f"recall vs planted pairs ({len(truth)}):                    {len(found(truth)) / max(1, len(truth)):.5f}")
    print(f"precision (duplicates joined to their survivor by planted pairs): {1 - wrong / max(1, len(duplicates)):.5f}")
    print(f"load average at end: {os.getloadavg()}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["flow", "search"], default="flow")
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000 (flow) or 200,000 (search)")
    parser.add_argument("--work-dir", default=None, help="flow: where the dataset, store and outputs go (removed at the end)")
    parser.add_argument("--chunk-rows", type=int, default=250_000, help="flow: rows generated at once")
    parser.add_argument("--method", default="out-of-core", help="flow: the flow's method")
    parser.add_argument("--bucket-rows", type=int, default=250_000, help="flow: the flow's bucket_rows")
    parser.add_argument("--keep", action="store_true", help="flow: keep the work directory")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--subset", type=int, default=None, help="rows searched exactly for the recall reference (100,000 flow, 50,000 search)")
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
    if args.mode == "flow":
        args.rows, args.subset = args.rows or 1_000_000, args.subset or 100_000
        flow_main(args)
    else:
        args.rows, args.subset = args.rows or 200_000, args.subset or 50_000
        search_main(args)


def search_main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    data = synthetic_data(args, args.rows, seed=args.seed)
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
