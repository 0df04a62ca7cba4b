"""A webdataset stage that keeps, from the original shards, only the samples a filter run passed.

    import webdataset as wds
    from tasks.io.keep_passed import keep_passed
    dataset = wds.WebDataset(urls, shardshuffle=False).compose(keep_passed(output_path))

`keep_passed(scores)` takes a filter run's `output_path` (or its `scores/` folder), as a path, URL or
`Location`. Building it lists `scores/part-{partition:06d}.parquet`, uses only those a partition manifest
(`_manifests/`, the partition's commit point) names (a run stopped mid-partition leaves scores no manifest
vouches for: their samples are dropped as never checked), checks each file's schema (`key` and
`shard` strings, `passed` bool) and reads its `shard` column once, so a bad or missing scores file is one
UserError naming it before any sample is read. Only the columns key, shard and passed are ever read.

The stage yields the sample dicts it is given, untouched, whose (shard, key) passed. It fails closed: a
sample is dropped when its shard is not in the scores (the run never checked it), when its key is not among
its shard's rows, or when a row of that key in that shard did not pass (a key that appears twice in a shard
is kept only if both appearances passed). `counts` holds the latest pass's counts; each pass logs them in
one INFO line (counts only, never a key or a sample's content).

Shards match by full identity, never by basename: the sample's `__url__` (the URL given to WebDataset) and
the scores' `shard` (the run's listing) both go through `shard_identity`: local paths and `file:` URLs
become real absolute paths (symlinks resolved, as the run's listing does); other URLs stay as written, the
scheme in lower case, without a trailing slash. A `pipe:` URL names no shard and matches nothing.

Memory: the index holds one entry per shard (about 300 bytes: 30 KB per million samples in 10^4-sample
shards). While iterating, the stage holds one scores file's three columns in Arrow (about 20 bytes a row
for 13-character keys, the shard dictionary-encoded) and the keys of the last `SHARDS_HELD` shards as Python
sets (about 100 bytes a key, measured). For 10^7 samples in 10^4-sample shards and 10^5-row partitions that
is under 10 MB, whatever the dataset's size. Samples should come shard by shard (compose this stage before
any shuffle); a sample-level shuffle mixing more than `SHARDS_HELD` shards re-reads scores files.

In a DataLoader each worker process holds its own copy (and logs its own counts).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.io.locations import Location, LocationLike, split_url_credentials
from tasks.io.write import OUTPUT_NAMES, join_url, read_manifest

logger = logging.getLogger(__name__)

# Shards whose keys stay loaded: a shuffle buffer after WebDataset mixes a few consecutive shards.
SHARDS_HELD = 4
SCORES_COLUMNS = ("key", "shard", "passed")
_SCORES_FILE = re.compile(rf"^(?:{OUTPUT_NAMES['scores']})$")


def shard_identity(url: str) -> str:
    """The spelling under which a sample's `__url__` and a scores row's `shard` name the same shard."""
    if url[:5].lower() == "file:":
        return os.path.realpath(url2pathname(urlparse(url).path))  # the file webdataset opens for a file: URL
    scheme, separator, rest = url.partition("://")
    if separator:
        return f"{scheme.lower()}://{rest}".rstrip("/")
    return os.path.realpath(url)


@dataclass
class KeepPassedCounts:
    """What one pass over the samples kept and dropped, and why."""

    kept: int = 0
    not_passed: int = 0  # a row of the sample's key in its shard did not pass
    unknown_key: int = 0  # the shard is in the scores, the key is not (or the sample has none)
    unknown_shard: int = 0  # the run never listed the sample's shard

    @property
    def dropped(self) -> int:
        return self.not_passed + self.unknown_key + self.unknown_shard


@dataclass(frozen=True)
class ShardKeys:
    """One shard's keys in the scores: those whose every row passed, and the others."""

    passed: frozenset[str]
    not_passed: frozenset[str]


