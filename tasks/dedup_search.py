"""Near-duplicate search: every pair of embeddings with cosine similarity >= a threshold.

The search runs in two stages. *Screening* computes similarities with matrix products of row blocks
(torch, on the GPU when present, in bfloat16 where the CPU multiplies it faster than float32) and keeps
every pair within a rigorous rounding-error margin of the threshold. *Verification* recomputes the
surviving candidates in float64 from the caller's float32 rows and applies `>= similarity_threshold`
exactly. So no pair is ever reported below the threshold, the screening precision never costs recall,
and the answer does not depend on block sizes, dtypes or the order of the rows.

Two ways to choose which pairs are screened:
- `exact`: all pairs, in row blocks against the rows after them (the upper triangle), memory bounded
  by `block_entries`; cost grows as N^2.
- `clustered`: spherical k-means on a sample, each row assigned to its `clusters_per_point` nearest
  centroids, all pairs within each cluster. A pair is found when the two rows share a cluster, so
  pairs straddling a boundary are still found unless neither row has the other's cluster among its
  nearest few; cost grows as N^1.5 with the default number of clusters.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tasks.errors import UserError

Method = Literal["auto", "exact", "clustered"]
METHODS: tuple[str, ...] = ("auto", "exact", "clustered")
MatmulDtype = Literal["auto", "float32", "bfloat16", "float16"]
MATMUL_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_SIMILARITY_THRESHOLD = 0.99
DEFAULT_CLUSTERS_PER_POINT = 3
# `auto` searches exactly up to this many rows: 1.25e9 similarities, ~5 s (bfloat16) to ~20 s (float32) on
# two CPU cores; a GPU computes 8e10 (400k rows) in about as long.
DEFAULT_EXACT_MAX_ROWS = {"cpu": 50_000, "cuda": 400_000}
# Similarity entries per screening block (64 MB in float32): bounds the memory of a block product.
DEFAULT_BLOCK_ENTRIES = 1 << 24

MISSING_REASON = "embedding is missing or has non-finite values (NaN or inf); not compared"
ZERO_REASON = "embedding is all zeros; not compared"

# k-means trains on this many sampled rows per centroid (faiss warns below 39).
_SAMPLES_PER_CENTROID = 40
_KMEANS_ITERATIONS = 10
# Fewer rows than this per cluster would make clustering pointless overhead.
_MIN_ROWS_PER_CLUSTER = 16
_MAX_BLOCK_ROWS = 4096
# Rows gathered at once when verifying pairs in float64 (two [rows, D] float64 arrays).
_VERIFY_ROWS = 4096
_SCAN_ROWS = 16384
# Rows checked at once for validity (their float64 squares are a temporary).
_VALIDITY_ROWS = 8192


@dataclass(frozen=True)
class SearchPlan:
    """How a search runs: the method chosen, its clustering and matmul settings, and the screening margin."""

    method: Literal["exact", "clustered"]
    similarity_threshold: float
    num_clusters: int
    clusters_per_point: int
    matmul_dtype: torch.dtype
    device: torch.device
    screen_margin: float

    @property
    def screen_threshold(self) -> float:
        return self.similarity_threshold - self.screen_margin


@dataclass
class SearchCounters:
    """What a search did, for run summaries: similarities screened, candidates verified, seconds per stage."""

    comparisons: int = 0
    candidates: int = 0
    verified: int = 0
    cluster_sizes_max: int = 0
    seconds: dict[str, float] | None = None

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds = self.seconds or {}
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@dataclass(frozen=True)
class CandidateBlock:
    """Screened pairs of canonical positions (`first < second`) and their screening similarity."""

    first: np.ndarray
    second: np.ndarray
    screen_similarity: np.ndarray


# ---------------------------------------------------------------------------------------------------
# Input checks and row validity


def check_embeddings(embeddings: object) -> np.ndarray:
    """The embeddings as a float32 [N, D] array; UserError naming the problem otherwise."""
    if not isinstance(embeddings, np.ndarray):
        raise UserError(
            f"embeddings must be a numpy float32 array of shape [rows, dim], got {type(embeddings).__name__}; "
            f"convert it with numpy.asarray(embeddings, dtype=numpy.float32)."
        )
    if embeddings.ndim != 2:
        raise UserError(
            f"embeddings must be 2-D [rows, dim], got shape {embeddings.shape}; stack one embedding per row."
        )
    if embeddings.dtype != np.float32:
        raise UserError(
            f"embeddings must be float32 (the embedding store's dtype), got {embeddings.dtype}; "
            f"convert them with embeddings.astype(numpy.float32)."
        )
    if embeddings.shape[1] == 0 and embeddings.shape[0] > 0:
        raise UserError("embeddings have dimension 0; pass one non-empty embedding per row.")
    return embeddings


def check_threshold(similarity_threshold: float) -> float:
    threshold = float(similarity_threshold)
    if not 0.0 < threshold <= 1.0:
        raise UserError(
            f"similarity_threshold must be in (0, 1], got {similarity_threshold!r}; "
            f"near-duplicates are usually >= 0.95 (NeMo Curator's eps = 1 - similarity_threshold)."
        )
    return threshold


def row_validity(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the inverse L2 norm (float32, 0 where invalid) and a reason code (0 ok, 1 non-finite, 2 zero)."""
    num_rows = embeddings.shape[0]
    inverse_norm = np.zeros(num_rows, dtype=np.float32)
    reason_code = np.zeros(num_rows, dtype=np.int8)
    for start in range(0, num_rows, _VALIDITY_ROWS):
        block = np.asarray(embeddings[start : start + _VALIDITY_ROWS])
        finite = np.isfinite(block).all(axis=1)
        # float64 squares so huge or tiny float32 values neither overflow nor underflow to a zero norm
        norm = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        usable = finite & (norm > 0) & np.isfinite(norm)
        reason_code[start : start + _VALIDITY_ROWS] = np.where(finite, np.where(usable, 0, 2), 1)
        inverse_norm[start : start + _VALIDITY_ROWS] = np.where(usable, 1.0 / np.where(usable, norm, 1.0), 0.0)
    return inverse_norm, reason_code


