"""Rendering a review sheet: the reviewed signal's score histogram as a PNG and the self-contained HTML page.

Both name the signal and its score column. The histogram spans the signal's histogram range; bars split at the
threshold line, the side its rule drops in FILTERED_COLOUR, the other in PASS_COLOUR (NEUTRAL_COLOUR when the
policy sets no threshold on the signal). Each card shows the reviewed score, nsfw_score when another signal is
reviewed, the matched concept of a concept group and the rule that dropped the sample.
"""

from __future__ import annotations

import html
import io
import math
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from tasks.io.write import HISTOGRAM_BINS
from tasks.review.records import ReviewedSignal, ReviewSample, ReviewSheet, ScoreOverview
from tasks.review.sampling import AROUND_WEIGHT, around_half_width
from tasks.signals.columns import NSFW

HISTOGRAM_NAME = "histogram.png"
_CAPTION_CHARS = 300

PASS_COLOUR = (54, 104, 168)
FILTERED_COLOUR = (196, 72, 52)
NEUTRAL_COLOUR = (130, 130, 130)
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

    def x_of(self, fraction: float) -> int:
        """x of a fraction of the score range, held inside the plot (a threshold may lie beyond the histogram's range)."""
        return round(self.left + min(max(fraction, 0.0), 1.0) * self.plot_width)

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


def decimals_for(step: float, at_least: int = 0) -> int:
    """The fewest decimals (at least `at_least`) that write multiples of `step` exactly: 0.05 -> 2, 0.025 -> 3, 1 -> 0."""
    decimals = at_least
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9 * max(1.0, abs(step)):
        decimals += 1
    return decimals


def _fraction(overview: ScoreOverview, score: float) -> float:
    low, high = overview.bin_edges[0], overview.bin_edges[-1]
    return (score - low) / (high - low)


def side_words(overview: ScoreOverview) -> tuple[str, str]:
    """What the samples below the line and at or above it are: (pass, filtered), (filtered, pass), or neither."""
    if not overview.has_threshold:
        return "samples", "samples"
    return ("filtered", "pass") if overview.signal.drops_below else ("pass", "filtered")


def _side_colours(overview: ScoreOverview) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    words = side_words(overview)
    colours = {"pass": PASS_COLOUR, "filtered": FILTERED_COLOUR, "samples": NEUTRAL_COLOUR}
    return colours[words[0]], colours[words[1]]


def _dashed_vertical(draw: ImageDraw.ImageDraw, x: int, y0: int, y1: int, colour: tuple[int, int, int]) -> None:
    for y in range(y0, y1, 10):
        draw.line((x, y, x, min(y + 5, y1)), fill=colour, width=2)


