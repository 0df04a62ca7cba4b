"""Atomic writes to any fsspec URL: readers see the old file or the whole new one, never a part.

Local disk: write a hidden temp file in the same directory, fsync, `os.replace`. Object stores (S3, GCS):
an object becomes visible only when its upload completes, so writing the final key directly is atomic;
an interrupted multipart upload leaves no object behind.
"""

from __future__ import annotations

import errno
import os
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import UserError
from tasks.io.locations import LocationLike, as_location

OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
# A full disk or quota is not transient: the write fails at once with one sentence instead of being retried.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))


@contextmanager
def atomic_output(location: LocationLike) -> Iterator[BinaryIO]:
    """Open `location` for writing; the file appears complete when the block exits, or not at all on error."""
    location = as_location(location)
    fs, path = location.filesystem()
    if is_object_store(fs):
        with fs.open(path, "wb") as handle:
            yield handle
        return
    parent = os.path.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp_path = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open(tmp_path, "wb") as handle:
            yield handle
            if isinstance(fs, LocalFileSystem):
                handle.flush()
                os.fsync(handle.fileno())
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp_path, path)
        else:
            fs.mv(tmp_path, path)
    except BaseException as error:
        try:
            fs.rm(tmp_path)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise UserError(f"No space left to write {location}; free space there or choose another location, then run again.") from None
        raise


def write_bytes_atomic(location: LocationLike, data: bytes) -> None:
    with atomic_output(location) as handle:
        handle.write(data)


def write_bytes_for_browser(location: LocationLike, data: bytes, content_type: str) -> None:
    """Atomic write; on S3 with a Content-Type, so a browser shows the sheet instead of downloading it."""
    location = as_location(location)
    fs, path = location.filesystem()
    if is_object_store(fs) and "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        fs.pipe_file(path, data, ContentType=content_type)
    else:
        write_bytes_atomic(location, data)

