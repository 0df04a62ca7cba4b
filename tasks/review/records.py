"""What a review sheet is made of: the score overview, the samples shown and what was written."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field


@dataclass
class ScoreOverview:
    """What the scores Parquet says, counted in one streaming pass."""

    samples: int  # rows, scored or not
    scored: int  # rows with a nsfw_score
    histogram: list[int]  # scored rows per band, same bins as summary.json
    histogram_below_threshold: list[int]  # of those, rows with nsfw_score < score_threshold
    bin_edges: list[float]
    score_threshold: float
    below_threshold: int  # scored rows with nsfw_score < score_threshold (they passed)
    around: float
    below_around: int  # scored rows with nsfw_score < around

    @property
    def at_or_above_threshold(self) -> int:
        return self.scored - self.below_threshold

    @property
    def at_or_above_around(self) -> int:
        return self.scored - self.below_around


@dataclass
class ReviewSample:
    """One sample shown on the sheet."""

    key: str
    shard: str
    nsfw_score: float
    band: int
    thumbnail: str | None = None  # path relative to the review folder; None when the image could not be fetched
    blurred: bool = False
    caption: str | None = None
    problem: str | None = None  # why there is no thumbnail


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

    @property
    def review_url(self) -> str:
        return posixpath.dirname(self.sheet_url)

