"""The review sheet on a real filter run (tiny random CLIP, real LAION head, real Prefect API, real tars, moto S3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.nsfw_filter import nsfw_filter
from tasks.errors import UserError
from tasks.review.records import nsfw_signal
from tasks.review.reviewed import review_centre, reviewed_signal
from tasks.review.render import FILTERED_COLOUR, PASS_COLOUR, HistogramLayout
from tasks.review.sampling import AROUND_WEIGHT, allocate_quotas, band_weights, choose_review_samples, read_run_summary, run_scores_urls, scan_scores
from tasks.review.sheet import write_review_sheet
from tasks.review.thumbnails import THUMBNAIL_SIDE
from tests.support.filter_parameters import local_filter_parameters
from tests.support.signal_weights import published_aesthetic, signal_specs
from tests.support.tiny_clip import open_clip_reference
from tests.support.tars import Member, bad_case_members, drawn_image, encode, shard_of_good_samples, write_tar

pytestmark = pytest.mark.usefixtures("prefect_api")

EVIL_KEY = 'evil"<img src=x onerror=alert(1)>'
EVIL_CAPTION = '<script>alert("caption")</script> & <b>bold</b>'
FLOW_REVIEW_SAMPLES = 6
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------- a real filter run, shared by the module


@dataclass
class FilterRunOutput:
    input_dir: Path
    output_path: Path
    flow_run_id: object
    score_threshold: float
    signals_output_path: Path  # the first run: an aesthetic signal under SIGNALS_POLICY, no sheet written


AESTHETIC_CUT = 5.0
SIGNALS_POLICY = {"rules": [{"signal": "nsfw", "at_least": 0.5}, {"signal": "aesthetic", "below": AESTHETIC_CUT}]}
# A concepts file in LAION's shape; a random CLIP's cosines sit about 0, so thresholds of 0 match some samples.
STYLE_CONCEPTS = "style:\n  concepts:\n    a photo: 0.0\n    a drawing: 0.0\n  action: obfuscate\n"


def input_shards(input_dir: Path, good_shards: int = 3, per_shard: int = 8) -> Path:
    for s in range(good_shards):
        write_tar(input_dir / f"part-{s:06d}.tar", shard_of_good_samples([f"{s:03d}/{j:04d}" for j in range(per_shard)], size=(160, 120)))
    evil = [
        Member(f"{EVIL_KEY}.jpg", encode(drawn_image(120, 90, seed=99), "JPEG")),
        Member(f"{EVIL_KEY}.txt", EVIL_CAPTION.encode()),
    ]
    write_tar(input_dir / f"part-{good_shards:06d}.tar", bad_case_members() + evil)
    return input_dir


def spread_aesthetic_weights(folder: Path, tiny_clip, images: list[Image.Image]) -> Path:
    """signal_weights' published aesthetic head, its last layer scaled and re-biased so that the tiny CLIP's
    embeddings of `images` score about AESTHETIC_CUT, one unit apart (a random head's scores all fall in one
    0.5-wide band); saved in the published format and converted the product's way."""
    import torch

    from tasks.signals.convert import convert_signal_weights

    source = published_aesthetic(folder / "sac+logos+ava1-l14-linearMSE.pth")
    state = torch.load(source)
    hidden = torch.from_numpy(open_clip_reference(*tiny_clip, images)).double()
    for index in (0, 2, 4, 6):  # the published MLP has no activation between its linear layers
        hidden = hidden @ state[f"layers.{index}.weight"].double().T + state[f"layers.{index}.bias"].double()
    raw = (hidden @ state["layers.7.weight"].double().T).squeeze(1)
    scale = 1.0 / float(raw.std())
    state["layers.7.weight"] = state["layers.7.weight"] * scale
    state["layers.7.bias"] = torch.tensor([AESTHETIC_CUT - scale * float(raw.median())])
    torch.save(state, source)
    convert_signal_weights(source, folder / "aesthetic.safetensors")
    return folder / "aesthetic.safetensors"


