"""Near-duplicate search: every pair of embeddings with cosine similarity >= a threshold.

The search runs in two stages. *Screening* computes similarities with matrix products of row blocks
(torch, on the GPU when present; in bfloat16 on CPUs with native bfloat16 dot products, about 4x
float32's speed) and keeps every pair within a rigorous rounding-error margin of the threshold. *Verification* recomputes the
surviving candidates in float64 from the caller's float32 rows and applies `>= similarity_threshold`
exactly. So no pair is ever reported below the threshold, the screening precision never costs recall,
and the answer does not depend on block sizes, dtypes or the order of the rows.

Two ways to choose which pairs are screened:
- `exact`: all pairs, in row blocks against the rows after them (the upper triangle), memory bounded
  by `block_entries`; cost grows as N^2.
- `clustered`: spherical k-means on a sample, each row assigned to its `clusters_per_point` nearest
  centroids, all pairs within each cluster (tasks/dedup/clusters.py). A pair is found when the two rows
  share a cluster, so pairs straddling a boundary are still found unless neither row has the other's
  cluster among its nearest few; cost grows as N^1.5 with the default number of clusters.

When only groups are wanted (`links_only`), each block's candidates far enough above the threshold
are reduced to a spanning forest of them (links, each a real pair) before leaving the worker, so a flood
of near-copies costs memory in proportion to its rows, not to its pairs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from tasks.dedup.clusters import default_num_clusters, split_into_leaves
from tasks.dedup.compute import UnionFind, cosine_rows, parallel_map
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

_MAX_BLOCK_ROWS = 4096
# Sets of rows up to this size are searched whole by one worker; larger ones block by block by all.
_SET_ROWS_PER_WORKER = 8192
# Rows gathered at once when verifying pairs in float64 (two [rows, D] float64 arrays).
_VERIFY_ROWS = 4096
_SCAN_ROWS = 4096
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
    """What a search did, for run summaries: similarities screened, leaves searched, seconds per stage."""

    comparisons: int = 0
    candidates: int = 0
    verified: int = 0
    largest_leaf: int = 0
    split_clusters: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _no_positions() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class CandidateBlock:
    """Screened pairs of canonical positions (`first < second`) still to verify, with their screening
    similarity, and links (`linked_first` < `linked_second`, only when searching `links_only`): screened pairs
    certainly at or above the threshold, a spanning forest of the block's certain pairs."""

    first: np.ndarray
    second: np.ndarray
    screen_similarity: np.ndarray
    linked_first: np.ndarray = field(default_factory=_no_positions)
    linked_second: np.ndarray = field(default_factory=_no_positions)


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
    try:
        threshold = float(similarity_threshold)
    except (TypeError, ValueError):
        threshold = math.nan
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
        block = np.array(self.embeddings[source_rows], dtype=np.float32)
        block *= self.inverse_norm[source_rows, None]
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


# ---------------------------------------------------------------------------------------------------
# Screening


def _row_blocks(num_rows: int, block_entries: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) whose products with the rows from `start` on hold about `block_entries` similarities."""
    blocks, start = [], 0
    while start < num_rows - 1:
        width = num_rows - start
        # a few row blocks per set skip most of the lower triangle without shrinking products too far
        height = max(1, min(block_entries // width, _MAX_BLOCK_ROWS, max(256, -(-width // 4))))
        blocks.append((start, min(num_rows, start + height)))
        start += height
    return blocks


def _representable_at_most(value: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` not above `value`, so comparing in `dtype` never loses a candidate."""
    rounded = torch.tensor(value, dtype=dtype)
    while rounded.double().item() > value:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return rounded.item()


