"""Worker processes that decode images and apply the model's transform, outside the interpreter lock.

Threads share one interpreter lock: the tar reader, the batch assembler, the model's own thread and every
decoding thread take turns holding it between Pillow's and torch's lock-free stretches, so a thread pool's
rate stops growing with cores (measured in benchmarks/README.md, "Host pipeline"). Here each worker is a
process with its own interpreter and one torch thread: it receives a sample's raw members, checks and
decodes the image, hashes it (MD5 and SHA-1 of its bytes, PDQ of its pixels: tasks/io/decode.py `hash_sample`),
applies the transform and sends back only its output (a numpy array: for the embedding stage the uint8 crop of
tasks/models/bounded_transform.py `pixel_step`, a quarter of the float model input's bytes), caption, metadata,
hashes and error.

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
- Decoding one image is bounded in time: a worker has `DecodeOptions.decode_deadline_s` (tasks/io/decode.py)
  to check, decode and transform a sample. Each worker writes what it decodes and until when into memory
  shared with its pool, whose watchdog thread looks every `_WATCH_INTERVAL_S` and kills a worker past its
  deadline: that sample gets `DEADLINE_REASON`, the pool is replaced, and every other sample the pool lost
  (not at fault) is decoded again in the new one. Threads cannot be killed, so decoding in threads has no
  deadline (the header limits of tasks/io/decode.py, the JPEG scan count among them, still apply there).
- Workers die with their parent: on Linux the forkserver and every worker ask the kernel for SIGKILL when
  their parent ends (PR_SET_PDEATHSIG), so after Ctrl-C, SIGTERM or `kill -9` no decoder is left running,
  and multiprocessing's resource tracker ends as well once they are gone (it exits when its pipe closes).
  The kernel sends that signal when the *thread* that started the process ends, so the forkserver is
  started from a thread that lives as long as this process. A stop request (tasks/stop.py) kills the
  workers at once: a run being stopped does not wait for a long decode.
- Workers ignore SIGINT: the parent decides what a stop request means (tasks/stop.py).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import itertools
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import queue
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tasks.io.decode import DecodeOptions, decode_and_transform, open_sample_image
from tasks.io.samples import ImageHashes, Sample
from tasks.stop import on_stop, raise_if_stopped

CRASH_REASON = "the image decoder's process died while decoding image {name!r} (a decoder crash or out of memory)"
DEADLINE_REASON = "decoding image {name!r} took over the {seconds:g}-second limit per image, so its decoder process was stopped"
# Decoding alone again, in a fresh pool, a sample whose worker died with others in flight.
_ATTEMPTS_ALONE = 1
# How often a pool's watchdog reads its workers' deadlines: a deadline is overrun by at most this much.
_WATCH_INTERVAL_S = 0.1

# Imported by the forkserver when this process has imported them: a model's transform comes from these.
_PRELOAD = ("torch", "torchvision.transforms", "open_clip")

# A worker's slot in its pool's shared memory: its pid, the task it decodes, the monotonic time it must be done by (0: idle).
_SLOT_PID, _SLOT_TASK, _SLOT_DEADLINE = range(3)
_SLOT_FIELDS = 3
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_pools: dict[int, "_DecodePool"] = {}
_pools_lock = threading.Lock()
_live_pools: "weakref.WeakSet[_DecodePool]" = weakref.WeakSet()  # shared and alone pools, for a stop to end their workers
_task_ids = itertools.count(1)
_worker_transforms: dict[str, Callable] = {}
_loadable: dict[tuple[int, str], bool] = {}

# In a worker: its slot in the pool's shared memory (None when it has none).
_slots: "ctypes.Array[ctypes.c_double] | None" = None
_slot_base: int | None = None


def _die_with_parent(expected_parent: int | None) -> None:
    """On Linux, have the kernel SIGKILL this process when its parent ends; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent ended before the request took effect: nobody is left to send work


def _in_forkserver() -> bool:
    """Whether this module is being imported by multiprocessing's forkserver (as one of its preload modules)."""
    server_main, serving_worker = multiprocessing.forkserver.main.__code__, multiprocessing.forkserver._serve_one.__code__
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is serving_worker:
            return False  # a worker forked from the server (it runs inside the server's frames)
        if frame.f_code is server_main:
            return True
        frame = frame.f_back
    return False


