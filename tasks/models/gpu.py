"""GPU slots: how many GPU tasks may share one GPU, bounded in this process.

`num_gpus_per_worker = f` lets at most floor(1/f) GPU tasks hold the same GPU at once. Threads of one
worker are bounded here; Ray bounds its worker processes with its own `num_gpus` resource (see
flows/runners.py), and a GPU work pool runs one worker per GPU. Without a GPU nothing waits: GPU tasks
run on the CPU.

`NSFW_CURATOR_SIMULATED_GPUS=N` pretends N GPUs exist (work still runs on the CPU) so the bound can be
checked on any machine; `NSFW_CURATOR_GPU_JOURNAL=FILE` appends one line per slot use
(`device start end pid`) for measuring how many tasks shared a GPU.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch

SIMULATED_GPUS_ENV = "NSFW_CURATOR_SIMULATED_GPUS"
GPU_JOURNAL_ENV = "NSFW_CURATOR_GPU_JOURNAL"


def simulated_gpu_count() -> int:
    return int(os.environ.get(SIMULATED_GPUS_ENV, "0") or 0)


def gpu_count() -> int:
    """GPUs this process may use (simulated ones included)."""
    return simulated_gpu_count() or (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def slots_per_gpu(num_gpus_per_worker: float) -> int:
    """floor(1 / f): how many GPU tasks share one GPU."""
    assert 0 < num_gpus_per_worker <= 1, "num_gpus_per_worker is validated as a fraction in (0, 1]"
    return max(1, math.floor(1 / num_gpus_per_worker + 1e-9))


class GpuSlots:
    """Process-wide slot accounting: a task holds one slot of one GPU while it runs."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._active: dict[int, int] = {}

    def __reduce__(self):
        # Shipped to another process (Ray pickles task code by value), it becomes that process's own slots.
        return (process_gpu_slots, ())

    @contextmanager
    def hold(self, num_gpus_per_worker: float, also: Callable[[int], ContextManager[object]] | None = None) -> Iterator[torch.device]:
        """Wait for a free slot on the least-busy GPU and yield its device (the CPU when there is no GPU).

        `also(index)`, when given, is entered once this process's slot on GPU `index` is taken and held with it
        (flows/gpu_limits.py: the GPU's limit shared with other processes).
        """
        devices = gpu_count()
        if devices == 0:
            yield torch.device("cpu")
            return
        limit = slots_per_gpu(num_gpus_per_worker)
        with self._condition:
            while True:
                index = min(range(devices), key=lambda i: self._active.get(i, 0))
                if self._active.get(index, 0) < limit:
                    break
                self._condition.wait()
            self._active[index] = self._active.get(index, 0) + 1
        try:
            with also(index) if also is not None else nullcontext():
                start = time.time()
                try:
                    yield torch.device("cpu") if simulated_gpu_count() else torch.device("cuda", index)
                finally:
                    end = time.time()
                    journal = os.environ.get(GPU_JOURNAL_ENV)
                    if journal:
                        with open(journal, "a") as handle:
                            handle.write(f"{index} {start:.6f} {end:.6f} {os.getpid()}\n")
        finally:
            with self._condition:
                self._active[index] -= 1
                self._condition.notify_all()


GPU_SLOTS = GpuSlots()


def process_gpu_slots() -> GpuSlots:
    return GPU_SLOTS


def max_overlap(journal_lines: list[str]) -> dict[int, int]:
    """The most slot uses that overlapped in time on each GPU, from journal lines."""
    events: dict[int, list[tuple[float, int]]] = {}
    for line in journal_lines:
        device, start, end, _pid = line.split()
        events.setdefault(int(device), []).extend([(float(start), 1), (float(end), -1)])
    peaks = {}
    for device, marks in events.items():
        current = peak = 0
        for _, delta in sorted(marks, key=lambda m: (m[0], m[1])):  # ends before starts at equal times
            current += delta
            peak = max(peak, current)
        peaks[device] = peak
    return peaks
