"""Outputs under `output_path`: filtered WebDataset shards, the scores Parquet, partition manifests.

Layout (one partition = `files_per_partition` input shards, named by its index in the run):

    shards/part-{partition:06d}-{n:04d}.tar   passed samples, `images_per_tar` per file, members byte for byte
    scores/part-{partition:06d}.parquet       one row per input sample: key, shard, nsfw_score, passed, error, output_shard
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
from tasks.stop import raise_if_stopped

SCORES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("nsfw_score", pa.float32()),
        ("passed", pa.bool_()),
        ("error", pa.string()),
        ("output_shard", pa.string()),
    ]
)
HISTOGRAM_BINS = 20


class RawSample(Protocol):
    key: str | None
    shard: str
    members: dict[str, bytes]


def unscored_images(members: dict[str, bytes]) -> str | None:
    """Why a sample whose scored image passed must still stay out of the filtered dataset, or None.

    One image per sample is embedded and scored (`image_extension` picks it); the filtered dataset copies
    every member byte for byte, so a sample with other image members would carry images nobody scored.
    """
    others = [extension for extension in image_members(members) if extension != image_extension(members)]
    if not others:
        return None
    return (
        f"{len(others) + 1} image members; only '{image_extension(members)}' was scored, so the sample is kept out of "
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


def score_histogram(nsfw_score: np.ndarray) -> list[int]:
    """Counts of scored samples in `HISTOGRAM_BINS` equal bins over [0, 1] (NaN scores left out)."""
    finite = nsfw_score[np.isfinite(nsfw_score)]
    counts, _ = np.histogram(finite, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return counts.astype(int).tolist()


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
    settings_identity: str = ""  # threshold, images_per_tar, NSFW head and embedding identity of the attempt

    @classmethod
    def from_json(cls, text: str) -> "PartitionResult":
        """Validated: the exact fields with the right types, or ValueError/TypeError."""
        result = cls(**json.loads(text))
        if not all(isinstance(value, list) for value in (result.shard_urls, result.output_shards, result.histogram)):
            raise ValueError("a manifest list field is not a list")
        counts = (result.partition_index, result.samples, result.passed, result.filtered, result.errors, *result.histogram)
        strings = (result.partition_id, result.scores_file, result.settings_identity, *result.shard_urls, *result.output_shards)
        if not all(type(value) is int for value in counts) or not all(isinstance(value, str) for value in strings):
            raise ValueError("a manifest field has the wrong type")
        return result


def write_scores(location: LocationLike, rows: dict[str, list]) -> None:
    table = pa.table(rows, schema=SCORES_SCHEMA)
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
    scored_samples: Iterable[tuple[RawSample, float, str | None]],
    score_threshold: float,
    images_per_tar: int,
    settings_identity: str = "",
    earlier: PartitionResult | None = None,
) -> PartitionResult:
    """Write one partition's outputs from (raw sample, nsfw_score, error) triples in input order.

    `passed` is `error is None and nsfw_score < score_threshold`. `earlier` is the partition's previous
    manifest (read before writing): the tars it names that this attempt does not rewrite are removed.
    Returns the manifest's content after the manifest is written (the partition's commit point).
    """
    output = as_location(output)
    columns: dict[str, list[Any]] = {name: [] for name in SCORES_SCHEMA.names}
    with FilteredShardWriter(output, partition_index, images_per_tar) as writer:
        for sample, nsfw_score, error in scored_samples:
            scored = error is None and sample.key is not None and bool(np.isfinite(nsfw_score))
            passed = scored and bool(nsfw_score < score_threshold)
            if passed and error is None:
                error = unscored_images(sample.members)
                passed = error is None
            columns["key"].append(sample.key)
            columns["shard"].append(sample.shard)
            columns["nsfw_score"].append(float(nsfw_score) if scored else None)
            columns["passed"].append(passed)
            columns["error"].append(error if error is not None or scored else "not scored")
            columns["output_shard"].append(writer.add(sample) if passed else None)
    output_shards = writer.written
    score_file = scores_url(output.url, partition_index)
    write_scores(output.at(score_file), columns)
    remove_stale_outputs(output, partition_index, len(output_shards), earlier.output_shards if earlier else ())
    nsfw_scores = np.array([np.nan if s is None else s for s in columns["nsfw_score"]], dtype=np.float32)
    passed_count = int(sum(columns["passed"]))
    error_count = int(sum(e is not None for e in columns["error"]))
    result = PartitionResult(
        partition_index=partition_index,
        partition_id=partition_id,
        shard_urls=list(shard_urls),
        samples=len(columns["key"]),
        passed=passed_count,
        filtered=len(columns["key"]) - passed_count - error_count,
        errors=error_count,
        histogram=score_histogram(nsfw_scores),
        scores_file=score_file,
        output_shards=output_shards,
        settings_identity=settings_identity,
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

    @classmethod
    def from_partitions(
        cls, results: Sequence[PartitionResult], score_threshold: float, models: dict[str, str], output_path: str
    ) -> "RunSummary":
        histogram = np.zeros(HISTOGRAM_BINS, dtype=int)
        for result in results:
            histogram += np.asarray(result.histogram, dtype=int)
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
        )

    def write(self, output: LocationLike | None = None) -> str:
        """Write `summary.json` under `output` (the run's output location; default: `output_path`, reached with
        the environment's credentials)."""
        output = as_location(output if output is not None else self.output_path)
        url = join_url(output.url, "summary.json")
        write_bytes_atomic(output.at(url), json.dumps(asdict(self), indent=2).encode())
        return url

    def histogram_markdown(self) -> str:
        """The score histogram as a Markdown table with bars, threshold bin marked."""
        peak = max(self.histogram) or 1
        lines = ["| nsfw_score | count | |", "| --- | ---: | --- |"]
        for low, high, count in zip(self.histogram_bins[:-1], self.histogram_bins[1:], self.histogram):
            mark = " ← threshold" if low <= self.score_threshold < high else ""
            lines.append(f"| {low:.2f}–{high:.2f} | {count} | {'█' * round(30 * count / peak)}{mark} |")
        return "\n".join(lines)