# The forkserver imports this module before it forks any worker: it ends with the process that started it,
# and its workers (which inherit this value) check that their parent is still this server.
_FORKSERVER_PID: int | None = None
if _in_forkserver():
    _FORKSERVER_PID = os.getpid()
    _die_with_parent(None)


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

    model_input: np.ndarray | None  # the transform's output (the embedding stage's uint8 crop [3, H, W])
    tensor: bool  # model_input was a torch tensor (sent as numpy, made a tensor again without a copy)
    caption: str | None
    metadata: dict | None
    error: str | None
    image_hashes: ImageHashes | None  # None also when the worker died or ran out of time (the parent hashes the bytes then)


def _start_worker(slots: "ctypes.Array[ctypes.c_double]", claimed: "multiprocessing.sharedctypes.Synchronized") -> None:
    _die_with_parent(_FORKSERVER_PID)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _slots, _slot_base
    with claimed.get_lock():
        index = claimed.value
        claimed.value += 1
    if index < len(slots) // _SLOT_FIELDS:  # a pool never runs more workers than slots; without one, no deadline
        _slots, _slot_base = slots, index * _SLOT_FIELDS
        slots[_slot_base + _SLOT_PID] = os.getpid()
    try:
        import torch

        torch.set_num_threads(1)  # one process per core: a thread team per worker would only compete
    except ImportError:
        pass
    # The same for numpy's BLAS (PDQ's filter bands are matrix products): one thread per worker process.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def _transform_of(transform: WorkerTransform) -> Callable:
    found = _worker_transforms.get(transform.digest)
    if found is None:
        found = _worker_transforms[transform.digest] = pickle.loads(transform.data)  # the parent's own transform, not stored data
    return found


def decode_in_worker(task: int, key: str, shard: str, members: dict[str, bytes], options: DecodeOptions, transform: WorkerTransform) -> WorkerResult:
    """In a worker: the sample's image checked, decoded and transformed, as `iter_batches` does in a thread, within its deadline."""
    if _slots is not None:
        _slots[_slot_base + _SLOT_TASK] = task  # the task first: the watchdog reads the deadline as this task's
        _slots[_slot_base + _SLOT_DEADLINE] = time.monotonic() + options.decode_deadline_s
    try:
        sample = Sample(key=key, shard=shard, members=members)
        # a refused header still gets its bytes hashed here, in parallel
        decode_and_transform(sample, open_sample_image(sample, options), _transform_of(transform))
    finally:
        if _slots is not None:
            _slots[_slot_base + _SLOT_DEADLINE] = 0.0
    model_input, tensor = sample.model_input, False
    if model_input is not None and type(model_input).__module__.startswith("torch"):
        model_input, tensor = model_input.numpy(), True
    return WorkerResult(model_input, tensor, sample.caption, sample.metadata, sample.error, sample.image_hashes)


def _load_transform(transform: WorkerTransform) -> bool:
    _transform_of(transform)
    return True


# --- the forkserver's parent thread ---

_server_requests: "queue.SimpleQueue[Future]" = queue.SimpleQueue()
_server_thread: threading.Thread | None = None
_server_thread_lock = threading.Lock()


def _keep_forkserver() -> None:
    """Start the forkserver when asked, from this thread alone: it never ends, so the server's PR_SET_PDEATHSIG fires
    only when this process does."""
    while True:
        started = _server_requests.get()
        try:
            multiprocessing.forkserver.ensure_running()
            started.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asked
            started.set_exception(exc)


def _ensure_forkserver() -> None:
    """The forkserver running (started, or restarted after it died, by `_keep_forkserver`'s thread)."""
    global _server_thread
    with _server_thread_lock:
        if _server_thread is None:
            _server_thread = threading.Thread(target=_keep_forkserver, name="forkserver-parent", daemon=True)
            _server_thread.start()
    started: Future = Future()
    _server_requests.put(started)
    started.result()


