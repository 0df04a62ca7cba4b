"""Open a shard and stream its tar members, one in memory at a time, ending with where the tar is damaged.

`open_shard` opens the shard through fsspec (or its verified local copy); `tar_members` streams the tar and
yields a `TarMember` for every header, its data left unread for the next stage to read or leave (what it
leaves is drained in large pieces, keeping none of it). A damaged tar ends the stream with one `TarDamage`,
the sentence of the shard-level record. I/O errors are not damage: they propagate so the task is retried.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import UserError
from tasks.io.locations import Location, redacted
from tasks.io.samples import printable, short_reason

# Damage in the tar or its compression, as opposed to I/O errors, which propagate so the task is retried.
TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)
# Skipped member data is read in pieces this large: tarfile's own skipping copies its decompressed buffer
# for every 10 KB, which is quadratic on highly compressed data.
_DRAIN_CHUNK_BYTES = 8 << 20
# s3/gcs/http read-ahead per open shard: large enough for throughput, small enough to keep memory flat.
_REMOTE_BLOCK_BYTES = 8 << 20


def open_shard(shard: Location, local_copy: str | None = None) -> IO[bytes]:
    """The shard's bytes: its verified `local_copy` on this machine when given, else an fsspec file; one-sentence
    UserError when it can never be opened (missing, denied, bad URL)."""
    if local_copy is not None:
        return open(local_copy, "rb")
    shard_url = shard.url
    try:
        fs, path = url_to_fs(shard_url, **shard.storage_options)  # not shard.filesystem(): these errors get a shard's sentences
        if isinstance(fs, LocalFileSystem):
            return fs.open(path, "rb")
        return fs.open(path, "rb", block_size=_REMOTE_BLOCK_BYTES, cache_type="readahead")
    except FileNotFoundError:
        raise UserError(f"Shard {redacted(shard_url)} does not exist; list the shards again or fix file_paths.") from None
    except PermissionError:
        raise UserError(f"Cannot read shard {redacted(shard_url)}: access denied; check the storage credentials in the environment.") from None
    except IsADirectoryError:
        raise UserError(f"Shard {redacted(shard_url)} is a directory, not a tar file; fix file_paths.") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise UserError(f"Shard {redacted(shard_url)} uses an unknown protocol; use a local path, file://, s3:// or another fsspec URL.") from None
    except ImportError as exc:
        raise UserError(f"Shard {redacted(shard_url)} needs a filesystem package that is not installed ({exc}); install it and retry.") from None
    # Anything else (5xx, timeouts, dropped connections) may be transient: it propagates so the task retries.


@dataclass(frozen=True)
class TarMember:
    """One tar header and, for a regular file, its data still unread (None otherwise)."""

    info: tarfile.TarInfo
    data: IO[bytes] | None


@dataclass(frozen=True)
class TarDamage:
    """Why the rest of a shard cannot be read: the last item of a damaged tar's stream."""

    error: str  # the shard-level record's sentence
    raised: bool  # reading stopped on an exception (not a header tarfile took for the end)

    @classmethod
    def at(cls, where: str, reason: str, raised: bool) -> "TarDamage":
        """Damage `where` ("inside member 'x'", "after member 'x'", "at its start") for `reason` (one line)."""
        return cls(printable(f"the tar is damaged {where} ({reason}); the rest of the shard could not be read"), raised)

    @classmethod
    def inside(cls, member_name: str, exc: Exception) -> "TarDamage":
        """Damage met while reading a member's data."""
        return cls.at(_where(member_name, member_name), damage_reason(exc), raised=True)


def damage_reason(exc: Exception) -> str:
    """The exception as the reason in a damage sentence (its class name when it has no message)."""
    return short_reason(str(exc) or type(exc).__name__)


class _TarEnd:
    """How tarfile stopped reading headers; tarfile treats damage after the first member as a clean end."""

    def __init__(self) -> None:
        self.header_error: Exception | None = None

    def tarinfo_class(self) -> type[tarfile.TarInfo]:
        end = self

        class _RecordingTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
                try:
                    return super().fromtarfile(tar)
                except tarfile.HeaderError as exc:
                    end.header_error = exc
                    raise

        return _RecordingTarInfo

    def damage(self) -> str | None:
        """Why the tar ended early, or None when it ended with a proper end-of-archive block."""
        error = self.header_error
        if error is None or isinstance(error, tarfile.EOFHeaderError):
            return None
        if isinstance(error, tarfile.EmptyHeaderError):
            return "the file ends without the tar end-of-archive marker, so it is probably truncated"
        if isinstance(error, tarfile.TruncatedHeaderError):
            return "the file ends inside a tar header, so it is truncated"
        return f"a tar header is corrupt ({short_reason(error)})"


def _drain(data: IO[bytes]) -> None:
    """Read a member's unread data in large pieces (see _DRAIN_CHUNK_BYTES), keeping none of it."""
    while data.read(_DRAIN_CHUNK_BYTES):
        pass


def tar_members(fileobj: IO[bytes]) -> Iterator[TarMember | TarDamage]:
    """Every member of the tar stream in order, then a `TarDamage` when the tar is damaged.

    The consumer reads a member's data (or not) before asking for the next member; damage met while it reads
    is the consumer's to report (`TarDamage.inside`), since the stream cannot go on after it.
    """
    end = _TarEnd()
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=end.tarinfo_class())
    except TAR_DAMAGE as exc:
        yield TarDamage(short_reason(f"the shard is not a readable tar file ({exc})"), raised=True)
        return
    member_name: str | None = None  # the last member whose header was read
    reading: str | None = None  # the member whose data is being read
    try:
        for info in tar:
            member_name = info.name
            tar.members = []  # stream mode appends every header; drop them so memory stays flat
            reading = member_name
            data = tar.extractfile(info) if info.isreg() else None
            yield TarMember(info, data)
            if data is not None:
                _drain(data)  # whatever the consumer did not keep
            reading = None
    except TAR_DAMAGE as exc:
        yield TarDamage.at(_where(reading, member_name), damage_reason(exc), raised=True)
        return
    damage = end.damage()
    if damage is not None:
        yield TarDamage.at(_where(reading, member_name), damage, raised=False)


def _where(reading: str | None, member_name: str | None) -> str:
    """Where reading stopped: inside the member whose data was being read, else after the last header read."""
    return f"inside member {reading!r}" if reading else f"after member {member_name!r}" if member_name else "at its start"
