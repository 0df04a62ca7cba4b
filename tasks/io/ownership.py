"""Where a run may write: never over or inside its inputs, and only in an output it owns.

Both rules are checked before any work, for every flow:

1. **Apart from its inputs.** An output may not hold an input shard or a folder, prefix or glob the run
   lists (the run would overwrite what it reads), nor lie inside one (the next listing would read the
   outputs as input). Locations are compared in one spelling: local paths resolved (symlinks included),
   `//` and `/./` collapsed in remote URLs.
2. **One owner.** `{output_path}/_owner.json` records which flow and which inputs the output belongs to
   (hashes of the canonical `file_paths` + `file_extensions` and of the listed shard URLs, credentials
   stripped) and how many partitions a run may have written there. A run of the same flow whose inputs
   are named the same way (the same folder, even if it gained or lost shards) or list the same shards
   owns it; any other run is refused in one sentence unless it takes the output over. An output without
   a record but with outputs of a run (`summary.json`, `_manifests/`) is treated as owned by someone else.
   The record is written when the run is planned, before any output, and is validated when read back.
3. **Real folders.** On local disk, every folder a run writes and deletes in under its output
   (`WRITTEN_FOLDERS`: `shards/`, `scores/`, `_manifests/`, `review/`, `_buckets/`, ...) must be a folder of
   its own, not a symbolic link: a link would lead the run's writes and cleanup to wherever it points (an
   input folder, say). Only `output_path` itself may be reached through links, and it is resolved.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, replace
from typing import Sequence

from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from tasks.io.atomic import write_bytes_atomic
from tasks.errors import UserError
from tasks.io.locations import Location, LocationLike, as_location, redacted
from tasks.io.partition import canonical_url, expand_file_paths, listed_roots

OWNER_RECORD = "_owner.json"
EARLIER_OUTPUTS = ("summary.json", "_manifests")  # what a run leaves in an output it owned
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_NAME = re.compile(r"^part-(\d{6})\.json$")
# Names a run writes under its output; a glob input matching one of them would read the outputs as input.
_OUTPUT_EXAMPLES = ("shards/part-000000-0000.tar", "scores/part-000000.parquet", "_manifests/part-000000.json",
                    "summary.json", OWNER_RECORD, "duplicates.parquet", "kept.parquet", "skipped.parquet",
                    "_buckets/centroids.parquet", "_buckets/units/unit-000000.parquet", "_buckets/units/keys-000000.parquet",
                    "_buckets/links/bucket-000000.parquet")
# Folders a run writes files into and removes files from, under its output (nested ones after their parent).
WRITTEN_FOLDERS = ("shards", "scores", "_manifests", "review", "review/thumbs", "_buckets", "_buckets/units", "_buckets/links",
                   "_quarantine")


def _holds(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _matches_under(pattern: str, folder: str) -> bool:
    """Whether the glob `pattern` matches one of the names a run writes under `folder`."""
    regex = re.compile(glob_translate(pattern))
    return any(regex.match(posixpath.join(folder, name)) for name in _OUTPUT_EXAMPLES)


def refuse_linked_folders(output: LocationLike, folders: Sequence[str] = WRITTEN_FOLDERS) -> None:
    """UserError when a folder the run writes under a local output is a symbolic link (rule 3 above)."""
    output = as_location(output)
    output_path = output.url
    fs, root = output.filesystem()
    if not isinstance(fs, LocalFileSystem):
        return  # object stores have no links
    real_root = os.path.realpath(root)
    for folder in folders:
        lexical = os.path.join(real_root, folder)
        if os.path.realpath(lexical) != lexical:
            linked = next(step for step in _steps(folder) if os.path.islink(os.path.join(real_root, step)))
            raise UserError(
                f"{linked}/ under output_path {redacted(output_path)} is a symbolic link (to {os.readlink(os.path.join(real_root, linked))}), "
                f"and the run writes and deletes files there; replace it with a real folder, or pass the folder you want as output_path."
            )


def _steps(folder: str) -> list[str]:
    """`a`, `a/b`, `a/b/c` for `a/b/c`."""
    parts = folder.split("/")
    return ["/".join(parts[: count + 1]) for count in range(len(parts))]


def refuse_overlap(
    output_location: LocationLike,
    file_paths: str | Sequence[str],
    shard_urls: Sequence[str],
    file_extensions: Sequence[str] = (".tar",),
    inputs: Location | None = None,
    also_listed: Sequence[tuple[Location, str]] = (),
) -> None:
    """UserError when the output holds an input shard, or holds or lies inside what `file_paths` lists
    (folders, prefixes, globs; reached as `inputs`) or another folder the run lists (`also_listed`: (its
    location, parameter name)), or when a folder the run writes under it is a symbolic link
    (`refuse_linked_folders`)."""
    output_location = as_location(output_location)
    refuse_linked_folders(output_location)
    listed = [(root, "file_paths") for root in listed_roots(file_paths, shard_urls, file_extensions, inputs)]
    listed += [(canonical_url(location), parameter) for location, parameter in also_listed]
    output = canonical_url(output_location)
    shown = redacted(output_location.url)
    held = next((url for url in shard_urls if _holds(output, url)), None)
    if held is not None:
        raise UserError(f"output_path {shown} holds input shards ({redacted(held)}); write the outputs to another directory or prefix.")
    for root, parameter in listed:
        if re.search(r"[*?\[]", root):
            static = re.split(r"[*?\[]", root, maxsplit=1)[0].rpartition("/")[0] or "/"
            inside = _holds(static, output) and _matches_under(root, output)
            holds = _holds(output, static)
        else:
            inside, holds = _holds(root, output), _holds(output, root)
        if holds:
            raise UserError(f"output_path {shown} holds {redacted(root)}, which {parameter} reads; write the outputs to another directory or prefix.")
        if inside:
            raise UserError(
                f"output_path {shown} is inside {redacted(root)}, which {parameter} lists, so the outputs would be read "
                f"as input; write them to another directory or prefix."
            )


@dataclass(frozen=True)
class OutputOwner:
    """The content of `_owner.json`: which run's inputs an output belongs to."""

    flow: str
    file_paths_sha256: str  # the inputs as named: canonical file_paths entries and file_extensions
    shards_sha256: str  # the inputs as listed: canonical shard URLs in order
    shards: int
    first_shard: str  # credentials stripped; for messages
    partitions: int  # partitions numbered below this may have outputs here (a killed or larger earlier run)

    def same_inputs(self, other: "OutputOwner") -> bool:
        return self.flow == other.flow and (self.file_paths_sha256 == other.file_paths_sha256 or self.shards_sha256 == other.shards_sha256)

    def describe(self) -> str:
        return f"an {self.flow} run over {self.shards} shards from {self.first_shard}"

    @classmethod
    def from_json(cls, data: bytes) -> "OutputOwner":
        """Validated: anything but the exact fields with the right types raises ValueError."""
        record = json.loads(data)
        if not isinstance(record, dict) or set(record) != {f for f in cls.__dataclass_fields__}:
            raise ValueError("unexpected fields")
        for name in ("flow", "first_shard"):
            if not isinstance(record[name], str):
                raise ValueError(f"{name} is not a string")
        for name in ("file_paths_sha256", "shards_sha256"):
            if not isinstance(record[name], str) or not _SHA256.match(record[name]):
                raise ValueError(f"{name} is not a SHA-256")
        for name in ("shards", "partitions"):
            if type(record[name]) is not int or record[name] < 0:
                raise ValueError(f"{name} is not a count")
        return cls(**record)


