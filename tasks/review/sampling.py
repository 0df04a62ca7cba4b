"""Reading a filter run's scores in one streaming pass and choosing the samples a review sheet shows.

Rows are drawn stratified over score bands, with more of them around the review centre (by default
the run's score_threshold); the choice is a function of the seed and the scores alone.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.io.locations import LocationLike, as_location
from tasks.io.write import HISTOGRAM_BINS, join_url
from tasks.review.records import ReviewSample, ScoreOverview

DEFAULT_REVIEW_SAMPLES = 64
# Score bands are the summary's histogram bins (0.05 wide); bands whose centre lies within
# AROUND_HALF_WIDTH of `around` get AROUND_WEIGHT times the share of the others.
AROUND_HALF_WIDTH = 0.1
AROUND_WEIGHT = 4
_SCORE_COLUMNS = ["key", "shard", "nsfw_score"]
_READ_BATCH_ROWS = 65_536


def read_run_summary(output: LocationLike) -> dict:
    """The run's summary.json; UserError when the output is not a finished filter run."""
    output = as_location(output)
    output_path = output.url
    url = join_url(output_path, "summary.json")
    fs, path = output.at(url).filesystem()
    try:
        with fs.open(path, "rb") as handle:
            summary = json.loads(handle.read().decode())
    except FileNotFoundError:
        raise UserError(f"{output_path} has no summary.json; point --output-path at the output_path of a finished nsfw-filter run.") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{url} is not valid JSON; re-run the nsfw-filter flow to rewrite it.") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("scores_files"), list) or "score_threshold" not in summary:
        raise UserError(f"{url} is not an nsfw-filter run summary; point --output-path at the output_path of a filter run.")
    return summary


def run_scores_urls(output_path: str, summary: dict) -> list[str]:
    """The run's scores files, found under `output_path` (so a moved or copied output still works)."""
    return [join_url(output_path, "scores", posixpath.basename(url)) for url in summary["scores_files"]]


def _iter_score_batches(scores_files: Sequence[LocationLike]) -> Iterator[pa.RecordBatch]:
    for scores_file in map(as_location, scores_files):
        url = scores_file.url
        fs, path = scores_file.filesystem()
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError:
            raise UserError(f"scores file {url} is missing; re-run the nsfw-filter flow on this output_path.") from None
        with handle:
            parquet = pq.ParquetFile(handle)
            missing = [name for name in _SCORE_COLUMNS if name not in parquet.schema_arrow.names]
            if missing:
                raise UserError(f"scores file {url} lacks the column(s) {', '.join(missing)}; it is not an nsfw-filter scores file.")
            yield from parquet.iter_batches(batch_size=_READ_BATCH_ROWS, columns=_SCORE_COLUMNS)


def _seed_hash_key(seed: int) -> str:
    return hashlib.sha256(f"nsfw-curator-review:{seed}".encode()).hexdigest()[:16]