def _context() -> multiprocessing.context.BaseContext:
    """`forkserver`, its server importing what the workers need and this process already uses, so each worker
    starts without importing them and shares their pages."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "tasks.io.decode", *(name for name in _PRELOAD if name in sys.modules)])
    return context


# --- pools and their watchdogs ---


class _DecodePool:
    """A process pool of `workers` decoders, the shared memory they report their deadlines in, and its watchdog."""

    def __init__(self, workers: int) -> None:
        context = _context()
        _ensure_forkserver()
        self.workers = workers
        self.slots = context.RawArray(ctypes.c_double, _SLOT_FIELDS * workers)
        claimed = context.Value(ctypes.c_int, 0)
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(self.slots, claimed))
        self.lock = threading.Lock()
        self.overdue: set[int] = set()  # tasks whose worker the watchdog killed past their deadline
        self.decodings: dict[int, Decoding] = {}  # submitted here and not decoded yet: what a broken pool must hand on
        self.closed = threading.Event()
        _live_pools.add(self)
        threading.Thread(target=self._watch, name="decode-deadline", daemon=True).start()

    @property
    def broken(self) -> bool:
        return bool(getattr(self.executor, "_broken", False))

    def pids(self) -> list[int]:
        return list(getattr(self.executor, "_processes", None) or {})

    def _runs(self, pid: int) -> bool:
        return pid in (getattr(self.executor, "_processes", None) or {})  # one lookup: the pool's manager thread edits it

    def _watch(self) -> None:
        while not self.closed.wait(_WATCH_INTERVAL_S) and not self.broken:
            now = time.monotonic()
            for base in range(0, len(self.slots), _SLOT_FIELDS):
                task = self.slots[base + _SLOT_TASK]
                deadline = self.slots[base + _SLOT_DEADLINE]
                # read the task again: a worker that moved on to another task meanwhile is not that one overdue
                if not deadline or now < deadline or self.slots[base + _SLOT_TASK] != task:
                    continue
                pid = int(self.slots[base + _SLOT_PID])
                if self._runs(pid):
                    self.overdue.add(int(task))
                    _kill(pid)

    def kill_workers(self) -> None:
        """End every worker now (the pool breaks: its samples' futures fail)."""
        self.closed.set()
        for pid in self.pids():
            _kill(pid)

    def shutdown(self, wait: bool = True) -> None:
        self.closed.set()
        # Never cancel this pool's futures (see `Decoding.cancel`): what is queued is a few batches at most.
        self.executor.shutdown(wait=wait, cancel_futures=False)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass  # it has just ended


def decode_pool(workers: int) -> _DecodePool:
    """This process's pool of `workers` decoding processes (started on first use, replaced once broken)."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None or pool.broken:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _pools[workers] = _DecodePool(workers)
        return pool


def _lost_with_its_pool(future: Future) -> bool:
    return future.done() and not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)


class Decoding:
    """One sample being decoded by the worker processes: its current future and what resubmitting it takes."""

    def __init__(self, workers: int, key: str, shard: str, members: dict[str, bytes], options: DecodeOptions, transform: WorkerTransform) -> None:
        self.task = next(_task_ids)
        self.workers = workers
        self.arguments = (key, shard, members, options, transform)
        self.cancelled = False
        self.pool: _DecodePool | None = None
        self.future: Future | None = None

    def start(self, pool: _DecodePool, shared: bool = True) -> None:
        """Submit it to `pool`; a broken shared pool is replaced for as long as submitting fails for that (not its fault)."""
        while True:
            raise_if_stopped()  # no new workers for a run being stopped
            with pool.lock:
                pool.decodings[self.task] = self
            try:
                future = pool.executor.submit(decode_in_worker, self.task, *self.arguments)
            except BrokenProcessPool:
                with pool.lock:
                    pool.decodings.pop(self.task, None)
                if not shared:
                    raise
                pool = decode_pool(self.workers)
                continue
            self.pool, self.future = pool, future
            future.add_done_callback(self._finished)
            return

    def _finished(self, future: Future) -> None:
        if not _lost_with_its_pool(future):  # a lost one stays listed for the pool's survivors to be resubmitted
            pool = self.pool
            if pool is not None:
                with pool.lock:
                    if pool.decodings.get(self.task) is self:
                        del pool.decodings[self.task]

    def done(self) -> bool:
        """Decoded for good (a sample lost with its pool is decoded again)."""
        return self.future is not None and self.future.done() and not _lost_with_its_pool(self.future)

    def cancel(self) -> None:
        """Drop it: nobody waits for its result, and a pool that breaks later does not hand it on.

        Its future is left to finish rather than cancelled. Python 3.11's process pool fails in its manager
        thread when it breaks (a stop, a deadline or the OOM killer ends a worker) while a cancelled future is
        still queued (fixed in 3.12): that thread's traceback is printed and the futures queued after the
        cancelled one are never finished. What runs on instead is bounded by the reader's window (a few
        batches), and a stop kills the workers anyway.
        """
        self.cancelled = True
        if self.pool is not None:
            with self.pool.lock:
                self.pool.decodings.pop(self.task, None)


def _resubmit_survivors(pool: _DecodePool) -> None:
    """The samples a pool killed for another sample's deadline lost, submitted again to the shared pool."""
    with pool.lock:
        # only those whose current future is this pool's: one being submitted elsewhere is listed before it has one
        lost = [decoding for task, decoding in pool.decodings.items()
                if task not in pool.overdue and not decoding.cancelled and decoding.pool is pool and _lost_with_its_pool(decoding.future)]
        for decoding in lost:
            del pool.decodings[decoding.task]
    for decoding in lost:
        decoding.start(decode_pool(decoding.workers))


