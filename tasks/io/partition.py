"""List WebDataset shards under `file_paths` and group them into partitions (units of work).

`file_paths` may be a local directory or file, a `file://`, `s3://` or other fsspec URL (directory,
prefix, single shard or glob), a list of such URLs, or WebDataset brace notation
(`shards/part-{000000..000099}.tar`, several patterns joined by `::`). Shards come back as full URLs in
one spelling per file (local paths resolved, symlinks included; `//` and `/./` collapsed in remote URLs),
deduplicated and in natural order, so a shard is processed once and a partition's identity is the same in
every run.

Names are checked one listing per parent folder, so a run may name at most `MAX_NAMED_URLS` URLs
(laion2B-en's 231,000 shards fit; checking that many takes about 15 s on local disk); a larger dataset is
passed as its folder or prefix, which is listed instead.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import StorageUnavailable, UserError
from tasks.io.locations import Location, object_size, redacted, scrubbed

# Most URLs file_paths may name (brace patterns expanded): beyond, the per-name work and memory outgrow a listing.
MAX_NAMED_URLS = 250_000
_GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")
_EMPTY_STEPS = re.compile(r"/(?:\.?/)+")  # "//" and "/./" inside a path


@dataclass(frozen=True)
class Partition:
    """A group of shards processed as one unit of work."""

    index: int  # position in the run, 0-based
    shard_urls: tuple[str, ...]

    @property
    def partition_id(self) -> str:
        """16 hex digits derived from the shard URLs only, so it is stable across runs and machines."""
        digest = hashlib.sha256("\n".join(self.shard_urls).encode("utf-8")).hexdigest()
        return digest[:16]


def _natural_key(url: str) -> tuple:
    # "part-9.tar" before "part-10.tar"; the raw string breaks ties so the order is total.
    parts = _DIGITS.split(url)
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts if part), url


def expand_file_paths(file_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Every URL or pattern named by `file_paths`, with WebDataset brace notation and `::` expanded."""
    if isinstance(file_paths, (str, os.PathLike)):
        items = [os.fspath(file_paths)]
    else:
        items = [os.fspath(item) for item in file_paths]
    expanded: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise UserError(f"file_paths holds an empty entry {item!r}; pass directories, prefixes or shard URLs.")
        for part in item.split("::"):
            # Counted before expanding: braceexpand builds every range in full, so 10**9 names would be made first.
            try:
                named = len(expanded) + (brace_count(part) if "{" in part else 1)
            except braceexpand.UnbalancedBracesError:
                raise UserError(f"file_paths entry {redacted(part)} has unbalanced braces; write ranges as part-{{000000..000099}}.tar.") from None
            if named > MAX_NAMED_URLS:
                raise UserError(
                    f"file_paths names {named:,} URLs, more than the {MAX_NAMED_URLS:,} a run checks one by one; pass the folder "
                    f"or prefix that holds the shards instead (it is listed, not checked name by name), or split the run."
                )
            expanded.extend(braceexpand.braceexpand(part) if "{" in part else [part])
    if not expanded:
        raise UserError("file_paths is empty; pass a directory, a prefix URL, a list of shard URLs or a brace pattern.")
    return expanded


def brace_count(pattern: str) -> int:
    """How many names `braceexpand.braceexpand(pattern)` yields, computed from the pattern (nothing is expanded).

    Mirrors braceexpand's grammar: a pattern is a product of literals and `{...}` expressions; an expression is
    an integer range `a..b[..step]`, a character range, a comma sequence (a sum of patterns), or a literal
    `{...}` holding a pattern. Unbalanced braces raise braceexpand's own error.
    """
    return _pattern_count(pattern)


