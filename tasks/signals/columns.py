"""The scores Parquet's signal columns: each signal's name, kind, columns and the range of its scores.

Imports nothing heavy: the writer, the review sheet and the webdataset stage read these names.
"""

from __future__ import annotations

from dataclasses import dataclass

NSFW = "nsfw"
# Columns of the scores Parquet that are not a signal's: no signal may take these names.
RESERVED_COLUMNS = frozenset({"key", "shard", "passed", "error", "output_shard", "filtered_by", "nsfw_score"})
# The values a threshold on each kind of score can take (and the histogram's range).
SCORE_RANGE = {"nsfw": (0.0, 1.0), "prompts": (0.0, 1.0), "aesthetic": (0.0, 10.0), "concepts": (-1.0, 1.0)}
HISTOGRAM_RANGE = {"nsfw": (0.0, 1.0), "prompts": (0.0, 1.0), "aesthetic": (0.0, 10.0), "concepts": (0.0, 0.5)}

@dataclass(frozen=True)
class ScoredSignal:
    """One score column of the scores Parquet: the signal name rules use, its kind, column and matched-concept column."""

    name: str
    kind: str
    score_column: str
    concept_column: str | None = None  # concept groups: the matched concept (null when none)

    @property
    def score_range(self) -> tuple[float, float]:
        return SCORE_RANGE[self.kind]

    @property
    def histogram_range(self) -> tuple[float, float]:
        return HISTOGRAM_RANGE[self.kind]
