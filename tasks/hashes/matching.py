"""A run's hash lists, resolved once, and the matching of a store entry's image hashes against them.

`plan_hash_lists(urls, pdq_max_distance, storage_options)` reads and validates every list before any task starts
(tasks/hashes/lists.py: a bad line is one sentence naming the file and line) and keeps only their locations and
the fingerprint of their content: the plan a task receives stays small however long the lists are. Each process
that matches reads the lists once (`loaded_matcher`), checks they still have that fingerprint, and builds one PDQ
index per list (tasks/hashes/pdq_index.py).

`HashMatcher.match(hashes)` gives, per matched row of an entry, its one `HashMatch`: an exact MD5 or SHA-1 match
(distance 0) before any PDQ match, then the nearest PDQ hash; lists in name order. PDQ hashes below quality
50 are not matched. Nothing here logs, prints or returns a hash: a match names the list, the kind and the distance.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from tasks.errors import UserError
from tasks.hashes.lists import HashLists, read_hash_lists
from tasks.hashes.pdq_index import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_QUALITY, PDQIndex, match_pdq
from tasks.io.locations import Location

QUARANTINE_PREFIX = "hash:"  # `filtered_by` of a matched sample: "hash:{list file name}"


class EntryHashesLike(Protocol):
    """A store entry's hash columns (tasks/store/entries.py `entry_hashes`)."""

    md5: Sequence[str | None]
    sha1: Sequence[str | None]
    pdq: np.ndarray  # uint8 [N, 32]
    has_pdq: np.ndarray  # bool [N]
    pdq_quality: np.ndarray  # int [N]


@dataclass(frozen=True)
class HashListsPlan:
    """Where a run's lists are, the fingerprint of their content and the PDQ distance they are matched within."""

    locations: tuple[Location, ...]
    fingerprint: str
    pdq_max_distance: int = DEFAULT_MAX_DISTANCE

    def identity(self) -> dict[str, Any]:
        return {"lists": self.fingerprint, "pdq_max_distance": self.pdq_max_distance}

    def __repr__(self) -> str:
        return f"HashListsPlan({len(self.locations)} lists, {self.fingerprint[:12]}, pdq within {self.pdq_max_distance})"


@dataclass(frozen=True)
class HashMatch:
    """One matched row: which list, which kind of hash (md5, sha1, pdq) and the Hamming distance (0 for exact kinds)."""

    list_name: str
    kind: str
    distance: int

    @property
    def filtered_by(self) -> str:
        return f"{QUARANTINE_PREFIX}{self.list_name}"


def plan_hash_lists(urls: Sequence[str] | None, pdq_max_distance: int, storage_options: dict[str, Any]) -> HashListsPlan | None:
    """The run's lists read and checked once (UserError, one sentence, for anything wrong); None without lists."""
    if not urls:
        return None
    try:
        locations = tuple(Location(str(url), storage_options) for url in urls)
    except ValueError:
        raise UserError("a hash list URL carries credentials; put them in the run's storage options (a Prefect Secret block), not in the URL.") from None
    lists = read_hash_lists(locations)
    return HashListsPlan(locations, lists.fingerprint, int(pdq_max_distance))


class HashMatcher:
    """A run's lists, ready to match entries: exact sets and one PDQ index per list."""

    def __init__(self, lists: HashLists, pdq_max_distance: int = DEFAULT_MAX_DISTANCE) -> None:
        self.lists = lists
        self.pdq_max_distance = pdq_max_distance
        # Lists in name order, as their fingerprint takes them: the order they were given in changes no match.
        self._ordered = sorted(lists.lists, key=lambda hash_list: hash_list.name)
        self._indexes = [(hash_list.name, PDQIndex(hash_list.pdq)) for hash_list in self._ordered if len(hash_list.pdq)]

    def match(self, hashes: EntryHashesLike) -> dict[int, HashMatch]:
        """Row -> its match, for the rows of one entry that any list holds."""
        found: dict[int, HashMatch] = {}
        for row, (md5, sha1) in enumerate(zip(hashes.md5, hashes.sha1)):
            if md5 is None and sha1 is None:
                continue
            for hash_list in self._ordered:
                if md5 in hash_list.md5:
                    found[row] = HashMatch(hash_list.name, "md5", 0)
                    break
                if sha1 in hash_list.sha1:
                    found[row] = HashMatch(hash_list.name, "sha1", 0)
                    break
        rows = np.flatnonzero(np.asarray(hashes.has_pdq, dtype=bool))
        if not len(rows) or not self._indexes:
            return found
        pdq = np.ascontiguousarray(hashes.pdq[rows], dtype=np.uint8)
        qualities = np.asarray(hashes.pdq_quality)[rows].astype(np.int64)
        nearest: dict[int, HashMatch] = {}
        for name, index in self._indexes:
            for query_row, _, distance in match_pdq(index, pdq, qualities, self.pdq_max_distance, DEFAULT_MIN_QUALITY):
                row = int(rows[query_row])
                if row not in nearest or distance < nearest[row].distance:
                    nearest[row] = HashMatch(name, "pdq", int(distance))
        for row, match in nearest.items():
            found.setdefault(row, match)
        return found


_matcher_lock = threading.Lock()


def loaded_matcher(plan: HashListsPlan) -> HashMatcher:
    """The plan's lists read once per process (one build, however many partitions ask at once) and checked
    against the plan's fingerprint."""
    with _matcher_lock:
        return _built_matcher(plan)


@functools.lru_cache(maxsize=2)
def _built_matcher(plan: HashListsPlan) -> HashMatcher:
    lists = read_hash_lists(plan.locations)
    if lists.fingerprint != plan.fingerprint:
        raise RuntimeError("a hash list changed while the run was going; run again so every partition is matched against the same lists")
    return HashMatcher(lists, plan.pdq_max_distance)
