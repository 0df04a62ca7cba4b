"""Compute helpers of the near-duplicate search: CPU threads, an ordered parallel map, union-find, exact cosine."""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")

# Tasks submitted ahead of the one being consumed, per worker: bounds the results waiting in memory.
_LOOKAHEAD_PER_WORKER = 2
# Results of a parallel map between two returns of freed heap memory to the operating system.
_RESULTS_PER_TRIM = 32


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS; a no-op off glibc.

    glibc keeps the pages of freed multi-megabyte temporaries (block products, gathered rows) in its
    arenas, so without this the resident size of a long search creeps up by gigabytes it does not use.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def cpu_threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's CPU operators on `count` threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def all_cpu_threads() -> Iterator[None]:
    """Let torch use every CPU this process may run on (it defaults to physical cores)."""
    with torch_threads(max(torch.get_num_threads(), cpu_threads())):
        yield


def parallel_map(function: Callable[[T], R], items: Iterable[T], device: torch.device) -> Iterator[R]:
    """`map` in order; on CPU over one single-threaded worker per core, a few tasks ahead of the consumer.

    Independent workers keep every core busy on small products, and on a machine shared with other
    processes a worker that loses its core does not hold the others up as a parallel region would.
    """
    if device.type != "cpu":
        yield from map(function, items)
        return
    workers = max(torch.get_num_threads(), cpu_threads())
    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        remaining = iter(items)
        for item in remaining:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers * _LOOKAHEAD_PER_WORKER:
                break
        done = 0
        while pending:
            result = pending.popleft().result()
            for item in remaining:
                pending.append(pool.submit(function, item))
                break
            done += 1
            if done % _RESULTS_PER_TRIM == 0:
                release_freed_memory()
            yield result
    release_freed_memory()


class UnionFind:
    """Vectorised union-find over 0..size-1; every root is the smallest member of its component."""

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size, dtype=np.int64)

    def find(self, nodes: np.ndarray) -> np.ndarray:
        roots = self.parent[nodes]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[nodes] = roots
        return roots

    def union(self, first: np.ndarray, second: np.ndarray) -> None:
        while first.size:
            first_root, second_root = self.find(first), self.find(second)
            apart = first_root != second_root
            first, second = first[apart], second[apart]
            if not first.size:
                return
            low = np.minimum(first_root[apart], second_root[apart])
            high = np.maximum(first_root[apart], second_root[apart])
            # hook the larger root under the smaller; of several hooks on one root the smallest wins
            np.minimum.at(self.parent, high, low)

    def union_edges(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Union the pairs like `union`, and return the indices of the pairs that joined two components: a
        spanning forest of the pairs (one pair fewer than members per component they made)."""
        pending = np.arange(first.shape[0], dtype=np.int64)
        joined: list[np.ndarray] = []
        while pending.size:
            first_root, second_root = self.find(first[pending]), self.find(second[pending])
            apart = first_root != second_root
            pending, first_root, second_root = pending[apart], first_root[apart], second_root[apart]
            if not pending.size:
                break
            low, high = np.minimum(first_root, second_root), np.maximum(first_root, second_root)
            # each root hooks under the smallest root it is paired with, through one of those pairs; every
            # hook goes to a smaller root, so the hooks of a round make no cycle and each joins two components
            order = np.lexsort((low, high))
            chosen = order[np.r_[True, high[order][1:] != high[order][:-1]]]
            self.parent[high[chosen]] = low[chosen]
            joined.append(pending[chosen])
        return np.concatenate(joined) if joined else np.zeros(0, dtype=np.int64)

    def roots(self) -> np.ndarray:
        parent = self.parent
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        self.parent = parent
        return parent


def cosine_rows(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosine of float64 rows as x.y / sqrt(x.x * y.y), clipped to [-1, 1].

    Symmetric, and exactly 1 for a row and any power-of-two multiple of it (sqrt(a*a) == a in IEEE).
    """
    dot = np.einsum("ij,ij->i", left, right)
    scale = np.sqrt(np.einsum("ij,ij->i", left, left) * np.einsum("ij,ij->i", right, right))
    return np.clip(dot / scale, -1.0, 1.0)
