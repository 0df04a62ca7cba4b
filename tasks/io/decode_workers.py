"""Worker processes that decode images and apply the model's transform, outside the interpreter lock.

Threads share one interpreter lock: the tar reader, the batch assembler, the model's own thread and every
decoding thread take turns holding it between Pillow's and torch's lock-free stretches, so a thread pool's
rate stops growing with cores (measured in benchmarks/README.md, "Host pipeline"). Here each worker is a
process with its own interpreter and one torch thread: it receives a sample's raw members, checks and
decodes the image, applies the transform and sends back only the model input (a numpy array), caption,
metadata and error.

- One pool per worker count per process, started on first use and reused by every partition the process
  reads, through `forkserver`: forking a process that runs threads (Prefect's, the reader's) could copy a
  lock held by one of them. The server imports torch and open_clip once (when this process uses them),
  and workers forked from it share those pages.
- The transform must be picklable (open_clip's are) and importable by the workers; it is pickled once per
  reading and unpickled once per worker. `iter_batches` decodes in threads when it is not, or when asked
  for one worker.
- A worker that dies (a decoder crash, the kernel's OOM killer) costs only the sample it was decoding:
  every sample it took down with it is decoded again alone in a fresh pool, and the one that kills that
  pool too gets the error `CRASH_REASON`.
- Workers ignore SIGINT: the parent decides what a stop request means (tasks/stop.py).
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import pickle
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tasks.stop import raise_if_stopped

CRASH_REASON = "the image decoder's process died while decoding image {name!r} (a decoder crash or out of memory)"
# Decoding alone again, in a fresh pool, a sample whose worker died with others in flight.
_ATTEMPTS_ALONE = 1

# Imported by the forkserver when this process has imported them: a model's transform comes from these.
_PRELOAD = ("torch", "torchvision.transforms", "open_clip")

_pools: dict[int, ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()
_worker_transforms: dict[str, Callable] = {}
_loadable: dict[tuple[int, str], bool] = {}


@dataclass(frozen=True)
class WorkerTransform:
    """A transform as the workers receive it: pickled once, named by the digest of its bytes."""

    digest: str
    data: bytes

    @classmethod
    def of(cls, transform: Callable) -> "WorkerTransform | None":
        """The transform ready for the workers, or None when it cannot be pickled (a lambda, a closure)."""
        try:
            data = pickle.dumps(transform, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - anything unpicklable is decoded in threads instead
            return None
        return cls(hashlib.sha256(data).hexdigest(), data)


@dataclass(frozen=True)
class WorkerResult:
    """What a worker sends back for one sample (the raw members stay with the parent)."""

    model_input: np.ndarray | None
    tensor: bool  # model_input was a torch tensor (sent as numpy, made a tensor again without a copy)
    caption: str | None
    metadata: dict | None
    error: str | None


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        torch.set_num_threads(1)  # one process per core: a thread team per worker would only compete
    except ImportError:
        pass


def _transform_of(transform: WorkerTransform) -> Callable:
    found = _worker_transforms.get(transform.digest)
    if found is None:
        found = _worker_transforms[transform.digest] = pickle.loads(transform.data)  # the parent's own transform, not stored data
    return found


def decode_in_worker(key: str, shard: str, members: dict[str, bytes], options, transform: WorkerTransform) -> WorkerResult:
    """In a worker: the sample's image checked, decoded and transformed, as `iter_batches` does in a thread."""
    from tasks.io.read import Sample, _decode_and_transform, _open_sample_image

    sample = Sample(key=key, shard=shard, members=members)
    opened = _open_sample_image(sample, options)
    if opened is not None:
        _decode_and_transform(sample, opened, _transform_of(transform))
    model_input, tensor = sample.model_input, False
    if model_input is not None and type(model_input).__module__.startswith("torch"):
        model_input, tensor = model_input.numpy(), True
    return WorkerResult(model_input, tensor, sample.caption, sample.metadata, sample.error)


def _load_transform(transform: WorkerTransform) -> bool:
    _transform_of(transform)
    return True


def workers_can_load(workers: int, transform: WorkerTransform) -> bool:
    """Whether the workers can unpickle the transform (one defined in a notebook or a script's `__main__`
    cannot be found there); asked once per pool and transform."""
    key = (workers, transform.digest)
    if key not in _loadable:
        try:
            _loadable[key] = bool(decode_pool(workers).submit(_load_transform, transform).result())
        except Exception:  # noqa: BLE001 - any failure to load it there means: decode in threads
            _loadable[key] = False
    return _loadable[key]


def decode_pool(workers: int) -> ProcessPoolExecutor:
    """This process's pool of `workers` decoding processes (started on first use, replaced once broken)."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None or getattr(pool, "_broken", False):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            pool = _pools[workers] = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_start_worker)
        return pool


def _context() -> multiprocessing.context.BaseContext:
    """`forkserver`, its server importing what the workers need and this process already uses, so each worker
    starts without importing them and shares their pages."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "tasks.io.read", *(name for name in _PRELOAD if name in sys.modules)])
    return context


def submit(workers: int, key: str, shard: str, members: dict[str, bytes], options, transform: WorkerTransform) -> Future:
    return decode_pool(workers).submit(decode_in_worker, key, shard, members, options, transform)


def result_of(future: Future, workers: int, key: str, shard: str, members: dict[str, bytes], options, transform: WorkerTransform,
              image_name: str) -> WorkerResult:
    """The future's result; when its worker died, the sample decoded alone in a fresh pool (see the module docstring)."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise_if_stopped()  # workers killed by a stop are not a sample's fault
    for _ in range(_ATTEMPTS_ALONE):
        alone = ProcessPoolExecutor(1, mp_context=_context(), initializer=_start_worker)
        try:
            return alone.submit(decode_in_worker, key, shard, members, options, transform).result()
        except BrokenProcessPool:
            continue
        finally:
            alone.shutdown(wait=True, cancel_futures=True)
    return WorkerResult(None, False, None, None, CRASH_REASON.format(name=image_name))


def shutdown_pools() -> None:
    """Stop every decoding process of this process (also done at exit)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def worker_pids() -> list[int]:
    """Process ids of the live decoding workers (for benchmarks that count their CPU time)."""
    with _pools_lock:
        return [pid for pool in _pools.values() for pid in (getattr(pool, "_processes", None) or {})]


atexit.register(shutdown_pools)
