"""Picklable transforms for the decoding worker processes: one that refuses an image size, one whose process dies on it."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class RefusingTransform:
    """`inner`, except that an image of `size` raises ValueError("odd size")."""

    inner: Callable
    size: tuple[int, int]

    def __call__(self, image):
        if image.size == self.size:
            raise ValueError("odd size")
        return self.inner(image)


@dataclass(frozen=True)
class KillingTransform:
    """`inner`, except that an image of `size` kills the process applying it (as a decoder crash would)."""

    inner: Callable
    size: tuple[int, int]

    def __call__(self, image):
        if image.size == self.size:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(image)
