"""Weights from object storage: a weight location (a local path or an fsspec URL) becomes a verified local file.

Contract:

- `resolve_weights(location)` runs once per run, at planning: it learns the SHA-256 of the object
  at `url` and leaves a verified copy in the local weights cache (`default_weights_cache_dir()`). The first
  time, the object is downloaded and hashed while streaming; a small record keyed by the URL and the object's
  version as the filesystem's `info` reports it (ETag / generation / version id, size, modification time)
  maps it to its digest, so a later process on this machine asks the store one metadata question and
  downloads nothing. The plan then carries the URL and the digest, never the bytes.
- `local_weights(location, sha256)` runs on any machine (a task on a Ray worker): it returns the
  cached `{sha256}{suffix}` file, downloading it first when this machine lacks it. A download is written to
  a temporary file, hashed while streaming, compared with `sha256` and only then renamed into place, so a
  file named by a digest always holds those bytes; an object whose bytes differ (it changed after planning)
  is one sentence (UserError) naming the URL without credentials, and nothing is kept.
- Verification: a cached file is re-hashed once per process (and again whenever its size, mtime, ctime or
  inode change). Hashing 900 MB takes about a second, small beside building the model from it, and unlike a
  size check plus a record of the download it catches any change of the bytes, in place or not; a file
  that fails is removed and downloaded again. Nothing that fails the check is ever handed out.
- Concurrency: downloads of one file on one machine are serialised by a lock file (`fcntl.flock`, which also
  excludes threads of one process); the second caller finds the first one's file and downloads nothing.
  Renames are atomic, so a reader never sees a partial file even without the lock.
- Credentials: URLs may carry `user:password@`; they are moved into the storage options
  (tasks/io/locations.py) and appear in no record, file name, log line or message.

Cache layout: `{cache}/{sha256}{suffix}` (read-only files; the suffix keeps the format loaders expect),
`{cache}/records/*.json`, `{cache}/locks/*.lock`, `{cache}/tmp/*.part` (downloads in progress).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.io.locations import Location, LocationLike, as_location, default_weights_cache_dir, redacted, scrubbed

_CHUNK_BYTES = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")
# Keys of fsspec `info` that name an object's version (backends spell them differently); size and times below.
_VERSION_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "content_md5")
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "mtime_ns")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights URL as a run's plan holds it: the clean URL, the object's SHA-256, its verified local copy."""

    url: str
    sha256: str
    path: Path


def is_remote(location: str | os.PathLike) -> bool:
    """True for an fsspec URL (`s3://...`, `gs://...`, `https://...`, `file://...`), False for a local path."""
    return isinstance(location, str) and "://" in location


def url_suffix(url: str) -> str:
    """The file suffix of the URL's last path segment, lower-cased (`.safetensors`); '' when it has none."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1]
    return suffix.lower() if _SUFFIX.fullmatch(suffix) else ""


def cached_weights_path(sha256: str, suffix: str) -> Path:
    """Where the file with this digest lives in this machine's weights cache."""
    return default_weights_cache_dir() / f"{sha256}{suffix}"


# ---------------------------------------------------------------------------------------------------
# Verified once per process: path -> the stat it had when its bytes were hashed and matched its name.

_verified_lock = threading.Lock()
_verified: dict[Path, tuple[int, int, int, int]] = {}


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    # ctime too: an in-place edit that restores the mtime still moves it.
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _is_verified(path: Path) -> bool:
    key = _stat_key(path)
    with _verified_lock:
        return key is not None and _verified.get(path) == key


def _mark_verified(path: Path) -> None:
    key = _stat_key(path)
    if key is not None:
        with _verified_lock:
            _verified[path] = key


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _holds(path: Path, sha256: str) -> bool:
    """True when the cached file exists and its bytes hash to `sha256` (hashed at most once per process)."""
    if _is_verified(path):
        return True
    if not path.is_file():
        return False
    if _file_sha256(path) == sha256:
        _mark_verified(path)
        return True
    # Never used: bytes that do not match the name are removed and fetched again.
    logger.warning("weights cache file %s does not hold the bytes its name says; downloading it again", path.name)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return False


@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """An exclusive lock on `name` across the processes and threads of this machine (one open file each)."""
    lock_dir = cache_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------
# Downloads


def _filesystem(location: Location):
    from fsspec.core import url_to_fs

    url = location.url
    try:
        return url_to_fs(url, **location.storage_options)
    except (ValueError, ImportError) as error:
        raise UserError(f"weights {redacted(url)} cannot be opened ({scrubbed(str(error), url)}); use s3://, gs:// or another fsspec URL whose package is installed.") from None


def _storage_error(url: str, error: BaseException, planning: bool) -> BaseException:
    """A UserError for what the user fixes; other errors as they are on a worker (the task's retries handle them)."""
    shown = redacted(url)
    if isinstance(error, FileNotFoundError):
        return UserError(f"weights {shown} do not exist; check the URL.")
    if isinstance(error, PermissionError):
        return UserError(f"weights {shown} cannot be read: access denied; check the storage credentials.")
    if planning:
        reason = scrubbed(str(error).strip().splitlines()[0], url) if str(error).strip() else type(error).__name__
        return UserError(f"weights {shown} cannot be read ({type(error).__name__}: {reason}); check the URL, the storage endpoint and the network.")
    return error