def score_bands(nsfw_score: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """Band index per score, with np.histogram's rule: [low, high) bins, the last one closed."""
    return np.clip(np.searchsorted(bin_edges, nsfw_score.astype(np.float64), side="right") - 1, 0, len(bin_edges) - 2)


def scan_scores(
    scores_files: Sequence[LocationLike], per_band: int, score_threshold: float, around: float, seed: int
) -> tuple[ScoreOverview, pd.DataFrame]:
    """Count the scores and keep, per band, the `per_band` scored rows with the lowest seeded hash.

    The hash of (shard, key) is the sampling order, so a seed picks the same samples whatever the
    order of files and rows; memory holds at most `per_band` rows per band.
    """
    bin_edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    histogram_below = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    samples = below_threshold = below_around = 0
    hash_key = _seed_hash_key(seed)
    kept = pd.DataFrame({"key": pd.Series(dtype=object), "shard": pd.Series(dtype=object), "nsfw_score": pd.Series(dtype=np.float32),
                         "band": pd.Series(dtype=np.int64), "priority": pd.Series(dtype=np.uint64)})
    for batch in _iter_score_batches(scores_files):
        samples += batch.num_rows
        scored = batch.filter(pc.is_valid(batch.column("nsfw_score")))
        if scored.num_rows == 0:
            continue
        nsfw_score = scored.column("nsfw_score").to_numpy(zero_copy_only=False).astype(np.float32)
        band = score_bands(nsfw_score, bin_edges)
        histogram += np.bincount(band, minlength=HISTOGRAM_BINS)
        passes = nsfw_score.astype(np.float64) < score_threshold
        histogram_below += np.bincount(band[passes], minlength=HISTOGRAM_BINS)
        below_threshold += int(np.count_nonzero(passes))
        below_around += int(np.count_nonzero(nsfw_score.astype(np.float64) < around))
        # The writer gives every scored row a key and a shard; the mask only keeps hashing total.
        named = pc.and_(pc.is_valid(scored.column("key")), pc.is_valid(scored.column("shard"))).to_numpy(zero_copy_only=False)
        scored = scored.filter(pa.array(named))
        identity = pc.binary_join_element_wise(scored.column("shard"), scored.column("key"), "\x00").to_numpy(zero_copy_only=False)
        batch_rows = pd.DataFrame(
            {
                "key": scored.column("key").to_numpy(zero_copy_only=False),
                "shard": scored.column("shard").to_numpy(zero_copy_only=False),
                "nsfw_score": nsfw_score[named],
                "band": band[named],
                "priority": pd.util.hash_array(identity.astype(object), hash_key=hash_key, categorize=False),
            }
        )
        merged = pd.concat([kept, batch_rows], ignore_index=True) if len(kept) else batch_rows
        kept = merged.sort_values(["band", "priority"], kind="stable").groupby("band", sort=False).head(per_band).reset_index(drop=True)
    overview = ScoreOverview(
        samples=samples,
        scored=int(histogram.sum()),
        histogram=histogram.astype(int).tolist(),
        histogram_below_threshold=histogram_below.astype(int).tolist(),
        bin_edges=bin_edges.round(4).tolist(),
        score_threshold=float(score_threshold),
        below_threshold=below_threshold,
        around=float(around),
        below_around=below_around,
    )
    return overview, kept


# ---------------------------------------------------------------- choosing the samples


def band_weights(around: float, bin_edges: Sequence[float]) -> np.ndarray:
    """Relative share of each band: AROUND_WEIGHT for bands centred within AROUND_HALF_WIDTH of `around`, else 1."""
    edges = np.asarray(bin_edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    return np.where(np.abs(centres - around) <= AROUND_HALF_WIDTH + 1e-9, float(AROUND_WEIGHT), 1.0)


def allocate_quotas(n: int, capacity: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Split `n` over bands in proportion to `weights`, no band above its `capacity`; full bands pass the rest on.

    Integer shares by largest remainder (ties to the lower band), so the split is deterministic.
    """
    capacity = np.asarray(capacity, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    assert capacity.shape == weights.shape and (weights > 0).all()
    quota = np.zeros_like(capacity)
    remaining = int(min(n, capacity.sum()))
    while remaining > 0:
        open_bands = quota < capacity
        share = np.where(open_bands, weights, 0.0)
        share = remaining * share / share.sum()
        give = np.floor(share).astype(np.int64)
        leftover = remaining - int(give.sum())
        if leftover:
            fraction = np.where(open_bands, share - give, -1.0)
            give[np.argsort(-fraction, kind="stable")[:leftover]] += 1
        give = np.minimum(give, capacity - quota)
        quota += give
        remaining -= int(give.sum())
    return quota


def choose_review_samples(kept: pd.DataFrame, overview: ScoreOverview, n: int) -> tuple[list[ReviewSample], np.ndarray]:
    """The samples to show, ordered by band then score, and the number taken from each band."""
    quotas = allocate_quotas(n, overview.histogram, band_weights(overview.around, overview.bin_edges))
    chosen: list[ReviewSample] = []
    for band, rows in kept.groupby("band", sort=True):
        for row in rows.head(int(quotas[band])).itertuples(index=False):
            chosen.append(ReviewSample(key=row.key, shard=row.shard, nsfw_score=float(row.nsfw_score), band=int(band)))
    chosen.sort(key=lambda s: (s.band, s.nsfw_score, s.shard, s.key))
    assert len(chosen) == int(quotas.sum())
    return chosen, quotas