def workers_can_load(workers: int, transform: WorkerTransform) -> bool:
    """Whether the workers can unpickle the transform (one defined in a notebook or a script's `__main__`
    cannot be found there); asked once per pool and transform."""
    key = (workers, transform.digest)
    if key not in _loadable:
        try:
            _loadable[key] = bool(decode_pool(workers).executor.submit(_load_transform, transform).result())
        except BrokenProcessPool:
            raise_if_stopped()  # workers killed by a stop say nothing about the transform
            _loadable[key] = False
        except Exception:  # noqa: BLE001 - any failure to load it there means: decode in threads
            _loadable[key] = False
    return _loadable[key]


def submit(workers: int, key: str, shard: str, members: dict[str, bytes], options: DecodeOptions, transform: WorkerTransform) -> Decoding:
    decoding = Decoding(workers, key, shard, members, options, transform)
    decoding.start(decode_pool(workers))
    return decoding


def _over_deadline(options: DecodeOptions, image_name: str) -> WorkerResult:
    return WorkerResult(None, False, None, None, DEADLINE_REASON.format(name=image_name, seconds=options.decode_deadline_s), None)


def result_of(decoding: Decoding, workers: int, key: str, shard: str, members: dict[str, bytes], options: DecodeOptions, transform: WorkerTransform,
              image_name: str) -> WorkerResult:
    """The decoding's result: the deadline's error when its worker was killed for it; decoded again in the new pool
    when another sample's deadline ended the pool; decoded alone when its worker died (see the module docstring)."""
    while True:
        assert decoding.future is not None and decoding.pool is not None
        try:
            return decoding.future.result()
        except BrokenProcessPool:
            raise_if_stopped()  # workers killed by a stop are not a sample's fault
        pool = decoding.pool
        if decoding.task in pool.overdue:
            return _over_deadline(options, image_name)
        if not pool.overdue:
            break  # the worker died by itself
        _resubmit_survivors(pool)  # this sample among them: wait for it again
    for _ in range(_ATTEMPTS_ALONE):
        alone_pool = _DecodePool(1)
        alone = Decoding(1, key, shard, members, options, transform)
        try:
            alone.start(alone_pool, shared=False)
            return alone.future.result()
        except BrokenProcessPool:
            raise_if_stopped()
            if alone.task in alone_pool.overdue:
                return _over_deadline(options, image_name)
            continue
        finally:
            alone_pool.shutdown(wait=True)
    return WorkerResult(None, False, None, None, CRASH_REASON.format(name=image_name), None)


def shutdown_pools() -> None:
    """Stop every decoding process of this process (also done at exit)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True)


def worker_pids() -> list[int]:
    """Process ids of the live decoding workers (for benchmarks that count their CPU time)."""
    with _pools_lock:
        return [pid for pool in _pools.values() for pid in pool.pids()]


def _kill_workers_on_stop() -> None:
    for pool in list(_live_pools):
        pool.kill_workers()


on_stop(_kill_workers_on_stop)
atexit.register(shutdown_pools)