class BlockScreen:
    """Screens row blocks of one set of rows and hands the candidates on as canonical positions."""

    def __init__(self, plan: SearchPlan, block_entries: int, links_only: bool) -> None:
        self.plan = plan
        self.block_entries = block_entries
        self.links_only = links_only
        self.threshold = _representable_at_most(plan.screen_threshold, plan.matmul_dtype)
        self.certain_threshold = plan.similarity_threshold + plan.screen_margin

    def block(self, rows: torch.Tensor, positions: np.ndarray, start: int, stop: int) -> CandidateBlock | None:
        """Pairs (i, j), start <= i < stop, i < j, of `rows` whose screened similarity passes."""
        similarity = rows[start:stop] @ rows[start:].T
        similarity.diagonal().fill_(-2.0)
        # most rows have no candidate at all: find the few that do before scanning their entries
        hit_rows = torch.nonzero(similarity.amax(dim=1) >= self.threshold).flatten()
        if not hit_rows.numel():
            return None
        hits = similarity[hit_rows]
        local_row, column = torch.nonzero(hits >= self.threshold, as_tuple=True)
        screened = hits[local_row, column].float().cpu().numpy()
        first = (hit_rows[local_row] + start).cpu().numpy()
        second = (column + start).cpu().numpy()
        # the block's own square holds each pair twice; keep the copy above the diagonal
        upper = second > first
        first, second, screened = positions[first[upper]], positions[second[upper]], screened[upper]
        return self._reduce(first, second, screened) if self.links_only else CandidateBlock(first, second, screened)

    def _reduce(self, first: np.ndarray, second: np.ndarray, screened: np.ndarray) -> CandidateBlock:
        """Certain pairs are reduced to a spanning forest of them (real pairs, so each link can be checked
        again on exact rows); doubtful pairs already joined by certain ones are dropped."""
        certain = screened >= self.certain_threshold
        if not certain.any():
            return CandidateBlock(first, second, screened)
        nodes, local = np.unique(np.concatenate([first, second]), return_inverse=True)
        local_first, local_second = local[: first.shape[0]], local[first.shape[0] :]
        components = UnionFind(nodes.shape[0])
        certain_pairs = np.flatnonzero(certain)
        linked = certain_pairs[components.union_edges(local_first[certain_pairs], local_second[certain_pairs])]
        roots = components.roots()
        doubtful = ~certain & (roots[local_first] != roots[local_second])
        return CandidateBlock(first[doubtful], second[doubtful], screened[doubtful], first[linked], second[linked])

    def whole_set(self, source: RowSource, positions: np.ndarray) -> list[CandidateBlock]:
        rows = source.screen_rows(positions)
        found = (self.block(rows, positions, start, stop) for start, stop in _row_blocks(positions.shape[0], self.block_entries))
        return [block for block in found if block is not None]


def screen_sets(
    source: RowSource, sets: list[np.ndarray], screen: BlockScreen, counters: SearchCounters
) -> Iterator[CandidateBlock]:
    """Candidates among all pairs within each set of (ascending) canonical positions."""
    sizes = np.array([positions.shape[0] for positions in sets], dtype=np.int64)
    counters.comparisons += int((sizes * (sizes - 1) // 2).sum())
    counters.largest_leaf = max(counters.largest_leaf, int(sizes.max(initial=0)))
    small = [positions for positions in sets if positions.shape[0] <= _SET_ROWS_PER_WORKER]
    # one small set per worker: too small for a team of threads to share one product
    for blocks in parallel_map(lambda positions: screen.whole_set(source, positions), small, source.plan.device):
        yield from blocks
    for positions in (positions for positions in sets if positions.shape[0] > _SET_ROWS_PER_WORKER):
        started = time.perf_counter()
        rows = torch.empty(positions.shape[0], source.dim, dtype=source.plan.matmul_dtype, device=source.plan.device)
        for start in range(0, positions.shape[0], _SCAN_ROWS):
            rows[start : start + _SCAN_ROWS] = source.screen_rows(positions[start : start + _SCAN_ROWS])
        counters.add_seconds("gather", time.perf_counter() - started)
        blocks = _row_blocks(positions.shape[0], screen.block_entries)
        for block in parallel_map(lambda bounds: screen.block(rows, positions, *bounds), blocks, source.plan.device):
            if block is not None:
                yield block
        del rows


def iter_candidates(
    source: RowSource,
    counters: SearchCounters,
    *,
    block_entries: int = DEFAULT_BLOCK_ENTRIES,
    seed: int = 0,
    links_only: bool = False,
) -> Iterator[CandidateBlock]:
    """Screened candidate pairs of canonical positions, block by block (run it under `all_cpu_threads`).

    Every pair with exact similarity >= the plan's threshold is among the candidates or, with
    `links_only`, joined by links (exact method); the clustered method misses pairs whose rows share
    none of their nearest clusters, and may yield a pair more than once. Candidates still need
    `RowSource.exact_similarity`; links do not.
    """
    if len(source) < 2:
        return
    plan = source.plan
    screen = BlockScreen(plan, block_entries, links_only)
    if plan.method == "exact":
        yield from screen_sets(source, [np.arange(len(source), dtype=np.int64)], screen, counters)
        return
    started = time.perf_counter()
    leaves = split_into_leaves(source.screen_rows, len(source), plan.num_clusters, plan.clusters_per_point, seed=seed)
    counters.split_clusters = leaves.split_clusters
    counters.add_seconds("partition", time.perf_counter() - started)
    yield from screen_sets(source, leaves.leaves, screen, counters)
