"""Partitions for the clustered near-duplicate search: spherical k-means, nearest clusters, and splits.

Every row joins its `clusters_per_point` nearest clusters, and each resulting set of rows (a *leaf*) is
later searched all-pairs; a pair is found when both rows share a leaf.

Rows are clustered on their *residuals*: each row minus its component along the mean direction of the
rows being clustered, re-normalised. Embeddings share a common direction (CLIP's sit in a narrow cone,
a topic's around its centre); on raw rows a centroid averaging more rows leans further towards that
direction and so attracts ever more rows, while on residuals centroids compete on what tells rows apart.

A cluster holding more than `SPLIT_FACTOR` times the mean membership (a dense topic, a flood of
near-copies) is clustered again on its own residuals, up to `_MAX_SPLIT_DEPTH` levels. A split that
would not reduce the pairs to compare (near-copies have no residual structure) is abandoned and the
cluster is searched whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tasks.dedup.compute import parallel_map, torch_threads

# k-means trains on this many sampled rows per centroid (faiss warns below 39).
SAMPLES_PER_CENTROID = 40
KMEANS_ITERATIONS = 10
# Fewer rows than this per cluster would make clustering pointless overhead.
MIN_ROWS_PER_CLUSTER = 16
# A cluster above this many times the mean membership is clustered again (`split_cluster`).
SPLIT_FACTOR = 4
_MAX_SPLIT_DEPTH = 3
# A split is kept only if it leaves at most this fraction of the cluster's pairs to compare.
_SPLIT_MAX_PAIR_FRACTION = 0.5
# Similarity entries per k-means / assignment block, and rows per gather.
_BLOCK_ENTRIES = 1 << 22
_GATHER_ROWS = 4096

# Rows at canonical positions (an index array or a slice), unit length, in the matmul dtype, on the device.
RowsOf = Callable[[np.ndarray | slice], torch.Tensor]


@dataclass(frozen=True)
class ClusterLeaves:
    """Leaves (ascending canonical positions, each to be searched all-pairs) and how they came about."""

    leaves: list[np.ndarray]
    num_clusters: int
    split_clusters: int


def default_num_clusters(num_rows: int, clusters_per_point: int) -> int:
    """Balances assigning rows to centroids (N*K) against comparing within clusters (m^2 N^2 / 2K)."""
    balanced = round(clusters_per_point * math.sqrt(num_rows / 2))
    return max(1, min(balanced, num_rows // MIN_ROWS_PER_CLUSTER))


def _gather(rows_of: RowsOf, positions: np.ndarray) -> torch.Tensor:
    return torch.cat([rows_of(positions[start : start + _GATHER_ROWS]) for start in range(0, positions.shape[0], _GATHER_ROWS)])


def mean_direction(rows: torch.Tensor) -> torch.Tensor:
    """The unit mean of `rows` (float32 [D]); zero when the rows cancel out."""
    starts = range(0, rows.shape[0], _GATHER_ROWS)
    partial = parallel_map(lambda start: rows[start : start + _GATHER_ROWS].float().sum(dim=0), starts, rows.device)
    total = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    for part in partial:
        total += part
    return torch.nn.functional.normalize(total, dim=0)


def residual_block(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`residuals` of one block of rows, computed in float32 and returned in the rows' dtype."""
    block = rows.float()
    block -= (block @ direction)[:, None] * direction[None, :]
    return torch.nn.functional.normalize(block, dim=1).to(rows.dtype)


