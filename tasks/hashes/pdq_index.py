"""Matching PDQ hashes against a list: every list hash within a Hamming distance, found exactly.

`PDQIndex(hashes)` indexes a list's PDQ hashes (uint8 [M, 32], as `HashList.pdq` holds them) the way
ThreatExchange's own matcher does (python-threatexchange, signal_type/pdq/pdq_faiss_matcher.py,
`PDQMultiHashIndex`): faiss's `IndexBinaryMultiHash` with 16 hash tables of 16 bits each, searched with
`nflip = max_distance // 16` flipped bits per table and a range search of radius `max_distance + 1`. That is
exact, not approximate: two hashes at most `max_distance` apart differ in at most `max_distance // 16` bits in
at least one of the 16 slices of 16 bits (pigeonhole), and every list hash within that many bits of the query's
slice is looked up and then checked at full length.

`index.match(queries, max_distance)` gives (query_row, list_row, distance) for every pair at most
`max_distance` apart, sorted by query row, then distance, then list row. `match_pdq(index, hashes, qualities)`
is what the pipeline calls: hashes of quality below `min_quality` (50) are not matched, since nearly flat
images all hash alike (ThreatExchange's pdq/README.md: discard quality <= 49); its rows are the caller's
rows. An index pickles as its hashes and is rebuilt where it is unpickled, so no faiss bytes are ever parsed.

Cost (benchmarks/bench_hashes.py, 10^6 random list hashes): building takes about 10 s; a query takes 2-3 ms,
hardly less than faiss's brute force, because each query shortlists about 4,000 candidates (16 tables x 17
probes x 15 hashes a bucket) in a hash set before checking them. 10^6 queries thus take about 50 minutes of
one core; a list of 10^5 hashes costs a tenth of that per query.
"""

from __future__ import annotations

import threading

import numpy as np

from tasks.errors import UserError
from tasks.hashes.image_hashes import PDQ_BYTES

PDQ_BITS = 8 * PDQ_BYTES
# ThreatExchange's threshold for a confident PDQ match (pdq_utils.PDQ_CONFIDENT_MATCH_THRESHOLD).
DEFAULT_MAX_DISTANCE = 31
# Below this quality a PDQ hash is not matched (ThreatExchange's pdq/README.md: featureless images).
DEFAULT_MIN_QUALITY = 50
# Beyond a quarter of the bits, unrelated images start to match and the flips probed grow combinatorially.
MAX_SUPPORTED_DISTANCE = 63
# ThreatExchange's PDQMultiHashIndex default: 16 tables of 16 bits.
HASH_TABLES = 16
BITS_PER_TABLE = PDQ_BITS // HASH_TABLES

Match = tuple[int, int, int]  # (query row, list row, Hamming distance)


class PDQIndex:
    """An exact radius search over one list's PDQ hashes (uint8 [M, 32]); thread-safe."""

    def __init__(self, hashes: np.ndarray) -> None:
        import faiss

        self._hashes = _hash_rows(hashes, "PDQIndex takes the list's PDQ hashes")
        self._index = faiss.IndexBinaryMultiHash(PDQ_BITS, HASH_TABLES, BITS_PER_TABLE)
        if len(self._hashes):
            self._index.add(self._hashes)
        self._search_lock = threading.Lock()  # nflip is index state, set for each search

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, queries: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> list[Match]:
        """Every (query_row, list_row, distance) with distance <= max_distance, in query-row order."""
        queries = _hash_rows(queries, "PDQIndex.match takes PDQ hashes")
        _check_distance(max_distance)
        if not len(queries) or not len(self._hashes):
            return []
        with self._search_lock:
            self._index.nflip = max_distance // HASH_TABLES
            limits, distances, labels = self._index.range_search(queries, max_distance + 1)  # radius is exclusive
        query_rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
        distances = distances.astype(np.int64)  # faiss returns Hamming distances as float32
        order = np.lexsort((labels, distances, query_rows))
        return list(zip(query_rows[order].tolist(), labels[order].tolist(), distances[order].tolist()))

    def __reduce__(self) -> tuple:
        return (PDQIndex, (self._hashes,))

    def __repr__(self) -> str:
        return f"PDQIndex({len(self._hashes)} hashes)"


def match_pdq(
    index: PDQIndex,
    hashes: np.ndarray,
    qualities: np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    min_quality: int = DEFAULT_MIN_QUALITY,
) -> list[Match]:
    """`index.match` for the images whose PDQ quality is at least `min_quality`; rows are `hashes`' rows."""
    hashes = _hash_rows(hashes, "match_pdq takes PDQ hashes")
    qualities = np.asarray(qualities)
    if qualities.shape != (len(hashes),) or not np.issubdtype(qualities.dtype, np.integer):
        raise ValueError("match_pdq takes one integer quality per hash")
    if isinstance(min_quality, bool) or not isinstance(min_quality, (int, np.integer)) or not 0 <= min_quality <= 100:
        raise UserError(f"the PDQ min_quality must be a whole number from 0 to 100, not {min_quality!r}.")
    kept = np.flatnonzero(qualities >= min_quality)
    matches = index.match(hashes[kept], max_distance)
    return [(int(kept[row]), list_row, distance) for row, list_row, distance in matches]


def _hash_rows(hashes: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(hashes, np.ndarray) or hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] != PDQ_BYTES:
        raise ValueError(f"{what} as a uint8 array of shape [rows, {PDQ_BYTES}]")
    return np.ascontiguousarray(hashes)


def _check_distance(max_distance: int) -> None:
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or not 0 <= max_distance <= MAX_SUPPORTED_DISTANCE:
        raise UserError(
            f"the PDQ max_distance must be a whole number from 0 to {MAX_SUPPORTED_DISTANCE} bits, not {max_distance!r}; "
            f"{DEFAULT_MAX_DISTANCE} is ThreatExchange's threshold for a confident match."
        )
