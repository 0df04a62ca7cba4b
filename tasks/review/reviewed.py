"""Which signal a review sheet shows and where its samples are densest, read from the run's summary.json.

A summary written with signals holds `signals` ({name: {kind, column, histogram_bins, histogram, [concept_column]}},
nsfw included) and `policy` ({"rules": [...]}, tasks/signals/schema.py). An older summary has neither: then only
`nsfw` exists, over [0, 1], and the run dropped nsfw_score >= its `score_threshold`.

The signal's threshold is the first one the policy sets on it (at_least or below, in a rule or in its `when`).
`around` defaults to that threshold, else for nsfw to the summary's `score_threshold`, else to the middle of the
signal's histogram range, and must lie in that range. Everything read is validated: a mistake is one sentence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import ValidationError

from tasks.errors import UserError
from tasks.io.write import HISTOGRAM_BINS
from tasks.review.records import ReviewedSignal
from tasks.signals.columns import NSFW
from tasks.signals.schema import Policy, default_policy

_LEGACY_SIGNALS = {NSFW: {"kind": "nsfw", "column": "nsfw_score", "histogram_bins": np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1).tolist()}}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_policy(summary: dict, summary_url: str) -> Policy:
    """The policy the run applied: the summary's, or for a summary from before the policy its score_threshold."""
    score_threshold = summary["score_threshold"]
    if not _is_number(score_threshold):
        raise UserError(f"{summary_url} has a score_threshold that is not a number; re-run the nsfw-filter flow to rewrite it.")
    if not summary.get("policy"):
        return default_policy(float(score_threshold))
    try:
        return Policy.model_validate(summary["policy"])
    except ValidationError:
        raise UserError(f"{summary_url} holds a policy that is not valid; re-run the nsfw-filter flow to rewrite it.") from None


def _bin_edges(record: dict) -> tuple[float, ...] | None:
    """The 20 equal bins of a summary record, as the writer's np.histogram drew them; None when they are not."""
    bins = record.get("histogram_bins")
    if not isinstance(bins, list) or len(bins) != HISTOGRAM_BINS + 1 or not all(_is_number(value) for value in bins):
        return None
    low, high = float(bins[0]), float(bins[-1])
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    # The summary rounds its edges to 4 decimals.
    if not high > low or not np.allclose(edges, np.asarray(bins, dtype=np.float64), rtol=0, atol=1e-4 + 1e-6 * (high - low)):
        return None
    return tuple(edges.tolist())


def _first_threshold(policy: Policy, name: str) -> tuple[float, bool, str] | None:
    """(threshold, whether it drops scores below it, the rule's label) of the first test on `name`'s score."""
    for rule in policy.rules:
        for test in (rule, *rule.when):
            if test.signal != name:
                continue
            if test.at_least is not None:
                return test.at_least, False, rule.label
            if test.below is not None:
                return test.below, True, rule.label
    return None


def reviewed_signal(summary: dict, name: str, summary_url: str) -> ReviewedSignal:
    """The signal `name` of the run: its column and bands from `signals[name]`, its threshold from the policy."""
    signals = summary.get("signals") or _LEGACY_SIGNALS
    if not isinstance(signals, dict) or not all(isinstance(key, str) for key in signals):
        raise UserError(f"{summary_url} holds signals that are not a mapping of names; re-run the nsfw-filter flow to rewrite it.")
    if name not in signals:
        raise UserError(f"the run has no signal {name!r}; its signals are {', '.join(signals)} (pass one of them to --signal).")
    record = signals[name]
    edges = _bin_edges(record) if isinstance(record, dict) else None
    column, concept_column = (record.get("column"), record.get("concept_column")) if isinstance(record, dict) else (None, None)
    if edges is None or not isinstance(column, str) or not column or not (concept_column is None or isinstance(concept_column, str) and concept_column):
        raise UserError(f"{summary_url} holds a malformed record of the signal {name!r}; re-run the nsfw-filter flow to rewrite it.")
    policy = run_policy(summary, summary_url)
    legacy = not summary.get("policy")
    threshold = _first_threshold(policy, name)
    return ReviewedSignal(
        name=name,
        column=column,
        bin_edges=edges,
        concept_column=concept_column,
        threshold=None if threshold is None else float(threshold[0]),
        drops_below=threshold is not None and threshold[1],
        threshold_name="score_threshold" if policy == default_policy(float(summary["score_threshold"])) else "threshold",
        threshold_rule=None if threshold is None else threshold[2],
        legacy_score_threshold=float(summary["score_threshold"]) if legacy else None,
    )


def _article(column: str) -> str:
    # nsfw is spoken letter by letter: "an nsfw_score".
    return "an" if column[:1] in "aeiou" or column.startswith("nsfw") else "a"


def review_centre(signal: ReviewedSignal, around: float | None, score_threshold: float) -> float:
    """`around` checked against the signal's range, or its default: the threshold, nsfw's score_threshold, the middle."""
    low, high = signal.value_range
    if around is not None:
        if not (_is_number(around) and low <= around <= high):
            raise UserError(f"around must be {_article(signal.column)} {signal.column} between {low:g} and {high:g}, not {around!r}.")
        return float(around)
    if signal.threshold is not None:
        centre, source = signal.threshold, f"the policy's threshold {signal.threshold:g}"
    elif signal.name == NSFW:
        centre, source = float(score_threshold), f"the run's score_threshold {score_threshold:g}"
    else:
        return (low + high) / 2
    if not low <= centre <= high:
        raise UserError(f"{source} on {signal.column} lies outside its histogram's range [{low:g}, {high:g}]; pass --around within that range.")
    return centre
