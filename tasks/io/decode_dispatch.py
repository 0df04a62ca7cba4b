"""Where `iter_batches` decodes each sample: in worker processes, in a thread pool, or not at all.

One `BatchDecoder` serves one reading. `check` runs where batches are assembled: it opens the image's header
(tasks/io/decode.py) there when threads decode, or leaves it to the worker process, and predicts the bytes
the sample will hold (tasks/io/limits.py). `submit` hands the sample on and returns its batch entry;
`finished` waits for that entry's decoded sample. The workers are processes (tasks/io/decode_workers.py)
when a decoding `transform` is picklable, loadable there, and more than one worker is asked for, unless
`worker_processes=False`; otherwise threads. `close` stops the threads and drops this reading's samples still
in worker processes (the shared process pool stays).

Every sample of a decoding reading comes out with its `image_hashes` (tasks/io/decode.py `hash_sample`): computed
by the thread or worker process that decodes it, with the PDQ of the pixels it decoded; here, from the bytes
alone, for a sample no worker decodes (refused before decoding) or whose worker died or ran out of time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.io import decode_workers
from tasks.io.decode import DecodeOptions, decode_and_transform, hash_sample, open_sample_image
from tasks.io.limits import held_bytes, transform_output_bytes
from tasks.io.samples import Sample, fail, image_extension


@dataclass
class _InWorker:
    """A sample being decoded and transformed in a worker process."""

    sample: Sample
    future: decode_workers.Decoding


# A batch entry: a sample needing no decoding, one decoding in a thread, or one decoding in a worker process.
PendingSample = Sample | Future | _InWorker


@dataclass(frozen=True)
class CheckedSample:
    """A sample ready to take its place in a batch: its opened image (threads only), whether it is decoded, its bytes."""

    sample: Sample
    opened: Image.Image | None
    decoding: bool
    held_bytes: int


class BatchDecoder:
    """The decoding of one `iter_batches` reading (see the module docstring)."""

    def __init__(self, decode: DecodeOptions | None, transform: Callable[[Image.Image], object] | None, workers: int,
                 worker_processes: bool) -> None:
        self.decode = decode
        self.transform = transform
        self.workers = workers
        self.in_processes: decode_workers.WorkerTransform | None = None
        if decode is not None and transform is not None and worker_processes and workers > 1:
            in_processes = decode_workers.WorkerTransform.of(transform)
            if in_processes is not None and not decode_workers.workers_can_load(workers, in_processes):
                in_processes = None
            self.in_processes = in_processes
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if decode is not None and self.in_processes is None else None
        # A transformed sample holds what the transform made (the 150 KB uint8 crop at 224 px), sometimes more than its image did.
        self.input_bytes = transform_output_bytes(transform) if transform is not None and decode is not None else 0
        # samples handed to worker processes and not yet done (kept by the reader thread), dropped when reading stops early
        self.pending: deque[_InWorker] = deque()

    def check(self, sample: Sample) -> CheckedSample:
        """The sample with its header checked where threads decode it, and the bytes it will hold once decoded."""
        if self.in_processes is not None:
            # the worker checks the header, and the decoded image lives and dies there: this process holds
            # the raw members and the model input only
            opened, decoding = None, sample.error is None and sample.key is not None
        else:
            opened = open_sample_image(sample, self.decode) if self.pool is not None else None
            decoding = opened is not None
        return CheckedSample(sample, opened, decoding, held_bytes(sample, opened) + (self.input_bytes if decoding else 0))

    def submit(self, checked: CheckedSample) -> PendingSample:
        """The sample's batch entry, its decoding started."""
        sample = checked.sample
        if not checked.decoding:
            return hash_sample(sample) if self.decode is not None else sample
        if self.in_processes is not None:
            entry = _InWorker(sample, decode_workers.submit(self.workers, sample.key, sample.shard, sample.members, self.decode, self.in_processes))
            while self.pending and self.pending[0].future.done():
                self.pending.popleft()
            self.pending.append(entry)
            return entry
        return self.pool.submit(decode_and_transform, sample, checked.opened, self.transform)

    def finished(self, entry: PendingSample) -> Sample:
        """The decoded sample behind a batch entry (waiting for its thread or worker process)."""
        if isinstance(entry, Sample):
            return entry
        if isinstance(entry, Future):
            return entry.result()
        sample = entry.sample
        decode, transform = self.decode, self.in_processes
        assert decode is not None and transform is not None and sample.key is not None
        image_ext = image_extension(sample.members)
        result = decode_workers.result_of(entry.future, self.workers, sample.key, sample.shard, sample.members, decode, transform,
                                          sample.member_name(image_ext) if image_ext is not None else sample.key)
        sample.caption, sample.metadata = result.caption, result.metadata
        sample.image_hashes = result.image_hashes
        if result.image_hashes is None:
            hash_sample(sample)  # its worker died or ran out of time: the bytes still match exact lists
        if result.error is not None:
            fail(sample, result.error)
        elif result.model_input is not None:
            sample.model_input = _as_tensor(result.model_input) if result.tensor else result.model_input
        return sample

    def close(self) -> None:
        """Stop the decoding threads; drop this reading's samples in worker processes (the shared worker pool stays)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for entry in list(self.pending):
            entry.future.cancel()


def _as_tensor(array: np.ndarray) -> object:
    import torch  # only samples a torch transform made reach here, so torch is already imported

    return torch.from_numpy(array)
