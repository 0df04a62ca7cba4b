"""Outputs under `output_path`: filtered WebDataset shards, the scores Parquet, partition manifests.

Layout (one partition = `files_per_partition` input shards, named by its index in the run):

    shards/part-{partition:06d}-{n:04d}.tar   passed samples, `images_per_tar` per file, members byte for byte
    scores/part-{partition:06d}.parquet       one row per input sample: key, shard, nsfw_score, each signal's score
                                              (and matched concept), passed, filtered_by, error, output_shard
    _manifests/part-{partition:06d}.json      written last: the partition is complete when its manifest exists
    summary.json                              the run summary (counts, threshold, models, histogram)
    _owner.json                               which inputs own the output (tasks/io/ownership.py)

Every file is written atomically; a partition re-run rewrites the same names and removes the files of
earlier attempts that the new manifest does not list: those the previous manifest names, and the further
`part-{partition}-{n}.tar` a killed attempt wrote in sequence after them. Cleanup touches nothing else:
no listing or glob of the output, so files a user keeps there and glob characters in its path are safe.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.io.atomic import atomic_output, is_object_store, write_bytes_atomic
from tasks.io.locations import LocationLike, as_location
from tasks.io.read import image_extension, image_members
from tasks.io.samples import holds_image_bytes
from tasks.signals.columns import NSFW, ScoredSignal
from tasks.stop import raise_if_stopped

# The scores Parquet's columns; a run with extra signals has theirs after `nsfw_score` (`scores_schema`).
SCORES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("nsfw_score", pa.float32()),
        ("passed", pa.bool_()),
        ("filtered_by", pa.string()),
        ("error", pa.string()),
        ("output_shard", pa.string()),
    ]
)
HISTOGRAM_BINS = 20
QUARANTINE_DIR = "_quarantine"  # hash-list matches: key, shard, list, kind, distance (never an image-derived value)
QUARANTINE_FILE = "matches.jsonl"


class RawSample(Protocol):
    key: str | None
    shard: str
    members: dict[str, bytes]


def unscored_images(members: dict[str, bytes]) -> str | None:
    """Why a sample whose scored image passed must still stay out of the filtered dataset, or None.

    One image per sample is embedded, scored and hashed (`image_extension` picks it); the filtered dataset copies
    every member byte for byte, so a sample with another image member, named as one or holding an image's bytes
    under another name, would carry an image nobody scored or matched against the hash lists.
    """
    scored = image_extension(members)
    others = [extension for extension in image_members(members) if extension != scored]
    others += [extension for extension, data in members.items() if extension != scored and extension not in others and holds_image_bytes(data)]
    if not others:
        return None
    return (
        f"{len(others) + 1} image members; only '{scored}' was scored, so the sample is kept out of "
        f"the filtered dataset (unscored: {', '.join(repr(extension) for extension in others[:3])}{', ...' if len(others) > 3 else ''})"
    )


def join_url(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def partition_stem(partition_index: int) -> str:
    return f"part-{partition_index:06d}"


def manifest_url(output_path: str, partition_index: int) -> str:
    return join_url(output_path, "_manifests", f"{partition_stem(partition_index)}.json")


def scores_url(output_path: str, partition_index: int) -> str:
    return join_url(output_path, "scores", f"{partition_stem(partition_index)}.parquet")


def output_shard_url(output_path: str, partition_index: int, number: int) -> str:
    return join_url(output_path, "shards", f"{partition_stem(partition_index)}-{number:04d}.tar")


def output_shard_name(url: object) -> tuple[int, int] | None:
    """(partition, n) of a URL ending in `shards/part-{partition}-{n}.tar` (as a manifest names it), else None."""
    match = re.search(r"/shards/part-(\d{6})-(\d{4,})\.tar$", url) if isinstance(url, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed, so a re-run writes byte-identical shards
    return info, io.BytesIO(data)


class FilteredShardWriter:
    """Streams passed samples into `shards/part-{partition}-{n}.tar`, `images_per_tar` samples per file."""

    def __init__(self, output: LocationLike, partition_index: int, images_per_tar: int) -> None:
        assert images_per_tar >= 1
        self.output = as_location(output)
        self.partition_index = partition_index
        self.images_per_tar = images_per_tar
        self.written: list[str] = []
        self._context = None
        self._tar: tarfile.TarFile | None = None
        self._in_current = 0

    def _open_next(self) -> None:
        url = output_shard_url(self.output.url, self.partition_index, len(self.written))
        self._context = atomic_output(self.output.at(url))
        handle = self._context.__enter__()
        self._tar = tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT)
        self.written.append(url)
        self._in_current = 0

    def _close_current(self, exc: BaseException | None = None) -> None:
        if self._tar is None:
            return
        tar, context = self._tar, self._context
        self._tar = self._context = None
        if exc is None:
            tar.close()
            context.__exit__(None, None, None)
        else:
            context.__exit__(type(exc), exc, exc.__traceback__)

    def add(self, sample: RawSample) -> str:
        """Append one sample (all its members, in order); returns the URL of the shard it went to."""
        assert sample.key is not None
        if self._tar is None or self._in_current >= self.images_per_tar:
            self._close_current()
            self._open_next()
        for extension, data in sample.members.items():
            self._tar.addfile(*_tar_member(f"{sample.key}.{extension}", data))
        self._in_current += 1
        return self.written[-1]

    def close(self) -> list[str]:
        self._close_current()
        return list(self.written)

    def abort(self, exc: BaseException) -> None:
        self._close_current(exc)
        # Tars completed by this attempt stay; the re-run overwrites them under the same names.

    def __enter__(self) -> "FilteredShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def score_histogram(score: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> list[int]:
    """Counts of scored samples in `HISTOGRAM_BINS` equal bins over `value_range` (NaN scores left out, scores
    outside the range counted in the first or last bin)."""
    finite = score[np.isfinite(score)]  # float32, binned as float32 (0.95 falls in the 0.95-1.00 bin)
    counts, _ = np.histogram(np.clip(finite, *value_range), bins=HISTOGRAM_BINS, range=value_range)
    return counts.astype(int).tolist()


def scores_schema(signals: Sequence[ScoredSignal]) -> pa.Schema:
    """The scores Parquet's schema for a run's signals: `nsfw_score`, then each signal's score (and matched concept)."""
    extra = [
        field
        for signal in signals
        if signal.name != NSFW
        for field in ([(signal.score_column, pa.float32())] + ([(signal.concept_column, pa.string())] if signal.concept_column else []))
    ]
    fields = list(zip(SCORES_SCHEMA.names, SCORES_SCHEMA.types))
    return pa.schema(fields[:3] + extra + fields[3:])