def _string_type(data_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _check_schema(url: str, schema: pa.Schema) -> None:
    missing = [name for name in SCORES_COLUMNS if name not in schema.names]
    if missing:
        raise UserError(
            f"scores file {url} has no column {', '.join(missing)}; pass the output_path of an nsfw-filter run, whose scores files have key, shard and passed."
        )
    expected = {"key": (_string_type, "string"), "shard": (_string_type, "string"), "passed": (pa.types.is_boolean, "bool")}
    for name, (is_expected, type_name) in expected.items():
        found = schema.field(name).type
        if not is_expected(found):
            raise UserError(
                f"scores file {url} has column {name} of type {found} where {type_name} is expected; it is not an nsfw-filter scores file, pass a run's output_path."
            )


class KeepPassed:
    """The stage `keep_passed` returns: call it on an iterator of webdataset samples."""

    def __init__(self, scores: Location) -> None:
        self.scores = _scores_folder(scores)
        self.counts = KeepPassedCounts()
        self._fs, scores_path = self.scores.filesystem()
        self._files: dict[str, str] = {}  # file path -> its URL, for messages
        # shard identity -> (scores file path, the shard as that file writes it), for each file holding its rows
        self._shard_rows: dict[str, list[tuple[str, str]]] = {}
        output = self.scores.at(self.scores.url.rstrip("/").rsplit("/", 1)[0])
        self.incomplete_partitions = 0  # scores files no manifest vouches for (a run stopped before they were committed)
        for name in _scores_file_names(self._fs, scores_path, self.scores.url):
            path = f"{scores_path.rstrip('/')}/{name}"
            self._files[path] = join_url(self.scores.url, name)
            shards = self._read(path, ["shard"]).column("shard")  # every file's schema is checked, committed or not
            manifest = read_manifest(output, int(name[len("part-") : len("part-") + 6]))
            if manifest is None or posixpath.basename(manifest.scores_file) != name:
                self.incomplete_partitions += 1  # its samples are not in the index: dropped as never checked
                continue
            for written in _distinct(shards):
                self._shard_rows.setdefault(shard_identity(written), []).append((path, written))
        self._held: OrderedDict[str, ShardKeys | None] = OrderedDict()
        self._file_table: tuple[str, pa.Table] | None = None

    @property
    def shards(self) -> int:
        """How many shards the scores hold rows for."""
        return len(self._shard_rows)

    def _read(self, path: str, columns: list[str]) -> pa.Table:
        """`columns` of one scores file (the shard dictionary-encoded), its schema checked; one sentence when it is unreadable."""
        url = self._files[path]
        try:
            with self._fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle, read_dictionary=["shard"])
                _check_schema(url, parquet.schema_arrow)
                return parquet.read(columns=columns)
        except FileNotFoundError:
            raise UserError(f"scores file {url} disappeared while reading; wait for the filter run to finish, then iterate again.") from None
        except (pa.ArrowException, OSError) as exc:
            reason = re.split(r"\.(?:\s|$)|\n", str(exc).strip())[0] or type(exc).__name__  # its first sentence only
            raise UserError(f"scores file {url} is not a readable Parquet file ({reason}); re-run the nsfw-filter flow on its output_path.") from None

    def _scores_of_file(self, path: str) -> pa.Table:
        if self._file_table is None or self._file_table[0] != path:
            self._file_table = None  # release the previous file's columns before reading the next
            self._file_table = (path, self._read(path, list(SCORES_COLUMNS)))
        return self._file_table[1]

    def shard_keys(self, url: str) -> ShardKeys | None:
        """The keys the scores hold for the shard at `url` (a sample's `__url__`), or None when they hold none."""
        identity = shard_identity(url)
        if identity in self._held:
            self._held.move_to_end(identity)
            return self._held[identity]
        passed: set[str] = set()
        not_passed: set[str] = set()
        for path, written in self._shard_rows.get(identity, ()):
            table = self._scores_of_file(path)
            rows = table.filter(pc.equal(table.column("shard"), written))
            ok = pc.fill_null(rows.column("passed"), False)  # a null `passed` was never a pass
            passed.update(key for key in rows.column("key").filter(ok).to_pylist() if key is not None)
            not_passed.update(key for key in rows.column("key").filter(pc.invert(ok)).to_pylist() if key is not None)
        keys = ShardKeys(frozenset(passed - not_passed), frozenset(not_passed)) if identity in self._shard_rows else None
        self._held[identity] = keys
        if len(self._held) > SHARDS_HELD:
            self._held.popitem(last=False)
        return keys

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        counts = self.counts = KeepPassedCounts()
        current_url: object = object()  # no sample's URL: the first sample looks its shard up
        keys: ShardKeys | None = None
        try:
            for sample in samples:
                url = sample.get("__url__")
                if url != current_url:
                    current_url = url
                    keys = self.shard_keys(url) if isinstance(url, str) else None
                key = sample.get("__key__")
                if keys is None:
                    counts.unknown_shard += 1
                elif key in keys.passed:
                    counts.kept += 1
                    yield sample
                elif key in keys.not_passed:
                    counts.not_passed += 1
                else:
                    counts.unknown_key += 1
        finally:
            logger.info(
                "keep_passed over %s: kept %d of %d samples; dropped %d that did not pass, %d whose key is not in its shard's scores, "
                "%d from shards not in the scores",
                self.scores, counts.kept, counts.kept + counts.dropped, counts.not_passed, counts.unknown_key, counts.unknown_shard,
            )


def _distinct(shards: pa.ChunkedArray) -> list[str]:
    """The distinct non-null values of a dictionary-encoded column (each chunk may have its own dictionary)."""
    distinct = pc.unique(shards)
    return [value for value in distinct.dictionary.take(distinct.indices).to_pylist() if value is not None]


def _scores_folder(location: Location) -> Location:
    """The `scores/` folder of an output folder, or the location itself when it is that folder."""
    below = location.join("scores")
    fs, path = below.filesystem()
    fs.invalidate_cache(path)  # a notebook that keeps running must see a run that finished since
    return below if fs.isdir(path) else location


def _scores_file_names(fs: Any, path: str, url: str) -> list[str]:
    fs.invalidate_cache(path)  # the files of a run that finished since an earlier listing
    try:
        listed = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{url} does not exist or is not a folder; pass the output_path of an nsfw-filter run or its scores/ folder.") from None
    except PermissionError:
        raise UserError(f"cannot list {url}: access denied; check the storage credentials and permissions.") from None
    names = sorted(name for name in (entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed) if _SCORES_FILE.match(name))
    if not names:
        raise UserError(f"{url} holds no scores file (part-NNNNNN.parquet); pass the output_path of an nsfw-filter run or its scores/ folder.")
    return names


def keep_passed(scores: LocationLike, storage_options: Mapping[str, Any] | None = None) -> KeepPassed:
    """The stage that keeps the samples a filter run passed: `scores` is its output_path or `scores/` folder,
    reached with `storage_options` (default: a Location's own, else the environment's credentials)."""
    if isinstance(scores, Location):
        return KeepPassed(Location(scores, storage_options))
    url, url_options = split_url_credentials(os.fspath(scores))
    return KeepPassed(Location(url, {**url_options, **(storage_options or {})}))
