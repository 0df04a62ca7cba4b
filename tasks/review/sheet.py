"""The threshold-calibration review sheet of a filter run: a score histogram and thumbnails to look at.

Reads a run's `summary.json` and `scores/*.parquet` under `output_path`, samples scored rows across
score bands (more of them around the threshold), fetches their images by streaming only the input
shards that hold them, and writes under `{output_path}/review/`:

    review.html                 the sheet: inline CSS, relative links only, so the folder is portable
    histogram.png               nsfw_score histogram (log count axis), threshold marked, counts on each side
    thumbs/{nnnn}-{id}.jpg      thumbnails, at most THUMBNAIL_SIDE px; `-blurred` ones hide their content

Thumbnails and the histogram are written first and `review.html` last, so the sheet never links a
missing file; thumbnails of an earlier sheet that the new one does not show are deleted afterwards
(an unblurred thumbnail never outlives the sheet that asked for it).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import os
import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tasks.io.atomic import filesystem, is_object_store, write_bytes_atomic
from tasks.errors import UserError
from tasks.io.read import DecodeOptions, decode_sample, iter_samples
from tasks.io.write import HISTOGRAM_BINS, join_url

DEFAULT_REVIEW_SAMPLES = 64
DEFAULT_BLUR_ABOVE = 0.5
REVIEW_DIR = "review"
SHEET_NAME = "review.html"
HISTOGRAM_NAME = "histogram.png"
THUMBS_DIR = "thumbs"
THUMBNAIL_SIDE = 192
# A Gaussian radius of 12% of the thumbnail's longer side leaves colour blobs, nothing recognisable.
BLUR_RADIUS_FRACTION = 0.12
THUMBNAIL_JPEG_QUALITY = 85
# Score bands are the summary's histogram bins (0.05 wide); bands whose centre lies within
# AROUND_HALF_WIDTH of `around` get AROUND_WEIGHT times the share of the others.
AROUND_HALF_WIDTH = 0.1
AROUND_WEIGHT = 4
_SCORE_COLUMNS = ["key", "shard", "nsfw_score"]
_READ_BATCH_ROWS = 65_536
_CAPTION_CHARS = 300
_SHARD_READERS = 4  # shards streamed at once when fetching images (object-store latency, not CPU)


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


# ---------------------------------------------------------------- reading the run


def _normalise(url: str) -> str:
    return url.rstrip("/") if "://" in url else os.path.abspath(os.path.expanduser(url))


def read_run_summary(output_path: str, storage_options: dict | None = None) -> dict:
    """The run's summary.json; UserError when `output_path` is not a finished filter run."""
    url = join_url(output_path, "summary.json")
    fs, path = filesystem(url, storage_options)
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


def _iter_score_batches(scores_urls: Sequence[str], storage_options: dict | None) -> Iterator[pa.RecordBatch]:
    for url in scores_urls:
        fs, path = filesystem(url, storage_options)
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
    scores_urls: Sequence[str], per_band: int, score_threshold: float, around: float, seed: int, storage_options: dict | None = None
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
    for batch in _iter_score_batches(scores_urls, storage_options):
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


# ---------------------------------------------------------------- thumbnails


def make_thumbnail(image: Image.Image, blurred: bool) -> Image.Image:
    """At most THUMBNAIL_SIDE px on its longer side; Gaussian-blurred beyond recognition when `blurred`."""
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    if blurred:
        thumbnail = thumbnail.filter(ImageFilter.GaussianBlur(radius=BLUR_RADIUS_FRACTION * max(thumbnail.size)))
    return thumbnail


def thumbnail_name(index: int, sample: ReviewSample) -> str:
    # Keys and shard names are untrusted: the file name is derived from them, never made of them.
    digest = hashlib.sha256(f"{sample.shard}\x00{sample.key}".encode()).hexdigest()[:12]
    return posixpath.join(THUMBS_DIR, f"{index:04d}-{digest}{'-blurred' if sample.blurred else ''}.jpg")


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return buffer.getvalue()


