"""The threshold-calibration review sheet of a filter run: one signal's score histogram and thumbnails to look at.

Reads a run's `summary.json` and `scores/*.parquet` under `output_path`, samples the rows scored by the reviewed
signal (nsfw by default; any signal the summary lists) across its score bands, more of them around its threshold
(tasks/review/reviewed.py), fetches their images by streaming only the input shards that hold them, and writes
under `{output_path}/review/`:

    review.html                 the sheet: inline CSS, relative links only, so the folder is portable
    histogram.png               the signal's score histogram (log count axis), threshold marked, counts on each side
    thumbs/{nnnn}-{id}.jpg      thumbnails, at most THUMBNAIL_SIDE px; `-blurred` ones hide their content

Blurring always follows nsfw_score, whichever signal is reviewed. Thumbnails and the histogram are written first and `review.html` last, so the sheet never links a
missing file; thumbnails of an earlier sheet that the new one does not show are deleted afterwards
(an unblurred thumbnail never outlives the sheet that asked for it).
"""

from __future__ import annotations

import os
import posixpath

from tasks.errors import UserError
from tasks.io.atomic import write_bytes_for_browser
from tasks.io.locations import LocationLike, as_location
from tasks.io.ownership import refuse_linked_folders
from tasks.io.write import join_url
from tasks.review.records import ReviewSheet
from tasks.review.reviewed import review_centre, reviewed_signal, run_policy
from tasks.review.render import HISTOGRAM_NAME, render_histogram_png, render_sheet_html
from tasks.review.sampling import (
    DEFAULT_REVIEW_SAMPLES,
    choose_review_samples,
    read_run_summary,
    run_scores_urls,
    scan_scores,
)
from tasks.review.thumbnails import THUMBS_DIR, fetch_thumbnails, remove_stale_thumbnails
from tasks.signals.columns import NSFW

DEFAULT_BLUR_ABOVE = 0.5
REVIEW_DIR = "review"
SHEET_NAME = "review.html"


def _normalise(url: str) -> str:
    return url.rstrip("/") if "://" in url else os.path.abspath(os.path.expanduser(url))


def write_review_sheet(
    output: LocationLike,
    n: int = DEFAULT_REVIEW_SAMPLES,
    around: float | None = None,
    blur_above: float = DEFAULT_BLUR_ABOVE,
    blur: bool = True,
    seed: int = 0,
    signal: str = NSFW,
) -> ReviewSheet:
    """Write `{output}/review/review.html` for a finished filter run; returns what was written.

    `n` samples are drawn from the rows `signal` scored, stratified over its score bands with extra density around
    `around` (a score of that signal; default: the policy's threshold on it, tasks/review/reviewed.py); thumbnails
    of samples with nsfw_score >= blur_above are blurred unless `blur` is False.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"the number of review samples must be a whole number of at least 1, not {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"the review seed must be a whole number, not {seed!r}.")
    if not isinstance(signal, str):
        raise UserError(f"the reviewed signal must be a signal's name, not {signal!r}.")
    if not 0.0 <= blur_above <= 1.0:
        raise UserError(f"blur_above must be an nsfw_score between 0 and 1, not {blur_above!r}; use --no-blur to turn blurring off.")
    output = as_location(output)
    output = output.at(_normalise(output.url))
    output_path = output.url
    refuse_linked_folders(output, (REVIEW_DIR, f"{REVIEW_DIR}/{THUMBS_DIR}"))  # stale thumbnails are deleted there
    summary = read_run_summary(output)
    summary_url = join_url(output_path, "summary.json")
    reviewed = reviewed_signal(summary, signal, summary_url)
    around = review_centre(reviewed, around, summary["score_threshold"])
    policy = run_policy(summary, summary_url)
    overview, kept = scan_scores([output.at(url) for url in run_scores_urls(output_path, summary)], n, reviewed, around, seed)
    samples, quotas = choose_review_samples(kept, overview, n)
    for sample in samples:
        sample.blurred = blur and sample.nsfw_score >= blur_above
    review = output / REVIEW_DIR
    review_url = review.url
    fetch_thumbnails(list(enumerate(samples)), review)
    histogram_url = join_url(review_url, HISTOGRAM_NAME)
    write_bytes_for_browser(review.at(histogram_url), render_histogram_png(overview), "image/png")
    sheet = ReviewSheet(
        output_path=output_path,
        sheet_url=join_url(review_url, SHEET_NAME),
        histogram_url=histogram_url,
        overview=overview,
        samples=samples,
        requested=n,
        seed=seed,
        blur_above=blur_above if blur else None,
        quotas=quotas.astype(int).tolist(),
        policy=[] if reviewed.legacy_score_threshold is not None else [rule.label for rule in policy.rules],
    )
    write_bytes_for_browser(review.at(sheet.sheet_url), render_sheet_html(sheet, summary).encode(), "text/html; charset=utf-8")
    remove_stale_thumbnails(review, [s.thumbnail for s in samples if s.thumbnail])
    return sheet


def remove_review_sheet(output: LocationLike) -> bool:
    """Delete an earlier review sheet under `output` (its page, histogram and thumbnails); True when there was one.

    A run that quarantines samples and writes no new sheet removes the old one: it may show a sample now matched.
    """
    review = as_location(output) / REVIEW_DIR
    fs, root = review.filesystem()
    removed = bool(remove_stale_thumbnails(review, []))
    for name in (SHEET_NAME, HISTOGRAM_NAME):
        path = posixpath.join(root.rstrip("/"), name)
        if fs.exists(path):
            fs.rm(path)
            removed = True
    return removed

