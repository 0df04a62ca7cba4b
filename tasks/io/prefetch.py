"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

Used by the reader (tar streaming and decoding ahead of the embedder) and by the embedder
(preprocessing ahead of inference). Memory stays bounded by `depth` items; an exception in the producer
is raised in the consumer; closing the consumer's iterator stops the producer and closes its source.
Once the run is interrupted (`tasks.stop`), both sides raise `RunStopped` before their next item.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

from tasks.stop import raise_if_stopped, stop_requested

T = TypeVar("T")

_END = object()


@dataclass
class _Failure:
    error: BaseException


def close_iterator(iterator: object) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def prefetched(items: Iterable[T], depth: int, name: str = "prefetch") -> Iterator[T]:
    """Yield `items` in order while a daemon thread produces up to `depth` of them in advance."""
    assert isinstance(depth, int) and depth >= 1, "depth counts items and must be >= 1"
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    return
                raise_if_stopped()
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer's thread and raised there
            put(_Failure(error))
        finally:
            close_iterator(iterator)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                raise_if_stopped()  # the producer may be busy with a long item
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            raise_if_stopped()
            yield item
    finally:
        stop.set()
        # An interrupted run does not wait on a producer stuck in a slow read: it is a daemon thread.
        worker.join(timeout=10 if stop_requested() else None)
