"""Group a tar's members into samples by the WebDataset key rule, with the per-sample checks and byte budget.

The key is the member path up to the first dot of the file name (`dir/a.seg.png` -> key `dir/a`, extension
`seg.png`); a new sample starts whenever the key changes. Every key comes out as exactly one `Sample` per
contiguous run of members, structure checked (tasks/io/samples.py); a member that cannot belong to a sample
(no extension) is reported under its own name. A sample's members hold at most `sample_bytes`, each counted
with its tar header: members past it are skipped unread. A damaged tar ends with one shard-level record
(`key=None`) for the part that could not be read.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import IO

from tasks.io.limits import TAR_HEADER_BYTES
from tasks.io.samples import Sample, check_structure, fail, printable, short_reason
from tasks.io.tar_stream import TAR_DAMAGE, TarDamage, TarMember

# WebDataset's key rule (webdataset.tariterators.base_plus_ext) and its metadata-member rules.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def _unsafe_name_reason(name: str) -> str | None:
    """Why a member name must never be used (absolute, `..`, NUL, not UTF-8), or None when it is safe."""
    if "\x00" in name:
        return "contains a NUL character"
    if printable(name) != name:
        return "is not valid UTF-8"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "climbs out of its directory with '..'"
    return None


def _is_meta_member(name: str) -> bool:
    # WebDataset skips these (e.g. `__index__`); they are shard metadata, not samples.
    return bool(_META_MEMBER.match(name)) or ("/" not in name and name.startswith("__") and name.endswith("__"))


def group_into_samples(entries: Iterator[TarMember | TarDamage], shard_url: str, sample_bytes: int) -> Iterator[Sample]:
    """The samples of a tar's members (tasks/io/tar_stream.py), in tar order, then its damage record if any."""
    grouper = _SampleGrouper(shard_url, sample_bytes)
    damage: TarDamage | None = None
    for entry in entries:
        if isinstance(entry, TarDamage):
            damage = entry
            break
        try:
            yield from grouper.add(entry.info, entry.data)
        except TAR_DAMAGE as exc:  # met while reading this member's data: the stream cannot go on
            damage = TarDamage.inside(entry.info.name, exc)
            break
    if damage is not None and damage.raised and grouper.current is not None and not grouper.current.members:
        grouper.current = None  # its first member could not be read: it is part of the unreadable rest
    if grouper.current is not None and damage is not None:
        fail(grouper.current, "the tar is damaged right after this sample, so some of its members may be missing")
    yield from grouper.finish()
    if damage is not None:
        yield Sample(key=None, shard=shard_url, error=damage.error)


class _SampleGrouper:
    """WebDataset's grouping of tar members into samples, with the per-sample checks and byte budget."""

    def __init__(self, shard_url: str, sample_bytes: int) -> None:
        self.shard_url = shard_url
        self.sample_bytes = sample_bytes
        self.current: Sample | None = None
        self.current_key: str | None = None  # the key as tarfile decoded it (Sample.key is its printable form)
        self.extensions: set[str] = set()  # lower-cased extensions of the current sample's members (O(1) duplicate check)
        self.held_bytes = 0  # the current sample's members and their headers
        self.over_budget = False
        self.seen_keys: set[str] = set()  # per shard only: detects a key whose members are not contiguous

    def finish(self) -> Iterator[Sample]:
        """The current sample, complete (structural checks done)."""
        if self.current is not None:
            check_structure(self.current)
            yield self.current
        self.current = None

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None) -> Iterator[Sample]:
        """Place one member (`data`: its unread file object, None unless regular); yields completed samples."""
        member_name = info.name
        if info.isdir() or _is_meta_member(member_name):
            return
        match = _KEY_AND_EXTENSION.match(member_name)
        if match is None:
            # WebDataset ignores such a member; we report it under its own name so nothing goes unnoticed.
            yield from self.finish()
            name = printable(member_name)
            yield Sample(key=name, shard=self.shard_url, error=short_reason(f"member {name!r} has no extension, so it belongs to no WebDataset sample"))
            return
        key, extension = match.group(1), match.group(2)
        if self.current is None or key != self.current_key:
            yield from self.finish()
            self.current, self.current_key = Sample(key=printable(key), shard=self.shard_url), key
            self.extensions, self.held_bytes, self.over_budget = set(), 0, False
            if key in self.seen_keys:
                fail(self.current, f"key {self.current.key!r} reappears after other keys; WebDataset reads its later members as a second sample")
            self.seen_keys.add(key)
        current = self.current
        unsafe = _unsafe_name_reason(member_name)
        if unsafe:
            fail(current, f"member name {printable(member_name)!r} {unsafe}, so the sample is never written")
        if extension.lower() in self.extensions:
            fail(current, f"member {member_name!r} appears twice in the sample")
            return
        if data is None:
            kind = "a symbolic link" if info.issym() else "a hard link" if info.islnk() else "not a regular file"
            fail(current, f"member {member_name!r} is {kind}")
            return
        self.held_bytes += info.size + TAR_HEADER_BYTES
        if self.over_budget or self.held_bytes > self.sample_bytes:
            if not self.over_budget:
                fail(current, f"the sample's members pass the {self.sample_bytes}-byte read limit at member {member_name!r}")
            self.over_budget = True  # this member and the rest of the sample are skipped unread
            return
        current.members[extension] = data.read()
        self.extensions.add(extension.lower())