def _write(url: str, data: bytes, content_type: str, storage_options: dict | None) -> None:
    """Atomic write; on S3 with a Content-Type, so a browser shows the sheet instead of downloading it."""
    fs, path = filesystem(url, storage_options)
    if is_object_store(fs) and "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        fs.pipe_file(path, data, ContentType=content_type)
    else:
        write_bytes_atomic(url, data, storage_options)


def fetch_thumbnails(
    samples: Sequence[tuple[int, ReviewSample]], review_url: str, storage_options: dict | None = None
) -> None:
    """Stream each shard holding chosen samples until all of them are found; write their thumbnails (in place)."""
    by_shard: dict[str, dict[str, tuple[int, ReviewSample]]] = defaultdict(dict)
    for index, sample in samples:
        by_shard[sample.shard][sample.key] = (index, sample)
    decode = DecodeOptions(reduced_jpeg_size=THUMBNAIL_SIDE)

    def fetch_shard(shard_url: str) -> None:
        wanted = dict(by_shard[shard_url])
        try:
            with closing(iter_samples(shard_url, decode=None, storage_options=storage_options)) as raw_samples:
                for raw in raw_samples:
                    if raw.key not in wanted or raw.error is not None:
                        continue
                    index, sample = wanted.pop(raw.key)
                    decoded = decode_sample(raw, decode)
                    if decoded.error is not None or decoded.image is None:
                        sample.problem = f"image could not be decoded: {decoded.error}"
                    else:
                        sample.caption = decoded.caption
                        name = thumbnail_name(index, sample)
                        _write(join_url(review_url, name), _jpeg_bytes(make_thumbnail(decoded.image, sample.blurred)), "image/jpeg", storage_options)
                        sample.thumbnail = name
                    if not wanted:
                        break  # the rest of the shard holds nothing to show
        except UserError as exc:
            for _, sample in wanted.values():
                sample.problem = f"shard could not be read: {exc}"
            return
        for _, sample in wanted.values():
            sample.problem = "sample not found in its shard; the shard changed after the run"

    with ThreadPoolExecutor(max_workers=max(1, min(_SHARD_READERS, len(by_shard)))) as pool:
        list(pool.map(fetch_shard, sorted(by_shard)))


def remove_stale_thumbnails(review_url: str, keep: Sequence[str], storage_options: dict | None = None) -> list[str]:
    """Delete thumbnails under `review_url` that the current sheet does not show."""
    fs, root = filesystem(review_url, storage_options)
    fs.invalidate_cache()
    keep_paths = {posixpath.join(root.rstrip("/"), name) for name in keep}
    stale = [path for path in fs.glob(posixpath.join(root.rstrip("/"), THUMBS_DIR, "*.jpg")) if path not in keep_paths]
    for path in stale:
        fs.rm(path)
    return stale


# ---------------------------------------------------------------- histogram PNG

PASS_COLOUR = (54, 104, 168)
FILTERED_COLOUR = (196, 72, 52)
THRESHOLD_COLOUR = (20, 20, 20)
AROUND_COLOUR = (120, 70, 170)
_GRID_COLOUR = (225, 225, 225)
_TEXT_COLOUR = (40, 40, 40)


