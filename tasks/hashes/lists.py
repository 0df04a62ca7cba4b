"""Known-abuse hash lists: read, validated and held without ever showing a hash.

A list is a text file (local path or any fsspec URL) with one hash per line, its kind told by its length:
32 hex digits an MD5, 40 a SHA-1 (both of an image file's bytes), 64 a PDQ hash as ThreatExchange writes it.
Hex digits may be upper or lower case; blank lines are skipped and `#` starts a comment that runs to the end of
its line (a whole line or after a hash). Any other line refuses the list in one sentence naming the file and
the line number, never the line itself (it may be a hash of abuse material); so does a file that cannot be
read or that holds no hash. Repeated hashes count once.

`read_hash_lists(locations)` gives a `HashLists`: one `HashList` per file, named by its file name (names must
differ), holding its MD5 and SHA-1 digests as sets of lowercase hex and its PDQ hashes as a read-only uint8
[M, 32] array (in file order, first occurrence), and a `fingerprint` naming the lists' content: the SHA-256 of
their canonical form (names, then each kind's sorted hashes), the same whatever the file order, case, comments
or repeats. Neither `repr` nor `str` of these values shows a hash; they give names and counts only.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from tasks.errors import StorageUnavailable, UserError
from tasks.io.locations import Location, LocationLike, as_location, redacted, scrubbed

MD5_HEX_DIGITS = 32
SHA1_HEX_DIGITS = 40
PDQ_HEX_DIGITS = 64
# A line longer than this is not a hash (nor a hash with a short comment); read no further into it.
MAX_LINE_BYTES = 4096
_BLOCK_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write first
_FINGERPRINT_VERSION = b"nsfw-curator hash lists 1\n"


@dataclass(frozen=True, eq=False, repr=False)
class HashList:
    """One list file's hashes: `md5` and `sha1` lowercase hex digests, `pdq` uint8 [M, 32] (read-only)."""

    name: str
    md5: frozenset[str]
    sha1: frozenset[str]
    pdq: np.ndarray

    def __repr__(self) -> str:
        return f"HashList({self.name!r}: {len(self.md5)} MD5, {len(self.sha1)} SHA-1, {len(self.pdq)} PDQ)"

    __str__ = __repr__


@dataclass(frozen=True, eq=False, repr=False)
class HashLists:
    """Every list of a run, and the fingerprint of their content (a digest; it reveals no hash)."""

    lists: tuple[HashList, ...]
    fingerprint: str

    def exact_matches(self, md5_hex: str, sha1_hex: str) -> tuple[str, ...]:
        """Names of the lists holding this MD5 or this SHA-1 (lowercase hex, as `bytes_hashes` gives them)."""
        return tuple(hash_list.name for hash_list in self.lists if md5_hex in hash_list.md5 or sha1_hex in hash_list.sha1)

    def __repr__(self) -> str:
        return f"HashLists({', '.join(repr(hash_list) for hash_list in self.lists)}; fingerprint {self.fingerprint[:12]})"

    __str__ = __repr__


def read_hash_lists(locations: Sequence[LocationLike]) -> HashLists:
    """Read and validate every list file; UserError (one sentence) for a bad line, an empty or unreadable file."""
    if isinstance(locations, (str, Location)) or not locations:
        raise UserError("hash lists are given as a non-empty list of files or URLs; pass at least one list file.")
    lists = [_read_one(as_location(location)) for location in locations]
    names = [hash_list.name for hash_list in lists]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"two hash lists are both named {repeated[0]}; give each list file its own name, since matches are reported by name.")
    return HashLists(lists=tuple(lists), fingerprint=_fingerprint(lists))