def render_histogram_png(overview: ScoreOverview, layout: HistogramLayout = HistogramLayout()) -> bytes:
    """The score histogram: log count axis, bars coloured by side of the threshold, counts on each side."""
    histogram = overview.histogram
    bins = len(histogram)
    column = overview.signal.column
    line = overview.score_threshold
    low, high = overview.bin_edges[0], overview.bin_edges[-1]
    below_colour, above_colour = _side_colours(overview)
    image = Image.new("RGB", (layout.width, layout.height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    small, normal = _font(11), _font(14)
    top = layout.axis_top(histogram)
    for power in range(0, int(round(math.log10(top))) + 1):
        y = layout.baseline - layout.bar_height(10**power, histogram)
        draw.line((layout.left, y, layout.width - layout.right, y), fill=_GRID_COLOUR)
        draw.text((layout.left - 6, y), _compact(10**power), fill=_TEXT_COLOUR, font=small, anchor="rm")
    line_x = layout.x_of(_fraction(overview, line))
    for index, (count, below_line) in enumerate(zip(histogram, overview.histogram_below_threshold)):
        x0, x1 = layout.bar_span(index, bins)
        height = layout.bar_height(count, histogram)
        if height == 0:
            continue
        y0 = layout.baseline - height
        # A bin the line cuts is split left/right in proportion to its samples on each side.
        split = x0 + round((x1 - x0 + 1) * below_line / count)
        if 0 < below_line < count:
            split = min(max(split, x0 + 1), x1)
        if split > x0:
            draw.rectangle((x0, y0, split - 1, layout.baseline - 1), fill=below_colour)
        if split <= x1:
            draw.rectangle((split, y0, x1, layout.baseline - 1), fill=above_colour)
        draw.text(((x0 + x1) / 2, y0 - 3), _compact(count), fill=_TEXT_COLOUR, font=small, anchor="mb")
    draw.line((layout.left, layout.baseline, layout.width - layout.right, layout.baseline), fill=_TEXT_COLOUR)
    tick_step = (high - low) / 10
    tick_decimals = decimals_for(tick_step)
    for tenth in range(11):
        x = layout.x_of(tenth / 10)
        draw.line((x, layout.baseline, x, layout.baseline + 4), fill=_TEXT_COLOUR)
        draw.text((x, layout.baseline + 7), f"{low + tenth * tick_step:.{tick_decimals}f}", fill=_TEXT_COLOUR, font=small, anchor="mt")
    draw.text((layout.left + layout.plot_width / 2, layout.height - 6), column, fill=_TEXT_COLOUR, font=normal, anchor="mb")
    draw.text((8, 8), f"{column} of {overview.scored:,} scored samples ({bins} bins, count on a log scale)", fill=_TEXT_COLOUR, font=normal)
    if not overview.has_threshold or abs(overview.around - line) > 1e-9:
        around_x = layout.x_of(_fraction(overview, overview.around))
        _dashed_vertical(draw, around_x, layout.top - 8, layout.baseline, AROUND_COLOUR)
        draw.text((around_x + 4, layout.top - 8), f"review centre {overview.around:g}", fill=AROUND_COLOUR, font=small, anchor="lt")
    if overview.has_threshold:
        draw.line((line_x, layout.top - 26, line_x, layout.baseline), fill=THRESHOLD_COLOUR, width=2)
    # The count below the line left of it, the count at or above right of it; near an edge both slide inwards, in order.
    below_word, above_word = side_words(overview)
    below = f"{overview.below_threshold:,} {below_word} (< {line:g})"
    above = f"{overview.at_or_above_threshold:,} {above_word} (>= {line:g})"
    below_width, above_width = normal.getlength(below), normal.getlength(above)
    below_x, above_x = line_x - 8 - below_width, line_x + 8
    if below_x < 8:
        below_x = 8
        above_x = max(above_x, below_x + below_width + 16)
    if above_x + above_width > layout.width - 8:
        above_x = layout.width - 8 - above_width
        below_x = min(below_x, above_x - 16 - below_width)
    label_y = layout.top - 30
    draw.text((below_x, label_y), below, fill=below_colour, font=normal, anchor="lm")
    draw.text((above_x, label_y), above, fill=above_colour, font=normal, anchor="lm")
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
.detail { display: block; font-size: 12px; color: #222; }
.detail.rule { font-weight: 600; }
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


def score_text(score: float) -> str:
    """Four significant digits: clean data scores far below 0.001, where fixed decimals would all read 0.0000."""
    return format(score, ".4g")


def _card(sample: ReviewSample, signal: ReviewedSignal) -> str:
    filtered = sample.filtered_by is not None
    classes = ["sample", "filtered" if filtered else "passed"] + (["blurred"] if sample.blurred else [])
    if sample.thumbnail is not None:
        alt = f"{'blurred ' if sample.blurred else ''}thumbnail of {sample.key}"
        picture = f'<div class="thumb"><img src="{_e(sample.thumbnail)}" alt="{_e(alt)}"></div>'
    else:
        picture = '<div class="thumb missing">image unavailable</div>'
    badge = '<span class="badge">blurred</span>' if sample.blurred else ""
    attributes = f'data-key="{_e(sample.key)}" data-shard="{_e(sample.shard)}" data-score="{sample.score!r}" data-nsfw-score="{sample.nsfw_score!r}"'
    details = []
    if signal.name != NSFW:  # blurring follows nsfw_score: show it beside the reviewed score
        details.append(f'<span class="detail nsfw">nsfw_score {score_text(sample.nsfw_score)}</span>')
    if signal.concept_column is not None:
        matched = f"matched concept: {sample.concept}" if sample.concept is not None else "no concept matched"
        details.append(f'<span class="detail concept">{_e(matched)}</span>')
        attributes += f' data-concept="{_e(sample.concept)}"' if sample.concept is not None else ""
    if sample.filtered_by is not None:
        details.append(f'<span class="detail rule">filtered by: {_e(sample.filtered_by)}</span>')
        attributes += f' data-filtered-by="{_e(sample.filtered_by)}"'
    problem = f'<span class="problem">{_e(sample.problem)}</span>' if sample.problem else ""
    return (
        f'<figure class="{" ".join(classes)}" {attributes}>{picture}<figcaption>'
        f'<span class="score" title="{_e(signal.column)}">{score_text(sample.score)}</span><span class="verdict">{"filtered" if filtered else "passes"}</span>{badge}'
        f'{"".join(details)}'
        f'<code class="key">{_e(sample.key)}</code><span class="shard" title="{_e(sample.shard)}">{_e(_shard_label(sample.shard))}</span>'
        f'<p class="caption">{_e(_caption_text(sample.caption))}</p>{problem}</figcaption></figure>'
    )


def _policy_text(sheet: ReviewSheet, summary: dict) -> str:
    """How the run decided: its score_threshold (no policy, or the default one), else its rules with what each dropped."""
    signal = sheet.overview.signal
    if signal.threshold_name == "score_threshold":
        return f"score_threshold {summary['score_threshold']:g}"
    dropped = summary.get("filtered_by")
    if not isinstance(dropped, dict) or not all(type(count) is int for count in dropped.values()):
        return "policy " + "; ".join(sheet.policy)  # counts read back are validated; without them the rules alone
    return "policy " + "; ".join(f"{label} ({dropped.get(label, 0):,} dropped)" for label in sheet.policy)


def _sides_table(overview: ScoreOverview) -> str:
    signal = overview.signal
    below_word, above_word = side_words(overview)
    heads = ("below", "at or above") if not overview.has_threshold else (f"below ({below_word})", f"at or above ({above_word})")
    rows = [f'<table class="sides"><tr><th>line</th><th>{heads[0]}</th><th>{heads[1]}</th></tr>']
    if overview.has_threshold:
        rule = f" ({_e(signal.threshold_rule)})" if signal.threshold_name != "score_threshold" and signal.threshold_rule else ""
        rows.append(
            f"<tr><th>{signal.threshold_name} {overview.score_threshold:g}{rule}</th><td>{overview.below_threshold:,}</td>"
            f"<td>{overview.at_or_above_threshold:,}</td></tr>"
        )
    if not overview.has_threshold or abs(overview.around - overview.score_threshold) > 1e-9:
        rows.append(f"<tr><th>review centre {overview.around:g}</th><td>{overview.below_around:,}</td><td>{overview.at_or_above_around:,}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def render_sheet_html(sheet: ReviewSheet, summary: dict) -> str:
    """The review sheet as one HTML document (inline CSS, no scripts, relative links only)."""
    overview = sheet.overview
    signal = overview.signal
    column = signal.column
    shown = len(sheet.samples)
    errors = overview.samples - overview.scored
    models = summary.get("models") or {}
    model_text = ", ".join(f"{name} {models[name]}" for name in ("clip_model", "clip_pretrained", "nsfw_head") if name in models)
    blur_text = (
        f"Thumbnails of samples with nsfw_score ≥ {sheet.blur_above:g} are blurred (marked “blurred”); write the sheet with --no-blur to see them."
        if sheet.blur_above is not None
        else "Blurring is off: every thumbnail shows its image as it is."
    )
    frames = (
        f"Bold frames mark samples the run filtered (nsfw_score ≥ {overview.score_threshold:g})."
        if signal.threshold_name == "score_threshold"
        else "Bold frames mark samples a policy rule dropped; the card names the rule."
    )
    edges = overview.bin_edges
    band_width = (edges[-1] - edges[0]) / len(overview.histogram)
    decimals = decimals_for(band_width, at_least=2)
    if overview.has_threshold:
        line_text = f"{overview.below_threshold:,} scored samples below {overview.score_threshold:g}, {overview.at_or_above_threshold:,} at or above"
    else:
        line_text = f"the policy sets no threshold on {signal.name}; {overview.below_around:,} scored samples below {overview.around:g}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(column)} review: {_e(_shard_label(sheet.output_path))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(column)} review</h1>",
        f'<p class="run">Run <code>{_e(sheet.output_path)}</code>: {overview.samples:,} samples, {overview.scored:,} scored, '
        f"{errors:,} not scored; {_e(_policy_text(sheet, summary))}. {_e(model_text)}</p>",
        f'<img class="histogram-png" src="{HISTOGRAM_NAME}" width="{HistogramLayout().width}" height="{HistogramLayout().height}" '
        f'alt="{_e(column)} histogram of the signal {_e(signal.name)}: {_e(line_text)}">',
        _sides_table(overview),
        f'<p class="how">{shown} of {overview.scored:,} scored samples (requested {sheet.requested}), drawn at random with seed {sheet.seed} '
        f"from each {band_width:g}-wide {_e(column)} band; bands centred within {around_half_width(edges):g} of {overview.around:g} get "
        f"{AROUND_WEIGHT}× the share of the others, and a band with fewer samples than its share passes the rest on. "
        f"{_e(frames)} {_e(blur_text)}</p>",
    ]
    by_band: dict[int, list[ReviewSample]] = defaultdict(list)
    for sample in sheet.samples:
        by_band[sample.band].append(sample)
    for band in sorted(by_band):
        members = by_band[band]
        parts.append(
            f'<section class="band" data-band="{band}"><h2>{_e(column)} {edges[band]:.{decimals}f}–{edges[band + 1]:.{decimals}f}: '
            f"{len(members)} shown of {overview.histogram[band]:,}</h2><div class=\"grid\">"
        )
        parts.extend(_card(sample, signal) for sample in members)
        parts.append("</div></section>")
    if not sheet.samples:
        parts.append('<p class="how">No scored samples to show.</p>')
    parts.append(f'<h2>Histogram counts</h2><table class="histogram"><tr><th>{_e(column)}</th><th>count</th></tr>')
    for band, count in enumerate(overview.histogram):
        parts.append(
            f'<tr data-low="{edges[band]}" data-high="{edges[band + 1]}"><td>{edges[band]:.{decimals}f}–{edges[band + 1]:.{decimals}f}</td><td>{count}</td></tr>'
        )
    parts.append("</table></body></html>\n")
    return "\n".join(parts)