# ---------------------------------------------------------------------------------------------------
# Planning


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_fast_bfloat16() -> bool:
    """AVX512-BF16 or AMX-BF16: oneDNN then multiplies bfloat16 several times faster than float32."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return bool(capabilities.get("avx512_bf16", False) or capabilities.get("amx_bf16", False))


def choose_matmul_dtype(matmul_dtype: MatmulDtype, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a CPU with native bfloat16 dot products, else float32 (a fixed rule, so runs repeat)."""
    if matmul_dtype != "auto":
        if matmul_dtype not in MATMUL_DTYPES:
            raise UserError(f"matmul_dtype must be one of auto, {', '.join(MATMUL_DTYPES)}; got {matmul_dtype!r}.")
        return MATMUL_DTYPES[matmul_dtype]
    if device.type != "cpu":
        # cuBLAS may reduce half-precision products in half precision, which the screening margin does not cover
        return torch.float32
    return torch.bfloat16 if _cpu_has_fast_bfloat16() else torch.float32


def screen_margin(matmul_dtype: torch.dtype, dim: int) -> float:
    """A bound on |screened - exact| cosine for unit rows: two input roundings, one output rounding, fp32 sums."""
    unit_roundoff = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}[matmul_dtype]
    rounding = 2 * unit_roundoff + unit_roundoff**2 + (unit_roundoff if matmul_dtype != torch.float32 else 0.0)
    accumulation = dim * 2.0**-24
    normalisation = 4 * 2.0**-24
    return 1.25 * (rounding + accumulation + normalisation)


