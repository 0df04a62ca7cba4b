"""Local copies of remote shards, so a cold run reads each shard's bytes from storage once.

A partition's read task downloads each remote shard it must process (one GET) into the run's spool folder
on this machine's disk; the embedding task decodes from that copy and the filter task copies members from
it, then removes it. Local shards are never copied (reading them twice costs no storage request).

- A copy is named by the shard's URL, content fingerprint and a random part, written under a temp name and
  renamed once complete, in a folder only this user may enter (a shared /tmp's planted folder or link means
  no copies), and used only when its size is the one recorded when it was downloaded: a task on another
  machine, a removed copy or a truncated one reads from storage instead.
- Disk is bounded: a shard is copied only while the folder's disk keeps `SPOOL_RESERVE_BYTES` (or
  `SPOOL_RESERVE_SHARE` of the disk, the larger) free after it and after the copies still downloading. A
  disk without that room costs a second read, never a row.
- The folder belongs to one run (`run_spool_folder`) and is removed when the run ends, copies left by failed
  partitions included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from tasks.io.locations import Location

SPOOL_DIR_ENV = "NSFW_CURATOR_SPOOL_DIR"
# Free disk a copy must leave behind: other programs (and this run's outputs on local disk) need room too.
SPOOL_RESERVE_BYTES = 2 << 30
SPOOL_RESERVE_SHARE = 0.05
# Below this much free disk after a failed copy, the disk is taken to have filled up.
_NEARLY_FULL_BYTES = 8 << 20
# Bytes of copies this process is downloading right now (not yet seen by the disk's free space).
_reserved_bytes = 0
_reserved_lock = threading.Lock()


@dataclass(frozen=True)
class LocalCopy:
    """A shard's copy on the disk of the machine that read it."""

    path: str
    size: int

    def usable(self) -> bool:
        """True on the machine holding the complete copy (a task elsewhere reads from storage)."""
        try:
            return os.path.getsize(self.path) == self.size
        except OSError:
            return False


def spool_root() -> str:
    """`$NSFW_CURATOR_SPOOL_DIR`, else `{tmp}/nsfw-curator-spool-{uid}` (one per user)."""
    return os.environ.get(SPOOL_DIR_ENV) or os.path.join(tempfile.gettempdir(), f"nsfw-curator-spool-{os.geteuid()}")


def _private_folder(folder: str) -> bool:
    """Create `folder` (and its parent) for this user; False when either is a link, another user's or writable
    by others (in a shared /tmp someone could plant a copy there), so nothing is copied."""
    for path in (os.path.dirname(folder), folder):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return False
    return True


def run_spool_folder() -> str:
    """A new folder name for one run's copies (created when the first copy is made)."""
    return os.path.join(spool_root(), f"run-{uuid.uuid4().hex}")


def is_remote(shard: Location) -> bool:
    """Whether reading the shard is a storage request (anything but this machine's own files)."""
    return not isinstance(shard.fs, LocalFileSystem)


def _room_for(folder: str, size: int) -> bool:
    usage = shutil.disk_usage(folder)
    return usage.free - size >= max(SPOOL_RESERVE_BYTES, int(SPOOL_RESERVE_SHARE * usage.total))


def copy_shard(shard: Location, fingerprint: str, size: int | None, folder: str) -> LocalCopy | None:
    """The shard downloaded whole into `folder` (one GET), or None when the disk has no room for it.

    `size` is the shard's size from the look that fingerprinted it (None: asked here).
    """
    shard_url = shard.url
    fs, path = shard.filesystem()
    if not _private_folder(folder):
        return None
    if size is None:
        fs.invalidate_cache(path)  # the size now, not a listing's from before the shard was rewritten
        size = fs.size(path)
    if size is None:
        return None
    with _reserved_lock:  # copies in flight count against the room they will take
        global _reserved_bytes
        if not _room_for(folder, int(size) + _reserved_bytes):
            return None
        _reserved_bytes += int(size)
    name = f"{hashlib.sha256(shard_url.encode()).hexdigest()[:32]}-{fingerprint}-{uuid.uuid4().hex}.tar"
    final = os.path.join(folder, name)
    partial = os.path.join(folder, f".{name}.tmp")
    try:
        fs.get_file(path, partial)  # one streamed GET on object stores
        os.replace(partial, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)
        if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
            return None  # the disk filled up meanwhile: read from storage instead
        raise
    finally:
        with _reserved_lock:
            _reserved_bytes -= int(size)
    copied = os.path.getsize(final)
    if copied != size:
        os.remove(final)
        raise OSError(f"{copied} of {size} bytes copied")  # the shard changed while it was read: the task retries
    return LocalCopy(final, copied)


def remove_copies(copies: tuple[LocalCopy | None, ...]) -> None:
    for copy in copies:
        if copy is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(copy.path)


def remove_run_folder(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