def _pattern_count(pattern: str) -> int:
    count, depth, start, position = 1, 0, 0, 0
    while position < len(pattern):
        char = pattern[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            if depth == 0:
                start = position
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                count *= _expression_count(pattern[start + 1 : position])
        position += 1
    if depth != 0:
        raise braceexpand.UnbalancedBracesError(f"Unbalanced braces: '{pattern}'")
    return count


def _expression_count(expression: str) -> int:
    numbers = braceexpand.int_range_re.match(expression)
    if numbers:
        first, last, step = int(numbers.group(1)), int(numbers.group(2)), int(numbers.group(3) or 1) or 1
        return abs(last - first) // step + 1
    letters = braceexpand.char_range_re.match(expression)
    if letters:
        return len(braceexpand.make_char_range(*letters.groups()))
    items, depth, start, position = [], 0, 0, 0
    while position < len(expression):
        char = expression[position]
        if char == "\\":
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(expression[start:position])
            start = position + 1
        position += 1
    if depth != 0 or not items:
        return _pattern_count(expression)  # `{...}` kept literally around a pattern
    return sum(_pattern_count(item) for item in [*items, expression[start:]])


def _canonical_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """One spelling per file: `x.tar`, `./x.tar`, `dir//x.tar` and a symlink to it are the same local file;
    `s3://b/in//x.tar` and `s3://b/in/./x.tar` the same object."""
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(fs._strip_protocol(path))
    path = _EMPTY_STEPS.sub("/", path)
    return path[:-2] if path.endswith("/.") else path


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local shards are plain absolute paths whether given as relative paths, absolute paths or file:// URLs.
    if isinstance(fs, LocalFileSystem):
        return _canonical_path(fs, path)
    return fs.unstrip_protocol(_canonical_path(fs, path))


def canonical_url(location: Location | str) -> str:
    """The location's URL in the spelling `list_shards` gives its shards (also for folders and paths that do not exist yet)."""
    fs, path = (location if isinstance(location, Location) else Location(location)).filesystem()
    return _full_url(fs, path).rstrip("/") or "/"


def _listing_error(url: str, exc: BaseException) -> UserError:
    if isinstance(exc, PermissionError):
        return UserError(f"Cannot list {redacted(url)}: access denied; check the storage credentials and permissions in the environment.")
    if isinstance(exc, FileNotFoundError):
        reason = scrubbed(str(exc).strip() or "not found", url)
        return UserError(f"Cannot list {redacted(url)}: {reason}; check the bucket or directory name.")
    reason = scrubbed(str(exc).strip().splitlines()[0], url) if str(exc).strip() else type(exc).__name__
    return StorageUnavailable(
        f"Cannot list {redacted(url)} ({type(exc).__name__}: {reason}); check the storage endpoint, network and credentials in the environment."
    )


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    return path.lower().endswith(extensions)


def _list_one(location: Location, extensions: tuple[str, ...]) -> dict[str, int | None]:
    """Shards named by one URL (a glob, a single shard, or everything under a directory/prefix), with their sizes."""
    url = location.url
    fs, path = location.filesystem()
    path = _canonical_path(fs, path)
    try:
        # A long-lived process (a notebook) must see shards added since its last listing.
        glob_at = _GLOB_CHARS.search(path)
        fs.invalidate_cache(path[: glob_at.start()].rpartition("/")[0] if glob_at else path)
        if glob_at:
            matches = {p: object_size(info) for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
            where = f"matches {redacted(url)}"
        elif _has_extension(path, extensions) and fs.isfile(path):
            return {_full_url(fs, path): object_size(fs.info(path))}
        else:
            matches = {p: object_size(info) for p, info in fs.find(path, detail=True).items()}
            where = f"was found under {redacted(url)}"
            if not matches and not fs.exists(path):
                raise UserError(f"No shard found: {redacted(url)} does not exist; check file_paths.")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend has its own listing errors; all mean "cannot list"
        raise _listing_error(url, exc) from None
    shards = {_full_url(fs, p): size for p, size in matches.items() if _has_extension(p, extensions)}
    if not shards:
        raise UserError(f"No shard ending in {' or '.join(extensions)} {where}; check file_paths and file_extensions.")
    return shards


def _check_exist(locations: Iterable[Location]) -> dict[str, int | None]:
    """Full URLs of explicitly named shards, checked with one listing per parent directory (and a
    per-shard check only for those the listing does not show, e.g. on HTTP)."""
    by_parent: dict[tuple[int, str], list[tuple[str, str]]] = {}
    filesystems: dict[int, fsspec.AbstractFileSystem] = {}
    for location in locations:
        url = location.url
        fs, path = location.filesystem()
        path = _canonical_path(fs, path)
        filesystems[id(fs)] = fs
        by_parent.setdefault((id(fs), fs._parent(path)), []).append((url, path))
    found: dict[str, int | None] = {}
    missing: list[tuple[str, str]] = []
    for (fs_id, parent), entries in by_parent.items():
        fs = filesystems[fs_id]
        reason = "no such file"
        try:
            fs.invalidate_cache(parent)
            listed = {fs._strip_protocol(info["name"]).rstrip("/"): object_size(info) for info in fs.ls(parent, detail=True)}
        except FileNotFoundError as exc:
            listed, reason = {}, str(exc).strip() or reason
        except Exception:  # noqa: BLE001 - some filesystems cannot list; each shard is checked below
            listed = {}
        for url, path in entries:
            stripped = fs._strip_protocol(path).rstrip("/")
            if stripped in listed:
                found[_full_url(fs, path)] = listed[stripped]
                continue
            try:
                info = fs.info(path)  # isfile() would hide connection errors
            except FileNotFoundError:
                info = {}
            except Exception as exc:  # noqa: BLE001 - see _list_one
                raise _listing_error(url, exc) from None
            if info.get("type") == "file":
                found[_full_url(fs, path)] = object_size(info)
            else:
                missing.append((url, reason))
    if missing:
        first_url, first_reason = missing[0]
        total = len(found) + len(missing)
        raise UserError(
            f"{len(missing)} of {total} shards named in file_paths do not exist (first: {redacted(first_url)}, {first_reason}); "
            f"fix file_paths or the brace range."
        )
    return found


def _extensions(file_extensions: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(file_extensions, str):
        file_extensions = [file_extensions]
    extensions = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in file_extensions)
    if not extensions or any(ext == "." for ext in extensions):
        raise UserError(f"file_extensions {list(file_extensions)!r} names no extension; pass e.g. ['.tar'].")
    return extensions


def list_shards(
    file_paths: str | os.PathLike | Sequence[str | os.PathLike],
    file_extensions: Sequence[str] = (".tar",),
    inputs: Location | None = None,
) -> list[str]:
    """Full shard URLs (`list_shard_sizes` without the sizes)."""
    return list(list_shard_sizes(file_paths, file_extensions, inputs))


def _reach(inputs: Location | None) -> Location:
    return inputs if inputs is not None else Location(".")


def list_shard_sizes(
    file_paths: str | os.PathLike | Sequence[str | os.PathLike],
    file_extensions: Sequence[str] = (".tar",),
    inputs: Location | None = None,
) -> dict[str, int | None]:
    """Full shard URLs (`s3://bucket/x.tar`, or absolute local paths), deduplicated, in natural order, with
    their sizes in bytes as the listing gave them (None where a filesystem does not say; no extra request).

    A single URL is a shard, a glob, or a directory/prefix listed recursively. Several URLs (a list or
    brace notation) are shards when they end in one of `file_extensions` (checked to exist) and
    directories/prefixes otherwise. Every URL is reached with the storage options of `inputs`, the input
    listing's location (the plan's; None: the environment's credentials and fsspec configuration).
    """
    extensions = _extensions(file_extensions)
    urls = expand_file_paths(file_paths)
    reach = _reach(inputs)
    if len(urls) == 1:
        shards = _list_one(reach.at(urls[0]), extensions)
    else:
        explicit = [reach.at(url) for url in urls if not _GLOB_CHARS.search(url) and _has_extension(url, extensions)]
        shards = _check_exist(explicit)
        for url in urls:
            if _GLOB_CHARS.search(url) or not _has_extension(url, extensions):
                shards.update(_list_one(reach.at(url), extensions))
    return {url: shards[url] for url in sorted(shards, key=_natural_key)}


def listed_roots(
    file_paths: str | os.PathLike | Sequence[str | os.PathLike],
    shard_urls: Sequence[str],
    file_extensions: Sequence[str] = (".tar",),
    inputs: Location | None = None,
) -> list[str]:
    """What `list_shards` lists for `file_paths`, canonical: directories/prefixes and glob patterns (shards it
    names one by one are left out). A file appearing under one of these later is an input of the next run."""
    extensions = _extensions(file_extensions)
    shards = set(shard_urls)
    roots = []
    for url in expand_file_paths(file_paths):
        canonical = canonical_url(_reach(inputs).at(url))
        if _GLOB_CHARS.search(url) or not (_has_extension(url, extensions) and canonical in shards):
            roots.append(canonical)
    return roots


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt](?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_blocksize(blocksize: int | str) -> int:
    """Bytes from `blocksize`: a whole number of bytes or a size such as "512MB", "1GiB" (NeMo Curator's spelling)."""
    if isinstance(blocksize, bool):
        raise UserError(f"blocksize must be a size such as '512MB' or a number of bytes, not {blocksize!r}.")
    if isinstance(blocksize, int):
        value = blocksize
    else:
        match = _SIZE.match(str(blocksize))
        if not match:
            raise UserError(f"blocksize must be a size such as '512MB' or a number of bytes, not {blocksize!r}.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if value < 1:
        raise UserError(f"blocksize must be at least 1 byte, not {blocksize!r}.")
    return value


def partition_shards(
    shard_urls: Sequence[str], files_per_partition: int = 1, *, shard_sizes: Sequence[int | None] | None = None, blocksize: int | None = None
) -> list[Partition]:
    """Consecutive groups of shards, in the given order: `files_per_partition` shards each (the last may be
    smaller) or, with `blocksize`, as many consecutive shards as fit in `blocksize` bytes (at least one; a
    shard of unknown size counts as one block, so it stands alone)."""
    if isinstance(files_per_partition, bool) or not isinstance(files_per_partition, int) or files_per_partition < 1:
        raise UserError(f"files_per_partition must be a whole number of at least 1, not {files_per_partition!r}.")
    if isinstance(shard_urls, str):
        shard_urls = [shard_urls]
    if blocksize is None:
        return [
            Partition(index=index, shard_urls=tuple(shard_urls[start : start + files_per_partition]))
            for index, start in enumerate(range(0, len(shard_urls), files_per_partition))
        ]
    sizes = list(shard_sizes) if shard_sizes is not None else [None] * len(shard_urls)
    if len(sizes) != len(shard_urls):
        raise ValueError("shard_sizes must give one size per shard")
    groups: list[list[str]] = []
    filled = 0
    for url, size in zip(shard_urls, sizes):
        if not groups or size is None or filled + size > blocksize:
            groups.append([])
            filled = 0
        groups[-1].append(url)
        filled = blocksize + 1 if size is None else filled + size  # a shard of unknown size closes its partition
    return [Partition(index=index, shard_urls=tuple(group)) for index, group in enumerate(groups)]