def _download(fs, remote_path: str, url: str, tmp_path: Path, planning: bool) -> str:
    """Stream the object into `tmp_path` (flushed and fsynced), returning the SHA-256 of the bytes written."""
    hasher = hashlib.sha256()
    try:
        with fs.open(remote_path, "rb", block_size=_CHUNK_BYTES) as source, open(tmp_path, "wb") as target:
            while chunk := source.read(_CHUNK_BYTES):
                hasher.update(chunk)
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(error, Exception):
            raise _storage_error(url, error, planning) from None
        raise
    return hasher.hexdigest()


def _publish(tmp_path: Path, final_path: Path) -> None:
    """Rename a verified download into place (atomic) and make the rename durable."""
    os.chmod(tmp_path, 0o444)  # read-only: the cache is written by downloads only
    os.replace(tmp_path, final_path)
    with contextlib.suppress(OSError):
        directory = os.open(final_path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    _mark_verified(final_path)


def _temp_path(cache_dir: Path, key: str) -> Path:
    """A fresh temporary file for `key`; earlier ones for it are stale (the caller holds the key's lock)."""
    tmp_dir = cache_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for stale in tmp_dir.glob(f"{key}.*.part"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return tmp_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.part"


def local_weights(weights: LocationLike, sha256: str) -> Path:
    """The verified local copy of the object at `weights` whose SHA-256 is `sha256`, downloaded when this machine lacks it.

    Raises UserError (naming the URL without credentials) when the object's bytes do not hash to `sha256`;
    nothing is kept then.
    """
    if not _SHA256.fullmatch(sha256 or ""):
        raise ValueError(f"{sha256!r} is not a SHA-256 hex digest")
    location = as_location(weights)
    url = location.url
    cache_dir = default_weights_cache_dir()
    final_path = cache_dir / f"{sha256}{url_suffix(url)}"
    if _holds(final_path, sha256):
        return final_path
    with _locked(cache_dir, sha256):
        if _holds(final_path, sha256):  # another task on this machine downloaded it meanwhile
            return final_path
        fs, remote_path = _filesystem(location)
        tmp_path = _temp_path(cache_dir, sha256)
        digest = _download(fs, remote_path, url, tmp_path, planning=False)
        if digest != sha256:
            tmp_path.unlink()
            raise UserError(
                f"weights {redacted(url)} changed since the run was planned (their SHA-256 is now {digest[:16]}..., "
                f"the plan expects {sha256[:16]}...); start the run again to use the new file."
            )
        _publish(tmp_path, final_path)
    return final_path


# ---------------------------------------------------------------------------------------------------
# Planning: URL -> digest, remembered per object version


def _object_version(info: dict) -> dict[str, str] | None:
    """What identifies this version of the object in `info`; None when nothing beyond the size does."""
    version = {key: str(info[key]) for key in (*_VERSION_KEYS, *_TIME_KEYS) if info.get(key) not in (None, "")}
    if not version:
        return None
    version["size"] = str(info.get("size"))
    return version


def _record_path(cache_dir: Path, url: str) -> Path:
    return cache_dir / "records" / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"


def _recorded_sha256(cache_dir: Path, url: str, version: dict[str, str] | None) -> str | None:
    if version is None:
        return None
    try:
        record = json.loads(_record_path(cache_dir, url).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("url") != url or record.get("version") != version:
        return None
    digest = record.get("sha256")
    return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None


def _write_record(cache_dir: Path, url: str, version: dict[str, str], sha256: str) -> None:
    record_path = _record_path(cache_dir, url)
    tmp_path = record_path.with_name(f".{record_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.write_text(json.dumps({"url": url, "version": version, "sha256": sha256}, sort_keys=True))
        os.replace(tmp_path, record_path)
    except OSError:
        # An unwritable record only costs a download in the next process.
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def resolve_weights(weights: LocationLike) -> ResolvedWeights:
    """The object's SHA-256 and verified local copy, downloading only when no record names this version of it.

    For planning: every failure, unreachable storage included, is one sentence (UserError).
    """
    location = as_location(weights)
    url = location.url
    cache_dir = default_weights_cache_dir()
    suffix = url_suffix(url)
    fs, remote_path = _filesystem(location)
    with contextlib.suppress(Exception):  # a long-lived process must see the object as it is now, not as listed before
        fs.invalidate_cache(remote_path)
    try:
        info = fs.info(remote_path)
    except Exception as error:  # noqa: BLE001 - every backend has its own errors; at planning all are one sentence
        raise _storage_error(url, error, planning=True) from None
    if info.get("type") == "directory":
        raise UserError(f"weights {redacted(url)} is a folder; pass the URL of the weight file itself.")
    version = _object_version(info)
    recorded = _recorded_sha256(cache_dir, url, version)
    if recorded is not None:
        path = local_weights(location, recorded)  # verified (or fetched again) against the recorded digest
        return ResolvedWeights(url, recorded, path)
    url_key = hashlib.sha256(url.encode()).hexdigest()[:32]
    with _locked(cache_dir, url_key):
        recorded = _recorded_sha256(cache_dir, url, version)  # another process on this machine resolved it meanwhile
        if recorded is not None:
            return ResolvedWeights(url, recorded, local_weights(location, recorded))
        tmp_path = _temp_path(cache_dir, url_key)
        digest = _download(fs, remote_path, url, tmp_path, planning=True)
        final_path = cache_dir / f"{digest}{suffix}"
        _publish(tmp_path, final_path)
        # Recorded only when the object kept its version while it was read (so the record names these bytes).
        try:
            after = _object_version(fs.info(remote_path))
        except Exception:  # noqa: BLE001 - the copy is verified by its name; only the shortcut is lost
            after = None
        if version is not None and after == version:
            _write_record(cache_dir, url, version, digest)
    return ResolvedWeights(url, digest, final_path)
