"""Reading a filter run's scores of one signal in one streaming pass and choosing the samples a review sheet shows.

Rows are drawn stratified over the signal's score bands, with more of them around the review centre (by default
the policy's threshold on the signal, tasks/review/reviewed.py); the choice is a function of the seed and the
scores alone. Each kept row carries nsfw_score too (blurring always follows it), the rule that dropped it
(`filtered_by`) and, for concept groups, the matched concept.
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
from tasks.review.records import ReviewedSignal, ReviewSample, ScoreOverview
from tasks.signals.schema import default_policy

DEFAULT_REVIEW_SAMPLES = 64
# Score bands are the summary's histogram bins of the signal (20 over its range); bands whose centre lies within
# AROUND_HALF_WIDTH of the range (0.1 of nsfw's [0, 1]) from `around` get AROUND_WEIGHT times the share of the others.
AROUND_HALF_WIDTH = 0.1
AROUND_WEIGHT = 4
_KEPT_COLUMNS = {
    "key": object, "shard": object, "score": np.float32, "nsfw_score": np.float32, "band": np.int64,
    "filtered_by": object, "concept": object, "priority": np.uint64,
}  # fmt: skip
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


def _score_columns(signal: ReviewedSignal) -> list[str]:
    """The columns a sheet of `signal` reads: identity, the reviewed score, nsfw_score (blurring) and the matched concept."""
    columns = ["key", "shard", "nsfw_score", signal.column] + ([signal.concept_column] if signal.concept_column else [])
    return list(dict.fromkeys(columns))


def _iter_score_batches(scores_files: Sequence[LocationLike], columns: Sequence[str], optional: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """Batches of `columns`, plus those of `optional` the file has."""
    for scores_file in map(as_location, scores_files):
        url = scores_file.url
        fs, path = scores_file.filesystem()
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError:
            raise UserError(f"scores file {url} is missing; re-run the nsfw-filter flow on this output_path.") from None
        with handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            missing = [name for name in columns if name not in names]
            if missing:
                raise UserError(f"scores file {url} lacks the column(s) {', '.join(missing)}; it is not the scores file of the run its summary.json describes.")
            read = list(columns) + [name for name in optional if name in names]
            yield from parquet.iter_batches(batch_size=_READ_BATCH_ROWS, columns=read)


def _seed_hash_key(seed: int) -> str:
    return hashlib.sha256(f"nsfw-curator-review:{seed}".encode()).hexdigest()[:16]


def score_bands(score: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """Band index per score, with np.histogram's rule: [low, high) bins, the last one closed; scores outside the
    range fall in the first or last band, as the summary's histogram counts them."""
    return np.clip(np.searchsorted(bin_edges, score.astype(np.float64), side="right") - 1, 0, len(bin_edges) - 2)


def _float_column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False).astype(np.float32)  # nulls read as NaN


def _string_column(batch: pa.RecordBatch, name: str | None) -> np.ndarray:
    if name is None or name not in batch.schema.names:
        return np.full(batch.num_rows, None, dtype=object)
    return batch.column(name).to_numpy(zero_copy_only=False).astype(object)


def _filtered_by(batch: pa.RecordBatch, signal: ReviewedSignal) -> np.ndarray:
    """Per row, the rule that dropped it; a run from before the policy dropped nsfw_score >= its score_threshold."""
    if "filtered_by" in batch.schema.names or signal.legacy_score_threshold is None:
        return _string_column(batch, "filtered_by")
    threshold = signal.legacy_score_threshold
    label = default_policy(threshold).rules[0].label
    return np.where(_float_column(batch, "nsfw_score").astype(np.float64) >= threshold, label, None).astype(object)


def scan_scores(
    scores_files: Sequence[LocationLike], per_band: int, signal: ReviewedSignal, around: float, seed: int
) -> tuple[ScoreOverview, pd.DataFrame]:
    """Count `signal`'s scores and keep, per band, the `per_band` scored rows with the lowest seeded hash.

    Rows without a score (errors) are left out. The hash of (shard, key) is the sampling order, so a seed picks
    the same samples whatever the order of files and rows; memory holds at most `per_band` rows per band.
    """
    bin_edges = np.asarray(signal.bin_edges, dtype=np.float64)
    line = signal.threshold if signal.threshold is not None else around
    histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    histogram_below = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    samples = below_line = below_around = 0
    hash_key = _seed_hash_key(seed)
    kept = pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in _KEPT_COLUMNS.items()})
    # Only a run from before the policy may lack filtered_by.
    columns, optional = _score_columns(signal), ["filtered_by"]
    if signal.legacy_score_threshold is None:
        columns, optional = columns + optional, []
    for batch in _iter_score_batches(scores_files, columns, optional):
        samples += batch.num_rows
        # The writer gives every scored row a key, a shard and all its scores; the mask only keeps hashing total.
        scored_mask = np.isfinite(_float_column(batch, signal.column)) & np.isfinite(_float_column(batch, "nsfw_score"))
        scored_mask &= pc.and_(pc.is_valid(batch.column("key")), pc.is_valid(batch.column("shard"))).to_numpy(zero_copy_only=False)
        scored = batch.filter(pa.array(scored_mask))
        if scored.num_rows == 0:
            continue
        score = _float_column(scored, signal.column)
        band = score_bands(score, bin_edges)
        histogram += np.bincount(band, minlength=HISTOGRAM_BINS)
        below = score.astype(np.float64) < line
        histogram_below += np.bincount(band[below], minlength=HISTOGRAM_BINS)
        below_line += int(np.count_nonzero(below))
        below_around += int(np.count_nonzero(score.astype(np.float64) < around))
        identity = pc.binary_join_element_wise(scored.column("shard"), scored.column("key"), "\x00").to_numpy(zero_copy_only=False)
        batch_rows = pd.DataFrame(
            {
                "key": scored.column("key").to_numpy(zero_copy_only=False),
                "shard": scored.column("shard").to_numpy(zero_copy_only=False),
                "score": score,
                "nsfw_score": _float_column(scored, "nsfw_score"),
                "band": band,
                "filtered_by": _filtered_by(scored, signal),
                "concept": _string_column(scored, signal.concept_column),
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
        score_threshold=float(line),
        below_threshold=below_line,
        around=float(around),
        below_around=below_around,
        signal=signal,
    )
    return overview, kept


# ---------------------------------------------------------------- choosing the samples


def around_half_width(bin_edges: Sequence[float]) -> float:
    """How far from `around` a band's centre may lie to be sampled densely: AROUND_HALF_WIDTH of the bands' range."""
    return AROUND_HALF_WIDTH * float(bin_edges[-1] - bin_edges[0])


def band_weights(around: float, bin_edges: Sequence[float]) -> np.ndarray:
    """Relative share of each band: AROUND_WEIGHT for bands centred within `around_half_width` of `around`, else 1."""
    edges = np.asarray(bin_edges, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    half_width = around_half_width(edges)
    return np.where(np.abs(centres - around) <= half_width * (1 + 1e-9), float(AROUND_WEIGHT), 1.0)


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
            chosen.append(
                ReviewSample(
                    key=row.key, shard=row.shard, nsfw_score=float(row.nsfw_score), score=float(row.score), band=int(band),
                    filtered_by=row.filtered_by if isinstance(row.filtered_by, str) else None,
                    concept=row.concept if isinstance(row.concept, str) else None,
                )
            )
    chosen.sort(key=lambda s: (s.band, s.score, s.shard, s.key))
    assert len(chosen) == int(quotas.sum())
    return chosen, quotas