@dataclass(frozen=True)
class ScoredRow:
    """A sample's scores by column name (float, or the matched concept), the rule that dropped it, and its error;
    `quarantine` is its hash-list match (tasks/hashes/matching.py), when it has one."""

    scores: dict[str, float | str | None]
    filtered_by: str | None
    error: str | None
    quarantine: Any = None  # HashMatch: list_name, kind, distance, filtered_by


def quarantine_url(output_path: str, partition_index: int) -> str:
    return join_url(output_path, QUARANTINE_DIR, f"{partition_stem(partition_index)}.jsonl")


def write_partition_quarantine(
    output: LocationLike, partition_index: int, records: list[dict[str, Any]], earlier: "PartitionResult | None" = None
) -> None:
    """The partition's hash-list matches as JSON lines (atomic), or no file when it has none: the one an earlier
    attempt's manifest counts is removed (no request at all when it counts none; a file no manifest counts is
    never gathered into the run's record)."""
    output = as_location(output)
    location = output.at(quarantine_url(output.url, partition_index))
    if records:
        write_bytes_atomic(location, "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode())
        return
    if earlier is not None and earlier.quarantined:
        fs, path = location.filesystem()
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


def write_run_quarantine(output: LocationLike, results: Sequence["PartitionResult"]) -> str | None:
    """`_quarantine/matches.jsonl`: every partition's matches in partition order (atomic); removed when there are none."""
    output = as_location(output)
    location = output.at(join_url(output.url, QUARANTINE_DIR, QUARANTINE_FILE))
    fs, path = location.filesystem()
    parts = []
    for result in sorted(results, key=lambda result: result.partition_index):
        if result.quarantined:
            part_fs, part_path = output.at(quarantine_url(output.url, result.partition_index)).filesystem()
            with part_fs.open(part_path, "rb") as handle:
                parts.append(handle.read())
    if not parts:
        if fs.exists(path):
            fs.rm(path)
        return None
    write_bytes_atomic(location, b"".join(parts))
    return location.url


@dataclass
class PartitionResult:
    """What a partition wrote; the manifest holds exactly this."""

    partition_index: int
    partition_id: str
    shard_urls: list[str]
    samples: int
    passed: int
    filtered: int
    errors: int
    histogram: list[int]
    scores_file: str
    output_shards: list[str] = field(default_factory=list)
    settings_identity: str = ""  # signals, policy, images_per_tar, NSFW head and embedding identity of the attempt
    signal_histograms: dict[str, list[int]] = field(default_factory=dict)  # signals other than nsfw, by name
    filtered_by: dict[str, int] = field(default_factory=dict)  # samples each policy rule dropped, by its label
    quarantined: int = 0  # samples a hash list matched (listed in _quarantine/part-{partition}.jsonl)

    @classmethod
    def from_json(cls, text: str) -> "PartitionResult":
        """Validated: the exact fields with the right types, or ValueError/TypeError."""
        result = cls(**json.loads(text))
        if not all(isinstance(value, list) for value in (result.shard_urls, result.output_shards, result.histogram)):
            raise ValueError("a manifest list field is not a list")
        if not isinstance(result.signal_histograms, dict) or not isinstance(result.filtered_by, dict):
            raise ValueError("a manifest mapping field is not a mapping")
        if not all(isinstance(counts, list) for counts in result.signal_histograms.values()):
            raise ValueError("a manifest histogram is not a list")
        counts = (
            result.quarantined, result.partition_index, result.samples, result.passed, result.filtered, result.errors, *result.histogram,
            *result.filtered_by.values(), *(count for counts in result.signal_histograms.values() for count in counts),
        )
        strings = (
            result.partition_id, result.scores_file, result.settings_identity, *result.shard_urls, *result.output_shards,
            *result.signal_histograms, *result.filtered_by,
        )
        if not all(type(value) is int for value in counts) or not all(isinstance(value, str) for value in strings):
            raise ValueError("a manifest field has the wrong type")
        return result


def write_scores(location: LocationLike, rows: dict[str, list], schema: pa.Schema = SCORES_SCHEMA) -> None:
    table = pa.table(rows, schema=schema)
    with atomic_output(as_location(location)) as handle:
        pq.write_table(table, handle)


def remove_stale_outputs(output: LocationLike, partition_index: int, written: int, earlier: Iterable[str] = ()) -> list[str]:
    """Delete this partition's output tars numbered `written` and above: those `earlier` (the previous
    manifest's `output_shards`) names, and the consecutive ones a killed attempt left after them."""
    output = as_location(output)
    fs = output.fs
    fs.invalidate_cache(output.at(join_url(output.url, "shards")).path)
    removed: list[str] = []

    def remove(number: int) -> bool:
        path = output.at(output_shard_url(output.url, partition_index, number)).path
        if not fs.exists(path):
            return False
        fs.rm(path)
        removed.append(path)
        return True

    number = written
    while remove(number):  # a killed attempt writes its tars in sequence: the first gap ends them
        number += 1
    named = {name[1] for name in map(output_shard_name, earlier) if name is not None and name[0] == partition_index}
    for number in sorted(n for n in named if n > number):  # named past a gap (one request each, however large n is)
        remove(number)
    return removed


# The names this project writes under an output, per folder; a temp file of one of them is
# `.{name}.{32 hex}.tmp` next to it (tasks/io/atomic.py), left only when a writer was killed.
OUTPUT_NAMES = {
    "": r"summary\.json|_owner\.json|duplicates\.parquet|kept\.parquet|skipped\.parquet",
    "shards": r"part-\d{6}-\d{4,}\.tar",
    "scores": r"part-\d{6}\.parquet",
    "_manifests": r"part-\d{6}\.json",
    QUARANTINE_DIR: r"part-\d{6}\.jsonl|matches\.jsonl",
}


def partitions_with_outputs(output: LocationLike, low: int, high: int) -> list[int]:
    """Partition numbers in [low, high) that have a file of this project's names under `output`
    (`shards/`, `scores/`, `_manifests/`), from one listing of each folder: the work is bounded by the
    files that exist, never by `high` (a recorded partition mark is read back from storage)."""
    fs, root = as_location(output).filesystem()
    found: set[int] = set()
    for folder in ("shards", "scores", "_manifests"):
        name = re.compile(rf"^part-(\d{{6}})(?:-\d{{4,}}\.tar|\.parquet|\.json)$")
        path = posixpath.join(root.rstrip("/"), folder)
        fs.invalidate_cache(path)
        try:
            names = fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for listed in names:
            raise_if_stopped()
            match = name.match(posixpath.basename(listed.rstrip("/")))
            if match and low <= int(match.group(1)) < high:
                found.add(int(match.group(1)))
    return sorted(found)


def remove_leftover_temp_files(output: LocationLike) -> list[str]:
    """Delete the temp files killed writers of this project's output names left on local disk (object
    stores never show partial objects); any other file, hidden or `.tmp` or not, stays."""
    fs, root = as_location(output).filesystem()
    if is_object_store(fs):
        return []
    removed: list[str] = []
    for folder, names in OUTPUT_NAMES.items():
        temp_name = re.compile(rf"^\.(?:{names})\.[0-9a-f]{{32}}\.tmp$")
        try:
            entries = fs.ls(posixpath.join(root.rstrip("/"), folder) if folder else root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry["type"] == "file" and temp_name.match(posixpath.basename(entry["name"])):
                fs.rm(entry["name"])
                removed.append(entry["name"])
    return removed


def read_manifest(output: LocationLike, partition_index: int) -> PartitionResult | None:
    """The partition's manifest, validated; None when there is none or it is not a valid manifest (redone)."""
    output = as_location(output)
    fs, path = output.at(manifest_url(output.url, partition_index)).filesystem()
    try:
        with fs.open(path, "rb") as handle:
            return PartitionResult.from_json(handle.read().decode())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, RecursionError):
        return None  # unreadable manifest: the partition is redone


def write_manifest(output: LocationLike, result: PartitionResult) -> str:
    output = as_location(output)
    url = manifest_url(output.url, result.partition_index)
    write_bytes_atomic(output.at(url), json.dumps(asdict(result), indent=2).encode())
    return url


def write_filtered_partition(
    output: LocationLike,
    partition_index: int,
    partition_id: str,
    shard_urls: Sequence[str],
    scored_samples: Iterable[tuple[RawSample, ScoredRow]],
    signals: Sequence[ScoredSignal],
    images_per_tar: int,
    settings_identity: str = "",
    earlier: PartitionResult | None = None,
) -> PartitionResult:
    """Write one partition's outputs from (raw sample, scored row) pairs in input order.

    `passed` is `error is None`, every signal scored, and no policy rule dropped the sample (`filtered_by` None).
    `earlier` is the partition's previous manifest (read before writing): the tars it names that this attempt does
    not rewrite are removed. Returns the manifest's content after the manifest is written (the commit point).
    """
    output = as_location(output)
    schema = scores_schema(signals)
    score_columns = [signal.score_column for signal in signals]
    concept_columns = [signal.concept_column for signal in signals if signal.concept_column]
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    quarantined: list[dict[str, Any]] = []
    with FilteredShardWriter(output, partition_index, images_per_tar) as writer:
        for sample, row in scored_samples:
            if row.quarantine is not None:
                # A hash-list match: its key, shard and which list, nothing derived from its pixels, never copied.
                match = row.quarantine
                quarantined.append({"key": sample.key, "shard": sample.shard, "list": match.list_name, "kind": match.kind, "distance": match.distance})
                for name in schema.names:
                    columns[name].append(None)
                columns["key"][-1], columns["shard"][-1] = sample.key, sample.shard
                columns["passed"][-1], columns["filtered_by"][-1] = False, match.filtered_by
                continue
            error = row.error
            scored = error is None and sample.key is not None and all(
                isinstance(row.scores.get(name), float) and np.isfinite(row.scores[name]) for name in score_columns
            )
            passed = scored and row.filtered_by is None
            if passed:
                error = unscored_images(sample.members)
                passed = error is None
            columns["key"].append(sample.key)
            columns["shard"].append(sample.shard)
            for name in score_columns:
                columns[name].append(float(row.scores[name]) if scored else None)
            for name in concept_columns:
                columns[name].append(row.scores.get(name) if scored else None)
            columns["passed"].append(passed)
            columns["filtered_by"].append(row.filtered_by if scored else None)
            columns["error"].append(error if error is not None or scored else "not scored")
            columns["output_shard"].append(writer.add(sample) if passed else None)
    output_shards = writer.written
    score_file = scores_url(output.url, partition_index)
    write_scores(output.at(score_file), columns, schema)
    write_partition_quarantine(output, partition_index, quarantined, earlier)
    remove_stale_outputs(output, partition_index, len(output_shards), earlier.output_shards if earlier else ())
    histograms = {
        signal.name: score_histogram(np.array([np.nan if s is None else s for s in columns[signal.score_column]], dtype=np.float32), signal.histogram_range)
        for signal in signals
    }
    passed_count = int(sum(columns["passed"]))
    error_count = int(sum(e is not None for e in columns["error"]))
    rules: dict[str, int] = {}
    for label in columns["filtered_by"]:
        if label is not None and not label.startswith("hash:"):  # matches are counted apart, never by list name
            rules[label] = rules.get(label, 0) + 1
    result = PartitionResult(
        partition_index=partition_index,
        partition_id=partition_id,
        shard_urls=list(shard_urls),
        samples=len(columns["key"]),
        passed=passed_count,
        filtered=len(columns["key"]) - passed_count - error_count - len(quarantined),
        errors=error_count,
        histogram=histograms.pop(NSFW, [0] * HISTOGRAM_BINS),
        scores_file=score_file,
        output_shards=output_shards,
        settings_identity=settings_identity,
        signal_histograms=histograms,
        filtered_by=rules,
        quarantined=len(quarantined),
    )
    write_manifest(output, result)
    return result


@dataclass
class RunSummary:
    samples: int
    passed: int
    filtered: int
    errors: int
    partitions: int
    score_threshold: float
    histogram_bins: list[float]
    histogram: list[int]
    models: dict[str, str]
    output_path: str
    scores_files: list[str]
    output_shards: list[str]
    policy: dict[str, Any] = field(default_factory=dict)  # the rules as run (`filtered_by` names them by label)
    filtered_by: dict[str, int] = field(default_factory=dict)  # samples each rule dropped
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)  # per signal: kind, column, histogram bins and counts
    quarantined: int = 0  # samples a hash list matched: a count only (the record is _quarantine/matches.jsonl)

    @classmethod
    def from_partitions(
        cls,
        results: Sequence[PartitionResult],
        score_threshold: float,
        models: dict[str, str],
        output_path: str,
        signals: Sequence[ScoredSignal] = (),
        policy: dict[str, Any] | None = None,
    ) -> "RunSummary":
        histogram = np.zeros(HISTOGRAM_BINS, dtype=int)
        rules: dict[str, int] = {}
        per_signal = {signal.name: np.zeros(HISTOGRAM_BINS, dtype=int) for signal in signals if signal.name != NSFW}
        for result in results:
            histogram += np.asarray(result.histogram, dtype=int)
            for label, count in result.filtered_by.items():
                rules[label] = rules.get(label, 0) + count
            for name, counts in result.signal_histograms.items():
                if name in per_signal and len(counts) == HISTOGRAM_BINS:
                    per_signal[name] += np.asarray(counts, dtype=int)
        signal_records = {
            signal.name: {
                "kind": signal.kind,
                "column": signal.score_column,
                **({"concept_column": signal.concept_column} if signal.concept_column else {}),
                "histogram_bins": np.linspace(*signal.histogram_range, HISTOGRAM_BINS + 1).round(4).tolist(),
                "histogram": (histogram if signal.name == NSFW else per_signal[signal.name]).tolist(),
            }
            for signal in signals
        }
        return cls(
            samples=sum(r.samples for r in results),
            passed=sum(r.passed for r in results),
            filtered=sum(r.filtered for r in results),
            errors=sum(r.errors for r in results),
            partitions=len(results),
            score_threshold=score_threshold,
            histogram_bins=np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1).round(4).tolist(),
            histogram=histogram.tolist(),
            models=dict(models),
            output_path=output_path,
            scores_files=[r.scores_file for r in results],
            output_shards=[url for r in results for url in r.output_shards],
            policy=dict(policy or {}),
            filtered_by=rules,
            signals=signal_records,
            quarantined=sum(r.quarantined for r in results),
        )

    def write(self, output: LocationLike | None = None) -> str:
        """Write `summary.json` under `output` (the run's output location; default: `output_path`, reached with
        the environment's credentials)."""
        output = as_location(output if output is not None else self.output_path)
        url = join_url(output.url, "summary.json")
        write_bytes_atomic(output.at(url), json.dumps(asdict(self), indent=2).encode())
        return url

    def histogram_markdown(self, signal: str = NSFW) -> str:
        """A signal's score histogram as a Markdown table with bars, the bins of the policy's thresholds on it marked."""
        record = self.signals.get(signal, {"column": "nsfw_score", "histogram_bins": self.histogram_bins, "histogram": self.histogram})
        bins, counts = record["histogram_bins"], record["histogram"]
        thresholds = self.policy_thresholds(signal) if self.policy else [self.score_threshold]
        peak = max(counts) or 1
        lines = [f"| {record['column']} | count | |", "| --- | ---: | --- |"]
        for low, high, count in zip(bins[:-1], bins[1:], counts):
            last = high == bins[-1]
            mark = " ← threshold" if any(low <= threshold < high or (last and threshold == high) for threshold in thresholds) else ""
            lines.append(f"| {low:.2f}–{high:.2f} | {count} | {'█' * round(30 * count / peak)}{mark} |")
        return "\n".join(lines)

    def policy_thresholds(self, signal: str) -> list[float]:
        """The thresholds the policy's rules and conditions set on `signal`."""
        tests = [test for rule in self.policy.get("rules", []) for test in (rule, *rule.get("when", []))]
        return [value for test in tests if test.get("signal") == signal for value in (test.get("at_least"), test.get("below")) if value is not None]