def _sha256(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def input_owner(
    flow: str,
    file_paths: str | Sequence[str],
    file_extensions: Sequence[str],
    shard_urls: Sequence[str],
    partitions: int,
    inputs: Location | None = None,
) -> OutputOwner:
    """The record a run over these inputs writes (`file_paths` as the user gave them and reached as `inputs`,
    `shard_urls` as listed)."""
    reach = inputs if inputs is not None else Location(".")
    named = sorted({redacted(canonical_url(reach.at(url))) for url in expand_file_paths(file_paths)})
    extensions = sorted({ext.lower().lstrip(".") for ext in file_extensions})
    return OutputOwner(
        flow=flow,
        file_paths_sha256=_sha256([*named, "", *extensions]),
        shards_sha256=_sha256([redacted(url) for url in shard_urls]),
        shards=len(shard_urls),
        first_shard=redacted(shard_urls[0]) if shard_urls else "",
        partitions=partitions,
    )


def owner_url(output_path: str) -> str:
    return posixpath.join(output_path.rstrip("/"), OWNER_RECORD)


def read_owner(output: LocationLike) -> OutputOwner | None:
    """The output's record; None when there is none; ValueError when it is unreadable or not a record."""
    output = as_location(output)
    fs, path = output.at(owner_url(output.url)).filesystem()
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    try:
        return OutputOwner.from_json(data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None


def _manifest_partitions(output: Location) -> int:
    """1 + the highest partition number with a manifest (0 without): how far an unrecorded run's outputs go."""
    fs, root = output.filesystem()
    folder = posixpath.join(root.rstrip("/"), "_manifests")
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return 0
    numbers = [int(m.group(1)) for m in map(_MANIFEST_NAME.match, names) if m]
    return max(numbers) + 1 if numbers else 0


def claim_output(output: LocationLike, owner: OutputOwner, take_over: bool = False) -> OutputOwner:
    """Refuse an output owned by other inputs (unless `take_over`), then record `owner` as its owner.

    Returns the record written: `partitions` is the larger of this run's and the previous owner's, so a
    run that ends early still leaves the earlier partitions for the next run to clean.
    """
    output = as_location(output)
    shown = redacted(output.url)
    fs, root = output.filesystem()
    if fs.isfile(root):
        raise UserError(f"output_path {shown} is a file; pass a directory or prefix for the outputs.")
    try:
        previous = read_owner(output)
        problem = None
    except ValueError as exc:
        previous, problem = None, f"has an unreadable {OWNER_RECORD} ({exc})"
    if previous is None and problem is None:
        if any(fs.exists(posixpath.join(root.rstrip("/"), name)) for name in EARLIER_OUTPUTS):
            problem = f"holds outputs of a run that recorded no {OWNER_RECORD}"
    elif previous is not None and not previous.same_inputs(owner):
        problem = f"holds the outputs of {previous.describe()}, not of these inputs"
    if problem is not None and not take_over:
        raise UserError(
            f"output_path {shown} {problem}; write to another output_path, or pass take_over_output=True "
            f"(--take-over-output) to replace them."
        )
    earlier = previous.partitions if previous is not None else _manifest_partitions(output)
    record = replace(owner, partitions=max(owner.partitions, earlier))
    if record != previous:
        _write_owner(output, record)
    return record


def _write_owner(output: Location, record: OutputOwner) -> None:
    write_bytes_atomic(output.at(owner_url(output.url)), json.dumps(asdict(record), indent=2).encode())


def settle_owner(output: LocationLike, partitions: int) -> None:
    """After a run removed the partitions beyond its own: lower the record's partition mark to `partitions`."""
    output = as_location(output)
    try:
        record = read_owner(output)
    except ValueError:
        return  # the next claim reports it
    if record is not None and record.partitions != partitions:
        _write_owner(output, replace(record, partitions=partitions))


def earlier_partitions(output: LocationLike) -> int:
    """The record's partition mark: partitions numbered below it may have outputs here (0 without a record)."""
    output = as_location(output)
    try:
        record = read_owner(output)
    except ValueError:
        return _manifest_partitions(output)
    return record.partitions if record is not None else _manifest_partitions(output)