def default_num_clusters(num_rows: int, clusters_per_point: int) -> int:
    """Balances assigning rows to centroids (N*K) against comparing within clusters (m^2 N^2 / 2K)."""
    balanced = round(clusters_per_point * math.sqrt(num_rows / 2))
    return max(1, min(balanced, num_rows // _MIN_ROWS_PER_CLUSTER))


def plan_search(
    num_rows: int,
    dim: int,
    *,
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    method: Method = "auto",
    clusters_per_point: int = DEFAULT_CLUSTERS_PER_POINT,
    num_clusters: int | None = None,
    exact_max_rows: int | None = None,
    matmul_dtype: MatmulDtype = "auto",
    device: str | torch.device | None = None,
) -> SearchPlan:
    """The search for `num_rows` valid embeddings of dimension `dim`.

    `auto` is exact up to `exact_max_rows` (default `DEFAULT_EXACT_MAX_ROWS` for the device), else clustered.
    """
    threshold = check_threshold(similarity_threshold)
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if int(clusters_per_point) < 1:
        raise UserError(f"clusters_per_point must be at least 1, got {clusters_per_point!r}; 3 is the default.")
    if num_clusters is not None and int(num_clusters) < 1:
        raise UserError(f"num_clusters must be at least 1, got {num_clusters!r}; leave it unset for the default.")
    try:
        resolved_device = torch.device(device) if device is not None else _default_device()
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"device {device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'.") from exc
    if resolved_device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asks for a GPU but torch sees none; pass device='cpu' or leave it unset.")
    chosen = method
    if method == "auto":
        if exact_max_rows is None:
            exact_max_rows = DEFAULT_EXACT_MAX_ROWS.get(resolved_device.type, DEFAULT_EXACT_MAX_ROWS["cpu"])
        chosen = "exact" if num_rows <= exact_max_rows else "clustered"
    dtype = choose_matmul_dtype(matmul_dtype, resolved_device)
    clusters, per_point = 0, 0
    if chosen == "clustered":
        per_point = int(clusters_per_point)
        clusters = int(num_clusters) if num_clusters is not None else default_num_clusters(num_rows, per_point)
        clusters = max(1, min(clusters, num_rows))
        per_point = min(per_point, clusters)
    return SearchPlan(
        method=chosen,
        similarity_threshold=threshold,
        num_clusters=clusters,
        clusters_per_point=per_point,
        matmul_dtype=dtype,
        device=resolved_device,
        screen_margin=screen_margin(dtype, dim),
    )


# ---------------------------------------------------------------------------------------------------
# Rows


def cpu_threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def all_cpu_threads() -> Iterator[None]:
    """Let torch use every CPU this process may run on (it defaults to physical cores), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(previous, cpu_threads()))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RowSource:
    """The valid rows of the caller's array, addressed by canonical position (no copy of the whole array)."""

    def __init__(self, embeddings: np.ndarray, rows: np.ndarray, inverse_norm: np.ndarray, plan: SearchPlan) -> None:
        assert rows.ndim == 1 and (inverse_norm[rows] > 0).all()
        self.embeddings = embeddings
        self.rows = rows.astype(np.int64, copy=False)
        self.inverse_norm = inverse_norm
        self.plan = plan

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def screen_rows(self, positions: np.ndarray | slice) -> torch.Tensor:
        """Rows at canonical positions, L2-normalised, in the matmul dtype, on the search device."""
        source_rows = self.rows[positions]
        block = np.asarray(self.embeddings[source_rows]) * self.inverse_norm[source_rows, None]
        return torch.from_numpy(block).to(device=self.plan.device, dtype=self.plan.matmul_dtype)

    def exact_rows(self, positions: np.ndarray) -> np.ndarray:
        """Rows at canonical positions as float64, not normalised (the exact similarity normalises)."""
        return np.asarray(self.embeddings[self.rows[positions]], dtype=np.float64)

    def exact_similarity(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Cosine similarity in float64: x.y / sqrt(x.x * y.y); symmetric, and exactly 1 for identical rows."""
        similarity = np.empty(first.shape[0], dtype=np.float64)
        for start in range(0, first.shape[0], _VERIFY_ROWS):
            left = self.exact_rows(first[start : start + _VERIFY_ROWS])
            right = self.exact_rows(second[start : start + _VERIFY_ROWS])
            similarity[start : start + _VERIFY_ROWS] = cosine_rows(left, right)
        return similarity


def cosine_rows(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosine of float64 rows, clipped to [-1, 1]."""
    dot = np.einsum("ij,ij->i", left, right)
    scale = np.sqrt(np.einsum("ij,ij->i", left, left) * np.einsum("ij,ij->i", right, right))
    return np.clip(dot / scale, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Screening


def _screen_upper_pairs(
    block_rows: torch.Tensor, screen_threshold: float, block_entries: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Local index pairs (i < j) of `block_rows` whose screened similarity is >= `screen_threshold`."""
    num_rows = block_rows.shape[0]
    threshold = _representable_at_most(screen_threshold, block_rows.dtype)
    start = 0
    while start < num_rows - 1:
        width = num_rows - start
        # a few row blocks per cluster skip most of the lower triangle without shrinking products too far
        height = max(1, min(block_entries // width, _MAX_BLOCK_ROWS, max(256, -(-width // 4))))
        stop = min(num_rows, start + height)
        similarity = block_rows[start:stop] @ block_rows[start:].T
        similarity.diagonal().fill_(-2.0)
        hit_rows = torch.nonzero(similarity.amax(dim=1) >= threshold).flatten()
        if hit_rows.numel():
            hits = similarity[hit_rows]
            local_row, column = torch.nonzero(hits >= threshold, as_tuple=True)
            screened = hits[local_row, column].float().cpu().numpy()
            first = (hit_rows[local_row] + start).cpu().numpy()
            second = (column + start).cpu().numpy()
            # the block's own square holds each pair twice; keep the copy above the diagonal
            upper = second > first
            yield first[upper], second[upper], screened[upper]
        start = stop


def _representable_at_most(value: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` not above `value`, so comparing in `dtype` never loses a candidate."""
    rounded = torch.tensor(value, dtype=dtype)
    while rounded.double().item() > value:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return rounded.item()


def _exact_candidates(
    source: RowSource, block_entries: int, counters: SearchCounters
) -> Iterator[CandidateBlock]:
    plan = source.plan
    started = time.perf_counter()
    all_rows = torch.empty(len(source), source.dim, dtype=plan.matmul_dtype, device=plan.device)
    for start in range(0, len(source), _SCAN_ROWS):
        all_rows[start : start + _SCAN_ROWS] = source.screen_rows(slice(start, start + _SCAN_ROWS))
    counters.add_seconds("gather", time.perf_counter() - started)
    counters.comparisons += len(source) * (len(source) - 1) // 2
    for first, second, screened in _screen_upper_pairs(all_rows, plan.screen_threshold, block_entries):
        yield CandidateBlock(first, second, screened)


# ---------------------------------------------------------------------------------------------------
# Clustering


def _nearest_centroids(rows: torch.Tensor, centroids: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [n, count] of each row's nearest centroids (by cosine) and the similarity to the nearest."""
    similarity = rows @ centroids.T
    best = similarity.topk(count, dim=1)
    return best.indices, best.values[:, 0].float()


def spherical_kmeans(
    source: RowSource, num_clusters: int, *, seed: int = 0, iterations: int = _KMEANS_ITERATIONS
) -> torch.Tensor:
    """Unit centroids [K, D] (float32) from k-means under cosine similarity on a seeded sample of the rows."""
    plan = source.plan
    generator = torch.Generator().manual_seed(seed)
    sample_size = min(len(source), num_clusters * _SAMPLES_PER_CENTROID)
    sample = np.sort(torch.randperm(len(source), generator=generator)[:sample_size].numpy())
    sample_rows = torch.cat(
        [source.screen_rows(sample[start : start + _SCAN_ROWS]) for start in range(0, sample_size, _SCAN_ROWS)]
    )
    seeds = torch.randperm(sample_size, generator=generator)[:num_clusters].to(plan.device)
    centroids = sample_rows[seeds].float()
    labels = None
    block = max(1, DEFAULT_BLOCK_ENTRIES // num_clusters)
    for _ in range(iterations):
        parts = [
            _nearest_centroids(sample_rows[start : start + block], centroids.to(plan.matmul_dtype), 1)
            for start in range(0, sample_size, block)
        ]
        new_labels = torch.cat([indices[:, 0] for indices, _ in parts])
        nearest = torch.cat([values for _, values in parts])
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros(num_clusters, source.dim, dtype=torch.float32, device=plan.device)
        for start in range(0, sample_size, block):
            sums.index_add_(0, labels[start : start + block], sample_rows[start : start + block].float())
        counts = torch.bincount(labels, minlength=num_clusters)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            # reseed empty clusters at the sampled rows farthest from their centroid
            farthest = torch.argsort(nearest, stable=True)[: empty.numel()]
            sums[empty] = sample_rows[farthest].float()
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def assign_clusters(source: RowSource, centroids: torch.Tensor, clusters_per_point: int) -> np.ndarray:
    """Each row's `clusters_per_point` nearest centroids: int64 [N, clusters_per_point]."""
    plan = source.plan
    block = max(1, min(_SCAN_ROWS, DEFAULT_BLOCK_ENTRIES // centroids.shape[0]))
    centroids_matmul = centroids.to(plan.matmul_dtype)
    parts = []
    for start in range(0, len(source), block):
        indices, _ = _nearest_centroids(source.screen_rows(slice(start, start + block)), centroids_matmul, clusters_per_point)
        parts.append(indices.cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, clusters_per_point), dtype=np.int64)


def cluster_members(assignment: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Members of every cluster, ascending within each: (positions, offsets) with cluster c at offsets[c]:offsets[c+1]."""
    flat = assignment.reshape(-1)
    positions = np.repeat(np.arange(assignment.shape[0], dtype=np.int64), assignment.shape[1])
    # a stable sort keeps positions ascending inside each cluster
    order = np.argsort(flat, kind="stable")
    offsets = np.zeros(num_clusters + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=num_clusters), out=offsets[1:])
    return positions[order], offsets


def _clustered_candidates(
    source: RowSource, block_entries: int, counters: SearchCounters, seed: int
) -> Iterator[CandidateBlock]:
    plan = source.plan
    started = time.perf_counter()
    centroids = spherical_kmeans(source, plan.num_clusters, seed=seed)
    counters.add_seconds("kmeans", time.perf_counter() - started)
    started = time.perf_counter()
    assignment = assign_clusters(source, centroids, plan.clusters_per_point)
    members, offsets = cluster_members(assignment, plan.num_clusters)
    del assignment
    counters.add_seconds("assign", time.perf_counter() - started)
    sizes = np.diff(offsets)
    counters.cluster_sizes_max = int(sizes.max(initial=0))
    counters.comparisons += int((sizes * (sizes - 1) // 2).sum())

    def search_cluster(cluster: int) -> list[CandidateBlock]:
        positions = members[offsets[cluster] : offsets[cluster + 1]]
        cluster_rows = source.screen_rows(positions)
        return [
            CandidateBlock(positions[first], positions[second], screened)
            for first, second, screened in _screen_upper_pairs(cluster_rows, plan.screen_threshold, block_entries)
        ]

    clusters = np.flatnonzero(sizes >= 2).tolist()
    if plan.device.type != "cpu":
        for cluster in clusters:
            yield from search_cluster(cluster)
        return
    # one cluster per thread, each single-threaded: clusters are too small to share a core team, and
    # on a busy machine every parallel region waits for a descheduled thread
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(previous_threads, cpu_threads())) as pool:
            for blocks in pool.map(search_cluster, clusters):
                yield from blocks
    finally:
        torch.set_num_threads(previous_threads)


def iter_candidates(
    source: RowSource,
    counters: SearchCounters,
    *,
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
    seed: int = 0,
) -> Iterator[CandidateBlock]:
    """Screened candidate pairs of canonical positions, block by block (run it under `all_cpu_threads`).

    Every pair with exact similarity >= the plan's threshold is among the candidates (exact method), or
    is unless the two rows share none of their nearest clusters (clustered). A pair may be yielded more
    than once by the clustered method. Candidates still need `RowSource.exact_similarity`.
    """
    if len(source) < 2:
        return
    if source.plan.method == "exact":
        yield from _exact_candidates(source, block_entries, counters)
    else:
        yield from _clustered_candidates(source, block_entries, counters, seed)