def _read_one(location: Location) -> HashList:
    shown = redacted(location)
    md5: set[str] = set()
    sha1: set[str] = set()
    pdq: dict[bytes, None] = {}  # insertion-ordered set
    try:
        fs, path = location.filesystem()
        with fs.open(path, "rb") as handle:
            for number, line in _lines(handle, shown):
                if b"#" in line:
                    line = line.split(b"#", 1)[0]
                digits = line.strip()
                if not digits:
                    continue
                value = _hash_bytes(digits)
                if value is None:
                    raise UserError(
                        f"hash list {shown} line {number} is not an MD5, SHA-1 or PDQ hash (32, 40 or 64 hex digits); "
                        "fix or remove that line (comments start with #)."
                    )
                if len(value) == PDQ_HEX_DIGITS // 2:
                    pdq[value] = None
                else:
                    (md5 if len(value) == MD5_HEX_DIGITS // 2 else sha1).add(value.hex())
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any storage failure is one sentence about this file
        raise _read_error(location, error) from None
    if not (md5 or sha1 or pdq):
        raise UserError(f"hash list {shown} holds no hash; give a file with one MD5, SHA-1 or PDQ hash per line.")
    pdq_array = np.frombuffer(b"".join(pdq), dtype=np.uint8).reshape(len(pdq), 32)  # frombuffer of bytes: read-only
    return HashList(name=_file_name(location), md5=frozenset(md5), sha1=frozenset(sha1), pdq=pdq_array)


def _lines(handle: BinaryIO, shown: str) -> Iterator[tuple[int, bytes]]:
    """(number, line) for each line, read in blocks; a line over MAX_LINE_BYTES is refused by its number."""
    pending, number = b"", 0
    while block := handle.read(_BLOCK_BYTES):
        if number == 0 and not pending and block.startswith(_BOM):
            block = block[len(_BOM) :]
        *complete, pending = (pending + block).split(b"\n")
        for line in complete:
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise _overlong(shown, number)
            yield number, line
        if len(pending) > MAX_LINE_BYTES:  # no line is ever held whole past the limit
            raise _overlong(shown, number + 1)
    if pending:
        yield number + 1, pending


def _overlong(shown: str, number: int) -> UserError:
    return UserError(f"hash list {shown} line {number} is over {MAX_LINE_BYTES} bytes, not a hash; give a text file with one hash per line.")


def _hash_bytes(digits: bytes) -> bytes | None:
    """The hash's bytes, or None unless `digits` are exactly 32, 40 or 64 hex digits (either case)."""
    if len(digits) not in (MD5_HEX_DIGITS, SHA1_HEX_DIGITS, PDQ_HEX_DIGITS):
        return None
    try:
        value = bytes.fromhex(digits.decode("ascii"))
    except ValueError:  # not ASCII (UnicodeDecodeError is a ValueError) or not hex
        return None
    return value if 2 * len(value) == len(digits) else None  # fromhex skips spaces between digit pairs


def _file_name(location: Location) -> str:
    """The list's file name: the URL's last path segment without a query or fragment (a presigned URL's
    signature must never reach a scores row or the quarantine record)."""
    path = location.url.split("#", 1)[0].split("?", 1)[0] if "://" in location.url else location.url
    return posixpath.basename(path.rstrip("/")) or "hash list"


def _read_error(location: Location, error: BaseException) -> UserError:
    shown = redacted(location)
    if isinstance(error, FileNotFoundError):
        return UserError(f"hash list {shown} does not exist; check its path or URL.")
    if isinstance(error, IsADirectoryError):
        return UserError(f"hash list {shown} is a directory; name the list file itself.")
    if isinstance(error, PermissionError):
        return UserError(f"hash list {shown} cannot be read: access denied; check its permissions or the storage credentials.")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = f"{type(error).__name__}: {scrubbed(first_line, location.url)}" if first_line else type(error).__name__
    return StorageUnavailable(f"hash list {shown} cannot be read ({reason}); check the URL, the storage endpoint and the network.")


def _fingerprint(lists: Sequence[HashList]) -> str:
    """SHA-256 over the lists' canonical form: sorted by name; MD5 and SHA-1 as sorted lowercase hex, PDQ as sorted bytes."""
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    for hash_list in sorted(lists, key=lambda item: item.name):
        digest.update(f"list {len(hash_list.name.encode())}:{hash_list.name}\n".encode())
        for kind, hashes in (("md5", hash_list.md5), ("sha1", hash_list.sha1)):
            digest.update(f"{kind} {len(hashes)}\n".encode())
            digest.update("".join(f"{value}\n" for value in sorted(hashes)).encode())
        words = hash_list.pdq.view(">u8")  # [M, 4] big-endian words: their lexicographic order is the bytes' order
        order = np.argsort(words[:, 0], kind="stable")
        if np.any(words[order[1:], 0] == words[order[:-1], 0]):  # a shared first word: order by all four
            order = np.lexsort(words.T[::-1])
        digest.update(f"pdq {len(order)}\n".encode())
        digest.update(hash_list.pdq[order].tobytes())
    return digest.hexdigest()