@dataclass(frozen=True)
class HistogramLayout:
    """Geometry of the histogram PNG (pixels)."""

    width: int = 960
    height: int = 380
    left: int = 64
    right: int = 24
    top: int = 64
    bottom: int = 52

    @property
    def baseline(self) -> int:
        return self.height - self.bottom

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.baseline - self.top

    def x_of(self, nsfw_score: float) -> int:
        return round(self.left + nsfw_score * self.plot_width)

    def axis_top(self, histogram: Sequence[int]) -> int:
        """The count at the top of the log axis: the next power of ten at or above the largest bin."""
        return 10 ** max(1, math.ceil(math.log10(max(max(histogram), 1))))

    def bar_height(self, count: int, histogram: Sequence[int]) -> int:
        if count <= 0:
            return 0
        return max(2, round(self.plot_height * math.log10(1 + count) / math.log10(1 + self.axis_top(histogram))))

    def bar_span(self, bin_index: int, bins: int = HISTOGRAM_BINS) -> tuple[int, int]:
        """x range of a bar (inclusive), a 2 px gap each side."""
        return self.x_of(bin_index / bins) + 2, self.x_of((bin_index + 1) / bins) - 2


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _compact(count: int) -> str:
    """1234 -> 1234, 18123 -> 18.1k, 480000 -> 480k, 1000000 -> 1M: short enough for a bar."""
    for unit, suffix, smallest in ((1_000_000, "M", 1_000_000), (1_000, "k", 10_000)):
        if count >= smallest:
            value = count / unit
            return (f"{value:.1f}" if value < 100 else f"{value:.0f}").removesuffix(".0") + suffix
    return str(count)


def _dashed_vertical(draw: ImageDraw.ImageDraw, x: int, y0: int, y1: int, colour: tuple[int, int, int]) -> None:
    for y in range(y0, y1, 10):
        draw.line((x, y, x, min(y + 5, y1)), fill=colour, width=2)