def residuals(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`rows` without their component along unit `direction`, re-normalised, in the rows' dtype."""
    result = torch.empty_like(rows)
    starts = list(range(0, rows.shape[0], _GATHER_ROWS))
    blocks = parallel_map(lambda start: residual_block(rows[start : start + _GATHER_ROWS], direction), starts, rows.device)
    for start, block in zip(starts, blocks):
        result[start : start + _GATHER_ROWS] = block
    return result


def nearest_centroids(rows: torch.Tensor, centroids: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [n, count] of each row's nearest centroids (by cosine) and the similarity to the nearest."""
    best = (rows @ centroids.T).topk(count, dim=1)
    return best.indices, best.values[:, 0].float()


def _cluster_sums(rows: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Float32 sum of each cluster's rows [K, D], added in row order (deterministic)."""
    sums = torch.zeros(num_clusters, rows.shape[1], dtype=torch.float32, device=rows.device)
    # one thread: a scattered add is memory-bound, and a thread team only waits on itself (or on other processes)
    with torch_threads(1):
        for start in range(0, rows.shape[0], _GATHER_ROWS):
            sums.index_add_(0, labels[start : start + _GATHER_ROWS], rows[start : start + _GATHER_ROWS].float())
    return sums


def spherical_kmeans(
    sample: torch.Tensor, num_clusters: int, generator: torch.Generator, *, iterations: int = KMEANS_ITERATIONS
) -> torch.Tensor:
    """Unit centroids [K, D] (float32) maximising the cosine of `sample` rows to their nearest centroid."""
    device = sample.device
    seeds = torch.randperm(sample.shape[0], generator=generator)[:num_clusters].to(device)
    centroids = sample[seeds].float()
    block = max(1, _BLOCK_ENTRIES // num_clusters)
    starts = list(range(0, sample.shape[0], block))
    labels = None
    for _ in range(iterations):
        centroids_matmul = centroids.to(sample.dtype)
        parts = list(parallel_map(lambda start: nearest_centroids(sample[start : start + block], centroids_matmul, 1), starts, device))
        new_labels = torch.cat([indices[:, 0] for indices, _ in parts])
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = _cluster_sums(sample, labels, num_clusters)
        empty = torch.nonzero(torch.bincount(labels, minlength=num_clusters) == 0).flatten()
        if empty.numel():
            # reseed empty clusters at the sampled rows farthest from their centroid
            nearest = torch.cat([values for _, values in parts])
            sums[empty] = sample[torch.argsort(nearest, stable=True)[: empty.numel()]].float()
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def assign(
    residual_rows: Callable[[int, int], torch.Tensor], num_rows: int, centroids: torch.Tensor, count: int, dtype: torch.dtype
) -> np.ndarray:
    """Each row's `count` nearest centroids, int64 [num_rows, count]; rows come as residuals [start, stop) in `dtype`."""
    block = max(1, min(_GATHER_ROWS, _BLOCK_ENTRIES // centroids.shape[0]))
    centroids_matmul = centroids.to(dtype)

    def nearest(start: int) -> np.ndarray:
        return nearest_centroids(residual_rows(start, start + block), centroids_matmul, count)[0].cpu().numpy()

    parts = list(parallel_map(nearest, range(0, num_rows, block), centroids.device))
    return np.concatenate(parts) if parts else np.zeros((0, count), dtype=np.int64)


def cluster_members(assignment: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Members of every cluster, ascending: (indices, offsets) with cluster c at offsets[c]:offsets[c+1]."""
    flat = assignment.reshape(-1)
    indices = np.repeat(np.arange(assignment.shape[0], dtype=np.int64), assignment.shape[1])
    # a stable sort keeps indices ascending inside each cluster
    order = np.argsort(flat, kind="stable")
    offsets = np.zeros(num_clusters + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_clusters), out=offsets[1:])
    return indices[order], offsets


def _generator(seed: int, path: tuple[int, ...]) -> torch.Generator:
    """A generator seeded by the run's seed and the cluster's path, so every split is reproducible."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1))


def _sample(num_rows: int, num_clusters: int, generator: torch.Generator) -> np.ndarray:
    size = min(num_rows, num_clusters * SAMPLES_PER_CENTROID)
    return np.sort(torch.randperm(num_rows, generator=generator)[:size].numpy())


def split_cluster(
    rows_of: RowsOf, positions: np.ndarray, target: int, clusters_per_point: int, seed: int, path: tuple[int, ...]
) -> list[np.ndarray]:
    """Leaves of a cluster too large to search whole: k-means on its residuals, recursively."""
    num_rows = positions.shape[0]
    num_clusters = min(math.ceil(clusters_per_point * num_rows / target), num_rows // MIN_ROWS_PER_CLUSTER)
    if num_clusters < 2:
        return [positions]
    per_point = min(clusters_per_point, num_clusters)
    rows = _gather(rows_of, positions)
    residual = residuals(rows, mean_direction(rows))
    del rows
    generator = _generator(seed, path)
    centroids = spherical_kmeans(residual[torch.from_numpy(_sample(num_rows, num_clusters, generator)).to(residual.device)], num_clusters, generator)
    assignment = assign(lambda start, stop: residual[start:stop], num_rows, centroids, per_point, residual.dtype)
    members, offsets = cluster_members(assignment, num_clusters)
    del residual
    sizes = np.diff(offsets)
    if float((sizes.astype(np.float64) ** 2).sum()) > _SPLIT_MAX_PAIR_FRACTION * float(num_rows) ** 2:
        return [positions]
    leaves: list[np.ndarray] = []
    for cluster in np.flatnonzero(sizes >= 2):
        # members are ascending indices into ascending positions, so leaves stay ascending
        leaf = positions[members[offsets[cluster] : offsets[cluster + 1]]]
        if leaf.shape[0] > SPLIT_FACTOR * target and len(path) < _MAX_SPLIT_DEPTH:
            leaves.extend(split_cluster(rows_of, leaf, target, clusters_per_point, seed, (*path, int(cluster))))
        else:
            leaves.append(leaf)
    return leaves


def split_into_leaves(rows_of: RowsOf, num_rows: int, num_clusters: int, clusters_per_point: int, *, seed: int = 0) -> ClusterLeaves:
    """Leaves covering `num_rows` rows: each row in its `clusters_per_point` nearest of `num_clusters` clusters."""
    generator = torch.Generator().manual_seed(seed)
    sample_rows = _gather(rows_of, _sample(num_rows, num_clusters, generator))
    direction = mean_direction(sample_rows)
    centroids = spherical_kmeans(residuals(sample_rows, direction), num_clusters, generator)
    dtype = sample_rows.dtype
    del sample_rows
    assignment = assign(
        lambda start, stop: residual_block(rows_of(slice(start, stop)), direction), num_rows, centroids, clusters_per_point, dtype
    )
    members, offsets = cluster_members(assignment, num_clusters)
    del assignment
    sizes = np.diff(offsets)
    target = max(2, math.ceil(clusters_per_point * num_rows / num_clusters))
    leaves: list[np.ndarray] = []
    split_clusters = 0
    for cluster in np.flatnonzero(sizes >= 2):
        positions = members[offsets[cluster] : offsets[cluster + 1]]
        if positions.shape[0] > SPLIT_FACTOR * target:
            split_clusters += 1
            leaves.extend(split_cluster(rows_of, positions, target, clusters_per_point, seed, (int(cluster),)))
        else:
            leaves.append(positions)
    return ClusterLeaves(leaves=leaves, num_clusters=num_clusters, split_clusters=split_clusters)
