"""A process-wide request to stop: set when a run is interrupted (Ctrl-C, SIGTERM), checked between batches.

Contract: `request_stop()` is called once the run is being abandoned; every background loop of a run
(tar reading and decoding, preprocessing, embedding) calls `raise_if_stopped()` before its next batch or
shard, so its thread ends within one batch instead of finishing the partition. `RunStopped` derives from
BaseException like KeyboardInterrupt: a task that sees it ends as crashed, is never retried, and nothing
it had not finished is written (outputs are atomic, so a re-run redoes exactly the unfinished partitions).
`clear_stop()` is called when a new run starts in the same process (a notebook after Ctrl-C).
"""

from __future__ import annotations

import threading

_STOP = threading.Event()


class RunStopped(BaseException):
    """The run was interrupted; raised in background work so it ends at the next batch."""


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def raise_if_stopped() -> None:
    if _STOP.is_set():
        raise RunStopped("the run was interrupted")