def render_histogram_png(overview: ScoreOverview, layout: HistogramLayout = HistogramLayout()) -> bytes:
    """The score histogram: log count axis, bars coloured by side of the threshold, counts on each side."""
    histogram = overview.histogram
    bins = len(histogram)
    image = Image.new("RGB", (layout.width, layout.height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    small, normal = _font(11), _font(14)
    top = layout.axis_top(histogram)
    for power in range(0, int(round(math.log10(top))) + 1):
        y = layout.baseline - layout.bar_height(10**power, histogram)
        draw.line((layout.left, y, layout.width - layout.right, y), fill=_GRID_COLOUR)
        draw.text((layout.left - 6, y), _compact(10**power), fill=_TEXT_COLOUR, font=small, anchor="rm")
    threshold_x = layout.x_of(overview.score_threshold)
    for index, (count, passing) in enumerate(zip(histogram, overview.histogram_below_threshold)):
        x0, x1 = layout.bar_span(index, bins)
        height = layout.bar_height(count, histogram)
        if height == 0:
            continue
        y0 = layout.baseline - height
        # A bin the threshold cuts is split left/right in proportion to its samples on each side.
        split = x0 + round((x1 - x0 + 1) * passing / count)
        if 0 < passing < count:
            split = min(max(split, x0 + 1), x1)
        if split > x0:
            draw.rectangle((x0, y0, split - 1, layout.baseline - 1), fill=PASS_COLOUR)
        if split <= x1:
            draw.rectangle((split, y0, x1, layout.baseline - 1), fill=FILTERED_COLOUR)
        draw.text(((x0 + x1) / 2, y0 - 3), _compact(count), fill=_TEXT_COLOUR, font=small, anchor="mb")
    draw.line((layout.left, layout.baseline, layout.width - layout.right, layout.baseline), fill=_TEXT_COLOUR)
    for tenth in range(11):
        x = layout.x_of(tenth / 10)
        draw.line((x, layout.baseline, x, layout.baseline + 4), fill=_TEXT_COLOUR)
        draw.text((x, layout.baseline + 7), f"{tenth / 10:.1f}", fill=_TEXT_COLOUR, font=small, anchor="mt")
    draw.text((layout.left + layout.plot_width / 2, layout.height - 6), "nsfw_score", fill=_TEXT_COLOUR, font=normal, anchor="mb")
    draw.text((8, 8), f"nsfw_score of {overview.scored:,} scored samples ({bins} bins, count on a log scale)", fill=_TEXT_COLOUR, font=normal)
    if abs(overview.around - overview.score_threshold) > 1e-9:
        around_x = layout.x_of(overview.around)
        _dashed_vertical(draw, around_x, layout.top - 8, layout.baseline, AROUND_COLOUR)
        draw.text((around_x + 4, layout.top - 8), f"review centre {overview.around:g}", fill=AROUND_COLOUR, font=small, anchor="lt")
    draw.line((threshold_x, layout.top - 26, threshold_x, layout.baseline), fill=THRESHOLD_COLOUR, width=2)
    # The pass count left of the line, the filtered count right of it; near an edge both slide inwards, in order.
    below = f"{overview.below_threshold:,} pass (< {overview.score_threshold:g})"
    above = f"{overview.at_or_above_threshold:,} filtered (>= {overview.score_threshold:g})"
    below_width, above_width = normal.getlength(below), normal.getlength(above)
    below_x, above_x = threshold_x - 8 - below_width, threshold_x + 8
    if below_x < 8:
        below_x = 8
        above_x = max(above_x, below_x + below_width + 16)
    if above_x + above_width > layout.width - 8:
        above_x = layout.width - 8 - above_width
        below_x = min(below_x, above_x - 16 - below_width)
    label_y = layout.top - 30
    draw.text((below_x, label_y), below, fill=PASS_COLOUR, font=normal, anchor="lm")
    draw.text((above_x, label_y), above, fill=FILTERED_COLOUR, font=normal, anchor="lm")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


# ---------------------------------------------------------------- the sheet

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
code { font: 12px ui-monospace, "SFMono-Regular", Menlo, monospace; word-break: break-all; }
.run, .how { color: #444; max-width: 960px; }
.histogram-png { display: block; max-width: 100%; height: auto; border: 1px solid #ddd; background: #fff; margin: 12px 0; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; background: #fff; }
th { background: #eee; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 12px; }
.sample { margin: 0; padding: 8px; background: #fff; border: 1px solid #ccc; border-radius: 4px; }
.sample.filtered { border: 3px solid #333; padding: 6px; }
.thumb { width: 192px; height: 192px; display: flex; align-items: center; justify-content: center; background: #eee; margin: 0 auto 6px; }
.thumb img { display: block; max-width: 192px; max-height: 192px; }
.thumb.missing { font-size: 12px; color: #555; text-align: center; padding: 8px; box-sizing: border-box; }
.score { font-weight: 600; font-size: 15px; }
.verdict { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; margin-left: 6px; }
.badge { font-size: 11px; background: #444; color: #fff; border-radius: 3px; padding: 0 5px; margin-left: 6px; }
.key, .shard { display: block; font-size: 12px; color: #333; }
.caption { font-size: 12px; color: #555; margin: 4px 0 0; overflow-wrap: anywhere; }
.problem { font-size: 12px; color: #000; font-style: italic; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _shard_label(shard_url: str) -> str:
    return posixpath.basename(shard_url.rstrip("/")) or shard_url


def _caption_text(caption: str | None) -> str:
    if caption is None:
        return "(no caption)"
    text = " ".join(caption.split())
    return text if len(text) <= _CAPTION_CHARS else text[: _CAPTION_CHARS - 1] + "…"


def score_text(nsfw_score: float) -> str:
    """Four significant digits: clean data scores far below 0.001, where fixed decimals would all read 0.0000."""
    return format(nsfw_score, ".4g")


def _card(sample: ReviewSample, score_threshold: float) -> str:
    filtered = sample.nsfw_score >= score_threshold
    classes = ["sample", "filtered" if filtered else "passed"] + (["blurred"] if sample.blurred else [])
    if sample.thumbnail is not None:
        alt = f"{'blurred ' if sample.blurred else ''}thumbnail of {sample.key}"
        picture = f'<div class="thumb"><img src="{_e(sample.thumbnail)}" alt="{_e(alt)}"></div>'
    else:
        picture = '<div class="thumb missing">image unavailable</div>'
    badge = '<span class="badge">blurred</span>' if sample.blurred else ""
    problem = f'<span class="problem">{_e(sample.problem)}</span>' if sample.problem else ""
    return (
        f'<figure class="{" ".join(classes)}" data-key="{_e(sample.key)}" data-shard="{_e(sample.shard)}" '
        f'data-score="{sample.nsfw_score!r}">{picture}<figcaption>'
        f'<span class="score">{score_text(sample.nsfw_score)}</span><span class="verdict">{"filtered" if filtered else "passes"}</span>{badge}'
        f'<code class="key">{_e(sample.key)}</code><span class="shard" title="{_e(sample.shard)}">{_e(_shard_label(sample.shard))}</span>'
        f'<p class="caption">{_e(_caption_text(sample.caption))}</p>{problem}</figcaption></figure>'
    )


def render_sheet_html(sheet: ReviewSheet, summary: dict) -> str:
    """The review sheet as one HTML document (inline CSS, no scripts, relative links only)."""
    overview = sheet.overview
    threshold = overview.score_threshold
    shown = len(sheet.samples)
    errors = overview.samples - overview.scored
    models = summary.get("models") or {}
    model_text = ", ".join(f"{name} {models[name]}" for name in ("clip_model", "clip_pretrained", "nsfw_head") if name in models)
    blur_text = (
        f"Thumbnails of samples scoring ≥ {sheet.blur_above:g} are blurred (marked “blurred”); write the sheet with --no-blur to see them."
        if sheet.blur_above is not None
        else "Blurring is off: every thumbnail shows its image as it is."
    )
    around_row = ""
    if abs(overview.around - threshold) > 1e-9:
        around_row = f"<tr><th>review centre {overview.around:g}</th><td>{overview.below_around:,}</td><td>{overview.at_or_above_around:,}</td></tr>"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nsfw_score review: {_e(_shard_label(sheet.output_path))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>nsfw_score review</h1>",
        f'<p class="run">Run <code>{_e(sheet.output_path)}</code>: {overview.samples:,} samples, {overview.scored:,} scored, '
        f"{errors:,} not scored; score_threshold {threshold:g}. {_e(model_text)}</p>",
        f'<img class="histogram-png" src="{HISTOGRAM_NAME}" width="{HistogramLayout().width}" height="{HistogramLayout().height}" '
        f'alt="nsfw_score histogram: {overview.below_threshold:,} scored samples below {threshold:g}, {overview.at_or_above_threshold:,} at or above">',
        '<table class="sides"><tr><th>line</th><th>below (pass)</th><th>at or above (filtered)</th></tr>',
        f"<tr><th>score_threshold {threshold:g}</th><td>{overview.below_threshold:,}</td><td>{overview.at_or_above_threshold:,}</td></tr>{around_row}</table>",
        f'<p class="how">{shown} of {overview.scored:,} scored samples (requested {sheet.requested}), drawn at random with seed {sheet.seed} '
        f"from each {1 / len(overview.histogram):g}-wide score band; bands centred within {AROUND_HALF_WIDTH:g} of {overview.around:g} get "
        f"{AROUND_WEIGHT}× the share of the others, and a band with fewer samples than its share passes the rest on. "
        f"Bold frames mark samples the run filtered (nsfw_score ≥ {threshold:g}). {_e(blur_text)}</p>",
    ]
    by_band: dict[int, list[ReviewSample]] = defaultdict(list)
    for sample in sheet.samples:
        by_band[sample.band].append(sample)
    edges = overview.bin_edges
    for band in sorted(by_band):
        members = by_band[band]
        parts.append(
            f'<section class="band" data-band="{band}"><h2>nsfw_score {edges[band]:.2f}–{edges[band + 1]:.2f}: '
            f"{len(members)} shown of {overview.histogram[band]:,}</h2><div class=\"grid\">"
        )
        parts.extend(_card(sample, threshold) for sample in members)
        parts.append("</div></section>")
    if not sheet.samples:
        parts.append('<p class="how">No scored samples to show.</p>')
    parts.append('<h2>Histogram counts</h2><table class="histogram"><tr><th>nsfw_score</th><th>count</th></tr>')
    for band, count in enumerate(overview.histogram):
        parts.append(f'<tr data-low="{edges[band]}" data-high="{edges[band + 1]}"><td>{edges[band]:.2f}–{edges[band + 1]:.2f}</td><td>{count}</td></tr>')
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def write_review_sheet(
    output_path: str,
    n: int = DEFAULT_REVIEW_SAMPLES,
    around: float | None = None,
    blur_above: float = DEFAULT_BLUR_ABOVE,
    blur: bool = True,
    seed: int = 0,
    storage_options: dict | None = None,
) -> ReviewSheet:
    """Write `{output_path}/review/review.html` for a finished filter run; returns what was written.

    `n` samples are drawn from the scored rows, stratified over score bands with extra density around
    `around` (default: the run's score_threshold); thumbnails of samples with nsfw_score >= blur_above
    are blurred unless `blur` is False.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"the number of review samples must be a whole number of at least 1, not {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"the review seed must be a whole number, not {seed!r}.")
    if around is not None and not 0.0 <= around <= 1.0:
        raise UserError(f"around must be an nsfw_score between 0 and 1, not {around!r}.")
    if not 0.0 <= blur_above <= 1.0:
        raise UserError(f"blur_above must be an nsfw_score between 0 and 1, not {blur_above!r}; use --no-blur to turn blurring off.")
    output_path = _normalise(output_path)
    summary = read_run_summary(output_path, storage_options)
    score_threshold = float(summary["score_threshold"])
    around = score_threshold if around is None else float(around)
    overview, kept = scan_scores(run_scores_urls(output_path, summary), n, score_threshold, around, seed, storage_options)
    samples, quotas = choose_review_samples(kept, overview, n)
    for sample in samples:
        sample.blurred = blur and sample.nsfw_score >= blur_above
    review_url = join_url(output_path, REVIEW_DIR)
    fetch_thumbnails(list(enumerate(samples)), review_url, storage_options)
    histogram_url = join_url(review_url, HISTOGRAM_NAME)
    _write(histogram_url, render_histogram_png(overview), "image/png", storage_options)
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
    )
    _write(sheet.sheet_url, render_sheet_html(sheet, summary).encode(), "text/html; charset=utf-8", storage_options)
    remove_stale_thumbnails(review_url, [s.thumbnail for s in samples if s.thumbnail], storage_options)
    return sheet


# ---------------------------------------------------------------- Prefect artifacts


def publish_review_artifacts(sheet: ReviewSheet) -> None:
    """The sheet as a link artifact of the current flow run, and the histogram PNG as an image where a browser can open it.

    An object-store histogram gets no image artifact: a pre-signed URL would put a bearer token derived from the
    storage credentials into the Prefect database for everyone who can read it (the counts and the histogram
    table are artifacts of the run already).
    """
    from prefect.artifacts import create_image_artifact, create_link_artifact

    local = "://" not in sheet.sheet_url or sheet.sheet_url.startswith("file://")
    if local:
        create_image_artifact(
            image_url="file://" + os.path.abspath(sheet.histogram_url.removeprefix("file://")),
            key="nsfw-filter-review-histogram",
            description="nsfw_score histogram of the run, threshold marked (a file:// URL: the browser must run on the machine that holds the output)",
        )
    overview = sheet.overview
    create_link_artifact(
        key="nsfw-filter-review",
        link=sheet.sheet_url if "://" in sheet.sheet_url else "file://" + sheet.sheet_url,
        link_text=f"review sheet: {len(sheet.samples)} samples across nsfw_score bands",
        description=(
            f"{overview.below_threshold:,} scored samples pass and {overview.at_or_above_threshold:,} are filtered at {overview.score_threshold:g}. "
            + ("" if local else "Copy the review/ folder to open it (e.g. `aws s3 sync` it to a local directory).")
        ),
    )
