"""GPU sharing in Prefect's terms: one global concurrency limit per GPU, held by every task that runs on it.

A GPU is a limit named `gpu-{host}-{gpu}` (the GPU's id as nvidia-smi numbers it, through
CUDA_VISIBLE_DEVICES) with `GPU_LIMIT_SLOTS` slots, hundredths of the GPU. A task that holds
`num_gpus_per_worker = f` of a GPU occupies `floor(100 f)` of them, so at most floor(1/f) such tasks share
it, whichever flow runs, processes or workers they belong to; the UI's Concurrency page shows each GPU's
limit and how much of it is held.

The process-local bound (tasks/models/gpu.py `GPU_SLOTS`) comes first and alone keeps one process's
tasks within a GPU: a task takes this process's slot, then the GPU's limit. A missing limit is created by
the first task on that GPU in each process (`ensure_gpu_limit`), so the limits appear on a real server
without a setup step and a command-line run's local API needs none; a limit that exists is never
changed, so an operator may raise, lower or deactivate it. Without a GPU nothing is held.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

import torch

from tasks.models.gpu import GPU_SLOTS

GPU_LIMIT_SLOTS = 100  # one GPU's slots: hundredths of it


def gpu_id(index: int) -> str:
    """The id of this process's GPU `index` on its host (CUDA_VISIBLE_DEVICES maps process indices to host GPUs)."""
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    return visible[index] if index < len(visible) else str(index)


def gpu_limit_name(index: int) -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "host"
    return f"gpu-{host}-{re.sub(r'[^a-zA-Z0-9-]+', '-', gpu_id(index))}"


def gpu_limit_occupancy(num_gpus_per_worker: float) -> int:
    """Slots of a GPU's limit that a task holding `num_gpus_per_worker` of it occupies."""
    return max(1, math.floor(GPU_LIMIT_SLOTS * num_gpus_per_worker + 1e-9))


_ensured: set[str] = set()  # limits this process knows exist
_ensuring = threading.Lock()


def ensure_gpu_limit(name: str) -> None:
    """Create the GPU limit `name` unless it exists (asked once per process); an existing one is left as it is."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with _ensuring:
        if name in _ensured:
            return
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=GPU_LIMIT_SLOTS))
                except ObjectAlreadyExists:
                    pass  # another process on this host created it first
        _ensured.add(name)


def _gpu_limit(num_gpus_per_worker: float) -> Callable[[int], ContextManager[object]]:
    from prefect.concurrency.sync import concurrency

    def hold(index: int) -> ContextManager[object]:
        name = gpu_limit_name(index)
        ensure_gpu_limit(name)
        return concurrency(name, occupy=gpu_limit_occupancy(num_gpus_per_worker))

    return hold


@contextmanager
def hold_gpu(num_gpus_per_worker: float) -> Iterator[torch.device]:
    """This process's slot on the least-busy GPU and that GPU's limit on the Prefect server; yields the device."""
    with GPU_SLOTS.hold(num_gpus_per_worker, also=_gpu_limit(num_gpus_per_worker)) as device:
        yield device
