"""A process-wide request to stop: set when a run is interrupted (Ctrl-C, SIGTERM), checked between batches.

Contract: `request_stop()` is called once the run is being abandoned; every background loop of a run
(tar reading and decoding, preprocessing, embedding) calls `raise_if_stopped()` before its next batch or
shard, so its thread ends within one batch instead of finishing the partition. `RunStopped` derives from
BaseException like KeyboardInterrupt: a task that sees it ends as crashed, is never retried, and nothing
it had not finished is written (outputs are atomic, so a re-run redoes exactly the unfinished partitions).
Work that cannot look between batches (an image decoding in a worker process) registers `on_stop(callback)`:
the first `request_stop()` after a start or `clear_stop()` calls each callback once, in the requesting
thread, so they must be quick and not block (killing worker processes, for example).
`clear_stop()` is called when a new run starts in the same process (a notebook after Ctrl-C).
"""

from __future__ import annotations

import threading
from typing import Callable

_STOP = threading.Event()
_STOP_LOCK = threading.Lock()
_ON_STOP: list[Callable[[], None]] = []


class RunStopped(BaseException):
    """The run was interrupted; raised in background work so it ends at the next batch."""


def on_stop(callback: Callable[[], None]) -> None:
    """Call `callback` when a stop is requested (see the module docstring)."""
    with _STOP_LOCK:
        _ON_STOP.append(callback)


def request_stop() -> None:
    with _STOP_LOCK:
        if _STOP.is_set():
            return  # the callbacks ran for this stop already
        _STOP.set()
        callbacks = list(_ON_STOP)
    for callback in callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - a failing callback must not keep the others, or the stop, from happening
            pass


def clear_stop() -> None:
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def raise_if_stopped() -> None:
    if _STOP.is_set():
        raise RunStopped("the run was interrupted")
