"""What a review sheet is made of: the reviewed signal, the score overview, the samples shown and what was written."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import numpy as np

from tasks.io.write import HISTOGRAM_BINS
from tasks.signals.columns import NSFW


@dataclass(frozen=True)
class ReviewedSignal:
    """The signal a sheet reviews: its score column, its bands (the summary's histogram bins) and the line the
    run's policy draws on it (`threshold`, None when no rule tests this signal's score)."""

    name: str = NSFW
    column: str = "nsfw_score"
    bin_edges: tuple[float, ...] = tuple(np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1).tolist())
    concept_column: str | None = None  # concept groups: the matched concept
    threshold: float | None = None
    drops_below: bool = False  # the rule drops scores below the threshold (a `below` test), not those at or above it
    threshold_name: str = "score_threshold"  # how the sheet names the threshold: score_threshold, or "threshold"
    threshold_rule: str | None = None  # the label of the policy rule that sets the threshold
    # A run from before the policy: its scores have no filtered_by, it dropped nsfw_score >= this.
    legacy_score_threshold: float | None = None

    @property
    def value_range(self) -> tuple[float, float]:
        return self.bin_edges[0], self.bin_edges[-1]


def nsfw_signal(score_threshold: float) -> ReviewedSignal:
    """nsfw over [0, 1], dropped at or above `score_threshold`: what every run without a policy reviews."""
    return ReviewedSignal(threshold=float(score_threshold))


@dataclass
class ScoreOverview:
    """What the scores Parquet says about the reviewed signal, counted in one streaming pass.

    The line is the signal's threshold, or `around` when the policy sets none on it; "below" counts are of scores
    strictly below the line.
    """

    samples: int  # rows, scored or not
    scored: int  # rows with a score for the reviewed signal
    histogram: list[int]  # scored rows per band, same bins as summary.json
    histogram_below_threshold: list[int]  # of those, rows scoring below the line
    bin_edges: list[float]
    score_threshold: float  # the line: the signal's threshold, else `around`
    below_threshold: int  # scored rows below the line
    around: float
    below_around: int  # scored rows below `around`
    signal: ReviewedSignal = field(default_factory=ReviewedSignal)

    @property
    def at_or_above_threshold(self) -> int:
        return self.scored - self.below_threshold

    @property
    def at_or_above_around(self) -> int:
        return self.scored - self.below_around

    @property
    def has_threshold(self) -> bool:
        return self.signal.threshold is not None


@dataclass
class ReviewSample:
    """One sample shown on the sheet."""

    key: str
    shard: str
    nsfw_score: float
    score: float  # the reviewed signal's (nsfw_score itself when the sheet reviews nsfw)
    band: int
    thumbnail: str | None = None  # path relative to the review folder; None when the image could not be fetched
    blurred: bool = False
    caption: str | None = None
    problem: str | None = None  # why there is no thumbnail
    filtered_by: str | None = None  # the label of the policy rule that dropped the sample
    concept: str | None = None  # concept groups: the matched concept


@dataclass
class ReviewSheet:
    """What `write_review_sheet` wrote."""

    output_path: str
    sheet_url: str
    histogram_url: str
    overview: ScoreOverview
    samples: list[ReviewSample]
    requested: int
    seed: int
    blur_above: float | None  # None: nothing blurred
    quotas: list[int] = field(default_factory=list)  # samples shown per band
    policy: list[str] = field(default_factory=list)  # the labels of the run's policy rules; empty for a run from before it

    @property
    def review_url(self) -> str:
        return posixpath.dirname(self.sheet_url)