def filter_parameters(tiny_clip, laion_dir, root: Path, file_paths: str, output_path: str) -> dict:
    return local_filter_parameters(
        root, tiny_clip, laion_dir, file_paths=file_paths, output_path=output_path, files_per_partition=2, task_batch_size=8,
        review_samples=FLOW_REVIEW_SAMPLES, return_state=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def filter_run(tmp_path_factory, tiny_clip_768, laion_dir, prefect_api) -> FilterRunOutput:
    root = tmp_path_factory.mktemp("review-run")
    input_dir = input_shards(root / "in")
    parameters = filter_parameters(tiny_clip_768, laion_dir, root, str(input_dir), str(root / "out"))
    # The first run scores an aesthetic signal and a concept group under a policy, into its own output.
    (root / "signals").mkdir()
    (root / "signals" / "style.yml").write_text(STYLE_CONCEPTS)
    drawn = [drawn_image(160, 120, seed=seed) for seed in range(8)]  # the images of every good shard
    files = {"aesthetic": spread_aesthetic_weights(root / "signals", tiny_clip_768, drawn), "concepts": root / "signals" / "style.yml"}
    signals_output = root / "signals-out"
    signal_parameters = {
        **parameters, "output_path": str(signals_output), "review_samples": 0, "signals": signal_specs(files), "policy": SIGNALS_POLICY,
    }  # fmt: skip
    assert nsfw_filter(**signal_parameters).is_completed()
    # A random CLIP scores everything far below 0.5; a threshold inside its scores puts samples on both sides.
    # The second run reuses the cached embeddings and writes the sheet.
    scores = np.sort(np.array(list(scored_rows(signals_output).values()), dtype=np.float32))
    threshold = float(np.float32((scores[int(len(scores) * 0.6)] + scores[int(len(scores) * 0.6) - 1]) / 2))
    state = nsfw_filter(**{**parameters, "score_threshold": threshold})
    assert state.is_completed()
    return FilterRunOutput(input_dir, root / "out", state.state_details.flow_run_id, threshold, signals_output)


def copy_of_run(run: FilterRunOutput, tmp_path: Path, output_path: Path | None = None) -> Path:
    """The run's outputs copied (the scores still name the original input shards); each test writes its own sheet."""
    target = tmp_path / "out"
    shutil.copytree(output_path or run.output_path, target, ignore=shutil.ignore_patterns("review"))
    return target


def read_scores(output_path: Path) -> dict[str, list]:
    table = pa.concat_tables([pq.read_table(p) for p in sorted((output_path / "scores").glob("*.parquet"))])
    return table.to_pydict()


def scored_rows(output_path: Path) -> dict[tuple[str, str], float]:
    scores = read_scores(output_path)
    return {(s, k): v for s, k, v in zip(scores["shard"], scores["key"], scores["nsfw_score"]) if v is not None}


# ---------------------------------------------------------------- reading the sheet back


@dataclass
class Card:
    key: str
    shard: str
    score: float
    classes: set[str]
    src: str | None
    text: str


class SheetParser(HTMLParser):
    """The cards, image sources, histogram and sides tables of a sheet, as the browser would read them."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[Card] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._card: Card | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        self.links += [value for name, value in attrs if name in ("href", "src") and value]
        if tag == "figure":
            self._card = Card(attributes["data-key"], attributes["data-shard"], float(attributes["data-score"]), set(attributes["class"].split()), None, "")
        if tag == "img":
            self.images.append(attributes["src"])
            if self._card is not None:
                self._card.src = attributes["src"]
        if tag == "table":
            self._table = attributes["class"]
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "figure":
            self.cards.append(self._card)
            self._card = None
        if tag in ("td", "th") and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._card is not None:
            self._card.text += data
        if self._cell is not None:
            self._cell.append(data)


def parse_sheet(text: str) -> SheetParser:
    parser = SheetParser()
    parser.feed(text)
    parser.close()
    return parser


def thumbnail_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def high_frequency_energy(pixels: np.ndarray) -> float:
    # Squared gradients: a blur spreads a step edge over many pixels and shrinks this (unlike absolute
    # gradients, whose sum over a monotone edge a blur keeps).
    grey = pixels.mean(axis=2)
    return float(np.square(np.diff(grey, axis=0)).mean() + np.square(np.diff(grey, axis=1)).mean())


# ---------------------------------------------------------------- tests on the local run


def test_sheet_lists_the_requested_samples_and_every_file_it_references_exists(filter_run, tmp_path):
    output_path = copy_of_run(filter_run, tmp_path)
    scored = scored_rows(output_path)
    blur_above = float(np.median(list(scored.values())))
    sheet = write_review_sheet(str(output_path), n=12, seed=1, blur_above=blur_above)
    review_dir = output_path / "review"
    text = (review_dir / "review.html").read_text()
    page = parse_sheet(text)
    assert len(page.cards) == len(sheet.samples) == 12
    # every card is a distinct scored sample of the run, with its score; all images are present
    identities = [(card.shard, card.key) for card in page.cards]
    assert len(set(identities)) == 12
    for card in page.cards:
        assert card.score == pytest.approx(scored[(card.shard, card.key)], abs=1e-7)
        assert card.src is not None, card.text
        assert ("blurred" in card.classes) == (card.score >= blur_above)
        assert ("filtered" in card.classes) == (card.score >= filter_run.score_threshold)
        assert card.key in card.text and os.path.basename(card.shard) in card.text and format(card.score, ".4g") in card.text
    assert sum("blurred" in card.classes for card in page.cards) > 0 and sum("blurred" not in card.classes for card in page.cards) > 0
    for src in page.images:
        assert not src.startswith(("/", "http:", "https:", "file:", "data:")) and ".." not in src
        path = review_dir / src
        assert path.is_file(), src
        with Image.open(path) as image:
            image.verify()
    thumbnails = [review_dir / card.src for card in page.cards]
    assert {p.name for p in (review_dir / "thumbs").iterdir()} == {p.name for p in thumbnails}
    for path in thumbnails:
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) <= THUMBNAIL_SIDE
    # captions come from the samples' .txt members
    good = [card for card in page.cards if card.key[:3].isdigit()]
    assert all(f"caption {card.key}" in card.text for card in good)
    # self-contained: inline CSS, no scripts, no stylesheets, nothing fetched from elsewhere
    assert {"script", "link", "iframe"}.isdisjoint(page.tags) and "<style>" in text
    assert sorted(page.links) == sorted(page.images)


def test_histogram_counts_match_the_scores_parquet(filter_run, tmp_path):
    output_path = copy_of_run(filter_run, tmp_path)
    sheet = write_review_sheet(str(output_path), n=5, around=0.3)
    scores = np.array([v for v in read_scores(output_path)["nsfw_score"] if v is not None], dtype=np.float32)
    expected, _ = np.histogram(scores, bins=20, range=(0.0, 1.0))
    summary = json.loads((output_path / "summary.json").read_text())
    assert sheet.overview.histogram == expected.tolist() == summary["histogram"]
    page = parse_sheet((output_path / "review" / "review.html").read_text())
    assert [int(row[1]) for row in page.tables["histogram"][1:]] == expected.tolist()
    sides = {row[0].split()[0]: (int(row[1].replace(",", "")), int(row[2].replace(",", ""))) for row in page.tables["sides"][1:]}
    threshold = summary["score_threshold"]
    rows = read_scores(output_path)
    # Scored below the threshold but kept out: samples carrying images nobody scored.
    held_out = sum(1 for score, error in zip(rows["nsfw_score"], rows["error"]) if score is not None and error is not None)
    assert held_out > 0
    assert sides["score_threshold"] == (int((scores < threshold).sum()), int((scores >= threshold).sum())) == (summary["passed"] + held_out, summary["filtered"])
    assert summary["passed"] > 0 and summary["filtered"] > 0
    assert sides["review"] == (int((scores < 0.3).sum()), int((scores >= 0.3).sum()))
    # the PNG draws a bar exactly where a bin holds samples
    layout = HistogramLayout()
    with Image.open(output_path / "review" / "histogram.png") as image:
        assert image.size == (layout.width, layout.height)
        pixels = image.convert("RGB")
        for index, count in enumerate(expected):
            x0, x1 = layout.bar_span(index)
            colours = {pixels.getpixel((x, layout.baseline - 2)) for x in range(x0, x1 + 1)}
            in_bin = scores[(scores >= index / 20) & ((scores < (index + 1) / 20) if index < 19 else (scores <= 1))]
            sides = {PASS_COLOUR} if (in_bin < threshold).any() else set()
            sides |= {FILTERED_COLOUR} if (in_bin >= threshold).any() else set()
            assert colours & {PASS_COLOUR, FILTERED_COLOUR} == sides, (index, count, colours)  # the cut bin shows both


def test_blurred_thumbnails_differ_from_unblurred_ones_and_do_not_survive_a_blurred_sheet(filter_run, tmp_path):
    output_path = copy_of_run(filter_run, tmp_path)
    scored = scored_rows(output_path)
    blur_above = float(np.median(list(scored.values())))
    unblurred = write_review_sheet(str(output_path), n=10, seed=2, blur_above=blur_above, blur=False)
    unblurred_pixels = [thumbnail_pixels(output_path / "review" / s.thumbnail) for s in unblurred.samples]
    assert not any(s.blurred for s in unblurred.samples)
    blurred = write_review_sheet(str(output_path), n=10, seed=2, blur_above=blur_above)
    assert [(s.shard, s.key) for s in blurred.samples] == [(s.shard, s.key) for s in unblurred.samples]
    above = 0
    for sample, plain in zip(blurred.samples, unblurred_pixels):
        pixels = thumbnail_pixels(output_path / "review" / sample.thumbnail)
        assert pixels.shape == plain.shape
        if sample.nsfw_score >= blur_above:
            assert sample.blurred and sample.thumbnail.endswith("-blurred.jpg")
            if high_frequency_energy(plain) < 1:
                continue  # a flat picture (one colour) is its own blur
            above += 1
            assert np.abs(pixels - plain).mean() > 8, sample.key  # not the same picture
            assert high_frequency_energy(pixels) < 0.25 * high_frequency_energy(plain), sample.key  # edges gone
        else:
            assert not sample.blurred
            assert np.abs(pixels - plain).max() == 0
    assert above > 0
    # the unblurred thumbnails of the first sheet are gone: only the blurred sheet's files remain
    remaining = {p.name for p in (output_path / "review" / "thumbs").iterdir()}
    assert remaining == {Path(s.thumbnail).name for s in blurred.samples}


def test_sampling_is_seeded_and_independent_of_file_order(filter_run, tmp_path):
    output_path = copy_of_run(filter_run, tmp_path)
    scored = scored_rows(output_path)
    first = write_review_sheet(str(output_path), n=8, seed=7)
    again = write_review_sheet(str(output_path), n=8, seed=7)
    other = write_review_sheet(str(output_path), n=8, seed=8)
    picked = lambda sheet: [(s.shard, s.key) for s in sheet.samples]  # noqa: E731
    assert picked(first) == picked(again)
    assert set(picked(first)) != set(picked(other))
    assert len(scored) > 8
    # the seeded hash of (shard, key), not the reading order, decides: reversed files keep the same candidates
    summary = read_run_summary(str(output_path))
    urls = run_scores_urls(str(output_path), summary)
    _, forward = scan_scores(urls, 3, nsfw_signal(0.5), 0.5, seed=7)
    _, backward = scan_scores(urls[::-1], 3, nsfw_signal(0.5), 0.5, seed=7)
    assert forward[["shard", "key"]].values.tolist() == backward[["shard", "key"]].values.tolist()


def test_quotas_are_denser_around_the_centre_and_pass_on_what_a_band_lacks():
    edges = np.linspace(0, 1, 21)
    weights = band_weights(0.5, edges)
    assert weights.tolist() == [1.0] * 8 + [float(AROUND_WEIGHT)] * 4 + [1.0] * 8
    quotas = allocate_quotas(64, [100] * 20, weights)
    assert quotas.sum() == 64 and quotas[8:12].tolist() == [8, 8, 8, 8] and set(quotas[:8].tolist() + quotas[12:].tolist()) == {2}
    # a clean dataset: almost everything below 0.05, a thin tail; the empty bands' share goes to the others
    capacity = [10_000, 40, 12, 5, 3, 1, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    quotas = allocate_quotas(64, capacity, weights)
    assert quotas.sum() == 64 and (quotas <= np.array(capacity)).all()
    assert quotas[8:10].tolist() == [2, 1] and quotas[5] == 1  # every sample of the sparse bands near the threshold is shown
    assert allocate_quotas(500, capacity[1:], weights[1:]).tolist() == capacity[1:]  # fewer samples than asked: all of them
    assert allocate_quotas(64, [0] * 20, weights).sum() == 0


def test_a_spread_of_scores_is_sampled_per_band_and_densest_around_the_centre(tmp_path):
    from tasks.io.write import write_scores

    rng = np.random.default_rng(0)
    # Clean-looking data: most scores near 0 and a thin tail up to 1; plus rows that were not scored.
    nsfw_score = np.concatenate([rng.beta(0.3, 30, 5000), rng.uniform(0, 1, 400)]).astype(np.float32)
    urls = []
    for part, chunk in enumerate(np.array_split(rng.permutation(nsfw_score), 3)):
        rows = len(chunk) + 2
        urls.append(str(tmp_path / "scores" / f"part-{part:06d}.parquet"))
        write_scores(urls[-1], {
            "key": [f"{part}/{i:05d}" for i in range(rows)],
            "shard": [f"s3://bucket/in/{part:06d}.tar"] * rows,
            "nsfw_score": [float(v) for v in chunk] + [None, None],
            "passed": [bool(v < 0.5) for v in chunk] + [False, False],
            "filtered_by": [None if v < 0.5 else "nsfw >= 0.5" for v in chunk] + [None, None],
            "error": [None] * len(chunk) + ["image is truncated", "not scored"],
            "output_shard": [None] * rows,
        })  # fmt: skip
    overview, kept = scan_scores(urls, 64, nsfw_signal(0.5), 0.3, seed=0)
    assert overview.samples == len(nsfw_score) + 6 and overview.scored == len(nsfw_score)
    assert overview.histogram == np.histogram(nsfw_score, bins=20, range=(0.0, 1.0))[0].tolist()
    assert min(overview.histogram) >= 8  # the tail fills every band, so the weights alone decide
    samples, quotas = choose_review_samples(kept, overview, 64)
    assert quotas.tolist() == [2] * 4 + [2 * AROUND_WEIGHT] * 4 + [2] * 12  # bands 0.20-0.40 centred near 0.3
    assert len(samples) == 64 and len({(s.shard, s.key) for s in samples}) == 64
    assert np.bincount([s.band for s in samples], minlength=20).tolist() == quotas.tolist()
    for sample in samples:
        assert overview.bin_edges[sample.band] <= sample.nsfw_score < overview.bin_edges[sample.band + 1]
    assert [s.nsfw_score for s in samples] == sorted(s.nsfw_score for s in samples)


def test_a_run_without_scored_samples_gets_an_empty_sheet(tmp_path):
    from tasks.io.write import SCORES_SCHEMA, write_scores

    # A run from before the policy: no filtered_by in its scores, no signals or policy in its summary.
    write_scores(str(tmp_path / "scores" / "part-000000.parquet"), {
        "key": ["a", "b"], "shard": ["in/0.tar"] * 2, "nsfw_score": [None, None], "passed": [False, False],
        "error": ["image is truncated", "no image member"], "output_shard": [None, None],
    }, pa.schema([column for column in SCORES_SCHEMA if column.name != "filtered_by"]))  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps({"score_threshold": 0.5, "scores_files": ["part-000000.parquet"]}))
    sheet = write_review_sheet(str(tmp_path), n=4)
    assert sheet.samples == [] and sheet.overview.samples == 2 and sheet.overview.histogram == [0] * 20
    text = (tmp_path / "review" / "review.html").read_text()
    assert "No scored samples to show." in text and parse_sheet(text).images == ["histogram.png"]
    with Image.open(tmp_path / "review" / "histogram.png") as image:
        assert image.format == "PNG"


def test_untrusted_keys_captions_and_shard_names_are_escaped(filter_run, tmp_path):
    output_path = copy_of_run(filter_run, tmp_path)
    scored = scored_rows(output_path)
    evil_score = next(v for (s, k), v in scored.items() if k == EVIL_KEY)
    sheet = write_review_sheet(str(output_path), n=3, around=float(evil_score), seed=0)
    if EVIL_KEY not in [s.key for s in sheet.samples]:  # make sure it is on the sheet: show everything
        sheet = write_review_sheet(str(output_path), n=len(scored), seed=0)
    text = (output_path / "review" / "review.html").read_text()
    page = parse_sheet(text)
    card = next(card for card in page.cards if card.key == EVIL_KEY)
    assert EVIL_CAPTION in card.text  # shown as text ...
    assert "<script" not in text and "<img src=x" not in text and "<b>bold" not in text  # ... never as markup
    assert "script" not in page.tags and "b" not in page.tags


def test_missing_or_changed_shards_are_reported_on_their_cards(filter_run, tmp_path):
    # The run's inputs are moved (the scores are rewritten to point at the copy), then one shard is deleted
    # and another truncated after its first sample, as if the data changed after the run.
    output_path = copy_of_run(filter_run, tmp_path)
    inputs = tmp_path / "in"
    shutil.copytree(filter_run.input_dir, inputs)
    for path in (output_path / "scores").glob("*.parquet"):
        table = pq.read_table(path)
        shards = [s.replace(str(filter_run.input_dir), str(inputs)) for s in table.column("shard").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shards, pa.string())), path)
    (inputs / "part-000000.tar").unlink()
    write_tar(inputs / "part-000001.tar", shard_of_good_samples(["001/0000"], size=(160, 120)))
    scored = scored_rows(output_path)
    sheet = write_review_sheet(str(output_path), n=len(scored), seed=0)
    page = parse_sheet((output_path / "review" / "review.html").read_text())
    assert len(page.cards) == len(scored)
    for card in page.cards:
        shard = os.path.basename(card.shard)
        if shard == "part-000000.tar":
            assert card.src is None and "shard could not be read" in card.text and "does not exist" in card.text
        elif shard == "part-000001.tar" and card.key != "001/0000":
            assert card.src is None and "not found in its shard" in card.text
        else:
            assert card.src is not None and (output_path / "review" / card.src).is_file()
    assert sum(s.thumbnail is None for s in sheet.samples) == 8 + 7


def test_bad_requests_get_one_sentence(filter_run, tmp_path, tiny_clip_768, laion_dir):
    output_path = copy_of_run(filter_run, tmp_path)
    parameters = filter_parameters(tiny_clip_768, laion_dir, tmp_path, str(filter_run.input_dir), str(tmp_path / "other"))
    with pytest.raises(UserError, match=r"review_samples input should be greater than or equal to 0 \(got -1\)"):
        nsfw_filter(**{**parameters, "return_state": False, "review_samples": -1})
    with pytest.raises(UserError, match=r"has no summary.json; point --output-path at the output_path of a finished nsfw-filter run"):
        write_review_sheet(str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=r"at least 1, not 0"):
        write_review_sheet(str(output_path), n=0)
    with pytest.raises(UserError, match=r"around must be an nsfw_score between 0 and 1, not 1.5"):
        write_review_sheet(str(output_path), around=1.5)
    (output_path / "scores" / "part-000001.parquet").unlink()
    with pytest.raises(UserError, match=r"scores file .*part-000001.parquet is missing; re-run the nsfw-filter flow"):
        write_review_sheet(str(output_path))
    assert not (output_path / "review").exists()


def test_cli_writes_the_sheet_and_reports_mistakes(filter_run, tmp_path, capsys):
    from flows.cli import main

    output_path = copy_of_run(filter_run, tmp_path)
    arguments = ["review", "--output-path", str(output_path), "--n", "5", "--seed", "3", "--blur-above", "0"]
    assert main(arguments) == 0
    sheet_path = output_path / "review" / "review.html"
    out = capsys.readouterr().out.strip()
    assert out.startswith("5 samples (0 without image) of ") and out.endswith(f"-> {sheet_path}")
    page = parse_sheet(sheet_path.read_text())
    assert len(page.cards) == 5 and all("blurred" in c.classes for c in page.cards)  # --blur-above 0 blurs everything
    shown = write_review_sheet(str(output_path), n=5, seed=3)  # same seed, same samples
    assert [(c.shard, c.key) for c in page.cards] == [(s.shard, s.key) for s in shown.samples]
    assert main(arguments + ["--no-blur"]) == 0
    capsys.readouterr()
    assert not any("blurred" in c.classes for c in parse_sheet(sheet_path.read_text()).cards)
    assert main(arguments + ["--around", "2"]) == 2
    assert capsys.readouterr().err.strip() == "nsfw-curator: error: around must be an nsfw_score between 0 and 1, not 2.0."
    assert main(["review", "--output-path", str(tmp_path / "nothing")]) == 2
    assert "has no summary.json" in capsys.readouterr().err


# ---------------------------------------------------------------- a run with signals and a policy


def signal_rows(output_path: Path, signal: str) -> dict[tuple[str, str], dict]:
    """Per scored sample of `signal`: its score, nsfw_score, filtered_by and (concept groups) matched concept."""
    scores = read_scores(output_path)
    concepts = scores.get(f"{signal}_concept", [None] * len(scores["key"]))
    rows = zip(scores["shard"], scores["key"], scores[f"{signal}_score"], scores["nsfw_score"], scores["filtered_by"], concepts)
    return {(s, k): {"score": v, "nsfw": n, "rule": r, "concept": c} for s, k, v, n, r, c in rows if v is not None}


def test_cli_reviews_the_aesthetic_signal_in_its_bands_around_the_policys_threshold(filter_run, tmp_path, capsys):
    from flows.cli import main

    output_path = copy_of_run(filter_run, tmp_path, filter_run.signals_output_path)
    rows = signal_rows(output_path, "aesthetic")
    blur_above = float(np.median([row["nsfw"] for row in rows.values()]))
    arguments = ["review", "--output-path", str(output_path), "--signal", "aesthetic", "--n", "12", "--seed", "1", "--blur-above", repr(blur_above)]
    assert main(arguments) == 0
    sheet_path = output_path / "review" / "review.html"
    assert capsys.readouterr().out.strip() == f"12 samples (0 without image) of {len(rows)} scored by aesthetic -> {sheet_path}"
    text = sheet_path.read_text()
    page = parse_sheet(text)
    record = json.loads((output_path / "summary.json").read_text())["signals"]["aesthetic"]
    # The bands are the summary's 20 aesthetic bins over [0, 10]; "around" spans 0.1 of that range: 1.0 either side of the cut.
    edges = np.linspace(0.0, 10.0, 21)
    assert record["histogram_bins"] == edges.tolist() and record["column"] == "aesthetic_score"
    weights = band_weights(AESTHETIC_CUT, edges)
    assert weights.tolist() == [1.0] * 8 + [float(AROUND_WEIGHT)] * 4 + [1.0] * 8
    quotas = allocate_quotas(12, record["histogram"], weights)
    bands = [int(np.searchsorted(edges, card.score, side="right")) - 1 for card in page.cards]
    assert len(page.cards) == 12 and np.bincount(bands, minlength=20).tolist() == quotas.tolist()
    assert quotas[8:12].sum() / 12 > sum(record["histogram"][8:12]) / len(rows) and quotas.sum() > quotas[8:12].sum()  # denser near the cut
    for card in page.cards:
        row = rows[(card.shard, card.key)]
        assert card.score == row["score"] and f"nsfw_score {format(row['nsfw'], '.4g')}" in card.text
        assert ("blurred" in card.classes) == (row["nsfw"] >= blur_above)  # blurring follows nsfw_score, whatever is reviewed
        assert ("filtered" in card.classes) == (row["rule"] is not None) == (row["score"] < AESTHETIC_CUT)
        assert ("filtered by: aesthetic < 5" in card.text) == (row["rule"] is not None)
    assert {"blurred" in card.classes for card in page.cards} == {True, False} and {"filtered" in card.classes for card in page.cards} == {True, False}
    # The page and the histogram name the signal and its column; the policy's rule drops the side below the cut.
    assert "<h1>aesthetic_score review</h1>" in text and 'alt="aesthetic_score histogram of the signal aesthetic' in text
    assert [int(row[1]) for row in page.tables["histogram"][1:]] == record["histogram"] and page.tables["histogram"][0][0] == "aesthetic_score"
    scores = np.array([row["score"] for row in rows.values()], dtype=np.float32)
    assert page.tables["sides"] == [
        ["line", "below (filtered)", "at or above (pass)"],
        ["threshold 5 (aesthetic < 5.0)", str(int((scores < AESTHETIC_CUT).sum())), str(int((scores >= AESTHETIC_CUT).sum()))],
    ]
    layout = HistogramLayout()
    with Image.open(output_path / "review" / "histogram.png") as image:
        pixels = image.convert("RGB")
        for index, count in enumerate(record["histogram"]):
            x0, x1 = layout.bar_span(index)
            colours = {pixels.getpixel((x, layout.baseline - 2)) for x in range(x0, x1 + 1)} & {PASS_COLOUR, FILTERED_COLOUR}
            assert colours == (set() if count == 0 else {FILTERED_COLOUR} if edges[index + 1] <= AESTHETIC_CUT else {PASS_COLOUR}), index
    # 7 is no nsfw_score but an aesthetic one; the signal's range decides, and out of it is one sentence.
    assert main(arguments + ["--around", "7"]) == 0
    capsys.readouterr()
    assert parse_sheet(sheet_path.read_text()).tables["sides"][2][0] == "review centre 7"
    assert main(arguments + ["--around", "11"]) == 2
    assert capsys.readouterr().err.strip() == "nsfw-curator: error: around must be an aesthetic_score between 0 and 10, not 11.0."
    assert main(["review", "--output-path", str(output_path), "--signal", "beauty"]) == 2
    assert capsys.readouterr().err.strip() == (
        "nsfw-curator: error: the run has no signal 'beauty'; its signals are nsfw, aesthetic, concepts_style (pass one of them to --signal)."
    )


def test_concept_groups_show_their_matched_concept_and_nsfw_centres_on_the_policys_threshold(filter_run, tmp_path):
    output_path = copy_of_run(filter_run, tmp_path, filter_run.signals_output_path)
    rows = signal_rows(output_path, "concepts_style")
    sheet = write_review_sheet(str(output_path), n=len(rows), signal="concepts_style", blur=False)
    # The policy sets no threshold on the group: the centre is the middle of its histogram range, [0, 0.5].
    assert sheet.overview.around == 0.25 and not sheet.overview.has_threshold
    text = (output_path / "review" / "review.html").read_text()
    page = parse_sheet(text)
    assert len(page.cards) == len(rows) and "<h1>concepts_style_score review</h1>" in text
    for card in page.cards:
        row = rows[(card.shard, card.key)]
        assert card.score == row["score"]
        assert (f"matched concept: {row['concept']}" if row["concept"] else "no concept matched") in card.text
    assert {row["concept"] for row in rows.values()} >= {"a photo", None}
    assert page.tables["sides"] == [["line", "below", "at or above"], ["review centre 0.25", str(len(rows)), "0"]]
    # nsfw on the same run: the policy's nsfw rule sets the centre; the cards name the aesthetic rule that dropped them.
    sheet = write_review_sheet(str(output_path), n=8, seed=0, blur=False)
    assert sheet.overview.around == sheet.overview.score_threshold == 0.5
    page = parse_sheet((output_path / "review" / "review.html").read_text())
    assert page.tables["sides"][1][0] == "threshold 0.5 (nsfw >= 0.5)"
    nsfw_rows = signal_rows(output_path, "nsfw")
    for card in page.cards:
        rule = nsfw_rows[(card.shard, card.key)]["rule"]
        assert ("filtered" in card.classes) == (rule is not None) and ("filtered by: aesthetic < 5" in card.text) == (rule is not None)


def test_the_review_centre_defaults_to_the_first_threshold_the_policy_sets_on_the_signal(filter_run):
    summary = json.loads((filter_run.signals_output_path / "summary.json").read_text())

    def reviewed(policy: dict | None, name: str, **changes) -> tuple[float, object]:
        edited = {**summary, "policy": policy, **changes}
        signal = reviewed_signal(edited, name, "summary.json")
        return review_centre(signal, None, edited["score_threshold"]), signal

    in_when = {"rules": [{"signal": "nsfw", "at_least": 0.2, "when": [{"signal": "aesthetic", "below": 6.5}]}, {"signal": "aesthetic", "at_least": 9}]}
    centre, aesthetic = reviewed(in_when, "aesthetic")
    assert centre == 6.5 and aesthetic.drops_below and aesthetic.threshold_rule == "nsfw >= 0.2 and aesthetic < 6.5"
    assert reviewed(in_when, "nsfw")[0] == 0.2
    no_thresholds = {"rules": [{"signal": "concepts_style", "matched": True}]}
    assert reviewed(no_thresholds, "aesthetic")[0] == 5.0  # the middle of [0, 10]
    assert reviewed(no_thresholds, "nsfw", score_threshold=0.3)[0] == 0.3  # nsfw falls back on the run's score_threshold
    with pytest.raises(UserError, match=r"^the policy's threshold 0.8 on concepts_style_score lies outside its histogram's range \[0, 0.5\]; pass --around"):
        reviewed({"rules": [{"signal": "concepts_style", "at_least": 0.8}]}, "concepts_style")
    # A summary from before the policy knows nsfw alone, dropped at or above its score_threshold.
    older = {key: value for key, value in summary.items() if key not in ("signals", "policy", "filtered_by")}
    signal = reviewed_signal({**older, "score_threshold": 0.3}, "nsfw", "summary.json")
    assert (signal.column, signal.threshold, signal.threshold_name, signal.legacy_score_threshold) == ("nsfw_score", 0.3, "score_threshold", 0.3)
    with pytest.raises(UserError, match=r"^the run has no signal 'aesthetic'; its signals are nsfw \(pass one of them to --signal\)\.$"):
        reviewed_signal(older, "aesthetic", "summary.json")
    broken = {**summary, "signals": {**summary["signals"], "aesthetic": {**summary["signals"]["aesthetic"], "histogram_bins": [0, 10]}}}
    with pytest.raises(UserError, match=r"^summary.json holds a malformed record of the signal 'aesthetic'; re-run the nsfw-filter flow"):
        reviewed_signal(broken, "aesthetic", "summary.json")


def read_artifacts(flow_run_id) -> dict[str, object]:
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    with get_client(sync_client=True) as client:
        # A plain POST: the client sends null for every filter left out, which this server refuses.
        response = client.request("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 100})
    return {artifact.key: artifact for artifact in Artifact.model_validate_list(response.json())}


def test_flow_writes_the_sheet_and_its_artifacts(filter_run):
    review_dir = filter_run.output_path / "review"
    page = parse_sheet((review_dir / "review.html").read_text())
    assert len(page.cards) == FLOW_REVIEW_SAMPLES
    assert all((review_dir / src).is_file() for src in page.images)
    artifacts = read_artifacts(filter_run.flow_run_id)
    # a local sheet is named as text (a file:// link is dead on the UI's http page); the histogram is the run's table artifact
    assert "nsfw-filter-review-histogram" not in artifacts
    sheet = artifacts["nsfw-filter-review"]
    assert sheet.type == "markdown" and f"`{review_dir / 'review.html'}`" in sheet.data
    assert not [key for key, artifact in artifacts.items() if "file://" in str(artifact.data)]
    assert "nsfw-filter-counts" in artifacts  # the run's other artifacts are still there


# ---------------------------------------------------------------- S3


def test_flow_on_s3_writes_the_sheet_next_to_its_thumbnails(tmp_path, tiny_clip_768, laion_dir, s3_bucket, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem()
    local_inputs = tmp_path / "in"
    write_tar(local_inputs / "part-000000.tar", shard_of_good_samples([f"s/{j:04d}" for j in range(6)], size=(160, 120)))
    fs.put(str(local_inputs / "part-000000.tar"), f"{s3_bucket}/in/part-000000.tar")
    output_url = f"s3://{s3_bucket}/out"
    state = nsfw_filter(**{**filter_parameters(tiny_clip_768, laion_dir, tmp_path, f"s3://{s3_bucket}/in", output_url), "review_samples": 4})
    assert state.is_completed()
    fs.invalidate_cache()
    review = f"{s3_bucket}/out/review"
    page = parse_sheet(fs.cat_file(f"{review}/review.html").decode())
    assert len(page.cards) == 4 and all(card.src for card in page.cards)
    assert all(fs.exists(f"{review}/{src}") for src in page.images)
    assert fs.info(f"{review}/review.html")["ContentType"].startswith("text/html")
    assert fs.info(f"{review}/histogram.png")["ContentType"] == "image/png"
    artifacts = read_artifacts(state.state_details.flow_run_id)
    # no pre-signed URL (a token made from the credentials) is stored with the run: the sheet is linked by its s3:// URL
    assert "nsfw-filter-review-histogram" not in artifacts
    assert not [key for key, artifact in artifacts.items() if "Signature" in str(artifact.data) or "X-Amz-" in str(artifact.data)]
    assert f"(s3://{s3_bucket}/out/review/review.html)" in artifacts["nsfw-filter-review"].data
    # the function reviews the S3 run again with other settings
    sheet = write_review_sheet(output_url, n=3, seed=5, blur=False)
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{review}/thumbs")) == sorted(f"{review}/{s.thumbnail}" for s in sheet.samples)


# ---------------------------------------------------------------- a real browser


def chromium_screenshot(page: Path, screenshot: Path, window: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as profile:
        command = [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--screenshot={screenshot}",
            f"--window-size={window[0]},{window[1]}", page.as_uri(),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and screenshot.is_file(), done.stderr[-3000:]


def colourful(pixels: np.ndarray) -> np.ndarray:
    return (pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)) > 40


def test_chromium_renders_the_histogram_and_the_thumbnails(filter_run, tmp_path):
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium` to render the review sheet"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    output_path = copy_of_run(filter_run, tmp_path)
    sheet = write_review_sheet(str(output_path), n=8, seed=4, blur_above=float(np.median(list(scored_rows(output_path).values()))))
    screenshot = Path(os.environ.get("NSFW_CURATOR_SCREENSHOT") or tmp_path / "review.png")  # set it to keep the picture
    chromium_screenshot(output_path / "review" / "review.html", screenshot, (1200, 2400))
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    histogram = np.asarray(Image.open(output_path / "review" / "histogram.png").convert("RGB"))
    # the histogram is drawn 1:1: its bar pixels all appear in the screenshot
    for colour in (PASS_COLOUR, FILTERED_COLOUR):
        in_png = int(np.all(histogram == colour, axis=2).sum())
        assert int(np.all(shot == colour, axis=2).sum()) >= 0.95 * in_png, colour
    # the page itself is greyscale: its colour comes from the histogram and the thumbnails, so they were rendered
    thumbnails = [np.asarray(Image.open(output_path / "review" / s.thumbnail).convert("RGB")) for s in sheet.samples]
    expected = int(colourful(histogram).sum()) + sum(int(colourful(t).sum()) for t in thumbnails)
    assert int(colourful(shot).sum()) >= 0.9 * expected
    assert sum(int(colourful(t).sum()) for t in thumbnails) > 0.5 * sum(t.shape[0] * t.shape[1] for t in thumbnails)


