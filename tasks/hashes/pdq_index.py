"""Matching PDQ hashes against a list: every list hash within a Hamming distance, found exactly.

`PDQIndex(hashes)` indexes a list's PDQ hashes (uint8 [M, 32], as `HashList.pdq` holds them) by multi-index
hashing, as ThreatExchange's own matcher does (python-threatexchange, signal_type/pdq/pdq_faiss_matcher.py,
`PDQMultiHashIndex`: 16 tables of 16 bits). It is exact, not approximate: two hashes at most `max_distance`
apart differ in at most `max_distance // 16` bits in at least one of the 16 slices of 16 bits (pigeonhole), so
looking up every key within that many bits of each of the query's slices (17 keys a table at distance 31)
shortlists every list hash that can match, and each is then checked. Nothing is ever dropped for speed.

`index.match(queries, max_distance)` gives (query_row, list_row, distance) for every pair at most
`max_distance` apart, sorted by query row, then distance, then list row. `match_pdq(index, hashes, qualities)`
is what the pipeline calls: hashes of quality below `min_quality` (50) are not matched, since nearly flat
images all hash alike (ThreatExchange's pdq/README.md: discard quality <= 49); its rows are the caller's
rows. An index pickles as its hashes and is rebuilt where it is unpickled, so no index bytes are ever parsed.

How (numpy only, no per-query Python):
- each table keeps the list in bucket order (a counting sort on its 16 bits): 65,537 offsets into a copy of
  the hashes' first 128 bits and into their list rows, so a bucket is one contiguous run;
- a table is searched `_PROBES_PER_UNIT` probes at a time, the queries sorted by that table's key, so that
  successive probes read neighbouring buckets: candidates come from the CPU's cache, not from memory;
- each probe's bucket run is laid out as candidates and checked on the first 128 bits (a random hash is
  64 of them away, so almost none pass), the few that pass on all 256; a pair is reported by the first
  table whose slice is within `max_distance // 16` bits, so each pair comes once, with no set of pairs;
- the (query chunk, table) units run on `MATCH_THREADS` threads. numpy releases the GIL in its array
  operations except `np.repeat` (about a third of the time), which caps what a second thread adds.

faiss's `IndexBinaryMultiHash` (the earlier implementation, the same 16 x 16-bit tables and probes) took
2-3 ms a query at 10^6 list hashes: it gathers the ~4,150 candidates of a query one by one into a hash set.
Here the same candidates take ~40-50 us of CPU a query, so faiss is no longer used to match (the tests and
the benchmark still use its brute-force search as the reference).

Memory: 20 bytes per list hash per table (16 bytes of bits, a 4-byte row), so 320 bytes per list hash and
16 x 256 KiB of offsets besides the list's own hashes: 0.33 GB per million list hashes (measured: +363 MB
peak while building one). A match adds 16 bytes per query and about 65 MB per thread (one unit's probes),
or one bucket's candidates where a bucket holds more than `_CANDIDATES_PER_STEP` list hashes.
Measured (benchmarks/bench_hashes.py, figures in benchmarks/README.md): building takes 1.3-1.7 s per
million list hashes; 10^6 queries against 10^6 random list hashes at distance 31 take 46-50 s, 45-46 s of
CPU (45 us a query; the goal was 120), on a 2-core machine where other work left about one core; every
planted pair at 0..31 is found and none beyond. A call with a few hundred queries costs up to ~90 us of
CPU a query (fewer queries share fewer buckets).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

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
# Threads one match uses: the pipeline runs one matcher per worker process.
MATCH_THREADS = min(2, os.cpu_count() or 1)

Match = tuple[int, int, int]  # (query row, list row, Hamming distance)

_KEYS = 1 << BITS_PER_TABLE
# Probes of one table per work unit: queries sorted by key in units this large share buckets in the cache.
_PROBES_PER_UNIT = 1 << 21
# Probes per table below which a match runs on the calling thread alone.
_PROBES_WORTH_A_THREAD = 1 << 14
# Candidates checked per step: their arrays (~40 bytes each) stay in the CPU's cache.
_CANDIDATES_PER_STEP = 1 << 16
_HALF = np.dtype((np.void, PDQ_BYTES // 2))  # the first 128 bits of a hash as one item: gathers copy 16 bytes


class PDQIndex:
    """An exact radius search over one list's PDQ hashes (uint8 [M, 32]); immutable, so thread-safe."""

    def __init__(self, hashes: np.ndarray) -> None:
        self._hashes = _hash_rows(hashes, "PDQIndex takes the list's PDQ hashes")
        assert len(self._hashes) < 2**31, "list rows are held as int32"
        self._words = self._hashes.view(np.uint64)  # [M, 4]
        keys = self._hashes.view(np.uint16)  # [M, 16]: table t's key is 16-bit word t
        halves = self._hashes[:, : PDQ_BYTES // 2].copy().view(_HALF)[:, 0]
        self._offsets, self._rows, self._halves = [], [], []
        for table in range(HASH_TABLES):
            table_keys = np.ascontiguousarray(keys[:, table])
            order = np.argsort(table_keys, kind="stable")
            offsets = np.zeros(_KEYS + 1, dtype=np.int32)
            np.cumsum(np.bincount(table_keys, minlength=_KEYS), out=offsets[1:])
            self._offsets.append(offsets)
            self._rows.append(order.astype(np.int32))
            self._halves.append(halves.take(order))  # bucket order: a bucket's candidates are read in one run

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, queries: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> list[Match]:
        """Every (query_row, list_row, distance) with distance <= max_distance, in query-row order."""
        queries = _hash_rows(queries, "PDQIndex.match takes PDQ hashes")
        _check_distance(max_distance)
        if not len(queries) or not len(self._hashes):
            return []
        flips = _flip_masks(max_distance // HASH_TABLES)
        chunk = max(1, _PROBES_PER_UNIT // len(flips))
        units = [(start, table) for start in range(0, len(queries), chunk) for table in range(HASH_TABLES)]
        query_halves = queries[:, : PDQ_BYTES // 2].copy().view(_HALF)[:, 0]

        def search(unit: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            start, table = unit
            rows = slice(start, start + chunk)
            query_rows, list_rows, distances = self._table_pairs(queries[rows], query_halves[rows], table, flips, max_distance)
            return query_rows + start, list_rows, distances

        if MATCH_THREADS > 1 and len(queries) * len(flips) >= _PROBES_WORTH_A_THREAD:
            with ThreadPoolExecutor(MATCH_THREADS) as pool:
                found = list(pool.map(search, units))
        else:  # a few queries: starting threads would cost more than they save
            found = [search(unit) for unit in units]
        query_rows, list_rows, distances = (np.concatenate([part[field] for part in found]) for field in range(3))
        order = np.lexsort((list_rows, distances, query_rows))
        return list(zip(query_rows[order].tolist(), list_rows[order].tolist(), distances[order].tolist()))

    def _table_pairs(
        self, queries: np.ndarray, query_halves: np.ndarray, table: int, flips: np.ndarray, max_distance: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query rows, list rows, distances) of the pairs within max_distance that this table is the first to find.

        A pair is found by every table whose 16 bits differ in at most `max_distance // 16`; reporting it from
        the first such table only gives each pair once, with no set of the pairs found.
        """
        by_key = np.argsort(queries.view(np.uint16)[:, table], kind="stable").astype(np.int32)
        sorted_keys = queries.view(np.uint16)[by_key, table]
        probe_keys = (flips[:, None] ^ sorted_keys[None, :]).ravel()  # flip-major: each flip's keys ascend in runs
        probe_queries = np.tile(by_key, len(flips))
        offsets = self._offsets[table]
        begins = offsets[probe_keys]
        counts = offsets[probe_keys.astype(np.int32) + 1] - begins
        ends = np.cumsum(counts, dtype=np.int64)  # candidate count up to and including each probe
        halves, rows = self._halves[table], self._rows[table]
        found_queries, found_rows = [], []
        first = 0
        while first < len(probe_keys):
            done = int(ends[first - 1]) if first else 0
            last = max(first + 1, int(np.searchsorted(ends, done + _CANDIDATES_PER_STEP, side="right")))
            step_counts = counts[first:last]
            step_ends = (ends[first:last] - done).astype(np.int32)
            # candidate positions: each probe's bucket run, laid end to end
            positions = np.repeat(begins[first:last] - (step_ends - step_counts), step_counts)
            positions += np.arange(int(step_ends[-1]), dtype=np.int32)
            differing = halves.take(positions).view(np.uint64)
            differing ^= np.repeat(query_halves.take(probe_queries[first:last]), step_counts).view(np.uint64)
            bit_counts = _bit_counts(differing).view(np.uint16)  # the two words' counts side by side
            passed = np.flatnonzero((bit_counts & 0xFF) + (bit_counts >> 8) <= max_distance)
            if len(passed):
                probes = np.searchsorted(step_ends, passed, side="right")
                found_queries.append(probe_queries[first:last][probes])
                found_rows.append(rows.take(positions[passed]))
            first = last
        if not found_queries:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        query_rows, list_rows = np.concatenate(found_queries).astype(np.int64), np.concatenate(found_rows).astype(np.int64)
        differing = queries.view(np.uint64)[query_rows] ^ self._words[list_rows]  # [pairs, 4]
        distances = _bit_counts(differing).sum(axis=1, dtype=np.int64)
        slice_distances = _bit_counts(differing.view(np.uint16))  # [pairs, 16]: table t's bits are word t
        first_table = np.argmax(slice_distances <= max_distance // HASH_TABLES, axis=1)
        kept = (distances <= max_distance) & (first_table == table)
        return query_rows[kept], list_rows[kept], distances[kept]

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


@functools.lru_cache(maxsize=None)
def _flip_masks(most_bits: int) -> np.ndarray:
    """Every 16-bit mask of at most `most_bits` set bits (the keys probed around a query's), 0 first."""
    masks = np.arange(_KEYS, dtype=np.uint16)
    masks = masks[_bit_counts(masks) <= most_bits]
    masks.setflags(write=False)
    return masks


def _bit_counts(values: np.ndarray) -> np.ndarray:
    """Set bits of each unsigned integer, as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy 2
        return np.bitwise_count(values)
    as_bytes = np.unpackbits(values.view(np.uint8)).reshape(*values.shape, -1)
    return as_bytes.sum(axis=-1, dtype=np.uint8)


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
